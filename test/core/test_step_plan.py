"""Lockstep step plan (core/request/step_plan.py): invariants as property tests, the objective's direction, the fit."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiersched.core.request import RequestTierConfig
from tiersched.core.request.step_plan import (RankStepSummary, RooflineStepModel, StepPlanner, StepTimeModel,
                                              candidate_chunks, fit_roofline, plan_step)

# Roughly the simulator's qwen3-dp4ep4 fit: a decode step is KV-read bound, so short chunks ride almost free.
MODEL = RooflineStepModel(overhead_s=0.008, dense_floor_s=0.0005, dense_per_token_s=7e-6, pair_s=1.4e-9,
                          ctx_s=4e-8, moe_floor_s=0.002, moe_per_token_s=6e-6)

models = st.builds(RooflineStepModel, *[st.floats(0, 1e-2) for _ in range(2)], st.floats(1e-8, 1e-4),
                   st.floats(0, 1e-8), st.floats(0, 1e-7), st.floats(0, 1e-2), st.floats(1e-8, 1e-4))


@st.composite
def summaries(draw, min_ranks=2, max_ranks=8):
    n = draw(st.integers(min_ranks, max_ranks))
    upstream = draw(st.sampled_from([1024, 2048, 4096, 8192, 16384]))
    out = []
    for r in range(n):
        chunk = draw(st.sampled_from([0, 0, draw(st.integers(1, 30_000))]))
        waiting = draw(st.integers(0, 40_000))
        reqs = draw(st.integers(0, 50)) if waiting else 0
        ls = draw(st.integers(0, reqs)) if reqs else 0
        decode = draw(st.integers(0, 256))
        out.append(RankStepSummary(
            rank=r, upstream_budget=upstream, chunk_tokens=chunk, chunk_prefix=draw(st.integers(0, 20_000)),
            waiting_tokens=waiting, waiting_requests=reqs + (chunk > 0), ls_waiting=ls,
            ls_tokens=draw(st.integers(1, waiting)) if ls else 0, decode_count=decode,
            decode_context=draw(st.integers(0, 2_000_000)), kv_room_tokens=draw(st.integers(-5000, 400_000)),
            slot_room=draw(st.integers(0, 256)), mixed_rows=draw(st.sampled_from([0, decode])),
            waiting_counted=draw(st.integers(0, reqs)), arrival_rate=draw(st.sampled_from([0.0, 5.0, 50.0])),
            oldest_wait_s=draw(st.sampled_from([0.0, 0.01, 0.2, 2.0]))))
    return out


weights = st.sampled_from([0.0, 0.1, 1.0, 10.0])


@settings(max_examples=300, deadline=None)
@given(summaries(), models, st.randoms(use_true_random=False), st.integers(1, 512), weights, weights)
def test_same_plan_in_any_rank_order(ranks, model, rnd, min_chunk, decode_weight, align_weight):
    plan = plan_step(ranks, model, min_chunk, decode_weight=decode_weight, align_weight=align_weight)
    shuffled = list(ranks)
    rnd.shuffle(shuffled)
    assert plan_step(shuffled, model, min_chunk, decode_weight=decode_weight, align_weight=align_weight) == plan
    # every rank evaluates its own copy: equal planners give equal plans
    planner = StepPlanner(model, min_chunk, decode_weight=decode_weight, align_weight=align_weight)
    assert planner.plan(shuffled) == plan


@settings(max_examples=300, deadline=None)
@given(summaries(), models, st.integers(1, 512), weights, weights)
def test_limits_and_progress(ranks, model, min_chunk, decode_weight, align_weight):
    plan = plan_step(ranks, model, min_chunk, decode_weight=decode_weight, align_weight=align_weight)
    assert len(plan.budgets) == len(ranks)
    for r, (s, cap) in enumerate(zip(ranks, plan.budgets)):
        demand = s.demand()
        assert 0 <= cap <= s.upstream_budget
        if not plan.planned:
            continue
        b = plan.prefill[r]
        assert cap == (b + s.mixed_rows if b > 0 else 0)  # the cap on upstream's budgets holds the mixed rows too
        assert b <= s.upstream_budget - s.mixed_rows
        assert b <= s.chunk_tokens + max(0, s.kv_room_tokens)  # KV room (the chunk holds its KV already)
        if s.chunk_tokens == 0 and s.slot_room == 0:
            assert b == 0  # no slot for a new request
        assert (b == 0) == (demand == 0)
        assert b >= min(demand, min_chunk)  # progress every step: the planner defers no rank


@settings(max_examples=200, deadline=None)
@given(summaries(max_ranks=6), models, st.integers(16, 512), st.integers(1, 20_000), weights)
def test_drain_bound(ranks, model, min_chunk, tokens, align_weight):
    """A request of `tokens` uncached tokens at the head of rank 0 is prefilled within ceil(tokens / min_chunk)
    steps whatever the other ranks do: the service lengthening that the wait bound (docs/lockstep.md) adds."""
    s0 = replace(ranks[0], chunk_tokens=tokens, waiting_tokens=0, waiting_requests=1, ls_waiting=0, ls_tokens=0,
                 mixed_rows=0)
    ranks = [s0] + ranks[1:]
    steps = 0
    while ranks[0].chunk_tokens > 0:
        b = plan_step(ranks, model, min_chunk, align_weight=align_weight).prefill[0]
        ranks[0] = replace(ranks[0], chunk_tokens=ranks[0].chunk_tokens - b, chunk_prefix=ranks[0].chunk_prefix + b)
        steps += 1
        assert steps <= math.ceil(tokens / min(min_chunk, s0.upstream_budget))
    assert steps >= math.ceil(tokens / s0.upstream_budget)


@settings(max_examples=200, deadline=None)
@given(summaries(min_ranks=1, max_ranks=1), models)
def test_one_rank_is_upstream(ranks, model):
    plan = plan_step(ranks, model)
    assert plan.budgets == (ranks[0].upstream_budget,) and not plan.planned


def test_no_demand_is_upstream():
    ranks = [RankStepSummary(r, 8192, decode_count=10, decode_context=10_000) for r in range(4)]
    plan = plan_step(ranks, MODEL)
    assert plan.budgets == (8192,) * 4 and not plan.planned


def test_rejects_missing_ranks():
    with pytest.raises(ValueError, match="one summary per rank"):
        plan_step([RankStepSummary(0, 8192), RankStepSummary(2, 8192)], MODEL)


def _group(prefill_rank_tokens, decode_count, waiting=1, ls=0, ls_tokens=0):
    """Rank 0 has `prefill_rank_tokens` waiting; ranks 1..3 decode `decode_count` requests of 2k context."""
    ranks = [RankStepSummary(0, 8192, waiting_tokens=prefill_rank_tokens, waiting_requests=waiting, ls_waiting=ls,
                             ls_tokens=ls_tokens, kv_room_tokens=10**6, slot_room=100)]
    ranks += [RankStepSummary(r, 8192, decode_count=decode_count, decode_context=decode_count * 2000,
                              kv_room_tokens=10**6, slot_room=100) for r in (1, 2, 3)]
    return ranks


def test_large_decode_batch_shrinks_the_chunk_and_prefill_bound_grows_it():
    idle = plan_step(_group(20_000, 0), MODEL)
    busy = plan_step(_group(20_000, 200), MODEL)
    assert idle.budgets[0] == 8192  # nothing else runs: the whole upstream chunk
    assert busy.budgets[0] < idle.budgets[0]
    crowded = plan_step(_group(20_000, 200, waiting=1000), MODEL)  # many waiters: prefill-bound
    assert crowded.budgets[0] > busy.budgets[0]


def test_equalise_a_short_rank_keeps_the_long_rank_short():
    ranks = _group(20_000, 0)
    alone = plan_step(ranks, MODEL)
    ranks[1] = replace(ranks[1], waiting_tokens=300, waiting_requests=1)
    plan = plan_step(ranks, MODEL)
    # the short prompt on rank 1 is worth a whole request: the step is sized near it, not by rank 0's long prompt
    assert alone.budgets[0] == 8192
    assert plan.budgets[1] >= 256 and plan.budgets[0] <= 512


def test_value_counts_requests_not_tokens():
    """Two ranks with the same waiting tokens: one long prompt vs many short ones. Finishing short prompts is
    worth more requests per step, so the plan does not take a longer step for the long prompt."""
    long_ = [RankStepSummary(r, 8192, waiting_tokens=8000, waiting_requests=1, waiting_counted=1,
                             kv_room_tokens=10**6, slot_room=100) for r in range(2)]
    short = [replace(s, waiting_requests=40, waiting_counted=40) for s in long_]
    assert plan_step(short, MODEL).chunk <= plan_step(long_, MODEL).chunk


def _lone_prefill(decodes=200, rate=10.0):
    return [replace(s, arrival_rate=rate) for s in _group(20_000, decodes)]


def test_alignment_keeps_a_lone_prefill_small_while_other_ranks_have_none():
    ranks = _lone_prefill()
    free = plan_step(ranks, MODEL, decode_weight=0.1, align_weight=0.0)
    aligned = plan_step(ranks, MODEL, decode_weight=0.1, align_weight=1.0)
    assert free.prefill[0] > 64 and aligned.prefill[0] == 64  # progress: min(demand, min_chunk_tokens)
    # ... but not when the other ranks get no arrivals (nothing to align with), without decodes to protect, or
    # while LS work waits (its step stays short by the LS cap instead)
    assert plan_step(_lone_prefill(rate=0.0), MODEL, decode_weight=0.1, align_weight=1.0).prefill[0] > 64
    assert plan_step(_lone_prefill(decodes=0), MODEL, decode_weight=0.1, align_weight=1.0).prefill[0] > 64
    ls = _lone_prefill()
    ls[0] = replace(ls[0], ls_waiting=1, ls_tokens=1000)
    assert plan_step(ls, MODEL, decode_weight=0.1, align_weight=1.0).prefill[0] == 1000
    # every rank with demand: nothing to wait for
    busy = [replace(s, waiting_tokens=20_000, waiting_requests=1) for s in _lone_prefill()]
    assert plan_step(busy, MODEL, decode_weight=0.1, align_weight=1.0) == plan_step(busy, MODEL, decode_weight=0.1,
                                                                                align_weight=0.0)


def test_hold_waits_for_the_other_ranks_only_when_the_stall_saved_pays_for_the_wait():
    """Rank 0 would prefill a 1024-token chunk alone (min_chunk_tokens 1024) beside 3 x 64 mixed decodes."""
    def group(decodes=64, rate=20.0, **first):
        ranks = [replace(s, arrival_rate=rate, oldest_wait_s=0.01, mixed_rows=s.decode_count)
                 for s in _group(2000, decodes)]
        return [replace(ranks[0], **first)] + ranks[1:]

    def plan(ranks, hold_s=0.5, decode_weight=1.0):
        return plan_step(ranks, MODEL, min_chunk_tokens=1024, decode_weight=decode_weight, hold_s=hold_s)

    assert plan(group(), hold_s=0.0).prefill[0] == 1024  # off by default
    held = plan(group())
    assert held.planned and held.prefill == (0, 0, 0, 0) and held.budgets == (0, 0, 0, 0)
    # not held: the oldest waiting request waited hold_s already; a low weight on decode delay; no decodes to
    # protect (nothing saved); no arrivals on the other ranks (nothing to align with); many waiters (their wait
    # outweighs the stall); LS work waiting; every rank with demand (already aligned)
    assert plan(group(oldest_wait_s=0.5)).prefill[0] == 1024
    assert plan(group(), decode_weight=0.1).prefill[0] == 1024
    assert plan(group(decodes=0)).prefill[0] == 1024
    assert plan(group(rate=0.0)).prefill[0] == 1024
    assert plan(group(waiting_requests=400)).prefill[0] > 0
    assert plan(group(ls_waiting=1, ls_tokens=2000)).prefill[0] == 2000
    every = [replace(s, waiting_tokens=2000, waiting_requests=1) for s in group()]
    assert all(b > 0 for b in plan(every).prefill)


@settings(max_examples=150, deadline=None)
@given(summaries(), models, st.randoms(use_true_random=False), st.integers(1, 512), weights,
       st.sampled_from([0.05, 0.5, 5.0]))
def test_hold_is_the_same_on_every_rank_and_bounded(ranks, model, rnd, min_chunk, decode_weight, hold_s):
    """With holding on: the same plan in any rank order; a held step prefills nothing on any rank, and only while
    no LS work waits, some rank has no demand and every rank with demand has waited less than hold_s; otherwise
    every rank with demand progresses as without holding (so a request waits at most hold_s longer)."""
    plan = plan_step(ranks, model, min_chunk, decode_weight=decode_weight, hold_s=hold_s)
    shuffled = list(ranks)
    rnd.shuffle(shuffled)
    assert plan_step(shuffled, model, min_chunk, decode_weight=decode_weight, hold_s=hold_s) == plan
    if not plan.planned:
        return
    demand = [s.demand() for s in ranks]
    if any(demand) and not any(plan.prefill):
        assert not any(s.ls_waiting for s in ranks)
        assert not all(demand)
        assert all(s.oldest_wait_s < hold_s for s, d in zip(ranks, demand) if d)
        assert plan.budgets == tuple(0 for _ in ranks)
    else:
        for s, b, d in zip(ranks, plan.prefill, demand):
            assert (b == 0) == (d == 0) and b >= min(d, min_chunk)
    if any(s.oldest_wait_s >= hold_s for s, d in zip(ranks, demand) if d):
        assert plan == plan_step(ranks, model, min_chunk, decode_weight=decode_weight)


def test_ls_waiting_anywhere_caps_the_chunk_but_not_below_the_ls_request():
    ranks = _group(20_000, 0)
    assert plan_step(ranks, MODEL).budgets[0] == 8192
    ranks[2] = replace(ranks[2], waiting_tokens=1500, waiting_requests=1, ls_waiting=1, ls_tokens=1500)
    plan = plan_step(ranks, MODEL, ls_chunk_tokens=512)
    assert plan.budgets[2] == 1500  # the LS request's own prefill is not cut
    assert plan.budgets[0] <= 1500


@settings(max_examples=200, deadline=None)
@given(summaries(), models, st.integers(1, 512))
def test_ls_work_is_prefilled_in_a_short_step(ranks, model, ls_chunk):
    """While LS work waits on a rank, that rank's budget covers its LS tokens after the BE chunk's (LS-limited)
    continuation, mixed rows or not, and no rank prefills more than max(ls_chunk_tokens, that need)."""
    plan = plan_step(ranks, model, ls_chunk_tokens=ls_chunk)
    if not plan.planned or not any(s.ls_waiting for s in ranks):
        return
    need = [min(s.demand(), s.ls_tokens + min(s.chunk_tokens, ls_chunk)) if s.ls_waiting else 0 for s in ranks]
    floor = min(64, max(s.upstream_budget for s in ranks))
    for s, b, n in zip(ranks, plan.prefill, need):
        assert b >= n
        assert b <= max(ls_chunk, max(need), min(s.demand(), floor))


def test_candidates():
    assert candidate_chunks(8192, 64) == [64, 128, 256, 512, 1024, 2048, 4096, 8192]
    assert candidate_chunks(1000, 100, page=64) == [128, 256, 512, 1000]


class _Exact(StepTimeModel):
    """A StepTimeModel with only step_seconds: the ABC's default batch_seconds must give the same plan."""

    def step_seconds(self, t, p, c, x):
        return MODEL.step_seconds(t, p, c, x)


