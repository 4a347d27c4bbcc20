"""Unit tests of the request tier's pure ordering policy and its configuration."""
from __future__ import annotations

import time

import numpy as np
import pytest

from tiersched.config import ConfigError, load_config
from tiersched.core.request import RequestTierConfig, WaitingRequest
from tiersched.core.request.ordering import AgingPrefixOrdering
from tiersched.core.request.upstream import FcfsPriorityOrdering


def W(rid, priority=0, arrival=0.0, tokens=100, cached=0, shares=False):
    return WaitingRequest(rid, priority, arrival, tokens, cached, shares)


def ranked(policy, waiting, now):
    return [waiting[i].rid for i in policy.order(waiting, now)]


def test_priority_class_first_then_uncached_work():
    pol = AgingPrefixOrdering(RequestTierConfig(aging_rate=0.0, token_credit_per_s=0.0))
    waiting = [W("be-short", 0, 0.0, 10), W("ls-long", 5, 0.0, 5000), W("ls-short", 5, 0.0, 50)]
    assert ranked(pol, waiting, 0.0) == ["ls-short", "ls-long", "be-short"]


def test_cached_prefix_reduces_work():
    pol = AgingPrefixOrdering(RequestTierConfig(token_credit_per_s=0.0))
    waiting = [W("a", tokens=1000, cached=0), W("b", tokens=1000, cached=950)]
    assert ranked(pol, waiting, 0.0) == ["b", "a"]


def test_arrival_breaks_ties():
    pol = AgingPrefixOrdering()
    waiting = [W("late", arrival=2.0), W("early", arrival=1.0)]
    assert ranked(pol, waiting, 2.0)[0] == "early"


def test_aging_credit_lets_old_long_request_pass_new_short_one():
    cfg = RequestTierConfig(aging_rate=0.0, token_credit_per_s=100.0)
    pol = AgingPrefixOrdering(cfg)
    waiting = [W("old-long", arrival=0.0, tokens=1000), W("new-short", arrival=9.5, tokens=200)]
    # old-long: 1000 - 100*10 = 0 < new-short: 200 - 100*0.5 = 150
    assert ranked(pol, waiting, 10.0)[0] == "old-long"
    early = [W("old-long", arrival=0.0, tokens=1000), W("new-short", arrival=4.9, tokens=200)]
    assert ranked(pol, early, 5.0)[0] == "new-short"  # 1000 - 500 = 500 > 200 - 10 = 190


def test_aging_rate_lifts_class_gradually():
    cfg = RequestTierConfig(aging_rate=1.0, aging_cap_s=100.0, token_credit_per_s=0.0)
    pol = AgingPrefixOrdering(cfg)
    waiting = [W("be", 0, 0.0, 10), W("ls", 3, 10.0, 10)]
    assert ranked(pol, waiting, 10.0)[0] == "be"  # be lifted to class 10 > 3
    waiting = [W("be", 0, 8.0, 10), W("ls", 3, 10.0, 10)]
    assert ranked(pol, waiting, 10.0)[0] == "ls"  # be only at class 2


def test_promotion_at_cap_beats_every_class_and_is_fcfs():
    cfg = RequestTierConfig(aging_rate=0.0, aging_cap_s=5.0, ls_overtake_burst=0, ls_overtakes_per_promoted=0.0)
    pol = AgingPrefixOrdering(cfg)
    waiting = [W("ls", 100, 9.0, 1), W("be-new", 0, 4.5, 1), W("be-b", 0, 3.0, 99999), W("be-a", 0, 2.0, 99999, shares=True)]
    # be-a and be-b waited >= 5 s: they lead, oldest first, regardless of size or deferral.
    assert ranked(pol, waiting, 9.0) == ["be-a", "be-b", "ls", "be-new"]
    # With the default overtake budget the LS request goes ahead of them; the promoted pair keeps its order.
    assert ranked(AgingPrefixOrdering(RequestTierConfig(aging_rate=0.0, aging_cap_s=5.0)), waiting, 9.0) == [
        "ls", "be-a", "be-b", "be-new"]


def _admit(waiting, rid):
    return [w for w in waiting if w.rid != rid]


def test_ls_overtakes_promoted_requests_only_within_the_budget():
    """burst 2, one more LS per promoted request admitted: the credit is spent by LS admitted ahead of promoted
    requests, earned back by promoted admissions, and reset when nothing promoted waits."""
    cfg = RequestTierConfig(aging_rate=0.0, aging_cap_s=5.0, token_credit_per_s=0.0, ls_overtake_burst=2,
                           ls_overtakes_per_promoted=1.0)
    pol = AgingPrefixOrdering(cfg)
    ls = [W(f"ls{i}", 10, 9.0 + i * 0.01, 100 + i) for i in range(4)]
    old = [W("old-a", 0, 1.0, 9000), W("old-b", 0, 2.0, 9000)]
    waiting = ls + old
    assert ranked(pol, waiting, 10.0) == ["ls0", "ls1", "old-a", "old-b", "ls2", "ls3"]
    waiting = _admit(_admit(waiting, "ls0"), "ls1")  # the two LS ahead were admitted: credit 2 -> 0
    assert ranked(pol, waiting, 10.1) == ["old-a", "old-b", "ls2", "ls3"]
    waiting = _admit(waiting, "old-a")  # a promoted admission earns one overtake
    assert ranked(pol, waiting, 10.2) == ["ls2", "old-b", "ls3"]
    waiting = _admit(waiting, "ls2")
    assert ranked(pol, waiting, 10.3) == ["old-b", "ls3"]
    assert pol.overtake.overtakes == 3
    waiting = _admit(waiting, "old-b")  # nothing promoted waits: the credit is back at the burst
    assert ranked(pol, waiting, 10.4) == ["ls3"]
    assert pol.overtake.credit == 2.0
    # An LS request that was ahead but is still waiting (not admitted this step) costs nothing.
    waiting = [W("ls3", 10, 9.03, 103), W("ls4", 10, 10.4, 50), W("old-c", 0, 4.0, 9000)]
    assert ranked(pol, waiting, 10.5)[:2] == ["ls4", "ls3"]
    assert ranked(pol, waiting, 10.6)[:2] == ["ls4", "ls3"]
    assert pol.overtake.credit == 2.0


