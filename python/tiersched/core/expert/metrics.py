"""Metrics of an expert placement under the dispatch model the expert tier plans for.

Dispatch model ("a source rank prefers its local replica, else spreads over the replicas"): when statistics are
per source rank (S == R), tokens that source s routes to expert e go to s's own replica of e if it has one, else
evenly over all replicas of e. With aggregate statistics (S == 1, upstream's `logical_count`) the source is
unknown, so tokens spread evenly over the replicas (what upstream's balancedness assumes); cross-rank share then
assumes sources spread evenly over ranks. Upstream mirrors this: with an all-to-all backend
`_compute_logical_to_all_physical_map` (sglang/srt/eplb/expert_location.py) keeps only the nearest (local) replica.

Shapes: L layers, E logical experts, P slots, R ranks, S sources, W windows; slot p lives on rank p // (P // R).
"""
from __future__ import annotations

import numpy as np

from tiersched.core.expert import ExpertStats, Placement


def replica_matrix(phy2log: np.ndarray, num_experts: int, num_ranks: int) -> np.ndarray:
    """int [L, E, R]: replicas of expert e on rank r, from phy2log int [L, P]."""
    num_layers, num_slots = phy2log.shape
    ranks = np.arange(num_slots) // (num_slots // num_ranks)
    has = np.zeros((num_layers, num_experts, num_ranks), dtype=np.int64)
    layer_ids = np.repeat(np.arange(num_layers), num_slots)
    np.add.at(has, (layer_ids, phy2log.reshape(-1), np.tile(ranks, num_layers)), 1)
    return has


def _local_mask(has: np.ndarray, num_sources: int) -> np.ndarray:
    """bool [L, S, E]: source s has a local replica of e (only meaningful when S == R)."""
    if num_sources != has.shape[2]:
        return np.zeros((has.shape[0], num_sources, has.shape[1]), dtype=bool)
    return np.transpose(has > 0, (0, 2, 1))


