"""A/B statistics for live runs: the tail quantile a sample size allows, ratios with bootstrap intervals, p-values.

Orientation is the one of tiersched.live.report: a ratio is > 1 when ours is better (`lower_is_better` metrics
such as latency: baseline ÷ ours; otherwise ours ÷ baseline).

Sample-size rule for tails: the project's one rule (tiersched.bench.stats.tail_percentile): P99 only where the
smaller arm has at least 1,000 samples, else P95. `tail_quantile(n)` applies it (None without a sample).

Intervals are percentile bootstraps. Per-request samples are resampled within each repeat (stratified), so a run
that was slow as a whole stays one run's worth of samples; per-run values are resampled by repeat index, paired
when both arms have the same number of repeats (runs alternate, so run i of each arm shared the machine's state).
The one-sided p-value of a per-request ratio is the share of bootstrap replicates at or below 1 (ours not better),
floored at 1 / (replicates + 1); per-request distributions also get a one-sided Mann-Whitney U test (ours lower).
Both treat requests as independent, so run-to-run variance (a whole run slowed by the machine) is not in them.
Per-run ratios get the exact one-sided sign-flip test of the paired log ratios (at least 1/2**n for n pairs;
None when not paired), which is.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

BOOTSTRAP_REPLICATES = 2000
CI_LEVEL = 0.95


def tail_quantile(n: int) -> float | None:
    """The tail quantile (percent) `n` samples per arm allow: 99 from 1,000, else 95; None for no sample."""
    from tiersched.bench.stats import tail_percentile

    return float(tail_percentile(n)) if n > 0 else None


def stat_name(q: float | None) -> str:
    return "mean" if q is None else ("median" if q == 50.0 else f"p{int(q)}")


def statistic(q: float | None) -> Callable[[np.ndarray], float]:
    """The mean (q None) or the q-th percentile of a 1-D array."""
    if q is None:
        return lambda x: float(np.mean(x))
    return lambda x: float(np.percentile(x, q))


def _clean(values) -> np.ndarray:
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    return arr


def _oriented(ours: float, base: float, lower_is_better: bool) -> float | None:
    num, den = (base, ours) if lower_is_better else (ours, base)
    if den == 0:
        return 1.0 if num == 0 else None
    return num / den


def _summary(point: float | None, reps: np.ndarray, **extra) -> dict | None:
    if point is None:
        return None
    reps = reps[np.isfinite(reps)]
    out = {"ratio": round(point, 4)}
    if len(reps):
        lo, hi = np.percentile(reps, [50 * (1 - CI_LEVEL), 100 - 50 * (1 - CI_LEVEL)])
        out["ci95"] = [round(float(lo), 4), round(float(hi), 4)]
        out["p_value"] = round(max(float(np.mean(reps <= 1.0)), 1.0 / (len(reps) + 1)), 5)
    else:
        out["ci95"], out["p_value"] = None, None
    out.update(extra)
    return out


def request_ratio(ours: Sequence[Sequence[float]], base: Sequence[Sequence[float]], q: float | None = None,
                  lower_is_better: bool = True, replicates: int = BOOTSTRAP_REPLICATES, seed: int = 0) -> dict | None:
    """Ratio of a statistic (mean, or percentile `q`) of per-request samples, ours against a baseline.

    `ours`, `base`: one list of per-request values per repeat. Returns {'ratio', 'ci95': [lo, hi], 'p_value'
    (bootstrap, one-sided), 'mannwhitney_p' (one-sided: ours lower, or higher when not lower_is_better),
    'n_ours', 'n_base', 'ours', 'base'} or None when either side has no sample."""
    ours_runs = [_clean(r) for r in ours]
    base_runs = [_clean(r) for r in base]
    ours_runs = [r for r in ours_runs if len(r)]
    base_runs = [r for r in base_runs if len(r)]
    if not ours_runs or not base_runs:
        return None
    f = statistic(q)
    pooled_ours, pooled_base = np.concatenate(ours_runs), np.concatenate(base_runs)
    s_ours, s_base = f(pooled_ours), f(pooled_base)
    point = _oriented(s_ours, s_base, lower_is_better)
    rng = np.random.default_rng(seed)
    reps = np.empty(replicates)
    for i in range(replicates):
        a = f(np.concatenate([r[rng.integers(0, len(r), len(r))] for r in ours_runs]))
        b = f(np.concatenate([r[rng.integers(0, len(r), len(r))] for r in base_runs]))
        ratio = _oriented(a, b, lower_is_better)
        reps[i] = np.nan if ratio is None else ratio
    from scipy.stats import mannwhitneyu

    alternative = "less" if lower_is_better else "greater"
    mw = float(mannwhitneyu(pooled_ours, pooled_base, alternative=alternative).pvalue)
    return _summary(point, reps, mannwhitney_p=round(mw, 6), n_ours=int(len(pooled_ours)),
                    n_base=int(len(pooled_base)), ours=round(s_ours, 6), base=round(s_base, 6),
                    stat=stat_name(q))


def run_ratio(ours: Sequence[float | None], base: Sequence[float | None], lower_is_better: bool,
              replicates: int = BOOTSTRAP_REPLICATES, seed: int = 0) -> dict | None:
    """Ratio of the means over repeats of a per-run value (e.g. one run's mean TTFT), with a bootstrap over
    repeats (paired by index when both sides have as many finite values). {'ratio', 'ci95', 'p_value',
    'repeats', 'per_repeat' (paired ratios, when paired)} or None."""
    paired = len(ours) == len(base) and all(v is not None and math.isfinite(v) for v in (*ours, *base))
    a, b = _clean(ours), _clean(base)
    if not len(a) or not len(b):
        return None
    point = _oriented(float(a.mean()), float(b.mean()), lower_is_better)
    rng = np.random.default_rng(seed)
    reps = np.empty(replicates)
    for i in range(replicates):
        if paired:
            idx = rng.integers(0, len(a), len(a))
            ratio = _oriented(float(a[idx].mean()), float(b[idx].mean()), lower_is_better)
        else:
            ratio = _oriented(float(a[rng.integers(0, len(a), len(a))].mean()),
                              float(b[rng.integers(0, len(b), len(b))].mean()), lower_is_better)
        reps[i] = np.nan if ratio is None else ratio
    extra: dict = {"repeats": [int(len(a)), int(len(b))], "paired": paired}
    out = _summary(point, reps, **extra)
    if out is not None:
        # a bootstrap over 2-5 repeats reaches its floor whenever every pair agrees; the run-level p-value is
        # the exact sign-flip test of the paired log ratios instead (n pairs: at least 1 / 2**n)
        out["p_value"] = sign_flip_p([_oriented(x, y, lower_is_better) for x, y in zip(a, b)]) if paired else None
        if paired:
            out["per_repeat"] = [None if (r := _oriented(x, y, lower_is_better)) is None else round(r, 4)
                                 for x, y in zip(a, b)]
    return out


def sign_flip_p(ratios: Sequence[float | None]) -> float | None:
    """One-sided exact sign-flip (paired permutation) p-value that the mean log ratio is > 0 (ours better): the
    share of the 2**n sign assignments whose mean is at least the observed one."""
    logs = [math.log(r) for r in ratios if r is not None and r > 0]
    if len(logs) != len(ratios) or not logs or len(logs) > 16:
        return None
    observed = sum(logs)
    import itertools

    hits = sum(1 for signs in itertools.product((1, -1), repeat=len(logs))
               if sum(s * x for s, x in zip(signs, logs)) >= observed - 1e-12)
    return round(hits / 2 ** len(logs), 5)
