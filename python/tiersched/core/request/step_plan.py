"""Lockstep step planning for a DP-attention group: every rank's prefill token budget for the next forward step.

Under DP attention every forward step runs in lockstep: a step lasts as long as the slowest rank, so a rank that
prefills a long chunk while the others decode stretches every rank's decode step, and a rank that prefills a few
tokens beside another rank's long chunk stalls its own decodes for the whole long step. Each rank publishes a
small `RankStepSummary` once per step over the group's same-step channel (the one the LS signal uses,
`lockstep.py`); every rank then calls `plan_step` on the same summaries and gets the same `StepPlan`: each rank's
prefill token budget for this step (the cap on upstream's chunked_prefill_size / max_prefill_tokens budgets).

Formulation (docs/lockstep.md "Formulation"). Candidate chunk sizes B (a geometric grid from `min_chunk_tokens`
up to the upstream chunk size, page aligned) cap each rank's whole step as upstream's chunked_prefill_size does:
rank r prefills b_r = min(demand_r, B - mixed_rows_r) (equal per-rank step sizes: the step's max over ranks is not
set by one rank), at least min(demand_r, min_chunk_tokens); with --enable-mixed-chunk its running requests ride in
the same step (`mixed_rows`) and the cap it applies is b_r + mixed_rows_r. The step time S(b) is predicted by a
`StepTimeModel`. The plan takes the B with the least predicted cost per unit of prefill value:

    J(B) = [ S(b) * (W + (w_ls - 1) * LS) + w_d * (D_lost * S(b) + D_stretched * (S(b) - S_decode))
             + lambda * S(b)^2 / 2 ] / V(b)

  W: waiting requests in the group (each waits the step out), LS: waiting latency-sensitive ones (weight
  `plan_ls_weight`), D_lost: running requests on ranks that prefill without mixed chunking (no token this step),
  D_stretched: the others (their step stretches from S_decode, the all-decode step, to S(b)), w_d:
  `plan_decode_weight`, lambda: the group's arrival rate (an arrival waits S/2 on average). V(b): prefill progress
  in requests, each token a share of its request's uncached prompt (the chunked remainder, then waiting requests of
  the rank's mean size), so finishing a short prompt on one rank is worth as much as a long one on another (mean
  TTFT counts requests) and a rank with a short prompt keeps the others' chunks near its size (equalisation).
  While LS work waits anywhere, candidates are capped at the LS request's own tokens or `be_chunk_tokens`,
  whichever is larger, so the step the LS request waits on is short.
Alignment (`plan_align_weight` > 0): while some ranks have no prefill demand, the chosen step's extra length over
the smallest candidate is lockstep waste for every running request in the share of idle ranks; when that waste
outweighs what the waiting requests lose until an idle rank gets an arrival (1 / their arrival rate), the plan
takes the smallest candidate (every rank with demand still prefills min(demand, min_chunk_tokens)), so the long
prefill runs later in a step other ranks share. Never while LS work waits.

Invariants (test/core/test_step_plan*.py, property tests):
  * the same summaries in any order give the same plan (input sorted by rank; ties broken by the smaller B);
  * progress: a rank with demand gets b_r >= min(demand_r, min_chunk_tokens) every step, so the planner never
    defers a rank; request-tier wait bound (docs/request-tier.md, Theorem 1) holds with each prefill's service
    lengthened to at most ceil(u / min_chunk_tokens) steps of at most the upstream step length (docs/lockstep.md);
  * limits: b_r + mixed rows <= upstream budget, b_r <= chunk remainder + KV room, b_r = 0 without a chunk and
    without slot room;
  * one DP rank: the plan is upstream's budget exactly (no lockstep, nothing to plan).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True, slots=True)
class RankStepSummary:
    """What one rank publishes before batch formation (all token counts are uncached prefill tokens)."""

    rank: int
    upstream_budget: int  # this rank's upstream prefill budget: min(chunked_prefill_size, max_prefill_tokens)
    chunk_tokens: int = 0  # remaining tokens of the request being chunk-prefilled (holds its slot and KV already)
    chunk_prefix: int = 0  # tokens of that request already computed (its next chunk attends to them)
    waiting_tokens: int = 0  # uncached tokens of waiting requests (may be summed only up to the upstream budget)
    waiting_requests: int = 0  # waiting requests, the chunked one included
    ls_waiting: int = 0  # latency-sensitive requests among them
    ls_tokens: int = 0  # uncached tokens of those LS requests
    decode_count: int = 0  # running (decoding) requests
    decode_context: int = 0  # their total context tokens (KV read per decode step)
    kv_room_tokens: int = 0  # KV tokens a new admission may take now (free + evictable - reserved decode)
    slot_room: int = 0  # running-request slots free
    arrival_rate: float = 0.0  # requests per second recently received by this rank (arrivals wait out the step)
    # Decode rows that ride in this rank's prefill step (upstream --enable-mixed-chunk: its running requests, one
    # token each; 0 without mixed chunking). They take that many tokens off the upstream budget, as upstream's
    # PrefillAdder does, and the rank's decodes advance in a step where it prefills.
    mixed_rows: int = 0
    waiting_counted: int = 0  # waiting requests whose uncached tokens are in waiting_tokens (0: count it as one)
    oldest_wait_s: float = 0.0  # seconds the oldest request in this rank's waiting queue has waited (0: none)

    def mean_waiting_tokens(self) -> float:
        """Uncached tokens of a waiting request, on average over those summed in waiting_tokens."""
        return max(1.0, self.waiting_tokens / max(1, self.waiting_counted))

    def demand(self) -> int:
        """Prefill tokens this rank could run this step: the chunk's remainder, plus new admissions within KV room
        and slots, at most the upstream budget less the mixed decode rows."""
        new = min(self.waiting_tokens, max(0, self.kv_room_tokens)) if self.slot_room > 0 else 0
        return max(0, min(self.upstream_budget - self.mixed_rows, self.chunk_tokens + new))


@dataclass(frozen=True, slots=True)
class StepPlan:
    budgets: tuple[int, ...]  # per rank, in rank order: the cap on its upstream budgets this step (its planned
    # prefill tokens + its mixed decode rows; 0: decode only)
    chunk: int  # the chosen common chunk size B (the upstream budget when nothing was planned)
    predicted_s: float  # predicted step time of the plan (0.0 when nothing was planned)
    planned: bool  # False: upstream's budgets (one rank, or no rank has prefill demand)
    prefill: tuple[int, ...] = ()  # per rank: the planned prefill tokens (budgets less mixed rows); () unplanned

    def budget(self, rank: int) -> int:
        return self.budgets[rank]

    @property
    def held(self) -> bool:
        """Every rank's prefill is held this step (plan_hold_s): some rank had demand, none prefills."""
        return self.planned and not any(self.prefill)