def test_shared_inflight_prefix_is_deferred_below_cap():
    pol = AgingPrefixOrdering(RequestTierConfig(token_credit_per_s=0.0))
    waiting = [W("dup", tokens=10, shares=True), W("other", tokens=500)]
    assert ranked(pol, waiting, 0.0) == ["other", "dup"]


def test_order_is_a_permutation_and_empty_ok():
    pol = AgingPrefixOrdering()
    assert pol.order([], 0.0) == []
    rng = np.random.default_rng(0)
    waiting = [W(str(i), int(rng.integers(0, 3)), float(rng.uniform(0, 30)), int(rng.integers(1, 4000))) for i in range(300)]
    assert sorted(pol.order(waiting, 30.0)) == list(range(300))


def test_fcfs_priority_baseline_matches_upstream_sort():
    waiting = [W("a", 0, 0.0), W("b", 5, 3.0), W("c", 5, 1.0)]
    assert ranked(FcfsPriorityOrdering(), waiting, 100.0) == ["c", "b", "a"]


def test_order_1k_is_fast():
    pol = AgingPrefixOrdering()
    rng = np.random.default_rng(1)
    waiting = [W(str(i), int(rng.integers(0, 2)), float(rng.uniform(0, 10)), int(rng.integers(1, 4000)), 0) for i in range(1000)]
    pol.order(waiting, 10.0)
    t0 = time.perf_counter()
    for _ in range(20):
        pol.order(waiting, 10.0)
    per_call = (time.perf_counter() - t0) / 20
    assert per_call < 0.01  # generous bound for CI noise; the benchmark reports the real number


@pytest.mark.parametrize(
    "field,value,fragment",
    [
        ("aging_rate", -1.0, "aging_rate"),
        ("aging_cap_s", 0.0, "aging_cap_s"),
        ("aging_cap_s", float("inf"), "aging_cap_s"),
        ("token_credit_per_s", -5.0, "token_credit_per_s"),
        ("preemption_threshold", -1, "preemption_threshold"),
        ("min_chunk_tokens", 0, "min_chunk_tokens"),
        ("be_chunk_tokens", 8, "be_chunk_tokens"),
        ("ls_overtake_burst", -1, "ls_overtake_burst"),
        ("ls_overtake_burst", 2.5, "ls_overtake_burst"),
        ("ls_overtakes_per_promoted", -0.5, "ls_overtakes_per_promoted"),
        ("ls_overtakes_per_promoted", float("nan"), "ls_overtakes_per_promoted"),
    ],
)
def test_validate_rejects_bad_values_with_one_sentence(field, value, fragment):
    with pytest.raises(ValueError, match=fragment):
        RequestTierConfig(**{field: value}).validate()


def test_defaults_validate_and_config_place_loads_request_section(tmp_path):
    RequestTierConfig().validate()
    path = tmp_path / "t.toml"
    path.write_text("[request]\naging_rate = 2.0\naging_cap_s = 7.5\n")
    cfg = load_config({"TIERSCHED_CONFIG": str(path), "TIERSCHED_SET": "request.preemption_threshold=3"})
    req = cfg.tier("request")
    assert (req.aging_rate, req.aging_cap_s, req.preemption_threshold) == (2.0, 7.5, 3)
    with pytest.raises(ConfigError, match=r"\[request\] aging_cap_s"):
        load_config({"TIERSCHED_SET": "request.aging_cap_s=-1"})


def test_overtake_state_stays_bounded_over_many_steps():
    """3000 scheduling steps with arrivals and admissions (some promoted): the budget remembers at most `burst`
    request ids and its credit stays within [0, burst]."""
    cfg = RequestTierConfig(aging_cap_s=2.0, ls_overtake_burst=3, ls_overtakes_per_promoted=1.0)
    pol = AgingPrefixOrdering(cfg)
    rng = np.random.default_rng(5)
    waiting, now, next_id = [], 0.0, 0
    for _ in range(3000):
        now += 0.05
        for _ in range(int(rng.poisson(1.2))):
            waiting.append(W(f"r{next_id}", int(rng.choice([0, 0, 0, 10])), now, int(rng.integers(1, 4000))))
            next_id += 1
        order = pol.order(waiting, now)
        assert sorted(order) == list(range(len(waiting)))
        waiting = [waiting[i] for i in order][1:]  # the head is admitted (one per step, below the arrival rate)
        assert len(pol.overtake._ahead) <= cfg.ls_overtake_burst
        assert 0.0 <= pol.overtake.credit <= cfg.ls_overtake_burst
    assert pol.overtake.overtakes > 0  # the overload really built a promoted backlog the LS requests overtook
