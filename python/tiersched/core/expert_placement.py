"""Expert tier: source-aware, dependency-aware, migration-stable, drift-robust expert placement.

CONTRACT (kept stable; the simulator, the EPLB adapter and `python -m tiersched.eplb` code against it).
Shapes follow upstream's `rebalance_experts` (sglang/srt/eplb/eplb_algorithms): L = MoE layers, E = logical
experts, P = physical slots (E + redundant), R = ranks (GPUs), P % R == 0, slot p lives on rank p // (P // R).
Arrays are numpy; the adapter converts to/from torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class ExpertStats:
    """Routing statistics over one or more recording windows.

    source_counts: float [W, L, S, E] -- tokens that source rank s routed to logical expert e at layer l, per
        window w (W >= 1, most recent last). Upstream's aggregate `logical_count` is the case S == 1.
    coactivation: optional float [L-1, E, E] -- (e at l, e' at l+1) pair counts (dense here; the recorder keeps
        it sparse/top-K and densifies for planning).
    """

    source_counts: np.ndarray
    coactivation: Optional[np.ndarray] = None


@dataclass(frozen=True)
class Placement:
    """phy2log int64 [L, P]; log2phy int64 [L, E, max_replicas] padded with -1; logcnt int64 [L, E]."""

    phy2log: np.ndarray
    log2phy: np.ndarray
    logcnt: np.ndarray


@dataclass(frozen=True)
class PlacementConfig:
    """Tunables of this tier: section [expert] of the TIERSCHED_CONFIG file (see tiersched.config).
    Every field has a default; validate() raises ValueError with one sentence saying what to fix."""

    def validate(self) -> None:
        pass
