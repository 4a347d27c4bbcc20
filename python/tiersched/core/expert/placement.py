"""Expert tier planner entry point: `rebalance(stats, num_physical_experts, num_ranks, num_nodes, prev, config)`.

Validates the layout (a bad one is a start-up error) and the statistics (bad ones keep the current placement),
then runs the pipeline in `tiersched.core.expert.solver`. Shapes as in `tiersched.core.expert`.
"""
from __future__ import annotations

import logging
import time
from typing import Optional

import numpy as np

from tiersched.core.expert import ExpertStats, Placement, PlacementConfig, check_stats, trivial_placement
from tiersched.core.expert.solver import solve

__all__ = ["rebalance"]

logger = logging.getLogger(__name__)


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
    start = time.perf_counter()
    try:
        result = solve(stats, num_physical_experts, num_ranks, num_nodes, prev, config, rank_distance)
    except Exception as exc:  # never let a solver problem stop serving
        logger.warning("tiersched expert tier: planner failed (%s: %s); keeping the current placement.",
                       type(exc).__name__, exc)
        return fallback
    logger.debug("tiersched expert tier: planned %d layers in %.3f s", num_layers, time.perf_counter() - start)
    return result