class StepTimeModel(ABC):
    """Predicted seconds of one lockstep step from per-rank work, arrays of shape [R]:
    prefill_tokens, prefill_pairs (sum over chunks of chunk * (prefix + (chunk + 1) / 2)), decode_count and
    decode_context. On a prefilling rank the decode columns are the decodes riding in the same forward (mixed
    chunking); they are zero there without mixed chunking (a rank that prefills does not decode)."""

    @abstractmethod
    def step_seconds(self, prefill_tokens: np.ndarray, prefill_pairs: np.ndarray, decode_count: np.ndarray,
                     decode_context: np.ndarray) -> float:
        ...

    def batch_seconds(self, prefill_tokens: np.ndarray, prefill_pairs: np.ndarray, decode_count: np.ndarray,
                      decode_context: np.ndarray) -> np.ndarray:
        """K candidate steps at once: inputs [K, R] -> seconds [K] (default: one `step_seconds` per row)."""
        return np.array([self.step_seconds(*row) for row in zip(prefill_tokens, prefill_pairs, decode_count,
                                                                  decode_context)], dtype=float)


ROOFLINE_PARAMS = ("overhead_s", "dense_floor_s", "dense_per_token_s", "pair_s", "ctx_s", "moe_floor_s",
                   "moe_per_token_s")


