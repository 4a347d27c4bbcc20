"""Expert tier, steps 2-3 of the planner: multi-scenario greedy and swap local search, batched over layers.

Both work on B layers at once (numpy over a leading batch axis), in the slot representation phy [B, P] (expert
in each slot; slot p lives on rank p // (P / R)), against every planning scenario at once:

    cost = alpha * (sum_w weight_w * peak_w + worst_window_weight * max_w peak_w)     peak_w = max_r load[w, r]
         + spread_weight * sum_w weight_w * sum_r load[w, r]**2        (moves past ties, prefers even spread)
         + sum over placed replicas (e on r) of unit_cost[r, e]        (-beta * locality + gamma * migration ...)

Rank loads follow the dispatch the objective assumes (local replica first when S == R, else even over the
replicas); they are kept exact and updated incrementally per swap. Candidate swaps are scored with the moved
replicas' load change (exact when S == 1; with S == R the tokens that change sides also shift the moved experts'
other replicas, which enters the scored peak approximately), then every applied swap is re-checked on the exact
loads, and undone and never retried (tabu) when it did not lower the cost. Deterministic: ties go to the lowest
index.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def batch_loads(has: np.ndarray, scen: np.ndarray) -> np.ndarray:
    """float [B, Wp, R]; has int [B, E, R]; scen float [B, Wp, S, E] (local replica first if S == R)."""
    num_ranks = has.shape[2]
    hasf = has.astype(np.float64)
    cnt = np.maximum(hasf.sum(2), 1.0)[:, None, :]  # [B, 1, E]
    if scen.shape[2] == num_ranks:
        local = np.transpose(has > 0, (0, 2, 1))[:, None]  # [B, 1, R, E]
        loc = scen * local
        remote = scen.sum(2) - loc.sum(2)  # [B, Wp, E]
        return (remote / cnt) @ hasf + loc.sum(3)
    return (scen.sum(2) / cnt) @ hasf


def has_from_phy(phy: np.ndarray, num_logical: int, num_ranks: int) -> np.ndarray:
    """int [B, E, R] replica counts from phy int [B, P]."""
    batch, num_slots = phy.shape
    has = np.zeros((batch, num_logical, num_ranks), dtype=np.int64)
    rank = np.arange(num_slots) // (num_slots // num_ranks)
    np.add.at(has, (np.repeat(np.arange(batch), num_slots), phy.reshape(-1), np.tile(rank, batch)), 1)
    return has


def cost(loads, has, unit_cost, weight, alpha, worst_weight, spread_weight):
    """float [B]: the objective above; loads [B, Wp, R], has [B, E, R], unit_cost [B, R, E]."""
    linear = (np.transpose(unit_cost, (0, 2, 1)) * (has > 0)).sum((1, 2))
    return _balance(loads, weight, worst_weight, spread_weight, alpha) + linear


def greedy(has, load, items_e, items_w, slots_per_rank, unit_cost, weight, alpha, worst_weight, spread_weight):
    """Place items in place, heaviest first, each to the rank of least marginal cost; returns has.

    has int [B, E, R] (replicas already placed), load float [B, Wp, R] (their loads), items_e int [B, n]
    (expert per item, -1 = none), items_w float [B, n, Wp] (its load in every scenario), unit_cost [B, R, E]."""
    batch, n = items_e.shape
    rows = np.arange(batch)
    free = slots_per_rank - has.sum(1)
    # the peak never ends below the mean rank load: items placed under it cost no balance, so locality and
    # migration decide where they go
    floor = ((load.sum(2) + items_w.sum(1)) / load.shape[2])[:, :, None]  # [B, Wp, 1]
    for t in range(n):
        e = items_e[:, t]
        valid = e >= 0
        es = np.where(valid, e, 0)
        new = load + items_w[:, t][:, :, None]  # [B, Wp, R]
        new_peak = np.maximum(new, np.maximum(load.max(2, keepdims=True), floor))  # peak per scenario if the item goes to r
        balance = np.einsum("bwr,w->br", new_peak, weight) + worst_weight * new_peak.max(1)
        spread = np.einsum("bwr,w->br", new ** 2 - load ** 2, weight)
        marginal = alpha * balance + spread_weight * spread + unit_cost[rows, :, es]
        marginal = marginal + np.where(has[rows, es, :] > 0, 1e3, 0.0)  # distinct ranks where possible
        marginal = np.where(free <= 0, np.inf, marginal)
        r = np.argmin(marginal, axis=1)
        sel = rows[valid]
        has[sel, es[valid], r[valid]] += 1
        load[sel, :, r[valid]] += items_w[valid, t]
        free[sel, r[valid]] -= 1
    return has


def _scen_of(src, rows, experts):
    """float [n, Wp, S]: the scenarios of expert experts[i] in layer rows[i]; src [B, S, E, Wp]."""
    return np.transpose(src[rows, :, experts], (0, 2, 1))


def _expert_state(scen_e, has_e, unit_cost_e, local_first):
    """For one expert per row: (load it puts on each rank [n, Wp, R], its remote tokens [n, Wp], its summed
    unit cost [n]); scen_e [n, Wp, S], has_e int [n, R], unit_cost_e [n, R]."""
    cnt = np.maximum(has_e.sum(1), 1)[:, None, None]
    linear = (unit_cost_e * (has_e > 0)).sum(1)
    if not local_first:
        remote = scen_e.sum(2)
        return remote[:, :, None] / cnt * has_e[:, None, :], remote, linear
    local = (has_e > 0)[:, None, :]
    remote = (scen_e * ~local).sum(2)
    return remote[:, :, None] / cnt * has_e[:, None, :] + scen_e * local, remote, linear


def _balance(loads, weight, worst_weight, spread_weight, alpha):
    peaks = loads.max(2)
    return alpha * (peaks @ weight + worst_weight * peaks.max(1)) + spread_weight * ((loads ** 2).sum(2) @ weight)


@dataclass
class _SwapState:
    """Exact bookkeeping of the swap search over B layers, updated in place by every applied swap."""

    phy: np.ndarray  # int [B, P] expert in each slot
    has: np.ndarray  # int [B, E, R] replicas of e on r
    loads: np.ndarray  # float [B, Wp, R] rank loads per scenario
    remote: np.ndarray  # float [B, Wp, E] tokens of e not served by a local replica (all of them unless S == R)
    linear: np.ndarray  # float [B] summed unit cost of the placed replicas
    current: np.ndarray  # float [B] the objective
    replicas: np.ndarray  # int [B, E] replica counts (>= 1); swaps never change them
    src: np.ndarray  # float [B, S, E, Wp] the scenarios of one (source, expert) side by side
    tabu: np.ndarray  # bool [B, P, P] slot swaps the exact loads rejected
    slots_per_rank: int
    local_first: bool  # S == R: a source's tokens go to its local replica when there is one


@dataclass
class _Candidates:
    """The swaps considered in one step for nb live layers: a slot on rank a against a slot on a partner rank."""

    a: np.ndarray  # int [nb] the rank that gives a slot away
    slot_a: np.ndarray  # int [nb, k] its slots
    slot_q: np.ndarray  # int [nb, Q] the partner ranks' slots (Q = m * k)
    rq: np.ndarray  # int [nb, Q] the rank of each partner slot
    ei: np.ndarray  # int [nb, k] expert in each slot of a
    eq: np.ndarray  # int [nb, Q] expert in each partner slot


def _init_swap_state(phy, scen, unit_cost, weight, alpha, worst_weight, spread_weight) -> _SwapState:
    """Exact loads, remote tokens, linear cost and objective of phy int [B, P]; scen [B, Wp, S, E],
    unit_cost [B, R, E]."""
    batch, num_slots = phy.shape
    num_sources, num_logical = scen.shape[2], scen.shape[3]
    num_ranks = unit_cost.shape[1]
    local_first = num_sources == num_ranks
    has = has_from_phy(phy, num_logical, num_ranks)
    loads = batch_loads(has, scen)
    agg = scen.sum(2)  # [B, Wp, E]
    if local_first:
        remote = agg - (scen * np.transpose(has > 0, (0, 2, 1))[:, None]).sum(2)  # [B, Wp, E] tokens not served locally
    else:
        remote = agg
    linear = (np.transpose(unit_cost, (0, 2, 1)) * (has > 0)).sum((1, 2))  # [B]
    current = _balance(loads, weight, worst_weight, spread_weight, alpha) + linear
    return _SwapState(
        phy=phy, has=has, loads=loads, remote=remote, linear=linear, current=current,
        replicas=np.maximum(has.sum(2), 1),
        # gathers of one (source, expert) then touch one cache line
        src=np.ascontiguousarray(np.transpose(scen, (0, 2, 3, 1))),
        tabu=np.zeros((batch, num_slots, num_slots), dtype=bool),
        slots_per_rank=num_slots // num_ranks, local_first=local_first,
    )


def _peak_rank_and_least_loaded(L, weight, worst_weight, m):
    """Default swap targets: (rank a [nb] carrying most of the balance term, the m least loaded other ranks
    [nb, m] by weighted mean load); L float [nb, Wp, R]. A rank carries weight_w * peak_w for each scenario it
    peaks in, plus worst_weight * peak of the worst scenario."""
    nb, num_windows, num_ranks = L.shape
    nbr = np.arange(nb)
    peaks = L.max(2)
    top = np.argmax(L, axis=2)  # [nb, Wp]
    worst = np.argmax(peaks, axis=1)
    carried = np.zeros((nb, num_ranks))
    np.add.at(carried, (np.repeat(nbr, num_windows), top.reshape(-1)), (peaks * weight).reshape(-1))
    carried[nbr, top[nbr, worst]] += worst_weight * peaks[nbr, worst]
    a = np.argmax(carried, axis=1)
    mean_load = np.einsum("bwr,w->br", L, weight)
    mean_load[nbr, a] = np.inf
    low = np.argsort(mean_load, axis=1, kind="stable")[:, :m]
    return a, low


def _candidate_swaps(state: _SwapState, b, a, low) -> _Candidates:
    """Every slot of rank a [nb] against every slot of the partner ranks low [nb, m], for layers b [nb]."""
    k = state.slots_per_rank
    nb, m = low.shape
    slot_a = a[:, None] * k + np.arange(k)[None]  # [nb, k]
    slot_q = (low[:, :, None] * k + np.arange(k)[None, None]).reshape(nb, m * k)  # [nb, Q]
    return _Candidates(a=a, slot_a=slot_a, slot_q=slot_q, rq=slot_q // k,
                       ei=np.take_along_axis(state.phy[b], slot_a, 1), eq=np.take_along_axis(state.phy[b], slot_q, 1))


def _swapped_loads(state: _SwapState, b, L, c: _Candidates):
    """Loads of rank a and of the partner rank after each candidate swap: (new_a, new_q) float [nb, k, Q, Wp], and
    with S == R the peaks the moved experts' other replicas reach (shift_i [nb, k, Q, Wp], shift_q [nb, Q, Wp]),
    else (None, None). L float [nb, Wp, R] = the current loads of layers b."""
    nb, num_windows, _ = L.shape
    nq = c.slot_q.shape[1]
    k = c.slot_a.shape[1]
    a, rq, ei, eq = c.a, c.rq, c.ei, c.eq
    nbr = np.arange(nb)
    bb = b[:, None]
    cnt = state.replicas[b]  # [nb, E]
    c_ei = np.take_along_axis(cnt, ei, 1)[:, :, None]
    c_eq = np.take_along_axis(cnt, eq, 1)[:, :, None]
    rem_ei = np.transpose(np.take_along_axis(state.remote[b], ei[:, None, :], 2), (0, 2, 1))  # [nb, k, Wp]
    rem_eq = np.transpose(np.take_along_axis(state.remote[b], eq[:, None, :], 2), (0, 2, 1))  # [nb, Q, Wp]
    shift_i = shift_q = None
    if state.local_first:
        src = state.src
        ar = np.arange(L.shape[2])
        src_a_ei = src[bb, a[:, None], ei]  # [nb, k, Wp]
        src_a_eq = src[bb, a[:, None], eq]  # [nb, Q, Wp]
        src_q_eq = src[bb, rq, eq]
        src_q_ei = src[b[:, None, None], rq[:, None, :], ei[:, :, None]]  # [nb, k, Q, Wp]
        item_i = src_a_ei + rem_ei / c_ei
        item_q = src_q_eq + rem_eq / c_eq
        eq_at_a = src_a_eq + (rem_eq + src_q_eq - src_a_eq) / c_eq  # [nb, Q, Wp]
        ei_at_q = src_q_ei + (rem_ei[:, :, None] + src_a_ei[:, :, None] - src_q_ei) / c_ei[:, :, None]
        # the other replicas of a moved expert take (or give back) a share of the tokens that changed sides
        hosts_i = (state.has[bb, ei] > 0) & (ar[None, None] != a[:, None, None])  # [nb, k, R]
        hosts_q = (state.has[bb, eq] > 0) & (ar[None, None] != rq[:, :, None])  # [nb, Q, R]
        others_i = np.where(hosts_i[:, :, None, :], L[:, None], -np.inf).max(3)  # [nb, k, Wp]
        others_q = np.where(hosts_q[:, :, None, :], L[:, None], -np.inf).max(3)  # [nb, Q, Wp]
        shift_i = others_i[:, :, None] + (src_a_ei[:, :, None] - src_q_ei) / c_ei[:, :, None]  # [nb, k, Q, Wp]
        shift_q = others_q + (src_q_eq - src_a_eq) / c_eq  # [nb, Q, Wp]
    else:
        item_i, item_q = rem_ei / c_ei, rem_eq / c_eq
        eq_at_a = item_q
        ei_at_q = np.broadcast_to(item_i[:, :, None, :], (nb, k, nq, num_windows))
    La = L[nbr, :, a]  # [nb, Wp]
    Lq = np.transpose(np.take_along_axis(L, rq[:, None, :], 2), (0, 2, 1))  # [nb, Q, Wp]
    new_a = La[:, None, None, :] - item_i[:, :, None, :] + eq_at_a[:, None, :, :]  # [nb, k, Q, Wp]
    new_q = Lq[:, None, :, :] - item_q[:, None, :, :] + ei_at_q
    return new_a, new_q, shift_i, shift_q


def _swap_deltas(state: _SwapState, b, L, c: _Candidates, swapped, unit_cost, weight, alpha, worst_weight,
                 spread_weight):
    """(change of the objective, change of the balance term), each float [nb, k, Q], for every candidate swap;
    the peak of the ranks a swap does not touch is the highest of the top 3 that is neither a nor the partner."""
    new_a, new_q, shift_i, shift_q = swapped
    a, rq, ei, eq = c.a, c.rq, c.ei, c.eq
    nbr = np.arange(L.shape[0])
    bi = b[:, None]
    peaks = L.max(2)
    order = np.argsort(-L, axis=2, kind="stable")[:, :, :3]  # [nb, Wp, 3]
    top3 = np.take_along_axis(L, order, 2)
    ok = (order[:, None] != a[:, None, None, None]) & (order[:, None] != rq[:, :, None, None])  # [nb, Q, Wp, 3]
    excl = np.take_along_axis(np.broadcast_to(top3[:, None], ok.shape), np.argmax(ok, 3)[..., None], 3)[..., 0]
    new_peaks = np.maximum(np.maximum(new_a, new_q), excl[:, None])  # [nb, k, Q, Wp]
    if shift_i is not None:
        new_peaks = np.maximum(np.maximum(new_peaks, shift_i), shift_q[:, None])
    balance = new_peaks @ weight + worst_weight * new_peaks.max(3)
    base_balance = peaks @ weight + worst_weight * peaks.max(1)
    La = L[nbr, :, a]
    Lq = np.transpose(np.take_along_axis(L, rq[:, None, :], 2), (0, 2, 1))
    spread = (new_a ** 2 + new_q ** 2 - La[:, None, None, :] ** 2 - Lq[:, None, :, :] ** 2) @ weight
    uc = unit_cost
    d_linear = (uc[bi[:, :, None], rq[:, None, :], ei[:, :, None]] + uc[bi, a[:, None], eq][:, None, :]
                - uc[bi, a[:, None], ei][:, :, None] - uc[bi[:, :, None], rq[:, None, :], eq[:, None, :]])
    d_balance = alpha * (balance - base_balance[:, None, None])
    return d_balance + spread_weight * spread + d_linear, d_balance


def _allowed_swaps(state: _SwapState, b, c: _Candidates) -> np.ndarray:
    """bool [nb, k, Q]: not tabu, two different experts, and neither lands on a rank that already holds it."""
    bi = b[:, None]
    a, rq, ei, eq = c.a, c.rq, c.ei, c.eq
    return (~state.tabu[b[:, None, None], c.slot_a[:, :, None], c.slot_q[:, None, :]]
            & (ei[:, :, None] != eq[:, None, :])
            & (state.has[bi[:, :, None], ei[:, :, None], rq[:, None, :]] == 0)
            & (state.has[bi, eq, a[:, None]] == 0)[:, None, :])


def _move_experts(state: _SwapState, keep, e1, e2, r1, r2, unit_cost) -> None:
    """Swap e1 on r1 with e2 on r2 in layers keep (each [n]) and update loads, remote tokens and linear cost
    exactly: remove both experts' old contribution, add the new one."""
    src = state.src
    for e in (e1, e2):
        contrib, _, lin = _expert_state(_scen_of(src, keep, e), state.has[keep, e], unit_cost[keep, :, e],
                                        state.local_first)
        state.loads[keep] -= contrib
        state.linear[keep] -= lin
    has = state.has
    has[keep, e1, r1] -= 1; has[keep, e2, r1] += 1; has[keep, e2, r2] -= 1; has[keep, e1, r2] += 1
    for e in (e1, e2):
        contrib, rem, lin = _expert_state(_scen_of(src, keep, e), has[keep, e], unit_cost[keep, :, e],
                                          state.local_first)
        state.loads[keep] += contrib
        state.linear[keep] += lin
        state.remote[keep, :, e] = rem


