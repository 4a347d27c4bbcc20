"""The priced LS cap on a rank of its own (no DP attention, `lockstep.join_own_rank_pricing`): which servers price
for a group of one, and the adapter's cap decisions and their counts inside upstream's prefill pass."""
from __future__ import annotations

from array import array
from types import SimpleNamespace

import pytest

pytest.importorskip("sglang.srt.managers.schedule_policy")

from sglang.srt.managers.schedule_policy import AddReqResult  # noqa: E402

from tiersched.core.request import RequestTierConfig  # noqa: E402
from tiersched.core.request.step_plan import RooflineStepModel  # noqa: E402
from tiersched.sglang.request import cap_pricing, lockstep  # noqa: E402
from tiersched.sglang.request.state import STATE, LockstepState, PolicyState  # noqa: E402

CFG = RequestTierConfig()


def make_req(priority: int, uncached: int, prefix: int = 0):
    return SimpleNamespace(priority=priority, full_untruncated_fill_ids=array("q", range(prefix + uncached)),
                           prefix_len=prefix, extend_end=None, origin_input_ids=[1] * (prefix + uncached),
                           output_ids=[])


@pytest.fixture
def rank(monkeypatch):
    """prefix-aging on, one LS request waiting on this rank, the given running requests; fresh pricing state."""
    cap_pricing.reset()
    state = LockstepState.fresh(CFG)
    state.enabled, state.low_values_first = True, False
    monkeypatch.setattr(STATE, "lockstep", state)
    running = [make_req(0, 500) for _ in range(16)]
    ls_req = make_req(CFG.ls_priority + 1, 64)
    scheduler = SimpleNamespace(device="cpu", waiting_queue=[ls_req] + [make_req(0, 900) for _ in range(20)],
                                running_batch=SimpleNamespace(reqs=running), chunked_prefill_size=8192,
                                max_prefill_tokens=16384, chunked_req=None, require_mlp_sync=False)
    state.scheduler = lambda: scheduler
    yield state, scheduler
    cap_pricing.reset()


def _parallel(monkeypatch, attn_dp: bool, tp: int = 1, pp: int = 1):
    import sglang.srt.runtime_context as rc

    monkeypatch.setattr(rc, "get_parallel", lambda: SimpleNamespace(attn_dp_enabled=attn_dp, tp_size=tp, pp_size=pp))


@pytest.mark.parametrize("attn_dp, tp, pp, priced", [(False, 1, 1, True), (False, 2, 1, False),
                                                     (False, 1, 2, False), (True, 1, 1, False)])
def test_which_servers_price_for_a_group_of_one(rank, monkeypatch, attn_dp, tp, pp, priced):
    _parallel(monkeypatch, attn_dp, tp, pp)
    monkeypatch.setattr("tiersched.sglang.request.step_plan.full_sequence_attention", lambda: True)
    lockstep.join_own_rank_pricing(rank[1])
    assert cap_pricing.PRICING.group_ranks == (1 if priced else 0)
    if priced:
        assert cap_pricing.PRICING.full_sequence


def test_pricing_off_or_another_policy_keeps_the_fixed_rule(rank, monkeypatch):
    _parallel(monkeypatch, False)
    state, sched = rank
    state.enabled = False  # an upstream policy on this server
    lockstep.join_own_rank_pricing(sched)
    assert cap_pricing.PRICING.group_ranks == 0
    state.enabled, state.config = True, RequestTierConfig(ls_cap_pricing=False)
    lockstep.join_own_rank_pricing(sched)
    assert cap_pricing.PRICING.group_ranks == 0 and lockstep.cap_pricing_for(3) is None


@pytest.mark.parametrize("overhead_s, capped", [(0.0, True), (0.05, False)])
def test_be_admission_follows_the_price_and_is_counted(rank, monkeypatch, overhead_s, capped):
    """A BE request admitted while an LS request waits on this busy rank (16 running, 20 waiting): without a
    per-step cost the cap is free and applies; with 50 ms per step its 7 extra steps cost the queue and the running
    requests more than the LS request's shorter step saves, so it is dropped. Either way the decision is counted
    and the fixed rule would have capped."""
    _parallel(monkeypatch, False)
    state, sched = rank
    model = RooflineStepModel(overhead_s=overhead_s, moe_per_token_s=1e-5)
    monkeypatch.setattr(cap_pricing, "model_for", lambda *a, **k: model)
    lockstep.track_iteration(lambda self, *a, **k: None, sched)  # joins a group of one, observes its LS count
    assert cap_pricing.PRICING.group_ranks == 1 and STATE.lockstep.same_step_group is None
    assert cap_pricing.PRICING.own_ls == 1
    policy = PolicyState.build(CFG, low_values_first=False)
    adder = SimpleNamespace(rem_chunk_tokens=8192, can_run_list=[])
    seen = []

    def original(a, req, *args, **kwargs):
        seen.append(a.rem_chunk_tokens)
        return AddReqResult.CONTINUE

    before = lockstep.priced_totals()
    lockstep.capped_be_add(original, adder, make_req(0, 4000), policy, has_chunked_req=False)
    assert seen == [CFG.be_chunk_tokens if capped else 8192]
    kept, dropped = (a - b for a, b in zip(lockstep.priced_totals(), before))
    assert (kept, dropped) == ((1, 0) if capped else (0, 1))