@dataclass(frozen=True)
class RooflineStepModel(StepTimeModel):
    """step = overhead + max_r attn_r + moe, a roofline per part (compute slope vs weight-read floor):
        attn_r = [tok_r > 0] * max(dense_floor, dense_per_token * tok_r) + pair_s * pairs_r + ctx_s * ctx_r
        moe    = [sum tok > 0] * max(moe_floor, moe_per_token * sum_r tok_r)
    tok_r = prefill tokens + decode count (a prefilling rank's decode columns are its mixed rows, zero without
    mixed chunking), ctx_r its decode context. The floors are what makes small chunks nearly free beside decodes;
    `fit_roofline` fits the seven seconds-valued parameters to measured steps."""

    overhead_s: float = 0.0
    dense_floor_s: float = 0.0
    dense_per_token_s: float = 0.0
    pair_s: float = 0.0
    ctx_s: float = 0.0
    moe_floor_s: float = 0.0
    moe_per_token_s: float = 0.0

    def step_seconds(self, prefill_tokens, prefill_pairs, decode_count, decode_context) -> float:
        return float(self.batch_seconds(*(np.asarray(a, dtype=float)[None, :] for a in
                                          (prefill_tokens, prefill_pairs, decode_count, decode_context)))[0])

    def batch_seconds(self, prefill_tokens: np.ndarray, prefill_pairs: np.ndarray, decode_count: np.ndarray,
                      decode_context: np.ndarray) -> np.ndarray:
        """Vectorised over K candidate steps: inputs [K, R] -> seconds [K]."""
        tok = prefill_tokens + decode_count
        attn = (np.where(tok > 0, np.maximum(self.dense_floor_s, self.dense_per_token_s * tok), 0.0)
                + self.pair_s * prefill_pairs + self.ctx_s * decode_context)
        total = tok.sum(axis=1)
        moe = np.where(total > 0, np.maximum(self.moe_floor_s, self.moe_per_token_s * total), 0.0)
        busy = total > 0
        return np.where(busy, self.overhead_s + attn.max(axis=1) + moe, 0.0)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ROOFLINE_PARAMS}


def fit_roofline(prefill_tokens: np.ndarray, prefill_pairs: np.ndarray, decode_count: np.ndarray,
                 decode_context: np.ndarray, measured_s: np.ndarray, prior: RooflineStepModel | None = None,
                 iterations: int = 12) -> RooflineStepModel:
    """Least-squares fit of a RooflineStepModel to measured steps (inputs [N, R], measured_s [N]).

    The model is linear in its parameters once each sample's slowest rank and each max's regime (floor or slope)
    are fixed, so the fit alternates: take those from the current parameters, solve the relative-error least
    squares (numpy lstsq, rows scaled by 1 / measured), clip at 0, repeat. `prior` (e.g. the simulator's model of
    the deployment) is the starting point; without it the regimes start from the slope side. Deterministic."""
    x = [np.asarray(a, dtype=float) for a in (prefill_tokens, prefill_pairs, decode_count, decode_context)]
    y = np.asarray(measured_s, dtype=float)
    if y.ndim != 1 or any(a.shape != x[0].shape or a.shape[0] != y.shape[0] for a in x) or y.size < len(ROOFLINE_PARAMS):
        raise ValueError(f"fit_roofline needs [N, R] feature arrays and [N] measured times with N >= "
                         f"{len(ROOFLINE_PARAMS)}, got shapes {[a.shape for a in x]} and {y.shape}.")
    pt, pp, dc, ctx = x
    tok = pt + dc  # as `RooflineStepModel.batch_seconds`: a prefilling rank's decode columns are its mixed rows
    total = tok.sum(axis=1)
    low = float(np.percentile(y, 5))
    starts = [prior] if prior is not None else []
    # Starting points from the slope side and from the floor side (a floor never chosen stays at 0 otherwise).
    starts += [RooflineStepModel(dense_per_token_s=1e-6, moe_per_token_s=1e-6),
               RooflineStepModel(dense_floor_s=low / 3, dense_per_token_s=1e-7, moe_floor_s=low / 3,
                                 moe_per_token_s=1e-7)]
    fits = [_fit_from(m, tok, pp, ctx, total, y, iterations) for m in starts]
    return min(fits, key=lambda m: float(np.square(m.batch_seconds(pt, pp, dc, x[3]) / y - 1.0).sum()))


