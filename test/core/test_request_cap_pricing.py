"""The priced LS cap (core/request/lockstep.py `ls_cap_pays`): a BE cap only where the LS stall it saves outweighs
the cost of the extra, shorter steps, both predicted by the step-time model; its inputs in the simulator and the
adapter."""
from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tiersched.core.request import RankLoad, RequestTierConfig
from tiersched.core.request.lockstep import (LockstepLsSignal, LsCapPricing, be_admission_budget, cap_plan_cost,
                                             cap_plan_steps, chunk_token_limit, ls_cap_pays)
from tiersched.core.request.ordering import AgingPrefixOrdering
from tiersched.core.request.step_plan import RooflineStepModel

CFG = RequestTierConfig(be_chunk_tokens=512, min_chunk_tokens=64)
# A step costs 10 ms plus 10 us per token of the group (the shape of the simulator's CPU prior, rounded).
MODEL = RooflineStepModel(overhead_s=0.01, moe_per_token_s=1e-5)
LINEAR = RooflineStepModel(moe_per_token_s=1e-5)  # no per-step cost: cutting a prefill into steps is free


def _pricing(**kw) -> LsCapPricing:
    base = dict(model=MODEL, upstream_budget=8192, group_ranks=2)
    base.update(kw)
    return LsCapPricing(**base)


# ---- the steps of a plan ----------------------------------------------------------------------------------------
@given(work=st.integers(1, 20_000), prefix=st.integers(0, 4096), first=st.integers(0, 4096),
       later=st.integers(1, 8192), step_tokens=st.integers(0, 2048), full=st.booleans())
@settings(max_examples=200, deadline=None)
def test_plan_steps_carry_the_whole_work_within_the_step_sizes(work, prefix, first, later, step_tokens, full):
    steps = cap_plan_steps(work, prefix, first, later, step_tokens, full)
    pieces = [t - (step_tokens if k == 0 else 0) for k, (t, _) in enumerate(steps)]
    assert sum(pieces) == work
    assert pieces[0] == min(first, work) and all(0 < p <= later for p in pieces[1:])
    assert all(p >= 0 for _, p in steps)
    # whole-sequence attention never prices a chunk below causal attention
    causal = cap_plan_steps(work, prefix, first, later, step_tokens, False)
    assert all(a[1] >= b[1] - 1e-6 for a, b in zip(steps, causal)) if full else steps == causal


def test_plan_steps_pairs():
    # 1000 tokens after 24, in 512 then 488: causal e (p + (e + 1) / 2); whole sequence (p + e)(p + e + 1) / 2
    assert cap_plan_steps(1000, 24, 512, 512) == [(512, 512 * (24 + 513 / 2)), (488, 488 * (536 + 489 / 2))]
    assert cap_plan_steps(1000, 24, 512, 512, full_sequence_attention=True) == [(512, 536 * 537 / 2),
                                                                               (488, 1024 * 1025 / 2)]
    assert cap_plan_steps(100, 0, 0, 512, step_tokens=10) == [(10, 55.0), (100, 100 * 101 / 2)]
    with pytest.raises(ValueError, match="later >= 1"):
        cap_plan_steps(10, 0, 5, 0)


# ---- the decision -------------------------------------------------------------------------------------------------
def test_cap_pays_for_a_waiting_ls_request_on_an_idle_rank():
    # 4000 BE tokens, an LS request waits now, nothing else waits or runs here: the LS request waits out a 4000-token
    # step uncapped (0.09 s for the group) instead of a 512-token one (0.02 s), 8x weighted; the BE request loses 7
    # steps of 10 ms.
    p = _pricing(group_ls_now=1)
    assert ls_cap_pays(4000, 0, 512, 8192, p, 1, CFG)
    capped = cap_plan_cost(cap_plan_steps(4000, 0, 512, 512), p, 1, CFG)
    uncapped = cap_plan_cost(cap_plan_steps(4000, 0, 8192, 8192), p, 1, CFG)
    assert capped < uncapped


def test_cap_does_not_pay_for_the_hold_alone_behind_a_queue():
    # Only the hold (no LS waiting now, ~2 LS arrivals/s), 20 requests waiting here and 16 running: the 7 extra steps
    # delay all of them and stall the decodes; the LS arrivals a long step would catch do not make up for it.
    p = _pricing(ls_rate_per_s=2.0, waiting_requests=20, decode_count=16, decode_context=16_000)
    assert not ls_cap_pays(4000, 0, 512, 8192, p, 0, CFG)
    # with a steady stream of LS arrivals and nothing behind, the hold pays again
    assert ls_cap_pays(4000, 0, 512, 8192, _pricing(ls_rate_per_s=40.0), 0, CFG)


