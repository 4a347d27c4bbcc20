"""The expert-tier planner behind `tiersched.core.expert.placement.rebalance` (formulation: docs/expert-tier.md).

Pipeline per rebalance (deterministic, no wall-clock budget; every tie is broken by index):
  1. estimate (estimate.py): planning scenarios = each window's load shares + a robust (mean + std) one;
  2. replica counts on the robust load (upstream's `replicate_experts` rule on mean + std instead of the mean);
  3. reduced assignment (with per-source data or a previous placement): the hot_slots_per_rank * R hottest
     replicas, R at a time, one per rank, to the ranks that maximise locality minus migration. It is an assignment problem (totally unimodular, so
     the MILP's LP relaxation is integral): solved exactly by scipy's linear_sum_assignment, or by HiGHS
     (`hot_solver = "highs"`, same optimum, slower);
  4. multi-scenario greedy (search.greedy), all layers at once;
  5. swap local search (search.local_search) on every scenario, all layers at once; with a previous
     placement the search also starts from it and the cheaper result wins per layer (bounds migration);
  6. co-location (when coactivation is given and colocation_weight > 0): swaps that do not raise the balance
     term and bring e' at l+1 to the ranks where its predecessors at l run (colocation.py);
  7. slots aligned to the previous placement within each rank (moving within a rank is not a migration).
Units: per layer, load shares scaled so the mean rank load is 1; traffic and migration are shares in [0, 1].
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, linear_sum_assignment, milp
from scipy.sparse import coo_matrix

from tiersched.core.expert import ExpertStats, Placement, PlacementConfig, placement_from_phy2log
from tiersched.core.expert.colocation import colocate
from tiersched.core.expert.estimate import default_rank_distance, estimate, replica_counts
from tiersched.core.expert.search import batch_loads, cost, greedy, has_from_phy, local_search


def assign_hot(cost_matrix: np.ndarray, solver: str = "assignment", time_limit: float = 30.0) -> np.ndarray:
    """int [n] rank of each hot replica (distinct ranks) minimising the summed cost; cost_matrix float [n, R]
    (n <= R). HiGHS's time limit is only a safety net: hitting it raises, and rebalance() keeps the current
    placement, so a result never depends on machine speed."""
    n, num_ranks = cost_matrix.shape
    if solver == "assignment":
        rows, cols = linear_sum_assignment(cost_matrix)
        out = np.empty(n, dtype=np.int64)
        out[rows] = cols
        return out
    cols = np.arange(n * num_ranks)
    per_item = coo_matrix((np.ones(n * num_ranks), (np.repeat(np.arange(n), num_ranks), cols)), shape=(n, n * num_ranks))
    per_rank = coo_matrix((np.ones(n * num_ranks), (np.tile(np.arange(num_ranks), n), cols)), shape=(num_ranks, n * num_ranks))
    res = milp(cost_matrix.reshape(-1), constraints=[LinearConstraint(per_item, 1, 1), LinearConstraint(per_rank, 0, 1)],
               integrality=np.ones(n * num_ranks), bounds=Bounds(0, 1), options={"time_limit": time_limit})
    if res.status != 0 or res.x is None:
        raise RuntimeError(f"HiGHS did not solve the reduced assignment to optimality ({res.message})")
    return np.argmax(res.x.reshape(n, num_ranks), axis=1).astype(np.int64)


def _align_slots(has: np.ndarray, prev_row: Optional[np.ndarray], slots_per_rank: int) -> np.ndarray:
    """phy2log row [P] from has [E, R]; experts that stay on a rank keep prev's slot there."""
    num_ranks = has.shape[1]
    row = np.empty(num_ranks * slots_per_rank, dtype=np.int64)
    for r in range(num_ranks):
        experts = list(np.repeat(np.arange(has.shape[0]), has[:, r]))
        slots = [-1] * slots_per_rank
        if prev_row is not None:
            for i, e in enumerate(prev_row[r * slots_per_rank:(r + 1) * slots_per_rank]):
                if e in experts:
                    experts.remove(e)
                    slots[i] = int(e)
        it = iter(experts)
        row[r * slots_per_rank:(r + 1) * slots_per_rank] = [s if s >= 0 else next(it) for s in slots]
    return row


def _search_args(config: PlacementConfig, weight: np.ndarray) -> dict:
    return dict(weight=weight, alpha=config.alpha, worst_weight=config.worst_window_weight,
                spread_weight=config.spread_weight)