def test_default_batch_seconds_matches():
    ranks = _group(20_000, 200)
    assert plan_step(ranks, _Exact()) == plan_step(ranks, MODEL)


def test_fit_recovers_a_known_model():
    rng = np.random.default_rng(0)
    n, r = 400, 4
    prefill = rng.uniform(size=(n, r)) < 0.5
    tok = np.where(prefill, np.rint(np.exp(rng.uniform(0, np.log(8192), (n, r)))), 0.0)
    pairs = tok * (rng.uniform(0, 8000, (n, r)) + (tok + 1) / 2)
    count = np.where(prefill, 0, rng.integers(0, 256, (n, r))).astype(float)
    ctx = count * rng.uniform(100, 6000, (n, r))
    y = MODEL.batch_seconds(tok, pairs, count, ctx)
    fitted = fit_roofline(tok, pairs, count, ctx, y * np.exp(rng.normal(0, 0.02, n)))
    test = MODEL.batch_seconds(tok[:50] / 2, pairs[:50] / 3, count[:50], ctx[:50])
    err = np.abs(fitted.batch_seconds(tok[:50] / 2, pairs[:50] / 3, count[:50], ctx[:50]) / test - 1)
    assert np.median(err) < 0.05
    with pytest.raises(ValueError, match="N >= 7"):
        fit_roofline(tok[:3], pairs[:3], count[:3], ctx[:3], y[:3])