def test_cap_is_free_without_a_per_step_cost_and_never_pays_without_ls():
    # Without per-step overhead the capped plan costs the BE work nothing extra and shortens the LS request's step.
    assert ls_cap_pays(4000, 0, 512, 8192, _pricing(model=LINEAR, waiting_requests=50), 1, CFG)
    # Nothing LS waits or arrives: the cap only costs.
    assert not ls_cap_pays(4000, 0, 512, 8192, _pricing(), 0, CFG)
    # a cap that shortens nothing "pays" (it changes nothing)
    assert ls_cap_pays(300, 0, 512, 8192, _pricing(), 0, CFG)


@given(work=st.integers(513, 16_000), waiting=st.integers(0, 40), extra=st.integers(1, 40),
       decode=st.integers(0, 64), rate=st.floats(0, 20), ls_now=st.integers(0, 3), full=st.booleans())
@settings(max_examples=200, deadline=None)
# A 637-token job, priced as a tie with no LS arrivals: its capped plan (512 + 125 tokens) adds a step whose fixed
# cost outweighs the 125 tokens it moves, so an LS arrival waits longer on average under the cap.
@example(work=637, waiting=1, extra=1, decode=0, rate=0.0, ls_now=1, full=False)
def test_cap_decision_is_monotone(work, waiting, extra, decode, rate, ls_now, full):
    """More requests waiting behind the BE work never make a cap pay that did not; more LS requests waiting never
    make a paying cap stop paying; more LS arrivals move the decision only towards the plan under which an
    arrival waits less (both priced over the same horizon)."""
    p = _pricing(ls_rate_per_s=rate, waiting_requests=waiting, decode_count=decode, decode_context=decode * 1000,
                 full_sequence_attention=full)
    pays = ls_cap_pays(work, 0, 512, 8192, p, ls_now, CFG)
    if not pays:
        assert not ls_cap_pays(work, 0, 512, 8192, replace(p, waiting_requests=waiting + extra), ls_now, CFG)
    else:
        assert ls_cap_pays(work, 0, 512, 8192, p, ls_now + extra, CFG)
    # what one more LS arrival per second adds to each plan's cost, over a horizon longer than both plans
    exposure = [cap_plan_cost(plan, replace(p, ls_rate_per_s=1.0), 0, CFG, horizon_s=1e3)
                - cap_plan_cost(plan, replace(p, ls_rate_per_s=0.0), 0, CFG, horizon_s=1e3)
                for plan in (cap_plan_steps(work, 0, 512, 512, 0, full), cap_plan_steps(work, 0, 8192, 8192, 0, full))]
    more = ls_cap_pays(work, 0, 512, 8192, replace(p, ls_rate_per_s=rate + extra), ls_now, CFG)
    if exposure[0] < exposure[1] - 1e-12:
        assert more or not pays
    elif exposure[0] > exposure[1] + 1e-12:
        assert pays or not more


def test_chunk_limit_and_admission_follow_the_price():
    busy = _pricing(ls_rate_per_s=2.0, waiting_requests=20, decode_count=16, decode_context=16_000)
    idle = _pricing(group_ls_now=1)
    # the running BE chunk: capped where it pays, not where it does not, and always without pricing
    assert chunk_token_limit(0, 4000, [], 8192, 1, CFG, group_ls_waiting=1, pricing=idle) == 512
    assert chunk_token_limit(0, 4000, [], 8192, 1, CFG, group_ls_waiting=1, pricing=busy) is None
    assert chunk_token_limit(0, 4000, [], 8192, 1, CFG, group_ls_waiting=1) == 512
    assert chunk_token_limit(0, 4000, [], 8192, 1, replace(CFG, ls_cap_pricing=False), 1, busy) == 512
    # an LS request waiting on this rank counts as waiting now even when the group count is only the hold
    assert chunk_token_limit(0, 4000, [(5, 300)], 8192, 1, CFG, 1, replace(idle, group_ls_now=0)) == 512
    # a newly admitted BE request: what is left of the cap where it pays, no cap where it does not
    assert be_admission_budget(0, 1, 100, CFG, idle, request_tokens=4000, step_tokens=100) == 412
    assert be_admission_budget(0, 1, 100, CFG, busy, request_tokens=4000, step_tokens=100) is None
    assert be_admission_budget(0, 1, 100, CFG) == 412
    assert be_admission_budget(0, 0, 0, CFG, idle, request_tokens=4000) is None  # no LS anywhere: no cap


def test_bad_pricing_flag_is_rejected():
    with pytest.raises(ValueError, match="ls_cap_pricing"):
        replace(CFG, ls_cap_pricing="yes").validate()