def solve(stats: ExpertStats, num_physical: int, num_ranks: int, num_nodes: int, prev: Optional[Placement],
          config: PlacementConfig, rank_distance: Optional[np.ndarray] = None) -> Placement:
    """Steps 1-7 above on statistics rebalance() has checked; raises when a solver fails.

    stats.source_counts float [W, L, S, E]; prev: the current placement (phy2log [L, P]) or None;
    rank_distance optional float [R, R]. Layers without tokens keep prev's row (or the trivial layout)."""
    counts = np.asarray(stats.source_counts, dtype=np.float64)
    _, num_layers, num_sources, num_logical = counts.shape
    k = num_physical // num_ranks
    dist = (np.asarray(rank_distance, dtype=np.float64) if rank_distance is not None
            else default_rank_distance(num_ranks, num_nodes, config.cross_node_weight))
    est = estimate(stats, num_ranks, config, dist)
    layers = np.flatnonzero(est.active)
    reps = replica_counts(est.robust[layers], num_physical)  # [B, E]
    scen = est.scen[layers]  # [B, Wp, S, E]
    prev_phy = prev.phy2log[layers] if prev is not None else None
    prev_has = has_from_phy(prev_phy, num_logical, num_ranks) if prev is not None else None
    moved = (np.ones((layers.size, num_ranks, num_logical)) if prev_has is None
             else (np.transpose(prev_has, (0, 2, 1)) == 0).astype(np.float64))
    unit_cost = -config.beta * est.gain[layers] + config.gamma * moved / num_physical  # [B, R, E]
    batch = layers.size
    has = np.zeros((batch, num_logical, num_ranks), dtype=np.int64)
    agg = scen.sum(2)  # [B, Wp, E]
    per_replica = est.robust[layers] / reps  # [B, E]
    # replicas heaviest first (by robust load per replica), ties by expert index
    item_e = np.stack([np.repeat(np.arange(num_logical), reps[b]) for b in range(batch)]) if batch else np.zeros((0, num_physical), dtype=np.int64)
    order = np.argsort(-np.take_along_axis(per_replica, item_e, 1), axis=1, kind="stable")
    item_e = np.take_along_axis(item_e, order, 1)
    rows = np.arange(batch)[:, None]
    rounds = min(config.hot_slots_per_rank, k) if config.use_milp else 0
    if rounds and (num_sources == num_ranks or prev is not None):
        # round j places the j-th group of R hottest replicas, one per rank; a rank that already holds the
        # expert is priced out, so replicas of one expert stay on distinct ranks
        for j in range(rounds):
            hot = item_e[:, j * num_ranks:(j + 1) * num_ranks]  # [B, R]
            for b in range(batch):
                table = unit_cost[b][:, hot[b]].T + np.where(has[b][hot[b]] > 0, 1e3, 0.0)  # [R replicas, R ranks]
                ranks = assign_hot(table, config.hot_solver, config.solver_time_limit_s)
                np.add.at(has[b], (hot[b], ranks), 1)
        item_e = np.where(np.arange(num_physical)[None] < rounds * num_ranks, -1, item_e)
    items_w = np.transpose(np.take_along_axis(agg, np.maximum(item_e, 0)[:, None, :], 2), (0, 2, 1))
    items_w = items_w / np.take_along_axis(reps, np.maximum(item_e, 0), 1)[:, :, None]  # [B, n, Wp]
    load = (agg / reps[:, None, :]) @ has.astype(np.float64)
    args = _search_args(config, est.weight)
    greedy(has, load, item_e, items_w, k, unit_cost, **args)
    # slot layout: each rank's experts ascending (counts from has [B, E, R], rank-major per layer)
    phy = np.repeat(np.tile(np.arange(num_logical), batch * num_ranks),
                    np.transpose(has, (0, 2, 1)).reshape(-1)).reshape(batch, num_physical)
    phy = local_search(phy, scen, unit_cost, iters=config.local_search_iters, candidate_ranks=config.candidate_ranks, **args)
    if prev_phy is not None:
        kept = local_search(prev_phy.copy(), scen, unit_cost, iters=config.local_search_iters,
                            candidate_ranks=config.candidate_ranks, **args)
        costs = [cost(batch_loads(h, scen), h, unit_cost, **args)
                 for h in (has_from_phy(phy, num_logical, num_ranks), has_from_phy(kept, num_logical, num_ranks))]
        use_kept = costs[1] <= costs[0] + config.keep_tolerance
        phy = np.where(use_kept[:, None], kept, phy)
    if stats.coactivation is not None and config.colocation_weight > 0 and batch > 1:
        phy = colocate(phy, layers, scen, unit_cost, np.asarray(stats.coactivation, dtype=np.float64), config, args)
    out = (np.array(prev.phy2log, dtype=np.int64) if prev is not None
           else np.tile(np.arange(num_physical, dtype=np.int64) % num_logical, (num_layers, 1)))
    if prev is None:
        out[layers] = np.sort(phy.reshape(batch, num_ranks, k), axis=2).reshape(batch, num_physical)
    else:
        final_has = has_from_phy(phy, num_logical, num_ranks)
        for b, layer in enumerate(layers):
            out[layer] = _align_slots(final_has[b], prev.phy2log[layer], k)
    return placement_from_phy2log(out, num_logical)