def _apply_confirmed_swaps(state: _SwapState, keep, sa, sq, unit_cost, weight, alpha, worst_weight,
                           spread_weight) -> None:
    """Apply the slot swaps sa <-> sq [n] in layers keep [n] on the exact loads; keep those that lower the
    objective, undo the others and never try them again (tabu)."""
    k = state.slots_per_rank
    phy, has = state.phy, state.has
    e1, e2 = phy[keep, sa], phy[keep, sq]
    r1, r2 = sa // k, sq // k
    old = (state.loads[keep].copy(), state.remote[keep].copy(), state.linear[keep].copy())
    _move_experts(state, keep, e1, e2, r1, r2, unit_cost)
    new_cost = _balance(state.loads[keep], weight, worst_weight, spread_weight, alpha) + state.linear[keep]
    worse = new_cost >= state.current[keep] - 1e-12
    kw, w1, w2 = keep[worse], e1[worse], e2[worse]
    has[kw, w1, r1[worse]] += 1; has[kw, w2, r1[worse]] -= 1; has[kw, w2, r2[worse]] += 1; has[kw, w1, r2[worse]] -= 1
    state.loads[kw], state.remote[kw], state.linear[kw] = (x[worse] for x in old)
    state.tabu[kw, sa[worse], sq[worse]] = True
    good = ~worse
    phy[keep[good], sa[good]], phy[keep[good], sq[good]] = e2[good], e1[good]
    state.current[keep[good]] = new_cost[good]


