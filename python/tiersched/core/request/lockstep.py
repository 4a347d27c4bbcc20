"""prefix-aging's protection of latency-sensitive (LS) requests from best-effort (BE) prefill.

SGLang runs a whole step at once, so an LS request that waits behind a long BE chunked prefill waits for that
step. While LS work waits, BE prefill per step is capped: the running BE chunk (`chunk_token_limit`) and the BE
requests newly admitted in the step (`be_admission_budget`). Under DP attention every rank's forward step is one
lockstep step, so "LS work waits" means on ANY rank of the group: `LockstepLsSignal` turns the per-step group
counts into the value both caps read.

Priced cap (`ls_cap_pays`, `[request] ls_cap_pricing`): a cap is not free. Cutting BE prefill into
`be_chunk_tokens` steps adds steps, each with its fixed cost, and (without mixed chunking) each one is a step in
which the rank's running requests do not decode; with a whole-sequence attention backend every later chunk also
re-reads the prompt so far. Where a step-time model of the deployment is known (`LsCapPricing`), the cap is
applied only when the LS stall it saves outweighs that cost, both predicted by the model over the BE work the cap
would cut (`cap_plan_cost`). Without a model: the fixed rule.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from tiersched.core.request import RequestTierConfig
from tiersched.core.request.step_plan import StepTimeModel

LS_RATE_WINDOW_S = 10.0  # LockstepLsSignal's LS arrival rate: arrivals seen over the last this many seconds


@dataclass(frozen=True)
class LsCapPricing:
    """What pricing the LS cap needs beside the rule's own inputs: the step-time model and this rank's load.

    model: predicted seconds of a step from per-rank work (step_plan.StepTimeModel); ls_rate_per_s: LS requests per second arriving in the lockstep group (one that
    arrives during a step waits out the rest of it, half a step on average); group_ls_now: LS requests the group
    count shows waiting this step (0 while only the hold keeps the signal on); decode_count / decode_context: this
    rank's running requests and their context tokens (without mixed chunking they sit out every step the rank
    prefills); waiting_requests: requests waiting on this rank besides the BE work priced (they start after it);
    upstream_budget: the rank's uncapped per-step prefill budget (upstream's chunked_prefill_size);
    full_sequence_attention: the prefill backend attends each chunk over its whole sequence (step_plan.plan_step);
    group_ranks: ranks in the lockstep group. This rank does not see the others' work, so the group is priced as
    R ranks like this one: every rank under the same LS signal sizes its BE prefill the same way, and the step's
    MoE part is paid on the group's tokens (arrays of shape [R], all equal); the others' running requests are as
    many as this rank's."""

    model: StepTimeModel
    ls_rate_per_s: float = 0.0
    group_ls_now: int = 0
    decode_count: int = 0
    decode_context: int = 0
    waiting_requests: int = 0
    upstream_budget: int = 8192
    full_sequence_attention: bool = False
    group_ranks: int = 1


def cap_plan_steps(work_tokens: int, work_prefix: int, first: int, later: int, step_tokens: int = 0,
                   full_sequence_attention: bool = False) -> list[tuple[int, float]]:
    """The steps (prefill tokens, attention pairs) in which this rank prefills `work_tokens` BE tokens after
    `work_prefix` computed ones: at most `first` in this step, which already holds `step_tokens` other prefill
    tokens (priced as a fresh prompt), then at most `later` per step. `first` may be 0 (the work waits a step).
    Pairs of a piece of e tokens after p: e (p + (e + 1) / 2), or (p + e)(p + e + 1) / 2 with whole-sequence
    attention."""
    if later < 1:
        raise ValueError(f"cap_plan_steps needs later >= 1, got {later!r}.")
    steps: list[tuple[int, float]] = []
    done = 0
    while done < work_tokens or not steps:
        e = max(0, min(first if not steps else later, work_tokens - done))
        base = step_tokens if not steps else 0
        p = work_prefix + done
        pairs = 0.0
        if e > 0:
            pairs = (p + e) * (p + e + 1) / 2.0 if full_sequence_attention else e * (p + (e + 1) / 2.0)
        steps.append((base + e, pairs + base * (base + 1) / 2.0))
        done += e
    return steps


