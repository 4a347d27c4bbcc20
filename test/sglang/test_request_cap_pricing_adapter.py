"""The adapter's side of the priced LS cap (sglang/request/cap_pricing.py): which model a process prices with, how
its own prefill steps rescale it, and when there is no pricing (the fixed rule)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from tiersched.core.request import RequestTierConfig
from tiersched.core.request.lockstep import LockstepLsSignal
from tiersched.core.request.step_plan import RooflineStepModel
from tiersched.sglang.request import cap_pricing

PRIOR = RooflineStepModel(overhead_s=0.005, moe_per_token_s=1e-5)
CFG = RequestTierConfig()


@pytest.fixture(autouse=True)
def fresh_state():
    cap_pricing.reset()
    yield
    cap_pricing.reset()


def _scheduler(device="cpu", running=3, waiting=5):
    reqs = [SimpleNamespace(origin_input_ids=[1] * 100, output_ids=[2] * 10) for _ in range(running)]
    return SimpleNamespace(device=device, running_batch=SimpleNamespace(reqs=reqs), waiting_queue=[None] * waiting,
                           chunked_prefill_size=4096, max_prefill_tokens=16384)


def test_no_group_no_pricing():
    sched = _scheduler()
    assert cap_pricing.model_for(sched, None, lambda r: PRIOR) is None  # group unknown: fixed rule
    assert not cap_pricing.wants_steps()
    assert cap_pricing.pricing(PRIOR, cap_pricing.rank_load(sched, 0), LockstepLsSignal(CFG), 1, 0.0, CFG) is None


def test_a_rank_of_its_own_prices_with_the_one_rank_prior_and_its_own_ls_counts():
    cap_pricing.set_group(1, 0, False, CFG)
    sched = _scheduler(running=2, waiting=3)
    asked = []
    assert cap_pricing.model_for(sched, None, lambda r: asked.append(r) or PRIOR) == PRIOR and asked == [1]
    assert cap_pricing.wants_steps()
    # this rank's LS count per iteration is its signal: 0, then 2 waiting a second later
    cap_pricing.observe_own_rank(0, 0.0)
    cap_pricing.observe_own_rank(2, 1.0)
    lockstep_signal = LockstepLsSignal(CFG)  # the lockstep signal, never observed here: ignored for a group of one
    p = cap_pricing.pricing(PRIOR, cap_pricing.rank_load(sched, 3), lockstep_signal, 0, 1.0, CFG)
    assert p.group_ranks == 1 and p.group_ls_now == 2 and p.ls_rate_per_s == pytest.approx(2.0)
    assert p.decode_count == 2 and p.waiting_requests == 3


def test_prior_then_rescaled_to_this_ranks_prefill_steps():
    cap_pricing.set_group(2, 1, True)
    sched = _scheduler()
    asked = []
    model = cap_pricing.model_for(sched, None, lambda r: asked.append(r) or PRIOR)
    assert model == PRIOR and asked == [2] and cap_pricing.wants_steps()
    cap_pricing.model_for(sched, None, lambda r: asked.append(r) or PRIOR)
    assert asked == [2]  # built once
    # the live steps take 3x what the prior predicts for this rank's work (its column; the other rank's is zero)
    for tokens in (100, 200, 400, 800, 1000, 1200, 1500, 2000):
        pred = PRIOR.step_seconds([0, tokens], [0, 0], [0, 0], [0, 0])
        cap_pricing.record_step(tokens, 0.0, 3 * pred)
        cap_pricing.record_step(0, 0.0, 0.05)  # a decode step is no sample
    got = cap_pricing.model_for(sched, None, lambda r: PRIOR)
    assert cap_pricing.PRICING.source == "scaled@8"
    assert got.overhead_s == pytest.approx(3 * PRIOR.overhead_s) and got.moe_per_token_s == pytest.approx(3e-5)
    # the step plan's group model wins where there is one
    plan = RooflineStepModel(overhead_s=1.0)
    assert cap_pricing.model_for(sched, plan, lambda r: PRIOR) is plan


def test_gpu_server_has_no_prior():
    cap_pricing.set_group(2, 0, False)
    assert cap_pricing.model_for(_scheduler(device="cuda"), None, lambda r: PRIOR) is None
    assert not cap_pricing.wants_steps()


def test_pricing_inputs_from_the_rank_and_the_signal():
    cap_pricing.set_group(2, 0, True)
    sched = _scheduler(running=3, waiting=5)
    load = cap_pricing.rank_load(sched, 4)
    assert (load.decode_count, load.decode_context, load.waiting_requests, load.upstream_budget) == (3, 330, 4, 4096)
    sig = LockstepLsSignal(CFG)
    sig.observe(0, 0.0)
    sig.observe(2, 2.0)
    p = cap_pricing.pricing(PRIOR, load, sig, 2, 2.0, CFG)
    assert p.ls_rate_per_s == pytest.approx(1.0) and p.group_ls_now == 2 and p.group_ranks == 2
    assert p.full_sequence_attention and p.decode_count == 3 and p.waiting_requests == 4
    assert cap_pricing.pricing(None, load, sig, 2, 2.0, CFG) is None
    from dataclasses import replace
    assert cap_pricing.pricing(PRIOR, load, sig, 2, 2.0, replace(CFG, ls_cap_pricing=False)) is None