def local_search(phy, scen, unit_cost, weight, alpha, worst_weight, spread_weight, iters, candidate_ranks=8,
                 balance_slack=None, targets=None):
    """Improve phy int [B, P] in place by slot swaps; returns it. scen [B, Wp, S, E], unit_cost [B, R, E].

    Per layer and step: the rank carrying most of the balance term swaps one of its slots with a slot on one of
    the `candidate_ranks` least loaded ranks. balance_slack=None: minimise the whole cost; a number: only swaps
    that raise the balance term by at most that much (used for co-location, which must not cost balance).
    targets: optional object with choose(b, has, m) -> (rank a [nb], partner ranks [nb, m]) and
    stuck(b) -> bool [len(b)] (layers that may go on after a step without an improving swap); default: the
    peak rank and the least loaded ranks, and a layer stops when no swap improves it.

    Each step, for the live layers b: pick targets, list the candidate swaps, score them on the current loads
    (_swapped_loads, _swap_deltas), keep the allowed best per layer, and apply it on the exact loads
    (_apply_confirmed_swaps). A layer stays live while it improved (or targets says it may go on)."""
    batch = phy.shape[0]
    num_ranks = unit_cost.shape[1]
    if num_ranks < 2 or batch == 0:
        return phy  # nothing to swap between
    objective = dict(weight=weight, alpha=alpha, worst_weight=worst_weight, spread_weight=spread_weight)
    state = _init_swap_state(phy, scen, unit_cost, **objective)
    m = min(candidate_ranks, num_ranks - 1)
    live = np.arange(batch)
    for _ in range(iters):
        if live.size == 0:
            break
        b = live
        nb = b.size
        L = state.loads[b]  # [nb, Wp, R]
        if targets is None:
            a, low = _peak_rank_and_least_loaded(L, weight, worst_weight, m)
        else:
            a, low = targets.choose(b, state.has[b], m)
        cand = _candidate_swaps(state, b, a, low)
        delta, d_balance = _swap_deltas(state, b, L, cand, _swapped_loads(state, b, L, cand), unit_cost, **objective)
        valid = _allowed_swaps(state, b, cand)
        if balance_slack is not None:
            valid &= d_balance <= balance_slack
        delta = np.where(valid, delta, np.inf).reshape(nb, -1)
        pick = np.argmin(delta, axis=1)
        nbr = np.arange(nb)
        improving = delta[nbr, pick] < -1e-12
        retry = np.zeros(nb, dtype=bool)
        if targets is not None and not improving.all():
            retry[~improving] = targets.stuck(b[~improving])
        if not (improving | retry).any():
            break
        i, q = np.divmod(pick, cand.slot_q.shape[1])
        keep = b[improving]
        _apply_confirmed_swaps(state, keep, cand.slot_a[nbr, i][improving], cand.slot_q[nbr, q][improving],
                               unit_cost, **objective)
        live = np.union1d(keep, b[retry])
    return phy