def _plan_step_seconds(steps: Sequence[tuple[int, float]], pricing: LsCapPricing) -> tuple[np.ndarray, np.ndarray]:
    """The model's seconds of each step of a plan (cap_plan_steps), shape [K], for the group priced as R ranks
    like this one (LsCapPricing), and which steps prefill ([K] bool: this rank's decodes sit those out)."""
    r = max(1, pricing.group_ranks)
    tok = np.repeat(np.array([[float(t)] for t, _ in steps]), r, axis=1)  # [K, R]
    pairs = np.repeat(np.array([[float(p)] for _, p in steps]), r, axis=1)
    prefills = tok[:, 0] > 0
    dc = np.repeat(np.where(prefills, 0.0, float(pricing.decode_count))[:, None], r, axis=1)
    dx = np.repeat(np.where(prefills, 0.0, float(pricing.decode_context))[:, None], r, axis=1)
    return np.asarray(pricing.model.batch_seconds(tok, pairs, dc, dx), dtype=float), prefills


def cap_plan_cost(steps: Sequence[tuple[int, float]], pricing: LsCapPricing, ls_waiting_now: int,
                  config: RequestTierConfig, horizon_s: float = 0.0) -> float:
    """Predicted cost (request-seconds) of prefilling the BE work in `steps` (cap_plan_steps): the step plan's
    objective terms (step_plan.plan_step) summed over the steps the work takes,

        (1 + W) * T  +  w_d * D * (sum_{prefill steps} S_k  +  (R - 1) * sum_k (S_k - S_dec)^+)
                     +  w_ls * (LS_now * S_1 + lambda_LS * (sum_k S_k^2 + (H - T)^+ * S_dec) / 2)

    S_k: the model's time of step k for the group priced as R ranks like this one (with prefill tokens: every
    rank prefills and this rank's decodes sit the step out; without: a decode step); T = sum S_k: when the BE
    request's prefill is done and the W requests waiting behind it can start; D: this rank's running requests
    (`plan_decode_weight` w_d per second of decode lost), and as many on each of the R - 1 other ranks of the
    lockstep group, whose decode step S_dec is stretched to S_k (the lockstep waste a long step causes, which a
    short one avoids; a lower bound where they prefill too); LS_now: LS requests waiting now, which wait out the
    first step; lambda_LS: LS arrivals per second, each waiting out half the step it arrives in
    (`plan_ls_weight` w_ls per LS second). H (`horizon_s`): arrivals are counted over at least H seconds, the
    group running decode steps S_dec after the plan, so that two plans of different lengths are priced over the
    same time (a shorter plan is not credited with the arrivals it merely does not see)."""
    r = max(1, pricing.group_ranks)
    s, prefills = _plan_step_seconds(steps, pricing)
    total = float(s.sum())
    lost = float(pricing.decode_count) * float(s[prefills].sum())
    zero = np.zeros((1, r))
    s_dec = float(pricing.model.batch_seconds(zero, zero, zero + float(pricing.decode_count),
                                              zero + float(pricing.decode_context))[0])
    if pricing.group_ranks > 1 and pricing.decode_count > 0:
        lost += ((pricing.group_ranks - 1) * float(pricing.decode_count)
                 * float(np.maximum(s - s_dec, 0.0).sum()))
    arrivals = float(np.square(s).sum()) + max(0.0, horizon_s - total) * s_dec
    ls = max(0, ls_waiting_now) * float(s[0]) + max(0.0, pricing.ls_rate_per_s) * arrivals / 2.0
    return ((1.0 + max(0, pricing.waiting_requests)) * total + config.plan_decode_weight * lost
            + config.plan_ls_weight * ls)


