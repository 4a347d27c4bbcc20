"""The preemption release path on REAL upstream memory objects, in-process on CPU: ReqToTokenPool,
MHATokenToKVPool + TokenToKVPoolAllocator and RadixCache (built as upstream's own mem-cache test fixtures do,
sglang/test/kits/unified_radix_cache/fixtures.py). A running decode request holding KV is released by
`release_with_prefix_cached` (our victim release): its computed tokens land in the radix tree (evictable, not
freed), the row is freed, upstream's over-allocation assertion in `_release_overallocated_kv_indices` holds, and
a re-match of its tokens finds them. Upstream's own release (checkpoint=False) frees everything instead."""
from __future__ import annotations

import array

import pytest

pytest.importorskip("sglang.srt.mem_cache.radix_cache")

import torch  # noqa: E402
from sglang.srt.managers.schedule_batch import Req  # noqa: E402
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator  # noqa: E402
from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams  # noqa: E402
from sglang.srt.mem_cache.cache_init_params import CacheInitParams  # noqa: E402
from sglang.srt.mem_cache.common import release_kv_cache  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool  # noqa: E402
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey  # noqa: E402
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: E402

from tiersched.sglang.request.preempt import release_with_prefix_cached  # noqa: E402

KV_SIZE = 512


@pytest.fixture(autouse=True, scope="module")
def published_runtime_context():
    """release_kv_cache reads process config bags (serving, spec); publish defaults as upstream's tests do
    (sglang.test.test_utils.publish_build_topology), and reset afterwards."""
    from sglang.srt.runtime_context import SpawnRanks, publish, reset_context
    from sglang.srt.server_args import ServerArgs

    reset_context()
    publish(ServerArgs(model_path="dummy"), role="test", ranks=SpawnRanks(world_rank=0))
    yield
    reset_context()


def build_tree():
    pool = ReqToTokenPool(size=8, max_context_len=KV_SIZE, device="cpu", enable_memory_saver=False)
    kv = MHATokenToKVPool(size=KV_SIZE, page_size=1, dtype=torch.float32, head_num=1, head_dim=4, layer_num=1,
                          device="cpu", enable_memory_saver=False)
    alloc = TokenToKVPoolAllocator(size=KV_SIZE, dtype=torch.float32, device="cpu", kvcache=kv, need_sort=False)
    return RadixCache(CacheInitParams(req_to_token_pool=pool, token_to_kv_pool_allocator=alloc, page_size=1,
                                      disable=False))


def running_decode_req(tree, prompt_len=40, generated=5, rid="victim"):
    """A request after prefill + decode steps: prompt + generated-1 tokens have KV (the newest output token's
    KV is written by the next step), all in its own req_to_token row."""
    req = Req(rid, "", array.array("q", range(1000, 1000 + prompt_len)), SamplingParams(max_new_tokens=64))
    req.output_ids.extend(range(7, 7 + generated))
    tree.req_to_token_pool.alloc([req])
    committed = prompt_len + generated - 1
    slots = tree.token_to_kv_pool_allocator.alloc(committed)
    tree.req_to_token_pool.write((req.kv.req_pool_idx, slice(0, committed)), slots)
    req.kv.kv_committed_len = req.kv.kv_allocated_len = committed
    req.last_node = tree.root_node
    req.lock = tree.lock(tree.root_node)
    return req, committed


def matched(tree, ids) -> int:
    return tree.match_prefix(MatchPrefixParams(key=RadixKey(token_ids=array.array("q", ids)))).device_prefix_len


def test_victim_release_keeps_its_computed_prefix_in_the_tree():
    tree = build_tree()
    alloc = tree.token_to_kv_pool_allocator
    req, committed = running_decode_req(tree)
    tokens = list(req.origin_input_ids) + list(req.output_ids)
    assert alloc.available_size() == KV_SIZE - committed and matched(tree, tokens) == 0
    release_with_prefix_cached(req, tree)
    assert not req.kv.holds_kv and req.retraction_count == 1 and req.is_retracted
    assert matched(tree, tokens) == committed  # resumes from everything it had computed
    assert tree.evictable_size() == committed  # unlocked: evictable under pressure, not pinned
    assert alloc.available_size() == KV_SIZE - committed  # the KV moved to the tree; nothing leaked
    assert tree.req_to_token_pool.available_size() == 8  # its row is free