def roofline_design(model: RooflineStepModel, tok, pp, ctx, total) -> np.ndarray:
    """Rows [N, 7] such that rows @ theta = predicted step seconds, theta in RooflineStepModel's field order, with
    the regimes (floor or per-token side, slowest rank) that `model` puts each step in. tok, pp, ctx: [N, R] per-rank
    prefill tokens, prefill attention pairs and decode context; total: [N] tokens of the step over all ranks."""
    rows = np.arange(tok.shape[0])
    m = model
    dense_floor_side = m.dense_floor_s >= m.dense_per_token_s * tok  # [N, R]
    attn = (np.where(tok > 0, np.where(dense_floor_side, m.dense_floor_s, m.dense_per_token_s * tok), 0.0)
            + m.pair_s * pp + m.ctx_s * ctx)
    top = attn.argmax(axis=1)
    t_top, p_top, c_top = tok[rows, top], pp[rows, top], ctx[rows, top]
    f_top = dense_floor_side[rows, top] & (t_top > 0)
    moe_floor_side = m.moe_floor_s >= m.moe_per_token_s * total
    busy = total > 0
    return np.stack([busy * 1.0, f_top * 1.0, np.where(f_top, 0.0, t_top), p_top, c_top,
                     (busy & moe_floor_side) * 1.0, np.where(moe_floor_side, 0.0, total)], axis=1)


def _fit_from(model: RooflineStepModel, tok, pp, ctx, total, y, iterations: int) -> RooflineStepModel:
    scale = 1.0 / np.maximum(y, 1e-12)
    for _ in range(iterations):
        a = roofline_design(model, tok, pp, ctx, total)
        theta, *_ = np.linalg.lstsq(a * scale[:, None], y * scale, rcond=None)
        new = RooflineStepModel(*np.maximum(theta, 0.0).tolist())
        if new == model:
            break
        model = new
    return model


def whole_sequence_pair_rate(prefix: np.ndarray, rest: np.ndarray, chunk: np.ndarray) -> np.ndarray:
    """Pairs per token of a prompt whose remaining `rest` tokens after `prefix` are prefilled in chunks of `chunk`
    by a backend that attends each chunk over its whole sequence (a chunk ending at e costs e (e + 1) / 2 pairs):
    sum over the chunks' ends e_k = prefix + min(k * chunk, rest) of e_k (e_k + 1) / 2, divided by rest.
    prefix, rest: [R]; chunk: [K, R] -> [K, R] (0 where rest or chunk is 0)."""
    chunk = np.asarray(chunk, dtype=float)
    p = np.broadcast_to(np.asarray(prefix, dtype=float), chunk.shape)
    r = np.broadcast_to(np.asarray(rest, dtype=float), chunk.shape)
    out = np.zeros(chunk.shape)
    for idx in np.ndindex(chunk.shape):
        b, pre, rem = chunk[idx], p[idx], r[idx]
        if b <= 0 or rem <= 0:
            continue
        ends = pre + np.minimum(np.arange(1, int(np.ceil(rem / b)) + 1) * b, rem)
        out[idx] = float(np.sum(ends * (ends + 1.0) / 2.0)) / rem
    return out


DEFAULT_DECODE_WEIGHT = 0.1  # [request] plan_decode_weight
DEFAULT_ALIGN_WEIGHT = 1.0  # [request] plan_align_weight


