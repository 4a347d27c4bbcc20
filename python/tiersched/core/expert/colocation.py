"""Expert tier, inter-layer co-location: bring e' at layer l to the ranks where the experts
that feed it at layer l-1 run, through swaps that do not raise the balance term.

Why it can only help one routing model: with SGLang's usual dispatch + combine, every token returns to its
source rank after each MoE layer, so where e at l-1 ran does not matter to layer l (co-location cuts nothing;
only source locality does). When tokens stay with their expert between layers (a dispatch that forwards
activations from layer l-1's expert rank straight to layer l), a token at e (l-1) on rank r reaches e' (l)
locally iff e' has a replica on r: the co-location gain of a replica of e' on r is the share of (e, e') pairs
whose e ran on r.

chain_gain: G[r, e'] = sum_e C[e, e'] * share[e, r] / sum C, with C the (e at l-1, e' at l) co-activation and
share[e, r] the share of e's tokens processed on rank r (local replica first, else even over the replicas).
colocate: Jacobi passes over all layers at once (gains from the previous pass's layer l-1), each a batched
swap search whose unit cost adds -colocation_weight * G (no spread term: only the peak counts as balance here),
restricted to swaps that keep the balance term
(balance_slack 0) and aimed at the largest unrealised gains (target rank a, partners = ranks hosting e').
"""
from __future__ import annotations

import numpy as np

from tiersched.core.expert.search import has_from_phy, local_search


def rank_shares(has: np.ndarray, scen: np.ndarray) -> np.ndarray:
    """float [B, E, R] share of e's tokens processed on r; has int [B, E, R], scen float [B, S, E]."""
    num_ranks = has.shape[2]
    cnt = np.maximum(has.sum(2), 1)[:, :, None]
    if scen.shape[1] == num_ranks:
        local = np.transpose(has > 0, (0, 2, 1))  # [B, R, E]
        remote = (scen * ~local).sum(1)  # [B, E]
        share = remote[:, :, None] / cnt * has + np.transpose(scen * local, (0, 2, 1))
    else:
        share = scen.sum(1)[:, :, None] / cnt * has
    total = share.sum(2, keepdims=True)
    return np.divide(share, total, out=np.zeros_like(share), where=total > 0)


def chain_gain(has_prev: np.ndarray, scen_prev: np.ndarray, coact: np.ndarray) -> np.ndarray:
    """float [B, R, E']: co-location gain per replica; has_prev [B, E, R] and scen_prev [B, S, E] of layer l-1,
    coact [B, E, E'] pairs (e at l-1, e' at l)."""
    share = rank_shares(has_prev, scen_prev)  # [B, E, R]
    total = coact.sum((1, 2))
    gain = np.matmul(np.transpose(share, (0, 2, 1)), coact)  # [B, R, E'] (BLAS)
    return gain / np.where(total > 0, total, 1.0)[:, None, None]


class _GainTargets:
    """Swap targets for co-location: per layer, the (rank, expert) with the largest unrealised gain not tried
    yet; partners = the ranks that host that expert."""

    def __init__(self, gain: np.ndarray, min_lift: float):
        self.gain = gain  # [B, R, E]
        # only ranks that feed e' clearly more than an even spread would (gain > min_lift * its mean over ranks)
        self.tried = gain <= min_lift * gain.mean(1, keepdims=True)
        self.expert = np.zeros(gain.shape[0], dtype=np.int64)
        self.rank = np.zeros(gain.shape[0], dtype=np.int64)

    def choose(self, b, has, m):
        open_gain = np.where(self.tried[b] | (np.transpose(has, (0, 2, 1)) > 0), -np.inf, self.gain[b])
        flat = np.argmax(open_gain.reshape(len(b), -1), axis=1)
        rank, expert = np.divmod(flat, self.gain.shape[2])
        self.rank[b], self.expert[b] = rank, expert
        hosts = has[np.arange(len(b)), expert] > 0  # [nb, R]
        order = np.argsort(~hosts, axis=1, kind="stable")[:, :m]  # host ranks first
        first = order[:, :1]
        partners = np.where(np.take_along_axis(hosts, order, 1), order, first)
        return rank, partners

    def stuck(self, b):
        self.tried[b, self.rank[b], self.expert[b]] = True
        return ~self.tried[b].all(axis=(1, 2))


def colocate(phy, layers, scen, unit_cost, coact, config, args, passes=1, min_lift=1.25):
    """phy int [B, P] after balancing -> phy with co-located chains; layers int [B] (model layer ids),
    scen [B, Wp, S, E], unit_cost [B, R, E], coact [L-1, E, E]. Only layers whose predecessor is in the batch
    take part. min_lift: (rank, e') targets whose gain is below min_lift times e''s mean gain over ranks are
    not pursued (an even spread of predecessors leaves nothing to co-locate)."""
    num_logical, num_ranks = scen.shape[3], unit_cost.shape[1]
    pos = np.flatnonzero((layers[1:] == layers[:-1] + 1))  # batch index of l-1 for batch index pos+1
    if pos.size == 0:
        return phy
    mean_scen = np.einsum("bwse,w->bse", scen, args["weight"])
    for _ in range(passes):
        has = has_from_phy(phy, num_logical, num_ranks)
        gain = chain_gain(has[pos], mean_scen[pos], coact[layers[pos]])  # [n, R, E] for batch rows pos + 1
        rows = pos + 1
        targets = _GainTargets(gain, min_lift)
        sub = phy[rows].copy()
        sub = local_search(sub, scen[rows], unit_cost[rows] - config.colocation_weight * gain,
                           iters=config.colocation_iters, candidate_ranks=config.candidate_ranks,
                           balance_slack=0.0, targets=targets, **{**args, "spread_weight": 0.0})
        phy[rows] = sub
    return phy