def test_upstream_release_frees_the_prefix_instead():
    tree = build_tree()
    req, committed = running_decode_req(tree)
    release_kv_cache(req, tree, checkpoint=False)  # what upstream's preempt_to_schedule -> release_req does
    req.reset_for_retract()
    assert matched(tree, list(req.origin_input_ids) + list(req.output_ids)) == 0
    assert tree.token_to_kv_pool_allocator.available_size() == KV_SIZE


def test_two_victims_sharing_a_prompt_prefix_are_both_cached_once():
    tree = build_tree()
    a, committed_a = running_decode_req(tree, 40, 5, "a")
    release_with_prefix_cached(a, tree)
    b, committed_b = running_decode_req(tree, 40, 9, "b")  # same prompt, a different own row and slots
    release_with_prefix_cached(b, tree)
    assert matched(tree, list(b.origin_input_ids) + list(b.output_ids)) == committed_b
    # a's 44 tokens and b's 48 share the 40-token prompt plus the first 4 outputs (same ids): the tree keeps
    # one copy of the shared part; b's duplicate slots for it were freed.
    assert tree.evictable_size() == committed_b
    assert tree.token_to_kv_pool_allocator.available_size() == KV_SIZE - committed_b


def test_prefix_aging_preemption_acts_only_in_its_own_schedulers_prefill_pass(monkeypatch):
    """Building a prefix-aging SchedulePolicy changes no other PrefillAdder: a real adder outside any prefill pass,
    or in an fcfs scheduler's pass, runs upstream's preempt_to_schedule / add_one_req; in the prefix-aging
    scheduler's pass it runs ours, with that policy's state."""
    from types import SimpleNamespace

    from sglang.srt.managers.schedule_policy import AddReqResult, PrefillAdder, SchedulePolicy

    from tiersched.sglang.request import hooks as request_tier
    from tiersched.sglang.request.state import policy_state

    tree = build_tree()

    def policy(name):
        pol = SchedulePolicy.__new__(SchedulePolicy)
        request_tier.init_schedule_policy(SchedulePolicy.__init__, pol, name, tree, False, True, False)
        return pol

    aging, fcfs = policy("prefix-aging"), policy("fcfs")
    adder = PrefillAdder(1, tree, tree.token_to_kv_pool_allocator, None, 0.5, KV_SIZE, None)
    ls = Req("ls", "", array.array("q", range(10)), SamplingParams(max_new_tokens=4), priority=10)
    ours, upstream = [], []
    monkeypatch.setattr(request_tier, "preempt",
                        lambda adder, req, state, slots_short: ours.append((req.rid, state, slots_short)) or True)

    def upstream_preempt(adder, req):
        upstream.append("preempt_to_schedule")
        return False

    def upstream_add(adder, req):
        upstream.append("add_one_req")
        return AddReqResult.NO_TOKEN

    def both_hooks():
        return (request_tier.preempt_for_slots(upstream_preempt, adder, ls),
                request_tier.preempt_for_kv(upstream_add, adder, ls))

    def in_pass_of(pol):  # what Scheduler.get_new_batch_prefill runs through the hook
        return request_tier.scope_prefill_pass(lambda scheduler: both_hooks(), SimpleNamespace(policy=pol))

    assert both_hooks() == (False, AddReqResult.NO_TOKEN)
    assert in_pass_of(fcfs) == (False, AddReqResult.NO_TOKEN)
    assert ours == [] and upstream == ["preempt_to_schedule", "add_one_req"] * 2
    upstream.clear()
    in_pass_of(aging)
    state = policy_state(aging)
    assert ours == [("ls", state, 1), ("ls", state, 0)]  # slot-full, then KV-shortage preemption for the LS request
    assert upstream == ["add_one_req", "add_one_req"]  # upstream's admission, retried once after our preemption
    assert both_hooks() == (False, AddReqResult.NO_TOKEN) and len(ours) == 2  # the pass is over