# ---- the LS arrival rate ------------------------------------------------------------------------------------------
def test_signal_counts_ls_arrivals_from_the_rises_of_the_group_count():
    sig = LockstepLsSignal(CFG)
    for t, n in [(0.0, 0), (1.0, 1), (1.5, 1), (2.0, 0), (3.0, 2), (4.0, 3), (5.0, 1)]:
        sig.observe(n, t)
    assert sig.fresh == 1
    assert sig.ls_rate_per_s(5.0) == pytest.approx(4 / 5.0)  # 1 + 2 + 1 arrivals over the 5 s observed
    assert sig.observe(0, 6.0) == 1 and sig.fresh == 0  # the hold keeps the signal on, nothing fresh
    assert sig.ls_rate_per_s(30.0) == 0.0  # all arrivals left the window
    assert LockstepLsSignal(CFG).ls_rate_per_s(3.0) == 0.0


# ---- the ordering and the simulator --------------------------------------------------------------------------------
def test_ordering_prices_only_with_a_model_and_a_load():
    o = AgingPrefixOrdering(CFG)
    load = RankLoad(decode_count=16, decode_context=16_000, waiting_requests=20, upstream_budget=8192)
    o.observe_group_ls_waiting(1, 0.0)
    o.observe_group_ls_waiting(0, 0.5)  # only the hold now
    assert o.chunk_limit(0, 4000, [], 8192, 1, group_ls_waiting=1, load=load) == 512  # no model: fixed rule
    o.set_step_model(MODEL, group_ranks=2)
    assert o.pricing(None) is None
    p = o.pricing(load)
    assert p.group_ranks == 2 and p.group_ls_now == 0 and p.ls_rate_per_s == pytest.approx(1.0)
    assert o.chunk_limit(0, 4000, [], 8192, 1, group_ls_waiting=1, load=load) is None
    assert o.be_admission_tokens(0, 1, 0, load=load, request_tokens=4000, room_tokens=8192) is None


def test_plans_of_different_lengths_are_priced_over_the_same_horizon():
    # past the plan's end the group keeps decoding its 4 running requests per rank (a 10.08 ms step), and an LS
    # arrival then waits out half of a decode step
    p = _pricing(ls_rate_per_s=1.0, decode_count=4)
    plan = cap_plan_steps(637, 0, 8192, 8192)
    s_plan = 0.01 + 2 * 637 * 1e-5
    s_dec = 0.01 + 2 * 4 * 1e-5
    extra = cap_plan_cost(plan, p, 0, CFG, horizon_s=s_plan + 0.01) - cap_plan_cost(plan, p, 0, CFG)
    assert extra == pytest.approx(CFG.plan_ls_weight * 1.0 * 0.01 * s_dec / 2)
    assert cap_plan_cost(plan, p, 0, CFG, horizon_s=0.001) == cap_plan_cost(plan, p, 0, CFG)  # never shortened
    # an idle group after the plan: arrivals then wait for nothing
    idle = _pricing(ls_rate_per_s=1.0)
    assert cap_plan_cost(plan, idle, 0, CFG, horizon_s=1.0) == cap_plan_cost(plan, idle, 0, CFG)


def test_a_rank_of_its_own_pays_only_its_own_decodes_and_queue():
    # A group of one (no DP attention): no other rank's decodes wait out this rank's steps, so the cost is the
    # queue's wait and this rank's own decodes sitting out its prefill steps.
    p = _pricing(group_ranks=1, decode_count=8, decode_context=8000)
    plan = cap_plan_steps(4000, 0, 512, 512)
    s = [0.01 + t * 1e-5 for t, _ in plan]
    assert cap_plan_cost(plan, p, 0, CFG) == pytest.approx(sum(s) + CFG.plan_decode_weight * 8 * sum(s))
    two = cap_plan_cost(plan, replace(p, group_ranks=2), 0, CFG)
    assert two > cap_plan_cost(plan, p, 0, CFG)  # the lockstep group adds the other rank's stretched decodes
    # an LS request waiting on an idle rank: the cap pays; on a busy rank (16 decodes, 20 waiting) it does not
    assert ls_cap_pays(4000, 0, 512, 8192, _pricing(group_ranks=1), 1, CFG)
    busy = _pricing(group_ranks=1, waiting_requests=20, decode_count=16, decode_context=16_000)
    assert not ls_cap_pays(4000, 0, 512, 8192, busy, 1, CFG)
    # the LS request here is shorter than the chunk's rest, so it joins this step either way (the shorter-waiter
    # reservation); the priced cap decides how long that step is
    assert chunk_token_limit(0, 4000, [(5, 300)], 8192, 1, CFG, 0, busy) == 8192 - 300
    assert chunk_token_limit(0, 4000, [(5, 300)], 8192, 1, CFG, 0, _pricing(group_ranks=1)) == 512