@pytest.mark.parametrize("bad", [0.5, float("nan")])
def test_config_rejects_bad_ls_weight(bad):
    with pytest.raises(ValueError, match="plan_ls_weight"):
        RequestTierConfig(plan_ls_weight=bad).validate()


def test_full_sequence_attention_makes_small_chunks_of_a_long_prompt_expensive():
    """A backend that attends each chunk over its whole sequence (upstream's torch_native extend) pays
    (p + b)^2 / 2 pairs per chunk: deep into a long prompt, the planner must not pick a small chunk."""
    cpu = RooflineStepModel(overhead_s=0.008, dense_floor_s=0.008, pair_s=1.7e-7, ctx_s=1.5e-6,
                            moe_per_token_s=5e-5)
    ranks = [RankStepSummary(0, 1024, chunk_tokens=2500, chunk_prefix=500, waiting_requests=1,
                             kv_room_tokens=10**6, slot_room=100),
             RankStepSummary(1, 1024, decode_count=64, decode_context=64 * 80, kv_room_tokens=10**6, slot_room=100)]
    causal = plan_step(ranks, cpu, min_chunk_tokens=64)
    whole = plan_step(ranks, cpu, min_chunk_tokens=64, full_sequence_attention=True)
    assert causal.budgets[0] == 64  # causal pricing: 64 decoders beside, the smallest chunk
    assert whole.budgets[0] == 1024  # each of 40 small chunks would re-read the prefix: the whole budget
    assert StepPlanner(cpu, min_chunk_tokens=64, full_sequence_attention=True).plan(ranks) == whole


def test_whole_sequence_pair_rate_sums_each_chunks_square():
    from tiersched.core.request.step_plan import whole_sequence_pair_rate

    rate = whole_sequence_pair_rate(np.array([100.0, 0.0]), np.array([250.0, 0.0]), np.array([[100.0, 64.0]]))
    ends = np.array([200.0, 300.0, 350.0])  # chunks of 100, 100, 50 after the 100-token prefix
    assert rate[0, 0] == pytest.approx(float(np.sum(ends * (ends + 1) / 2)) / 250)
    assert rate[0, 1] == 0.0  # nothing left to prefill
    one = whole_sequence_pair_rate(np.array([10.0]), np.array([50.0]), np.array([[64.0]]))
    assert one[0, 0] == pytest.approx(60 * 61 / 2 / 50)  # one chunk takes it all
