"""Reading recorded statistics into ExpertStats: upstream `logical_count` files (.json/.pt, [L, E] or
[W, L, E]) or ours (.npz with source_counts [W, L, S, E] and optional coactivation [L-1, E, E])."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from tiersched.core.expert import ExpertStats
from tiersched.sim.moe_routing import load_logical_counts


def load_window(path: str) -> ExpertStats:
    """One file -> ExpertStats with W = 1 (upstream files: S = 1)."""
    if path.endswith(".npz"):
        data = np.load(path)
        counts = np.asarray(data["source_counts"], dtype=np.float64)
        if counts.ndim == 3:
            counts = counts[None]
        coact = np.asarray(data["coactivation"], dtype=np.float64) if "coactivation" in data else None
        return ExpertStats(source_counts=counts.sum(0, keepdims=True), coactivation=coact)
    return ExpertStats(source_counts=load_logical_counts(path)[None, :, None, :])


def load_windows(paths: Sequence[str]) -> ExpertStats:
    """Files in order (oldest first) -> ExpertStats with one window per file; sources must agree."""
    windows = [load_window(p) for p in paths]
    counts = np.concatenate([w.source_counts for w in windows], axis=0)
    coacts = [w.coactivation for w in windows if w.coactivation is not None]
    return ExpertStats(source_counts=counts, coactivation=np.sum(coacts, axis=0) if coacts else None)


def save_stats(path: str, stats: ExpertStats) -> None:
    arrays = {"source_counts": np.asarray(stats.source_counts)}
    if stats.coactivation is not None:
        arrays["coactivation"] = np.asarray(stats.coactivation)
    np.savez_compressed(path, **arrays)