def rank_loads(has: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """float [L, R] tokens each rank processes; has int [L, E, R]; counts float [L, S, E] (one window)."""
    local = _local_mask(has, counts.shape[1])
    cnt = np.maximum(has.sum(-1), 1)  # [L, E]
    remote = (counts * ~local).sum(1)  # [L, E]
    loads = np.einsum("le,ler->lr", remote / cnt, has)
    if local.any():
        loads = loads + (counts * local).sum(-1)  # S == R: source s's local tokens run on rank s
    return loads


def _window_counts(stats: ExpertStats) -> np.ndarray:
    """float [L, S, E]: all windows summed."""
    return np.asarray(stats.source_counts, dtype=np.float64).sum(0)


def balancedness_per_layer(placement: Placement, stats: ExpertStats) -> np.ndarray:
    """float [L'] mean/max rank load for each layer with any tokens (all windows summed)."""
    counts = _window_counts(stats)
    num_ranks = _num_ranks(placement, stats)
    loads = rank_loads(replica_matrix(placement.phy2log, counts.shape[2], num_ranks), counts)
    active = loads.max(-1) > 0
    return loads[active].mean(-1) / loads[active].max(-1)


def balancedness(placement: Placement, stats: ExpertStats, num_ranks: int | None = None) -> float:
    """Mean over MoE layers (all-zero layers skipped) of mean/max rank load; 1.0 is perfect."""
    counts = _window_counts(stats)
    num_ranks = num_ranks or _num_ranks(placement, stats)
    loads = rank_loads(replica_matrix(placement.phy2log, counts.shape[2], num_ranks), counts)
    active = loads.max(-1) > 0
    if not active.any():
        return 1.0
    return float((loads[active].mean(-1) / loads[active].max(-1)).mean())


def _num_ranks(placement: Placement, stats: ExpertStats) -> int:
    num_sources = stats.source_counts.shape[2]
    if num_sources > 1:
        return num_sources
    raise ValueError("aggregate statistics (S == 1) need num_ranks= to know the rank layout")


def cross_rank_share(placement: Placement, stats: ExpertStats, num_ranks: int | None = None) -> float:
    """Share of (token, expert) assignments served on another rank than their source ("combine every layer":
    tokens return to their source rank after each layer, SGLang's dispatch+combine)."""
    counts = _window_counts(stats)
    num_ranks = num_ranks or _num_ranks(placement, stats)
    has = replica_matrix(placement.phy2log, counts.shape[2], num_ranks)
    total = counts.sum()
    if total <= 0:
        return 0.0
    if counts.shape[1] == num_ranks:
        local = _local_mask(has, num_ranks)
        return float(1.0 - (counts * local).sum() / total)
    ranks_hosting = (has > 0).sum(-1) / num_ranks  # sources spread evenly over ranks
    return float(1.0 - (counts.sum(1) * ranks_hosting).sum() / total)


def rank_shares(has: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """float [L, E, R]: share of expert e's tokens processed on rank r under the dispatch model."""
    local = _local_mask(has, counts.shape[1])
    cnt = np.maximum(has.sum(-1), 1)
    remote = (counts * ~local).sum(1)  # [L, E]
    share = (remote / cnt)[..., None] * has
    if local.any():
        share = share + np.transpose(counts * local, (0, 2, 1))
    totals = share.sum(-1, keepdims=True)
    return np.divide(share, totals, out=np.zeros_like(share), where=totals > 0)


def cross_rank_share_stay(placement: Placement, stats: ExpertStats, num_ranks: int | None = None) -> float:
    """Cross-rank share when tokens stay with their expert between layers: the first MoE layer is reached from
    the source rank; layer l+1 is reached from wherever the token's expert at layer l ran, weighted by the
    (e at l, e' at l+1) co-activation; a hop is local when e' has a replica on that rank. Needs coactivation."""
    if stats.coactivation is None:
        raise ValueError("cross_rank_share_stay needs coactivation statistics")
    counts = _window_counts(stats)
    num_ranks = num_ranks or _num_ranks(placement, stats)
    has = replica_matrix(placement.phy2log, counts.shape[2], num_ranks)
    shares = rank_shares(has, counts)  # [L, E, R]
    coact = np.asarray(stats.coactivation, dtype=np.float64)
    active = np.flatnonzero(counts.sum(axis=(1, 2)) > 0)
    if active.size == 0:
        return 0.0
    first = int(active[0])
    first_stats = ExpertStats(source_counts=counts[None, first : first + 1])
    first_place = Placement(placement.phy2log[first : first + 1], placement.log2phy[first : first + 1], placement.logcnt[first : first + 1])
    first_total = counts[first].sum()
    cross = cross_rank_share(first_place, first_stats, num_ranks) * first_total
    total = first_total
    for layer in range(first, counts.shape[0] - 1):
        pair = coact[layer]
        if pair.sum() <= 0:
            continue
        # mass of pairs (e, e') whose e ran on rank r, then arrives at e' which is absent from r
        at_rank = pair[:, :, None] * shares[layer][:, None, :]  # [E, E', R]
        absent = (has[layer + 1] == 0)[None, :, :]
        cross += (at_rank * absent).sum()
        total += pair.sum()
    return float(cross / total)


def migrated_fraction(placement: Placement, prev: Placement | None) -> float:
    """Share of slots whose logical expert changed versus prev (0.0 without prev)."""
    if prev is None:
        return 0.0
    return float((placement.phy2log != prev.phy2log).mean())


def source_destinations(has: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """float [L, S, R]: tokens of source s at layer l that rank r serves under the dispatch model; has int
    [L, E, R]; counts float [L, S, E] (one window). Summed over S it is rank_loads(has, counts)."""
    local = _local_mask(has, counts.shape[1])
    cnt = np.maximum(has.sum(-1), 1)  # [L, E]
    dest = np.einsum("lse,ler->lsr", counts * ~local / cnt[:, None, :], has)
    if local.any():  # S == R: source s's local tokens run on rank s
        sources = np.arange(counts.shape[1])
        dest[:, sources, sources] += (counts * local).sum(-1)
    return dest


def expert_pressure(destinations: np.ndarray, rank_load: np.ndarray) -> np.ndarray:
    """float [S]: the expert pressure a new request on source rank s meets, the one definition the simulator and
    the adapter share. Its tokens' (layer, expert) assignments are served where s's assignments go; pressure is the
    load of those destination ranks, each relative to its layer's mean rank load, averaged over the assignments.
    1.0: the request's tokens land on average-loaded ranks; above 1: on hot ones (its MoE time grows with them).

    destinations float [L, S, G]: assignments (or per-token shares) of source s at layer l served on rank/GPU g;
    rank_load float [L, G]: the load on each (any unit: only its ratio to the layer mean is used)."""
    destinations = np.asarray(destinations, dtype=np.float64)
    rank_load = np.asarray(rank_load, dtype=np.float64)
    load = rank_load / np.maximum(rank_load.mean(axis=1, keepdims=True), 1e-12)
    return np.einsum("lsg,lg->s", destinations, load) / np.maximum(destinations.sum(axis=(0, 2)), 1e-12)


def placement_pressure(placement: Placement, stats: ExpertStats, num_ranks: int | None = None) -> np.ndarray:
    """float [R]: expert_pressure of each rank as a source, for the placement under the dispatch model with the
    statistics' tokens as the load (all windows summed). Per-source statistics (S == R) give each rank its own
    destinations; aggregate statistics (S == 1) do not say who sends what, so every rank gets the same value."""
    counts = _window_counts(stats)
    num_ranks = num_ranks or _num_ranks(placement, stats)
    if counts.shape[1] not in (1, num_ranks):
        raise ValueError(f"statistics have {counts.shape[1]} sources; pressure needs 1 or one per rank ({num_ranks})")
    dest = source_destinations(replica_matrix(placement.phy2log, counts.shape[2], num_ranks), counts)
    pressure = expert_pressure(dest, dest.sum(1))
    return pressure if pressure.size == num_ranks else np.full(num_ranks, float(pressure[0]))