def ls_cap_pays(work_tokens: int, work_prefix: int, capped_first: int, uncapped_first: int, pricing: LsCapPricing,
                ls_waiting_now: int, config: RequestTierConfig, step_tokens: int = 0) -> bool:
    """Whether capping this rank's BE prefill is predicted to cost no more than not capping it (`cap_plan_cost`):
    capped, the BE work takes at most `capped_first` tokens now and `be_chunk_tokens` per later step; uncapped,
    `uncapped_first` now and the upstream budget per later step. True where the cap shortens nothing."""
    if work_tokens <= 0 or capped_first >= min(uncapped_first, work_tokens):
        return True
    full = pricing.full_sequence_attention
    later_up = max(1, pricing.upstream_budget)
    capped = cap_plan_steps(work_tokens, work_prefix, max(0, capped_first), max(1, min(config.be_chunk_tokens,
                            later_up)), step_tokens, full)
    uncapped = cap_plan_steps(work_tokens, work_prefix, uncapped_first, later_up, step_tokens, full)
    horizon = max(float(_plan_step_seconds(capped, pricing)[0].sum()),
                  float(_plan_step_seconds(uncapped, pricing)[0].sum()))
    return (cap_plan_cost(capped, pricing, ls_waiting_now, config, horizon)
            <= cap_plan_cost(uncapped, pricing, ls_waiting_now, config, horizon))


