"""Statistics the benchmark reports share: the tail rule, bootstrap confidence intervals, headroom captured."""
from __future__ import annotations

import numpy as np

TAIL_MIN_SAMPLES = 1000  # P99 only where every arm has at least this many samples in every run
BOOTSTRAP_RESAMPLES = 4000
BOOTSTRAP_SEED = 20260101


def tail_percentile(min_samples: int) -> int:
    """99 where the smallest sample of any arm's run holds >= TAIL_MIN_SAMPLES values, else 95: a P99 of a hundred
    values is its largest one or two, which a rerun overturns."""
    return 99 if min_samples >= TAIL_MIN_SAMPLES else 95


def headroom(best: float | None, ours: float | None, bound: float | None) -> float | None:
    """Share of the gap between upstream-best and a lower bound that ours closes (1 = reaches the bound, 0 = no
    better than upstream-best, < 0 = worse); None where the bound leaves no gap."""
    if best is None or ours is None or bound is None or best - bound <= 0:
        return None
    return (best - ours) / (best - bound)


def bootstrap_ci(stat, arrays: list[np.ndarray], resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> list[float] | None:
    """95% percentile-bootstrap CI of `stat(*means)` where each mean is over the same resampled seeds of every
    array (arrays: one value per seed, paired by seed). None with fewer than 2 seeds or non-finite values."""
    arrays = [np.asarray(a, dtype=float) for a in arrays]
    n = len(arrays[0])
    if n < 2 or any(not np.all(np.isfinite(a)) for a in arrays):
        return None
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.asarray(stat(*[a[idx].mean(axis=1) for a in arrays]), dtype=float)
    values = values[np.isfinite(values)]
    if values.size < resamples // 2:
        return None
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]
