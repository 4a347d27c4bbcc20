"""Request-tier adapter against REAL upstream objects on CPU, in-process: Req, RadixCache, SchedulePolicy,
the real `--schedule-policy` argparse action. The hooks are called the way HookRegistry's AROUND wrapper
calls them (original function first), without patching upstream globally."""
from __future__ import annotations

import argparse
import array
import time

import pytest

pytest.importorskip("sglang.srt.managers.schedule_policy")

import torch  # noqa: E402
from sglang.srt.managers.schedule_batch import Req  # noqa: E402
from sglang.srt.managers.schedule_policy import SchedulePolicy  # noqa: E402
from sglang.srt.mem_cache.base_prefix_cache import InsertParams  # noqa: E402
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey  # noqa: E402
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: E402
from sglang.srt.server_args import ServerArgs  # noqa: E402

from tiersched.core.request import RequestTierConfig  # noqa: E402
from tiersched.sglang.request import hooks as request_tier  # noqa: E402
from tiersched.sglang.request.state import STATE, policy_state  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_state():
    saved = STATE.config
    request_tier.configure(RequestTierConfig(aging_rate=0.0, token_credit_per_s=0.0, aging_cap_s=30.0))
    yield
    request_tier.configure(saved)


def make_req(rid, ids, priority=0, entered=None):
    r = Req(rid, "", array.array("q", ids), SamplingParams(max_new_tokens=4), priority=priority)
    r.time_stats.set_wait_queue_entry_time(entered)
    return r


def make_policy(policy_name, tree, low_values_first=False):
    # SchedulePolicy(policy, tree_cache, enable_hierarchical_cache, enable_priority_scheduling, low_values_first)
    pol = SchedulePolicy.__new__(SchedulePolicy)
    request_tier.init_schedule_policy(SchedulePolicy.__init__, pol, policy_name, tree, False, True, low_values_first)
    return pol


def calc(pol, queue):
    request_tier.calc_priority(SchedulePolicy.calc_priority, pol, queue, None, 0)


def tree_with(prefix_ids):
    tree = RadixCache.create_simulated()
    tree.insert(InsertParams(key=RadixKey(token_ids=array.array("q", prefix_ids)), value=torch.arange(len(prefix_ids))))
    return tree


def test_prefix_aging_orders_by_class_then_uncached_after_real_radix_match():
    tree = tree_with(range(1000))
    pol = make_policy("prefix-aging", tree)
    assert policy_state(pol) is not None
    now = time.perf_counter()
    queue = [
        make_req("be-uncached", range(5000, 5400), 0, now - 1.0),
        make_req("be-cached", list(range(1000)) + [1, 2, 3], 0, now - 0.5),  # 1003 tokens, 1000 cached
        make_req("ls", range(7000, 7600), 10, now),
    ]
    calc(pol, queue)
    assert [r.rid for r in queue] == ["ls", "be-cached", "be-uncached"]
    cached = {r.rid: r.num_matched_prefix_tokens for r in queue}
    assert cached["be-cached"] == 1000 and cached["be-uncached"] == 0  # filled by upstream's radix match


def test_in_queue_shared_prefix_is_deferred_like_lpm():
    tree = RadixCache.create_simulated()
    pol = make_policy("prefix-aging", tree)
    now = time.perf_counter()
    shared = list(range(100, 200))
    queue = [make_req("first", shared + [1], 0, now - 3), make_req("dup", shared + [2], 0, now - 2),
             make_req("long", range(900, 1100), 0, now - 1)]
    calc(pol, queue)
    # dup shares a >= 32-token uncached prefix with `first`: it goes after `long` despite being shorter.
    assert [r.rid for r in queue] == ["first", "long", "dup"]


def test_aged_request_is_promoted_above_ls():
    request_tier.configure(RequestTierConfig(aging_cap_s=5.0, ls_overtake_burst=0, ls_overtakes_per_promoted=0.0))
    pol = make_policy("prefix-aging", RadixCache.create_simulated())
    now = time.perf_counter()
    queue = [make_req("ls", range(10), 10, now), make_req("be-old", range(20, 2020), 0, now - 6.0)]
    calc(pol, queue)
    assert [r.rid for r in queue] == ["be-old", "ls"]


