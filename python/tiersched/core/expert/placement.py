"""Expert tier: source-aware, dependency-aware, migration-stable, drift-robust expert placement.

CONTRACT (kept stable; the simulator, the EPLB adapter and `python -m tiersched.eplb` code against it).
Shapes follow upstream's `rebalance_experts` (sglang/srt/eplb/eplb_algorithms): L = MoE layers, E = logical
experts, P = physical slots (E + redundant), R = ranks (GPUs), P % R == 0, slot p lives on rank p // (P // R).
Arrays are numpy; the adapter converts to/from torch.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

logger = logging.getLogger(__name__)


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


def rebalance(
    stats: ExpertStats,
    num_physical_experts: int,
    num_ranks: int,
    num_nodes: int,
    prev: Optional[Placement],
    config: PlacementConfig,
    rank_distance: Optional[np.ndarray] = None,
) -> Placement:
    """Source-aware, migration-stable, drift-robust placement for every layer (see docs/expert-tier.md).

    stats.source_counts float [W, L, S, E] (S == num_ranks for source-aware planning, S == 1 for aggregate);
    rank_distance optional float [R, R] (default: 0 same rank, 1 same node, 1 + cross_node_weight otherwise).
    Invalid layout parameters raise ValueError (a startup error); bad statistics or a solver failure return
    prev (or the trivial placement) and log one line, so serving never stops on them.
    """
    counts = np.asarray(getattr(stats, "source_counts", np.zeros((0,))))
    num_layers = counts.shape[1] if counts.ndim == 4 else (prev.phy2log.shape[0] if prev is not None else 0)
    num_logical = counts.shape[3] if counts.ndim == 4 else (int(prev.logcnt.shape[1]) if prev is not None else 0)
    if num_physical_experts % num_ranks or num_ranks % max(num_nodes, 1) or num_nodes < 1:
        raise ValueError(
            f"num_physical_experts={num_physical_experts} must be a multiple of num_ranks={num_ranks}, "
            f"itself a multiple of num_nodes={num_nodes}."
        )
    problem = check_stats(stats, prev.phy2log.shape[0] if prev is not None else None,
                          int(prev.logcnt.shape[1]) if prev is not None else None)
    if not problem and num_physical_experts < num_logical:
        raise ValueError(f"num_physical_experts={num_physical_experts} is below the {num_logical} logical experts.")
    fallback = prev if prev is not None else (
        trivial_placement(num_layers, num_logical, num_physical_experts) if num_layers and num_logical else None)
    if problem:
        logger.warning("tiersched expert tier: bad statistics (%s); keeping the current placement.", problem)
        if fallback is None:
            raise ValueError(f"bad statistics ({problem}) and no previous placement to keep")
        return fallback
    from tiersched.core.expert.solver import solve  # the solver module imports this one

    start = time.perf_counter()
    try:
        result = solve(stats, num_physical_experts, num_ranks, num_nodes, prev, config, rank_distance)
    except Exception as exc:  # never let a solver problem stop serving
        logger.warning("tiersched expert tier: planner failed (%s: %s); keeping the current placement.",
                       type(exc).__name__, exc)
        return fallback
    logger.debug("tiersched expert tier: planned %d layers in %.3f s", num_layers, time.perf_counter() - start)
    return result