def chunk_token_limit(
    chunked_priority: int,
    chunked_remaining_tokens: int,
    waiting_uncached: Sequence[tuple[int, int]],
    budget_tokens: int,
    page_size: int,
    config: RequestTierConfig,
    group_ls_waiting: int = 0,
    pricing: LsCapPricing | None = None,
    chunked_prefix_tokens: int = 0,
) -> int | None:
    """Cap on the tokens the running chunked prefill may advance this step, or None for no cap.

    chunked_priority / chunked_remaining_tokens: the request being chunk-prefilled.
    waiting_uncached: (priority, uncached_tokens) of waiters, in scheduling order.
    budget_tokens: this step's prefill token budget (upstream's rem_chunk_tokens).
    group_ls_waiting: the largest LS-waiting count any rank of this rank's lockstep (DP-attention) group
    published (0 without DP attention); counts when `config.lockstep_chunk_cap` is on.
    pricing: with `config.ls_cap_pricing`, the LS cap applies only where `ls_cap_pays` (module docstring);
    chunked_prefix_tokens: the chunked request's computed tokens (its next chunk attends to them).

    Two rules, the smaller cap wins:
      * shorter-waiter reservation (as upstream shortest-prefill-first's shortest_prefill_chunk_limit): reserve
        budget for waiters whose uncached work is shorter than the chunk's remainder, in order, while the chunk
        keeps at least `min_chunk_tokens`; so a long prefill never blocks short waiters for more than a step;
      * LS protection (the QLLM analog in SGLang's whole-step execution): while an LS request waits behind a BE
        chunk, the BE chunk advances at most `be_chunk_tokens`, so the step the LS request waits on is short.
        Under DP attention every rank's step is one lockstep step, so "waits" means on ANY rank of the group.
    Page-aligned; never below `min_chunk_tokens` rounded up to a page.
    """
    page = max(1, page_size)
    floor = -(-config.min_chunk_tokens // page) * page
    if budget_tokens <= floor:
        return None
    caps: list[int] = []
    reserved = 0
    for priority, uncached in waiting_uncached:
        charge = -(-max(uncached, 1) // page) * page
        if uncached >= chunked_remaining_tokens or reserved + charge > budget_tokens - floor:
            break
        reserved += charge
    if reserved:
        caps.append(budget_tokens - reserved)
    ls_waiting = any(config.is_latency_sensitive(p) for p, _ in waiting_uncached) or (
        config.lockstep_chunk_cap and group_ls_waiting > 0)
    if ls_waiting and not config.is_latency_sensitive(chunked_priority):
        if pricing is None or not config.ls_cap_pricing:
            caps.append(config.be_chunk_tokens)
        else:
            local = sum(1 for p, _ in waiting_uncached if config.is_latency_sensitive(p))
            cap = max(floor, config.be_chunk_tokens // page * page)
            if ls_cap_pays(chunked_remaining_tokens, chunked_prefix_tokens, cap, budget_tokens, pricing,
                           max(local, pricing.group_ls_now), config):
                caps.append(config.be_chunk_tokens)
    if not caps:
        return None
    limit = max(floor, min(caps) // page * page)
    return limit if limit < budget_tokens else None


def be_admission_budget(local_ls_waiting: int, group_ls_waiting: int, be_tokens_this_step: int,
                        config: RequestTierConfig, pricing: LsCapPricing | None = None,
                        request_tokens: int = 0, request_prefix: int = 0, step_tokens: int = 0,
                        room_tokens: int | None = None) -> int | None:
    """Prefill tokens a BE request newly admitted this step may take (None: no cap; 0: admit no BE this step).

    While LS work waits (on this rank, or with `lockstep_chunk_cap` on any rank of the lockstep group), this
    rank's BE prefill per step is bounded by `be_chunk_tokens` in total: the capped running chunk plus new BE
    admissions (without this, a BE request admitted on an idle rank takes a whole 8192-token first chunk and
    the LS request on another rank waits for that step). `be_tokens_this_step`: BE tokens already in this
    step's batch. A remainder below `min_chunk_tokens` admits nothing (the BE request waits one short step).
    pricing (with `config.ls_cap_pricing`): the cap applies only where `ls_cap_pays` for the request being
    admitted (`request_tokens` uncached after `request_prefix` cached), in a step that already holds
    `step_tokens` prefill tokens and has `room_tokens` left uncapped (None: the upstream budget less step_tokens).
    """
    ls_active = local_ls_waiting > 0 or (config.lockstep_chunk_cap and group_ls_waiting > 0)
    if not ls_active or not config.cap_be_admissions:
        return None
    left = config.be_chunk_tokens - max(0, be_tokens_this_step)
    left = left if left >= config.min_chunk_tokens else 0
    if pricing is not None and config.ls_cap_pricing and request_tokens > 0:
        room = room_tokens if room_tokens is not None else max(0, pricing.upstream_budget - max(0, step_tokens))
        if not ls_cap_pays(request_tokens, request_prefix, left, room, pricing,
                           max(local_ls_waiting, pricing.group_ls_now), config, step_tokens):
            return None
    return left


class LockstepLsSignal:
    """The DP-wide "LS work waiting" signal one rank applies, from the per-step group counts it receives.

    `observe(group_ls_waiting, now_s)` is called once per scheduling step with the largest LS-waiting count
    any rank of the lockstep group published (SGLang: gathered with the previous step's MLP-sync all-gather);
    it returns the value the chunk cap uses this step: the count itself, or 1 while `ls_hold_s` has not passed
    since a nonzero count was last seen. Every rank observes the same gathered values, so all ranks of a group
    agree. `expire(now_s)` is for a step without a fresh count (no gather ran): only the hold remains, and it
    runs out, so a stale signal cannot keep BE capped.

    For the priced cap it also estimates the group's LS arrival rate: each rise of the count over the previous
    observation counts as that many arrivals (`ls_rate_per_s`, over the last LS_RATE_WINDOW_S). The count is the
    largest over ranks, so LS requests waiting on two ranks at once count once: an underestimate. `fresh` is the
    count of the last observation (0 while only the hold keeps the signal on). Before LS_RATE_WINDOW_S of
    observations the rate is over the time observed so far (at least 1 s).
    """

    def __init__(self, config: RequestTierConfig):
        self.config = config
        self.last_seen_s = -math.inf
        self.last_observed_s = 0.0
        self.first_observed_s: float | None = None
        self.fresh = 0
        self._last_count = 0
        self._arrivals: deque[tuple[float, int]] = deque()
        self._arrived = 0

    def observe(self, group_ls_waiting: int, now_s: float) -> int:
        count = max(0, int(group_ls_waiting))
        if self.first_observed_s is None:
            self.first_observed_s = now_s
        if count > self._last_count:
            self._arrivals.append((now_s, count - self._last_count))
            self._arrived += count - self._last_count
        self._last_count = count
        self.last_observed_s = now_s
        self._trim(now_s)
        self.fresh = count
        if count > 0:
            self.last_seen_s = now_s
            return count
        return self.expire(now_s)

    def _trim(self, now_s: float) -> None:
        while self._arrivals and self._arrivals[0][0] < now_s - LS_RATE_WINDOW_S:
            self._arrived -= self._arrivals.popleft()[1]

    def ls_rate_per_s(self, now_s: float) -> float:
        """LS arrivals per second seen in the group over the last LS_RATE_WINDOW_S seconds."""
        self._trim(now_s)
        if self.first_observed_s is None:
            return 0.0
        return self._arrived / min(LS_RATE_WINDOW_S, max(1.0, now_s - self.first_observed_s))

    def expire(self, now_s: float) -> int:
        return 1 if now_s - self.last_seen_s <= self.config.ls_hold_s else 0