def test_ls_overtakes_a_promoted_request_within_the_policy_budget():
    """Each scheduler's SchedulePolicy keeps its own overtake credit across steps: one LS request (burst 1) goes
    ahead of the promoted one; once it left the queue (admitted), the next LS request does not."""
    request_tier.configure(RequestTierConfig(aging_cap_s=5.0, ls_overtake_burst=1, ls_overtakes_per_promoted=0.0))
    pol = make_policy("prefix-aging", RadixCache.create_simulated())
    now = time.perf_counter()
    queue = [make_req("be-old", range(20, 2020), 0, now - 6.0), make_req("ls1", range(10), 10, now),
             make_req("ls2", range(30, 40), 10, now)]
    calc(pol, queue)
    assert [r.rid for r in queue] == ["ls1", "be-old", "ls2"]
    queue.pop(0)  # ls1 admitted
    calc(pol, queue)
    assert [r.rid for r in queue] == ["be-old", "ls2"]
    other = make_policy("prefix-aging", RadixCache.create_simulated())  # another scheduler: its own credit
    queue2 = [make_req("be-old2", range(50, 2050), 0, now - 6.0), make_req("ls3", range(60, 70), 10, now)]
    calc(other, queue2)
    assert [r.rid for r in queue2] == ["ls3", "be-old2"]


def test_low_priority_values_first_is_normalised():
    pol = make_policy("prefix-aging", RadixCache.create_simulated(), low_values_first=True)
    now = time.perf_counter()
    queue = [make_req("p5", range(10), 5, now), make_req("p1", range(20, 40), 1, now)]
    calc(pol, queue)
    assert [r.rid for r in queue] == ["p1", "p5"]


def test_other_policies_pass_through_untouched():
    tree = tree_with(range(500))
    pol = make_policy("lpm", tree)
    assert policy_state(pol) is None
    now = time.perf_counter()
    queue = [make_req("ls-uncached", range(9000, 9010), 10, now), make_req("be-cached", list(range(500)) + [1], 0, now - 1)]
    calc(pol, queue)
    # upstream LPM (no priority): longest cached prefix first, although ls-uncached is urgent and short
    assert [r.rid for r in queue] == ["be-cached", "ls-uncached"]


def test_cli_accepts_prefix_aging_only_through_the_hook():
    plain = argparse.ArgumentParser()
    ServerArgs.add_cli_args(plain)
    with pytest.raises(SystemExit):
        plain.parse_args(["--model-path", "m", "--schedule-policy", "prefix-aging"])
    hooked = argparse.ArgumentParser()
    request_tier.accept_policy_choice(ServerArgs.add_cli_args, hooked)
    args = hooked.parse_args(["--model-path", "m", "--schedule-policy", "prefix-aging", "--enable-priority-scheduling"])
    assert args.schedule_policy == "prefix-aging" and args.enable_priority_scheduling


def test_validation_hook_presents_fcfs_only_during_the_check():
    from sglang.srt.arg_groups import validation_hook

    seen = []

    class Args:
        schedule_policy = "prefix-aging"
        enable_priority_scheduling = True

    def fake_check(sa):  # reads its config the way upstream's check_server_args does
        cfg = validation_hook.resolving_view(sa)
        seen.append((cfg.schedule_policy, cfg.enable_priority_scheduling))

    real = validation_hook.resolving_view
    validation_hook.resolving_view = lambda sa: sa
    try:
        request_tier.allow_policy_with_priority(fake_check, Args())
        assert validation_hook.resolving_view.__name__ == "<lambda>"  # restored to what it was
    finally:
        validation_hook.resolving_view = real
    assert seen == [("fcfs", True)]


def test_chunk_cap_for_ls_waiter_behind_be_chunk():
    request_tier.configure(RequestTierConfig(be_chunk_tokens=128, min_chunk_tokens=64))
    pol = make_policy("prefix-aging", RadixCache.create_simulated())
    now = time.perf_counter()
    chunked = make_req("be-long", range(10_000, 30_000), 0, now - 1)
    chunked.full_untruncated_fill_ids = chunked.origin_input_ids
    chunked.prefix_len = 4096
    waiting = [make_req("ls", range(50_000, 53_000), 10, now)]
    limit = request_tier.chunk_limit(SchedulePolicy.shortest_prefill_chunk_limit, pol, chunked, waiting, 8192, 1)
    assert limit == 128
    # the upstream method (used for every other policy) returns None here: it only acts for shortest-prefill-first
    assert SchedulePolicy.shortest_prefill_chunk_limit(pol, chunked, waiting, 8192, 1) is None
