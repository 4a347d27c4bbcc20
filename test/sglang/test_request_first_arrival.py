"""A preempted request keeps its age, and is preempted a bounded number of times: in-process on CPU, on REAL
upstream objects (Req, Scheduler._add_request_to_queue, SchedulePolicy, PrefillAdder, ScheduleBatch,
ReqToTokenPool + KV allocator + RadixCache, built as in test_request_preempt_path.py).

Upstream re-queues a preempted or retracted request through `Scheduler._add_request_to_queue`, which stamps
`time_stats.wait_queue_entry_time` again; the request tier ages from the first queue entry instead
(`tiersched_first_arrival`, set once by our hook on that method), and after `max_preemptions_per_request`
preemptions (upstream's `Req.retraction_count`) a request is no longer a victim."""
from __future__ import annotations

import array
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("sglang.srt.mem_cache.radix_cache")

from sglang.srt.disaggregation.utils import DisaggregationMode  # noqa: E402
from sglang.srt.managers.schedule_batch import Req, ScheduleBatch  # noqa: E402
from sglang.srt.managers.schedule_policy import PrefillAdder, SchedulePolicy  # noqa: E402
from sglang.srt.managers.scheduler import Scheduler  # noqa: E402
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: E402
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm  # noqa: E402

from tiersched.core.request import RequestTierConfig  # noqa: E402
from tiersched.sglang.request import hooks as request_tier  # noqa: E402
from tiersched.sglang.request.state import FIRST_ARRIVAL_ATTR, STATE, first_arrival, policy_state  # noqa: E402

from test_request_preempt_path import KV_SIZE, build_tree, published_runtime_context  # noqa: E402,F401

LS, BE = 10, 0
BOUND = 2


@pytest.fixture
def tier_config():
    saved = STATE.config
    # No LS overtakes of promoted requests: a promoted request goes first, whatever waits.
    request_tier.configure(RequestTierConfig(max_preemptions_per_request=BOUND, aging_cap_s=0.05,
                                             ls_overtake_burst=0, ls_overtakes_per_promoted=0.0))
    yield STATE.config
    request_tier.configure(saved)


def prefix_aging_policy(tree):
    pol = SchedulePolicy.__new__(SchedulePolicy)
    request_tier.init_schedule_policy(SchedulePolicy.__init__, pol, "prefix-aging", tree, False, True, False)
    return pol


def scheduler(policy, tree):
    """A real Scheduler with the attributes its `_add_request_to_queue` reads (no model, no processes)."""
    sched = Scheduler.__new__(Scheduler)
    sched.policy, sched.tree_cache = policy, tree
    sched.enable_priority_scheduling, sched.schedule_low_priority_values_first = True, False
    sched.abort_on_priority_when_disabled = False
    sched.disaggregation_mode = DisaggregationMode.NULL
    sched.max_queued_requests = None
    sched.enable_hicache_storage = sched.enable_lmcache = False
    sched.waiting_queue, sched.processed_tokens_counter = [], 0
    return sched


def add_to_queue(sched, req, **kwargs):
    """Upstream's own Scheduler._add_request_to_queue, through our AROUND hook (what HookRegistry installs)."""
    request_tier.keep_first_arrival(Scheduler._add_request_to_queue, sched, req, **kwargs)


def make_running(tree, req, computed):
    """Give `req` its own KV row holding `computed` tokens, as after prefill (test_request_preempt_path)."""
    tree.req_to_token_pool.alloc([req])
    slots = tree.token_to_kv_pool_allocator.alloc(computed)
    tree.req_to_token_pool.write((req.kv.req_pool_idx, slice(0, computed)), slots)
    req.kv.kv_committed_len = req.kv.kv_allocated_len = computed
    req.last_node = tree.root_node
    req.lock = tree.lock(tree.root_node)


def running_batch(tree, reqs):
    return ScheduleBatch.init_new(reqs, tree.req_to_token_pool, tree.token_to_kv_pool_allocator, tree,
                                  SimpleNamespace(vocab_size=1024, is_encoder_decoder=False), False,
                                  SpeculativeAlgorithm.NONE)


