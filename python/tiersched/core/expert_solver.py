"""The expert-tier planner behind `tiersched.core.expert_placement.rebalance` (formulation: docs/expert-tier.md).

Pipeline per rebalance (deterministic; every tie is broken by index):
  1. estimate: each window -> load shares; recency weights 2**(-age/half_life); robust load per expert
     u = mean + variance_weight * std (observed spread between windows + an assumed drift prior);
  2. replica counts: greedy on u (min max u_e / c_e, the rule upstream's `replicate_experts` uses on the mean);
  3. reduced MILP (HiGHS via scipy.optimize.milp): ranks of the hottest replicas, at most `cap` per rank,
     maximising source locality minus migration (a bipartite b-matching, solved to optimality);
  4. greedy (all layers at once): remaining replicas, heaviest first, to the rank of least
     alpha * peak - beta * locality + gamma * migration;
  5. local search per layer: swaps of single-replica experts that lower
     alpha * (weighted mean + worst_window_weight * worst of the per-window peak) - beta * locality + gamma * migration,
     evaluated on every planning window (exact loads under the local-replica-first dispatch);
  6. with a previous placement, the same local search also starts from it; per layer the cheaper of the two wins,
     so a stationary workload keeps most slots. Slots are aligned to prev within each rank (moving an expert
     between slots of one rank is not a migration).
Units: per layer, load shares scaled so the mean rank load is 1; traffic and migration are shares in [0, 1].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from tiersched.core.expert_placement import ExpertStats, Placement, PlacementConfig, placement_from_phy2log


def default_rank_distance(num_ranks: int, num_nodes: int, cross_node_weight: float) -> np.ndarray:
    """float [R, R]: 0 on the diagonal, 1 within a node, 1 + cross_node_weight across nodes."""
    node = np.arange(num_ranks) // (num_ranks // num_nodes)
    dist = np.where(node[:, None] == node[None, :], 1.0, 1.0 + cross_node_weight)
    np.fill_diagonal(dist, 0.0)
    return dist


def replica_counts(load: np.ndarray, num_physical: int) -> np.ndarray:
    """int [L, E] >= 1 summing to num_physical per layer, minimising max load / count (greedy, optimal)."""
    num_layers, num_logical = load.shape
    counts = np.ones((num_layers, num_logical), dtype=np.int64)
    rows = np.arange(num_layers)
    for _ in range(num_physical - num_logical):
        pick = np.argmax(load / counts, axis=1)
        counts[rows, pick] += 1
    return counts


@dataclass
class _Estimate:
    scen: np.ndarray  # [L, Wp, S, E] planning scenarios, each scaled so mean rank load is 1
    weight: np.ndarray  # [Wp] scenario weights summing to 1
    robust: np.ndarray  # [L, E] robust load (same units)
    gain: np.ndarray  # [L, R, E] locality gain (traffic share saved) of a replica of e on rank r
    active: np.ndarray  # [L] layers with tokens


def estimate(stats: ExpertStats, num_ranks: int, config: PlacementConfig, dist: np.ndarray) -> _Estimate:
    counts = np.asarray(stats.source_counts, dtype=np.float64)  # [W, L, S, E]
    num_windows, num_layers, num_sources, num_logical = counts.shape
    totals = counts.sum(axis=(2, 3))  # [W, L]
    shares = np.divide(counts, totals[:, :, None, None], out=np.zeros_like(counts), where=totals[:, :, None, None] > 0)
    ages = np.arange(num_windows)[::-1]
    omega = (2.0 ** (-ages / config.window_half_life))[:, None] * (totals > 0)  # [W, L]
    omega = omega / np.maximum(omega.sum(0, keepdims=True), 1e-300)
    mean_src = np.einsum("wl,wlse->lse", omega, shares)
    agg = shares.sum(2)  # [W, L, E]
    mean_agg = mean_src.sum(1)
    var = np.einsum("wl,wle->le", omega, (agg - mean_agg[None]) ** 2) + (config.prior_drift_sigma * mean_agg) ** 2
    robust = mean_agg + config.variance_weight * np.sqrt(var)
    # robust scenario: per-source split of the mean, scaled per expert to the robust load, renormalised
    scale = np.divide(robust, mean_agg, out=np.ones_like(robust), where=mean_agg > 0)
    robust_src = mean_src * scale[:, None, :]
    robust_src /= np.maximum(robust_src.sum(axis=(1, 2), keepdims=True), 1e-300)
    scen = np.concatenate([np.transpose(shares, (1, 0, 2, 3)), robust_src[:, None]], axis=1) * num_ranks
    weight = np.append(np.full(num_windows, 1.0 / num_windows), 1.0) / 2.0
    if num_sources == num_ranks:
        dbar = dist.mean(1)  # expected distance from source s to a random rank
        gain = np.einsum("lse,sr->lre", mean_src, dbar[:, None] - dist)
    else:
        gain = np.zeros((num_layers, num_ranks, num_logical))
    active = totals.sum(0) > 0
    return _Estimate(scen, weight, robust * num_ranks, gain, active)


def scenario_loads(has: np.ndarray, scen: np.ndarray) -> np.ndarray:
    """float [Wp, R] rank loads of one layer; has int [E, R]; scen [Wp, S, E] (local-replica-first if S == R)."""
    num_logical, num_ranks = has.shape
    cnt = np.maximum(has.sum(1), 1)
    if scen.shape[1] == num_ranks:
        local = (has > 0).T[None]  # [1, S, E]
        remote = (scen * ~local).sum(1)
        return remote / cnt @ has + (scen * local).sum(-1)
    return scen.sum(1) / cnt @ has


def _milp_hot(gain_l, moved_l, reps, hot, cap, beta, gamma, num_physical, time_limit):
    """has int [E, R] for the hot experts. Variables y[e, r] in {0, 1}. The problem is a b-matching (totally
    unimodular), so HiGHS proves optimality at the root; time_limit is only a safety net: hitting it raises,
    and rebalance() then keeps the current placement (a result never depends on machine speed)."""
    num_ranks = gain_l.shape[0]
    h = len(hot)
    cost = (-beta * gain_l[:, hot].T + gamma * moved_l[:, hot].T / num_physical).reshape(-1)  # [h * R]
    rows_e = np.repeat(np.arange(h), num_ranks)
    cols = np.arange(h * num_ranks)
    per_expert = coo_matrix((np.ones(h * num_ranks), (rows_e, cols)), shape=(h, h * num_ranks))
    per_rank = coo_matrix((np.ones(h * num_ranks), (np.tile(np.arange(num_ranks), h), cols)), shape=(num_ranks, h * num_ranks))
    res = milp(
        cost,
        constraints=[LinearConstraint(per_expert, reps[hot], reps[hot]), LinearConstraint(per_rank, 0, cap)],
        integrality=np.ones(h * num_ranks),
        bounds=Bounds(0, 1),
        options={"time_limit": max(time_limit, 1e-3), "presolve": True},
    )
    if res.status != 0 or res.x is None:
        raise RuntimeError(f"HiGHS did not solve the reduced MILP to optimality ({res.message})")
    has = np.zeros((gain_l.shape[1], num_ranks), dtype=np.int64)
    has[hot] = np.rint(res.x.reshape(h, num_ranks)).astype(np.int64)
    if not np.array_equal(has[hot].sum(1), reps[hot]):
        raise RuntimeError("HiGHS returned a fractional solution to the reduced MILP")
    return has


def _greedy(has, load, items_e, items_w, gain, moved, free, config, num_physical):
    """Place items (experts, proxy loads) for a batch of layers in place. has [B, E, R], load [B, R], items [B, n]
    (expert -1 = no item), gain/moved [B, R, E], free [B, R]."""
    batch, num_ranks = load.shape
    rows = np.arange(batch)
    for t in range(items_e.shape[1]):
        e = items_e[:, t]
        valid = e >= 0
        es = np.where(valid, e, 0)
        w = items_w[:, t][:, None]
        peak = np.maximum(load.max(1, keepdims=True), 1.0)
        cost = (config.alpha * np.maximum(load + w, peak) - config.beta * gain[rows, :, es]
                + config.gamma * moved[rows, :, es] / num_physical + 1e-6 * load)
        dup = has[rows, es, :] > 0
        full = free <= 0
        cost = np.where(full, np.inf, cost + np.where(dup, 1e3, 0.0))
        r = np.argmin(cost, axis=1)
        sel = rows[valid]
        has[sel, es[valid], r[valid]] += 1
        load[sel, r[valid]] += items_w[valid, t]
        free[sel, r[valid]] -= 1


def _objective(loads, weight, ww):
    peaks = loads.max(-1)
    return float(weight @ peaks + ww * peaks.max())


def _local_search(has, scen, weight, gain_l, moved_l, config, num_physical):
    """Swap single-replica experts between a peak rank and any other rank while the objective drops."""
    has = has.copy()
    reps = has.sum(1)
    agg = scen.sum(1)  # [Wp, E]
    ww = config.worst_window_weight
    for _ in range(config.local_search_iters):
        loads = scenario_loads(has, scen)  # [Wp, R]
        base = _objective(loads, weight, ww)
        single = reps == 1
        rank_of = np.argmax(has, axis=1)
        best = (-1e-9, None)
        order = np.argsort(-loads, axis=1)[:, :3]  # top-3 ranks per scenario
        top = np.take_along_axis(loads, order, axis=1)  # [Wp, 3]
        ranks = np.arange(loads.shape[1])[:, None, None]
        # the rank carrying most of the objective: peak ranks weighted by their scenario's weight in it
        peak_w = weight + ww * (np.arange(loads.shape[0]) == np.argmax(loads.max(1)))
        carried = np.zeros(loads.shape[1])
        np.add.at(carried, order[:, 0], peak_w * loads.max(1))
        for a in (int(np.argmax(carried)),):
            ei = np.flatnonzero(single & (rank_of == a))
            ej = np.flatnonzero(single & (rank_of != a))
            if ei.size == 0 or ej.size == 0:
                continue
            bj = rank_of[ej]
            # peak over ranks other than a and b, per scenario: the first of the top-3 not in {a, b}
            ok = (order[None] != a) & (order[None] != ranks)  # [R, Wp, 3]
            excl = np.take_along_axis(top[None].repeat(len(ranks), 0), np.argmax(ok, axis=2)[..., None], axis=2)[..., 0]
            xi, xj = agg[:, ei].T[:, None, :], agg[:, ej].T[None, :, :]  # [ni,1,Wp], [1,nj,Wp]
            new_a = loads[:, a][None, None, :] - xi + xj
            new_b = loads[:, bj].T[None, :, :] - xj + xi
            peaks = np.maximum(np.maximum(new_a, new_b), excl[bj][None, :, :])
            balance = peaks @ weight + ww * peaks.max(-1)
            d_gain = gain_l[a, ej][None, :] + gain_l[bj, ei[:, None]] - gain_l[a, ei][:, None] - gain_l[bj, ej][None, :]
            d_move = moved_l[a, ej][None, :] + moved_l[bj, ei[:, None]] - moved_l[a, ei][:, None] - moved_l[bj, ej][None, :]
            delta = config.alpha * (balance - base) - config.beta * d_gain + config.gamma * d_move / num_physical
            i, j = np.unravel_index(np.argmin(delta), delta.shape)
            if delta[i, j] < best[0]:
                best = (delta[i, j], (ei[i], a, ej[j], bj[j]))
        if best[1] is None:
            break
        e1, a, e2, b = best[1]
        has[e1, a] -= 1; has[e2, a] += 1; has[e2, b] -= 1; has[e1, b] += 1
    return has


def _layer_cost(has, est_scen, weight, gain_l, moved_l, config, num_physical):
    loads = scenario_loads(has, est_scen)
    locality = float((gain_l.T * (has > 0)).sum())
    moves = float((moved_l.T * has).sum())
    return config.alpha * _objective(loads, weight, config.worst_window_weight) - config.beta * locality + config.gamma * moves / num_physical


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


def solve(stats: ExpertStats, num_physical: int, num_ranks: int, num_nodes: int, prev: Optional[Placement],
          config: PlacementConfig, rank_distance: Optional[np.ndarray] = None) -> Placement:
    counts = np.asarray(stats.source_counts, dtype=np.float64)
    _, num_layers, _, num_logical = counts.shape
    k = num_physical // num_ranks
    dist = (np.asarray(rank_distance, dtype=np.float64) if rank_distance is not None
            else default_rank_distance(num_ranks, num_nodes, config.cross_node_weight))
    est = estimate(stats, num_ranks, config, dist)
    reps = replica_counts(est.robust, num_physical)  # [L, E]
    prev_has = None
    if prev is not None:
        from tiersched.core.expert_metrics import replica_matrix

        prev_has = replica_matrix(prev.phy2log, num_logical, num_ranks)
    moved = (np.ones((num_layers, num_ranks, num_logical)) if prev_has is None
             else (np.transpose(prev_has, (0, 2, 1)) == 0).astype(np.float64))
    has = np.zeros((num_layers, num_logical, num_ranks), dtype=np.int64)
    # 3. reduced MILP on the hottest replicas (only when it has something to decide)
    placed = np.zeros((num_layers, num_logical), dtype=bool)
    has_sources = counts.shape[2] == num_ranks
    if config.use_milp and config.hot_slots_per_rank > 0 and (has_sources or prev is not None):
        for layer in np.flatnonzero(est.active):
            per_replica = est.robust[layer] / reps[layer]
            hot_slots = np.argsort(-np.repeat(per_replica, reps[layer]), kind="stable")[: config.hot_slots_per_rank * num_ranks]
            hot = np.unique(np.repeat(np.arange(num_logical), reps[layer])[hot_slots])
            hot = hot[reps[layer, hot] <= num_ranks]
            cap = int(np.ceil(reps[layer, hot].sum() / num_ranks))
            if hot.size == 0 or cap > k:
                continue
            has[layer] = _milp_hot(est.gain[layer], moved[layer], reps[layer], hot, cap, config.beta, config.gamma,
                                   num_physical, config.solver_time_limit_s)
            placed[layer, hot] = True
    # 4. greedy for everything else, all layers at once
    free = k - has.sum(1)
    load = np.einsum("le,ler->lr", est.robust / reps, has).astype(np.float64)
    item_e = np.where(placed, -1, np.arange(num_logical)[None, :])
    items_e, items_w = [], []
    for layer in range(num_layers):
        e_list = np.repeat(item_e[layer], np.where(placed[layer], 0, reps[layer]))
        w_list = est.robust[layer, e_list] / reps[layer, e_list]
        order = np.argsort(-w_list, kind="stable")
        items_e.append(e_list[order]); items_w.append(w_list[order])
    width = max(len(x) for x in items_e)
    pad_e = np.full((num_layers, width), -1, dtype=np.int64)
    pad_w = np.zeros((num_layers, width))
    for layer in range(num_layers):
        pad_e[layer, : len(items_e[layer])] = items_e[layer]
        pad_w[layer, : len(items_w[layer])] = items_w[layer]
    _greedy(has, load, pad_e, pad_w, est.gain, moved, free, config, num_physical)
    # 5./6. local search per layer, from the fresh plan and from prev; keep the cheaper
    rows = []
    for layer in range(num_layers):
        prev_row = prev.phy2log[layer] if prev is not None else None
        if not est.active[layer]:
            rows.append(prev_row if prev_row is not None else np.arange(num_physical) % num_logical)
            continue
        scen, gain_l, moved_l = est.scen[layer], est.gain[layer], moved[layer]
        fresh = _local_search(has[layer], scen, est.weight, gain_l, moved_l, config, num_physical)
        best = fresh
        if prev_has is not None:
            kept = _local_search(prev_has[layer], scen, est.weight, gain_l, moved_l, config, num_physical)
            cost_kept = _layer_cost(kept, scen, est.weight, gain_l, moved_l, config, num_physical)
            cost_fresh = _layer_cost(fresh, scen, est.weight, gain_l, moved_l, config, num_physical)
            if cost_kept <= cost_fresh + config.keep_tolerance:
                best = kept
        rows.append(_align_slots(best, prev_row, k))
    return placement_from_phy2log(np.stack(rows), num_logical)
