"""Unit tests of the request tier's preemption choice and chunk cap (pure core)."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tiersched.core.request import RequestTierConfig, RunningRequest, WaitingRequest
from tiersched.core.request.lockstep import chunk_token_limit
from tiersched.core.request.preemption import LatencySensitivePreemption
from tiersched.core.request.upstream import PriorityPreemption

LS = WaitingRequest("ls", priority=10, arrival_s=5.0, input_tokens=100)
BE = WaitingRequest("be", priority=0, arrival_s=5.0, input_tokens=100)


def R(rid, priority=0, arrival=0.0, kv=100):
    return RunningRequest(rid, priority, arrival, kv, kv)


def test_only_ls_candidates_preempt_and_only_be_victims():
    pol = LatencySensitivePreemption()
    running = [R("be1"), R("ls-run", priority=10)]
    assert pol.choose_victims(BE, running, 1, 0, 5.0) is None
    assert pol.choose_victims(LS, running, 1, 0, 5.0) == ["be1"]
    assert pol.choose_victims(LS, [R("ls-run", priority=10)], 1, 0, 5.0) is None


def test_threshold_is_strict_like_upstream():
    pol = LatencySensitivePreemption(RequestTierConfig(ls_priority=1, preemption_threshold=10))
    assert pol.choose_victims(LS, [R("be", priority=0)], 1, 0, 0.0) is None  # diff 10 is not > 10
    pol = LatencySensitivePreemption(RequestTierConfig(ls_priority=1, preemption_threshold=9))
    assert pol.choose_victims(LS, [R("be", priority=0)], 1, 0, 0.0) == ["be"]


def test_lowest_priority_then_newest_first():
    pol = LatencySensitivePreemption(RequestTierConfig(ls_priority=5))
    running = [R("p0-old", 0, 1.0), R("p0-new", 0, 3.0), R("p2-newest", 2, 4.0)]
    assert pol.choose_victims(LS, running, 1, 0, 5.0) == ["p0-new"]
    assert pol.choose_victims(LS, running, 2, 0, 5.0) == ["p0-new", "p0-old"]
    assert set(pol.choose_victims(LS, running, 3, 0, 5.0)) == {"p0-new", "p0-old", "p2-newest"}


def test_a_request_preempted_max_times_is_no_longer_a_victim():
    """Newest first would pick the same request every time; after the bound the next-newest one goes instead,
    and with no other victim the LS request is not helped by preemption at all."""
    pol = LatencySensitivePreemption(RequestTierConfig(max_preemptions_per_request=2))
    old, new = RunningRequest("old", 0, 1.0, 100, 100), RunningRequest("new", 0, 3.0, 100, 100, preemptions=1)
    assert pol.choose_victims(LS, [old, new], 1, 0, 5.0) == ["new"]
    tired = RunningRequest("new", 0, 3.0, 100, 100, preemptions=2)
    assert pol.choose_victims(LS, [old, tired], 1, 0, 5.0) == ["old"]
    assert pol.choose_victims(LS, [tired], 1, 0, 5.0) is None
    never = LatencySensitivePreemption(RequestTierConfig(max_preemptions_per_request=0))
    assert never.choose_victims(LS, [old], 1, 0, 5.0) is None


def test_max_preemptions_per_request_is_validated():
    import pytest

    for bad in (-1, 1.5, "2"):
        with pytest.raises(ValueError, match="max_preemptions_per_request"):
            RequestTierConfig(max_preemptions_per_request=bad).validate()


def test_kv_shortage_preempts_only_as_many_as_needed():
    pol = LatencySensitivePreemption()
    running = [R("old-big", 0, 1.0, kv=900), R("new-small", 0, 3.0, kv=50)]
    # newest first would take new-small (50) then old-big (900); new-small alone is useless -> put back.
    assert pol.choose_victims(LS, running, 0, 600, 5.0) == ["old-big"]
    assert pol.choose_victims(LS, running, 0, 40, 5.0) == ["new-small"]
    assert pol.choose_victims(LS, running, 0, 2000, 5.0) is None  # cannot cover: preempt nobody


def test_kv_shortage_switch_and_upstream_baseline_never_preempts_on_kv():
    off = LatencySensitivePreemption(RequestTierConfig(preempt_on_kv_shortage=False))
    assert off.choose_victims(LS, [R("be")], 0, 10, 0.0) is None
    assert PriorityPreemption(threshold=0).choose_victims(LS, [R("be")], 0, 10, 0.0) is None
    assert PriorityPreemption(threshold=0).choose_victims(LS, [R("be")], 1, 0, 0.0) == ["be"]


@settings(max_examples=200, deadline=None)
@given(
    kvs=st.lists(st.tuples(st.integers(0, 3), st.floats(0, 10), st.integers(1, 500)), max_size=12),
    slots_short=st.integers(0, 4),
    kv_short=st.integers(0, 2000),
)
def test_victim_set_covers_shortfall_and_is_minimal(kvs, slots_short, kv_short):
    cfg = RequestTierConfig(ls_priority=5)
    running = [R(f"r{i}", p, a, kv) for i, (p, a, kv) in enumerate(kvs)]
    victims = LatencySensitivePreemption(cfg).choose_victims(LS, running, slots_short, kv_short, 10.0)
    by_rid = {r.rid: r for r in running}
    total_kv = sum(r.kv_tokens for r in running)
    if victims is None:
        assert len(running) < slots_short or total_kv < kv_short
        return
    assert len(set(victims)) == len(victims)
    assert len(victims) >= slots_short and sum(by_rid[v].kv_tokens for v in victims) >= kv_short
    for v in victims:  # minimal: dropping any one breaks the cover
        rest = [x for x in victims if x != v]
        assert len(rest) < slots_short or sum(by_rid[x].kv_tokens for x in rest) < kv_short


def test_chunk_cap_while_ls_waits_behind_be_chunk():
    cfg = RequestTierConfig(be_chunk_tokens=256, min_chunk_tokens=64)
    limit = chunk_token_limit(0, 20_000, [(10, 5000)], budget_tokens=8192, page_size=16, config=cfg)
    assert limit == 256
    # no LS waiting and no shorter waiter: no cap
    assert chunk_token_limit(0, 20_000, [(0, 30_000)], 8192, 16, cfg) is None
    # the chunked request is itself LS: no LS cap
    assert chunk_token_limit(10, 20_000, [(10, 30_000)], 8192, 16, cfg) is None


def test_chunk_cap_reserves_room_for_shorter_waiters():
    cfg = RequestTierConfig(min_chunk_tokens=64)
    limit = chunk_token_limit(0, 20_000, [(0, 1000), (0, 2000), (0, 50_000)], 8192, 16, cfg)
    assert limit == 8192 - 1008 - 2000
    # reservation never squeezes the chunk below min_chunk_tokens
    limit = chunk_token_limit(0, 20_000, [(0, 8150)], 8192, 16, cfg)
    assert limit is None
    assert chunk_token_limit(0, 20_000, [(0, 8000)], 8192, 16, cfg) == 192