def preempt_once(policy, tree, victim, ls):
    """One prefill pass of the prefix-aging scheduler, slots full: our preempt_to_schedule hook decides; returns
    the adder (its preempt_list is what the scheduler re-queues)."""
    make_running(tree, victim, len(victim.origin_input_ids) + len(victim.output_ids) - 1)
    adder = PrefillAdder(1, tree, tree.token_to_kv_pool_allocator, running_batch(tree, [victim]), 0.5, KV_SIZE, None)
    request_tier.scope_prefill_pass(
        lambda sched: request_tier.preempt_for_slots(lambda a, r: pytest.fail("upstream preemption ran"), adder, ls),
        SimpleNamespace(policy=policy))
    return adder


def be_request(rid="be", prompt_len=40):
    req = Req(rid, "", array.array("q", range(1000, 1000 + prompt_len)), SamplingParams(max_new_tokens=64),
              priority=BE)
    req.output_ids.extend(range(7, 12))
    return req


def test_requeue_keeps_the_first_arrival_and_aging_uses_it(tier_config):
    tree = build_tree()
    policy = prefix_aging_policy(tree)
    sched = scheduler(policy, tree)
    victim = be_request()
    add_to_queue(sched, victim)
    first = victim.time_stats.wait_queue_entry_time
    assert first > 0 and getattr(victim, FIRST_ARRIVAL_ATTR) == first
    sched.waiting_queue.clear()
    time.sleep(0.1)  # longer than aging_cap_s (0.05 s): aged from its first arrival it is promoted
    ls = Req("ls", "", array.array("q", range(2000, 2010)), SamplingParams(max_new_tokens=4), priority=LS)
    adder = preempt_once(policy, tree, victim, ls)
    assert adder.preempt_list == [victim] and victim.retraction_count == 1
    for req in adder.preempt_list:  # what Scheduler.get_new_batch_prefill does with the victims
        add_to_queue(sched, req)
    assert victim.time_stats.wait_queue_entry_time > first  # upstream restarted its queue clock
    assert getattr(victim, FIRST_ARRIVAL_ATTR) == first  # ours did not
    # A fresh LS request arrives; the preempted BE request waited > aging_cap_s since its FIRST arrival, so it is
    # promoted and goes first (aged from upstream's re-stamped entry time it would be 0 s old and go last).
    fresh = Req("ls2", "", array.array("q", range(3000, 3010)), SamplingParams(max_new_tokens=4), priority=LS)
    add_to_queue(sched, fresh)
    request_tier.calc_priority(lambda *a, **k: pytest.fail("upstream ordering ran"), policy, sched.waiting_queue)
    assert [r.rid for r in sched.waiting_queue] == ["be", "ls2"]
    assert time.perf_counter() - first_arrival(victim, 0.0) >= tier_config.aging_cap_s


def test_a_request_stops_being_a_victim_after_the_bound(tier_config):
    tree = build_tree()
    policy = prefix_aging_policy(tree)
    sched = scheduler(policy, tree)
    victim = be_request()
    add_to_queue(sched, victim)
    first = getattr(victim, FIRST_ARRIVAL_ATTR)
    sched.waiting_queue.clear()
    preempted = 0
    for i in range(BOUND + 2):
        ls = Req(f"ls{i}", "", array.array("q", range(2000 + 20 * i, 2010 + 20 * i)),
                 SamplingParams(max_new_tokens=4), priority=LS)
        adder = preempt_once(policy, tree, victim, ls)
        if not adder.preempt_list:
            break
        preempted += 1
        for req in adder.preempt_list:
            add_to_queue(sched, req)
        sched.waiting_queue.clear()  # admitted again; the next loop makes it run
        assert getattr(victim, FIRST_ARRIVAL_ATTR) == first
    assert preempted == BOUND and victim.retraction_count == BOUND
    assert adder.running_batch.reqs == [victim]  # still running: not released, not re-queued
    assert policy_state(policy).preemptions.victims == BOUND
