"""The request tier's BE admission cap inside upstream's prefill pass (`lockstep.capped_be_add`): while LS work
waits it shrinks a BE request's chunk, but never starts a second chunked request while the scheduler still holds
one (upstream tracks one and asserts `self.chunked_req is None` when a pass makes a new one)."""
from __future__ import annotations

from array import array
from types import SimpleNamespace

import pytest

pytest.importorskip("sglang.srt.managers.schedule_policy")

from sglang.srt.managers.schedule_policy import AddReqResult  # noqa: E402

from tiersched.core.request import RequestTierConfig  # noqa: E402
from tiersched.sglang.request import lockstep  # noqa: E402
from tiersched.sglang.request.state import STATE, LockstepState, PolicyState  # noqa: E402


def make_req(priority: int, uncached: int, prefix: int = 0):
    return SimpleNamespace(priority=priority, full_untruncated_fill_ids=array("q", range(prefix + uncached)),
                           prefix_len=prefix, extend_end=None)


@pytest.fixture
def ls_waiting_here(monkeypatch):
    """A scheduler with one LS request waiting locally, prefix-aging on: the BE cap is active."""
    config = RequestTierConfig()
    ls_req = make_req(priority=config.ls_priority + 1, uncached=64)
    scheduler = SimpleNamespace(waiting_queue=[ls_req])
    state = LockstepState.fresh(config)
    state.enabled, state.low_values_first = True, False
    state.scheduler = lambda: scheduler  # stands in for the weakref.ref the adapter keeps
    monkeypatch.setattr(STATE, "lockstep", state)
    return config, PolicyState.build(config, low_values_first=False)


def test_be_chunk_is_capped_without_a_held_chunked_request(ls_waiting_here):
    config, policy = ls_waiting_here
    adder = SimpleNamespace(rem_chunk_tokens=8192, can_run_list=[])
    seen = []

    def original(a, req, *args, **kwargs):
        seen.append(a.rem_chunk_tokens)
        a.rem_chunk_tokens -= min(a.rem_chunk_tokens, len(req.full_untruncated_fill_ids) - req.prefix_len)
        return AddReqResult.CONTINUE

    be = make_req(priority=config.ls_priority - 1, uncached=4000)
    assert lockstep.capped_be_add(original, adder, be, policy, has_chunked_req=False) is AddReqResult.CONTINUE
    assert seen == [config.be_chunk_tokens]  # upstream's adder saw the capped budget
    assert adder.rem_chunk_tokens == 8192 - config.be_chunk_tokens  # and the pass's budget lost only that


def test_no_second_chunked_request_while_one_is_held(ls_waiting_here):
    config, policy = ls_waiting_here
    adder = SimpleNamespace(rem_chunk_tokens=8192, can_run_list=[])
    called = []

    def original(a, req, *args, **kwargs):
        called.append(req)
        return AddReqResult.CONTINUE

    long_be = make_req(priority=config.ls_priority - 1, uncached=config.be_chunk_tokens + 100)
    assert lockstep.capped_be_add(original, adder, long_be, policy, has_chunked_req=True) is AddReqResult.OTHER
    assert called == [] and adder.rem_chunk_tokens == 8192
    # positional form, as a caller may pass it
    assert lockstep.capped_be_add(original, adder, long_be, policy, True, None) is AddReqResult.OTHER
    # a BE request that fits whole under the cap still joins (it will not be chunked)
    short_be = make_req(priority=config.ls_priority - 1, uncached=config.be_chunk_tokens // 2)
    assert lockstep.capped_be_add(original, adder, short_be, policy, has_chunked_req=True) is AddReqResult.CONTINUE
    assert called == [short_be]


@pytest.mark.parametrize("ls", [True, False])
def test_no_request_is_chunked_while_a_held_chunk_left_budget(ls_waiting_here, ls):
    """The held chunk was capped (LS cap or shorter-waiter reservation), so budget is left; any request, LS or BE,
    that would need chunking in that budget waits; one that fits whole joins."""
    config, policy = ls_waiting_here
    priority = config.ls_priority + 1 if ls else config.ls_priority - 1
    adder = SimpleNamespace(rem_chunk_tokens=300, can_run_list=[])
    called = []

    def original(a, req, *args, **kwargs):
        called.append(req)
        return AddReqResult.CONTINUE

    too_long = make_req(priority=priority, uncached=301, prefix=48)
    assert lockstep.capped_be_add(original, adder, too_long, policy, has_chunked_req=True) is AddReqResult.OTHER
    assert called == []
    fits = make_req(priority=priority, uncached=200 if ls else 100, prefix=48)
    assert lockstep.capped_be_add(original, adder, fits, policy, has_chunked_req=True) is AddReqResult.CONTINUE
    # without a held chunk upstream chunks it as usual
    assert lockstep.capped_be_add(original, adder, too_long, policy, has_chunked_req=False) is AddReqResult.CONTINUE
    assert called == [fits, too_long]
