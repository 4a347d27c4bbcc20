"""Expert tier (EPLB): where each MoE expert's replicas live, knowing which DP rank sends tokens to which expert.

This module is the tier's interface and imports none of its submodules: the statistics a planner reads
(`ExpertStats`), the placement it returns (`Placement`), its tunables (`PlacementConfig`) and the pure helpers
every module shares. The planner entry point is `tiersched.core.expert.placement.rebalance`; its steps are
`estimate` -> `solver` (with `search` and `colocation`); `metrics` scores a placement.

Shapes follow upstream's `rebalance_experts` (sglang/srt/eplb/eplb_algorithms): L = MoE layers, E = logical
experts, P = physical slots (E + redundant), R = ranks (GPUs), P % R == 0, slot p lives on rank p // (P // R),
W = recorded windows, S = token sources. Arrays are numpy; the adapter converts to/from torch.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional

import numpy as np

__all__ = ["ExpertPlanner", "ExpertStats", "Placement", "PlacementConfig", "check_stats", "placement_from_phy2log",
           "trivial_placement"]


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
    Every field has a default; validate() raises ValueError with one sentence saying what to fix.
    The objective and the reasoning behind each knob are in docs/expert-tier.md."""

    alpha: float = 1.0  # weight of the peak rank load (normalised by the mean rank load)
    beta: float = 1.0  # weight of cross-rank/cross-node traffic (share of token-expert assignments)
    gamma: float = 0.5  # weight of migrated slots (share of slots whose expert changes)
    cross_node_weight: float = 1.0  # extra distance of a cross-node hop when no rank_distance is given
    window_half_life: float = 2.0  # windows; older windows weigh 2**(-age / half_life) in the estimate
    variance_weight: float = 1.0  # replicas are sized for mean + variance_weight * std of an expert's load
    prior_drift_sigma: float = 0.26  # assumed relative std of an expert's load between windows (DeepSeek-V3)
    worst_window_weight: float = 0.5  # balance term = mean over windows of peak + this * worst window's peak
    hot_slots_per_rank: int = 1  # the reduced assignment places the hottest hot_slots_per_rank * R replicas (0: off)
    local_search_iters: int = 100  # swap-improvement steps (each one swap per layer, all layers at once)
    candidate_ranks: int = 4  # a swap pairs the peak rank with one of this many least loaded ranks
    spread_weight: float = 0.05  # weight of the sum of squared rank loads (moves past ties in the peak)
    colocation_weight: float = 0.3  # weight of inter-layer co-location (only with coactivation statistics)
    colocation_iters: int = 30  # co-location swap steps (each one swap per layer, all layers at once)
    use_milp: bool = True  # False: skip the reduced assignment of the hottest replicas (greedy only)
    hot_solver: str = "assignment"  # "assignment" (scipy linear_sum_assignment) or "highs" (same optimum)
    solver_time_limit_s: float = 30.0  # safety net per HiGHS call; hitting it keeps the current placement
    keep_tolerance: float = 0.0  # keep a layer of prev when its objective is within this of the new plan

    def validate(self) -> None:
        for name in ("alpha", "beta", "gamma", "cross_node_weight", "variance_weight", "prior_drift_sigma",
                     "worst_window_weight", "keep_tolerance", "spread_weight", "colocation_weight"):
            value = getattr(self, name)
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"expert.{name} must be a finite number >= 0, got {value!r}.")
        if self.alpha == 0 and self.beta == 0:
            raise ValueError("expert.alpha and expert.beta are both 0; set at least one of them above 0.")
        if not self.window_half_life > 0:
            raise ValueError(f"expert.window_half_life must be > 0 windows, got {self.window_half_life!r}.")
        if self.hot_slots_per_rank < 0 or self.local_search_iters < 0 or self.colocation_iters < 0:
            raise ValueError("expert.hot_slots_per_rank, local_search_iters and colocation_iters must be >= 0.")
        if self.candidate_ranks < 1:
            raise ValueError(f"expert.candidate_ranks must be >= 1, got {self.candidate_ranks!r}.")
        if self.hot_solver not in ("assignment", "highs"):
            raise ValueError(f"expert.hot_solver must be 'assignment' or 'highs', got {self.hot_solver!r}.")
        if not self.solver_time_limit_s > 0:
            raise ValueError(f"expert.solver_time_limit_s must be > 0 seconds, got {self.solver_time_limit_s!r}.")