def candidate_chunks(upstream_budget: int, min_chunk: int, page: int = 1) -> list[int]:
    """Chunk sizes the plan chooses from: min_chunk * 2^k (page aligned) below the upstream budget, and it."""
    page = max(1, page)
    out, b = [], max(page, -(-min_chunk // page) * page)
    while b < upstream_budget:
        out.append(b)
        b *= 2
    out.append(upstream_budget)
    return out


@dataclass(frozen=True)
class StepPlanner:
    """`plan_step` with its model and tunables bound (one object per rank; all ranks' objects are equal).

    model: the step-time prediction; min_chunk_tokens: the smallest chunk a rank with demand gets (or its whole
    demand when smaller); ls_weight: how many waiting requests one waiting LS request counts as; ls_chunk_tokens:
    while LS work waits anywhere, no candidate chunk is longer than this or the LS request's own tokens."""

    model: StepTimeModel
    min_chunk_tokens: int = 64
    ls_weight: float = 8.0
    ls_chunk_tokens: int = 512
    page_size: int = 1
    decode_weight: float = DEFAULT_DECODE_WEIGHT
    align_weight: float = DEFAULT_ALIGN_WEIGHT
    full_sequence_attention: bool = False
    hold_s: float = 0.0

    def plan(self, summaries: Sequence[RankStepSummary]) -> StepPlan:
        return plan_step(summaries, self.model, self.min_chunk_tokens, self.ls_weight, self.ls_chunk_tokens,
                         self.page_size, self.decode_weight, self.align_weight, self.full_sequence_attention,
                         self.hold_s)


def plan_step(summaries: Sequence[RankStepSummary], model: StepTimeModel, min_chunk_tokens: int = 64,
              ls_weight: float = 8.0, ls_chunk_tokens: int = 512, page_size: int = 1,
              decode_weight: float = DEFAULT_DECODE_WEIGHT,
              align_weight: float = DEFAULT_ALIGN_WEIGHT, full_sequence_attention: bool = False,
              hold_s: float = 0.0) -> StepPlan:
    """The group's plan for this step from every rank's summary (module docstring: objective and invariants).

    `full_sequence_attention`: the attention backend computes every chunk over its whole sequence (upstream's
    torch_native extend pads the chunk's queries to prefix + chunk and runs causal attention on the square), so a
    chunk of b tokens after a prefix p costs (p + b)(p + b + 1) / 2 pairs and small chunks of a long prompt
    multiply its attention work. Each chunk is then charged at the per-token rate of the rank's whole remaining
    prompt chunked at this candidate's size (`whole_sequence_pair_rate`), as the causal case charges the
    prompt's average: a small chunk now means every later chunk re-reads the prefix too.

    Deterministic and independent of the order of `summaries` (they are sorted by rank, which must be 0..R-1)."""
    ranks = sorted(summaries, key=lambda s: s.rank)
    if [s.rank for s in ranks] != list(range(len(ranks))):
        raise ValueError(f"plan_step needs one summary per rank 0..R-1, got ranks {[s.rank for s in summaries]}.")
    upstream = tuple(s.upstream_budget for s in ranks)
    if len(ranks) <= 1:  # no lockstep: upstream's budget exactly
        return StepPlan(upstream, upstream[0] if upstream else 0, 0.0, False)
    demand = np.array([s.demand() for s in ranks], dtype=float)
    if not demand.any():
        return StepPlan(upstream, max(upstream), 0.0, False)
    top = max(upstream)
    floor = min(max(1, min_chunk_tokens), top)
    cands = candidate_chunks(top, floor, page_size)
    ls_any = any(s.ls_waiting > 0 for s in ranks)
    rows = np.array([max(0, s.mixed_rows) for s in ranks], dtype=float)
    ls_floor = np.zeros(len(ranks))
    if ls_any:
        # A rank where LS work waits prefills it this step: its LS tokens after the BE chunk's continuation (which
        # the LS protection limits to ls_chunk_tokens). Every step is kept short meanwhile: candidates are prefill
        # tokens (mixed rows are not taken off them) up to max(ls_chunk_tokens, that LS need).
        chunk_cont = np.array([min(max(0, s.chunk_tokens), ls_chunk_tokens) for s in ranks], dtype=float)
        ls_tok = np.array([s.ls_tokens if s.ls_waiting > 0 else 0 for s in ranks], dtype=float)
        ls_floor = np.where(ls_tok > 0, np.minimum(demand, ls_tok + chunk_cont), 0.0)
        limit = max(ls_chunk_tokens, int(ls_floor.max()), floor)
        cands = [c for c in cands if c < limit] + [min(limit, top)]
        rows_off = np.zeros(len(ranks))
    else:
        # B caps each rank's whole step, prefill + mixed decode rows (what upstream's chunked_prefill_size caps).
        rows_off = rows
    cand = np.array(sorted(set(cands)), dtype=float)  # [K]
    budgets = np.minimum(demand[None, :], np.maximum(cand[:, None] - rows_off[None, :], 0.0))  # [K, R] prefill
    # Progress: every rank with demand moves at least min(demand, floor) tokens (a rank with LS work its LS need).
    budgets = np.maximum(budgets, np.maximum(np.minimum(demand, floor), ls_floor)[None, :])
    # Attention pairs at the request's average rate, b * (prefix + remaining / 2): a prompt's total attention
    # work does not depend on how it is chunked, so no chunk size looks cheaper by deferring it to later chunks.
    prefix = np.array([s.chunk_prefix if s.chunk_tokens > 0 else 0 for s in ranks], dtype=float)
    rest = np.array([s.chunk_tokens if s.chunk_tokens > 0 else d for s, d in zip(ranks, demand)], dtype=float)
    pairs = budgets * (prefix + (rest + 1.0) / 2.0)[None, :]
    if full_sequence_attention:
        pairs = budgets * whole_sequence_pair_rate(prefix, rest, budgets)
    dcount = np.array([s.decode_count for s in ranks], dtype=float)
    dctx = np.array([s.decode_context for s in ranks], dtype=float)
    prefilling = budgets > 0
    mixes = prefilling & (rows > 0)[None, :]  # the rank's decodes ride in its prefill step
    stalls = prefilling & ~mixes  # the rank's decodes sit the step out
    dc = np.where(stalls, 0.0, dcount[None, :])
    dx = np.where(stalls, 0.0, dctx[None, :])
    step = np.asarray(model.batch_seconds(budgets, pairs, dc, dx), dtype=float)  # [K]
    zero = np.zeros((1, len(ranks)))
    s_decode = float(model.batch_seconds(zero, zero, dcount[None, :], dctx[None, :])[0])
    waiting = float(sum(s.waiting_requests for s in ranks))
    ls = float(sum(s.ls_waiting for s in ranks))
    # Every waiting request in the group waits the step out (LS ones weigh ls_weight); a decode that sits out a
    # prefill step (no mixed chunking) loses the whole step, one that rides along or runs on a decoding rank is
    # stretched from s_decode to the step; arrivals during the step wait half of it on average.
    arrivals = float(sum(max(0.0, s.arrival_rate) for s in ranks))
    lost = (dcount[None, :] * stalls).sum(axis=1)  # [K]
    stretched = (dcount[None, :] * ~stalls).sum(axis=1)
    cost = (step * (waiting + (ls_weight - 1.0) * ls) + decode_weight * (lost * step + stretched
            * np.maximum(step - s_decode, 0.0)) + arrivals * step * step / 2.0)
    # Value of the step: prefill progress in requests, each request's tokens counted as a share of its uncached
    # prompt (the chunked request's remainder first, then waiting requests of the rank's mean size), so a step
    # that finishes a short prompt is worth as much as one that finishes a long one (mean TTFT counts requests).
    chunk = np.array([max(0, s.chunk_tokens) for s in ranks], dtype=float)
    mean_wait = np.array([s.mean_waiting_tokens() for s in ranks], dtype=float)
    on_chunk = np.minimum(budgets, chunk[None, :])
    value = (np.divide(on_chunk, chunk[None, :], out=np.zeros_like(budgets), where=chunk[None, :] > 0)
             + (budgets - on_chunk) / mean_wait[None, :]).sum(axis=1)
    ratio = cost / np.maximum(value, 1e-12)
    best = int(np.argmin(ratio))  # first minimum: the smallest chunk among equals
    idle = demand == 0
    if align_weight > 0 and best > 0 and not ls_any and idle.any():
        # Alignment: some ranks have nothing to prefill, so the chosen step's extra length over the smallest
        # candidate (every rank with demand at min(demand, floor): progress still holds) is lockstep waste for
        # the share of ranks that do not prefill. Take the small step instead when that waste, over every running
        # request, outweighs what the waiting requests lose by waiting for another rank's demand (expected after
        # 1 / arrival rate of the idle ranks) -- the prefill then runs in a step the other ranks share.
        idle_rate = float(sum(max(0.0, s.arrival_rate) for s, i in zip(ranks, idle) if i))
        if idle_rate > 0:
            waste = (align_weight * decode_weight * float(dcount.sum()) * max(0.0, float(step[best] - step[0]))
                     * float(idle.sum()) / len(ranks))
            if waste > (waiting + (ls_weight - 1.0) * ls) / idle_rate:
                best = 0
    if hold_s > 0 and not ls_any and idle.any():
        held = _hold(ranks, model, demand, budgets[best], float(step[best]), s_decode, dcount, dctx, rows,
                     prefix, rest, full_sequence_attention, waiting, arrivals, decode_weight, hold_s)
        if held is not None:
            return held
    prefill = tuple(int(b) for b in budgets[best])
    caps = tuple(b + int(m) if b > 0 else 0 for b, m in zip(prefill, rows))
    return StepPlan(caps, int(cand[best]), float(step[best]), True, prefill)


def _hold(ranks, model, demand, budgets, step_now, s_decode, dcount, dctx, rows, prefix, rest, full_sequence,
          waiting, arrivals, decode_weight, hold_s) -> StepPlan | None:
    """Priced alignment by holding: the plan for a step in which no rank prefills, or None to prefill now.

    Only called while some ranks have no prefill demand, no chunked prefill is in flight and no LS work waits. The
    ranks with demand would prefill alone, stretching every running request's step from s_decode to step_now (or
    taking it, on a rank that prefills without mixed chunking). Held, their tokens run later in a step the other
    ranks share, where they add only their share of an aligned step (every rank prefilling the same tokens). The
    plan holds when the stall saved, over every running request and weighed by decode_weight, exceeds what the
    waiting requests lose by waiting for that step: each waits the expected time until an idle rank has demand
    (1 / the idle ranks' arrival rate), never more than what is left of hold_s for the rank that waited longest.
    A rank whose oldest waiting request has waited hold_s is never held (the wait bound: hold_s + the drain
    bound)."""
    has = demand > 0
    waits = [max(0.0, s.oldest_wait_s) for s, h in zip(ranks, has) if h]
    left = hold_s - max(waits, default=0.0)
    if left <= 0:
        return None
    idle_rate = float(sum(max(0.0, s.arrival_rate) for s, h in zip(ranks, has) if not h))
    if idle_rate <= 0:
        return None
    wait = min(left, 1.0 / idle_rate)
    stalls = has & (rows <= 0)
    lost = float(dcount[stalls].sum())
    stretched = float(dcount[~stalls].sum())
    now_stall = lost * step_now + stretched * max(0.0, step_now - s_decode)
    # The aligned step: every rank prefills the mean planned tokens of the ranks with demand, at their mean
    # attention rate; these ranks' share of its stall.
    b = float(budgets[has].mean())
    rate = float(np.mean(np.divide(_pairs(budgets, prefix, rest, full_sequence)[has], budgets[has])))
    n = len(ranks)
    tok = np.full((1, n), b)
    mixes = rows > 0
    step_al = float(model.batch_seconds(tok, tok * rate, np.where(mixes, dcount, 0.0)[None, :],
                                        np.where(mixes, dctx, 0.0)[None, :])[0])
    lost_al = float(dcount[~mixes].sum())
    share = float(has.sum()) / n
    aligned_stall = share * (lost_al * step_al + (float(dcount.sum()) - lost_al) * max(0.0, step_al - s_decode))
    saved = decode_weight * (now_stall - aligned_stall)
    if saved <= waiting * wait + arrivals * wait * wait / 2.0:
        return None
    zero = tuple(0 for _ in ranks)
    return StepPlan(zero, 0, s_decode, True, zero)


def _pairs(budgets: np.ndarray, prefix: np.ndarray, rest: np.ndarray, full_sequence: bool) -> np.ndarray:
    """Attention pairs of per-rank prefill budgets [R] (as plan_step charges them)."""
    if full_sequence:
        return budgets * whole_sequence_pair_rate(prefix, rest, budgets[None, :])[0]
    return budgets * (prefix + (rest + 1.0) / 2.0)