class ExpertPlanner(ABC):
    """A placement policy as a caller that triggers rebalances sees it (the simulator, every
    eplb_rebalance_steps forward steps): ours (tiersched.core.expert.placement.rebalance) or upstream's."""

    name: str  # the policy's registry name, shown in results

    @abstractmethod
    def plan(self, stats: ExpertStats, num_slots: int, num_gpus: int, num_nodes: int,
             current: Optional[Placement] = None) -> Placement:
        """The placement of num_slots physical slots over num_gpus GPUs in num_nodes nodes.

        stats.source_counts float [W, L, S, E] (S = the caller's token sources, e.g. DP ranks); current: the
        placement now in use (phy2log [L, num_slots]) or None. Returns phy2log [L, num_slots] with its
        log2phy and logcnt."""


def trivial_placement(num_layers: int, num_logical: int, num_physical: int) -> Placement:
    """Upstream's trivial layout (ExpertLocationMetadata.init_trivial + append_trivial_expert_slots):
    slot p holds expert p % E."""
    phy2log = np.tile(np.arange(num_physical, dtype=np.int64) % num_logical, (num_layers, 1))
    return placement_from_phy2log(phy2log, num_logical)


def placement_from_phy2log(phy2log: np.ndarray, num_logical: int) -> Placement:
    """Derive log2phy [L, E, max_replicas] (-1 padded, slots ascending) and logcnt [L, E] from phy2log [L, P]."""
    phy2log = np.asarray(phy2log, dtype=np.int64)
    num_layers, num_physical = phy2log.shape
    logcnt = np.zeros((num_layers, num_logical), dtype=np.int64)
    np.add.at(logcnt, (np.repeat(np.arange(num_layers), num_physical), phy2log.reshape(-1)), 1)
    width = max(int(logcnt.max()), 1)
    log2phy = np.full((num_layers, num_logical, width), -1, dtype=np.int64)
    order = np.argsort(phy2log, axis=1, kind="stable")  # slots grouped by expert, ascending within an expert
    sorted_experts = np.take_along_axis(phy2log, order, axis=1)
    starts = np.cumsum(logcnt, axis=1) - logcnt
    rank_in_expert = np.arange(num_physical)[None, :] - np.take_along_axis(starts, sorted_experts, axis=1)
    layer_ids = np.repeat(np.arange(num_layers), num_physical)
    log2phy[layer_ids, sorted_experts.reshape(-1), rank_in_expert.reshape(-1)] = order.reshape(-1)
    return Placement(phy2log=phy2log, log2phy=log2phy, logcnt=logcnt)


def check_stats(stats: ExpertStats, num_layers: Optional[int] = None, num_logical: Optional[int] = None) -> str:
    """'' when the statistics are usable, else one sentence saying what is wrong with them."""
    counts = getattr(stats, "source_counts", None)
    if counts is None:
        return "no source_counts"
    counts = np.asarray(counts)
    if counts.ndim != 4:
        return f"source_counts has shape {counts.shape}, expected [windows, layers, sources, experts]"
    if counts.size == 0:
        return "source_counts is empty"
    if num_layers is not None and counts.shape[1] != num_layers:
        return f"source_counts has {counts.shape[1]} layers, the placement has {num_layers}"
    if num_logical is not None and counts.shape[3] != num_logical:
        return f"source_counts has {counts.shape[3]} experts, expected {num_logical}"
    if not np.issubdtype(counts.dtype, np.number) or not np.all(np.isfinite(counts)):
        return "source_counts contains NaN or infinite values"
    if (counts < 0).any():
        return "source_counts contains negative counts"
    if counts.sum() <= 0:
        return "source_counts holds no tokens"
    coact = stats.coactivation
    if coact is not None:
        coact = np.asarray(coact)
        expected = (counts.shape[1] - 1, counts.shape[3], counts.shape[3])
        if coact.shape != expected:
            return f"coactivation has shape {coact.shape}, expected {expected}"
        if not np.all(np.isfinite(coact)) or (coact < 0).any():
            return "coactivation contains NaN, infinite or negative values"
    return ""
