"""The simulator's copies of upstream's request-tier policies against upstream's own objects, side by side.

Each case builds one rank's state twice from the same random draw: upstream's real `Req`s, `SchedulePolicy`,
`RadixCache` (a simulated one: no KV pool, the tree only) and `PrefillAdder`, and the simulator's `RankState`
(tiersched.sim.rank) running the copies in tiersched.core.request.upstream. Requests are made of pages of
`block_tokens` tokens named by chained hashes (what the simulator caches); upstream sees the same pages as token ids
(page hash h -> tokens h*bt .. h*bt+bt-1, so different pages never share a token), plus a private tail.

The prefill-pass test runs upstream's own `Scheduler._get_new_batch_prefill_raw` on a stand-in scheduler holding
the attributes it reads, with a real CPU `TokenToKVPoolAllocator` and RadixCache; stubbed are only what needs GPU
tables or a model: the running batch's release_req / filter_batch (`_RunningBatch`), the request-row budget, and
`ScheduleBatch.init_new`, patched to hand back the chosen requests. Queues come from seeds (numpy), 1,000 seeds per
test, derandomized: a failure names its seed.
"""
from __future__ import annotations

from array import array
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tiersched.core.request import upstream as ours  # noqa: E402
from tiersched.sim.presets import get_preset  # noqa: E402
from tiersched.sim.rank import RankState, RequestTable  # noqa: E402
from tiersched.sim.workloads import Workload  # noqa: E402

sp_mod = pytest.importorskip("sglang.srt.managers.schedule_policy")
from sglang.srt.managers.schedule_batch import Req  # noqa: E402
from sglang.srt.mem_cache.base_prefix_cache import InsertParams  # noqa: E402
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey  # noqa: E402
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: E402

CASES = settings(max_examples=1000, derandomize=True, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TAIL_BASE = 10_000_000  # private tail tokens: far above every page's token ids


@pytest.fixture(scope="module", autouse=True)
def published_server_args():
    """Upstream's policies read server flags from its runtime context: publish a default ServerArgs."""
    from sglang.test.test_utils import published_topology

    with published_topology() as server_args:
        yield server_args


def test_constants_are_upstreams():
    assert ours.WAITING_QUEUE_PREFIX_MATCH_MAX == sp_mod.WAITING_QUEUE_PREFIX_MATCH_MAX
    assert ours.IN_BATCH_PREFIX_CACHING_CHECK_THRESHOLD == sp_mod.IN_BATCH_PREFIX_CACHING_CHECK_THRESHOLD
    assert ours.IN_BATCH_PREFIX_CACHING_DEPRIORITIZE_THRESHOLD == sp_mod.IN_BATCH_PREFIX_CACHING_DEPRIORITIZE_THRESHOLD


# ---- one rank's waiting queue, drawn once, built twice -------------------------------------------------------------

def draw_queue(seed: int, max_len: int = 12, long_every: int = 25) -> dict:
    """One rank's queue from a seed: requests (pages, tail, priority, arrival, entry time, generated tokens, HRRN
    snapshot), the queue order, the cached page chains. Pages come from 1-3 root chains (shared prefixes) plus
    private ones; one queue in `long_every` is longer than upstream's 128-waiting cut-off."""
    rng = np.random.default_rng(seed)
    bt = int(rng.choice([16, 32, 64]))
    n = int(rng.integers(0, max_len + 1))
    if long_every and rng.integers(0, long_every) == 0:
        n = int(rng.integers(ours.WAITING_QUEUE_PREFIX_MATCH_MAX - 1, ours.WAITING_QUEUE_PREFIX_MATCH_MAX + 5))
    roots = int(rng.integers(1, 4))
    reqs = []
    for i in range(n):
        root, depth, own = int(rng.integers(0, roots)), int(rng.integers(0, 4)), int(rng.integers(0, 3))
        pages = tuple(1 + root * 16 + d for d in range(depth)) + tuple(1000 + 4 * i + k for k in range(own))
        reqs.append(dict(pages=pages, tail=int(rng.integers(0 if pages else 1, bt + 8)),
                         prio=int(rng.integers(-3, 4)), arrival=int(rng.integers(0, 21)),
                         entry=int(rng.integers(0, 41)), generated=int(rng.choice([0, 0, 0, 1, 5, 40])),
                         snap=int(rng.integers(0, 5001))))
    cached = [tuple(1 + r * 16 + d for d in range(int(rng.integers(0, 4)))) for r in range(roots)]
    return dict(bt=bt, reqs=reqs, order=[int(x) for x in rng.permutation(n)], cached=cached,
                processed=int(rng.integers(0, 6001)), low_first=bool(rng.integers(0, 2)))


SEEDS = st.integers(0, 2**32 - 1)


def _tokens(q, i) -> list[int]:
    bt, r = q["bt"], q["reqs"][i]
    toks = [h * bt + j for h in r["pages"] for j in range(bt)]
    return toks + [TAIL_BASE + 1000 * i + j for j in range(r["tail"] + r["generated"])]


def _upstream_queue(q, policy_name: str, priority: bool, made: dict | None = None):
    """A SchedulePolicy over a fresh tree holding q's cached chains, and the queue of Reqs in q's order (`made`
    caches the Reqs of one draw across policies: calc_priority recomputes everything it reads)."""
    tree = RadixCache.create_simulated()
    bt = q["bt"]
    for chain in q["cached"]:
        if chain:
            toks = [h * bt + j for h in chain for j in range(bt)]
            tree.insert(InsertParams(key=RadixKey(token_ids=array("q", toks)), value=None))
    policy = sp_mod.SchedulePolicy(policy_name, tree, False, priority, q["low_first"])
    sign = -1 if q["low_first"] else 1  # the adapter flips priorities so that higher is more urgent in ours
    queue = []
    made = {} if made is None else made
    for i in q["order"]:
        if i in made:
            queue.append(made[i])
            continue
        r = q["reqs"][i]
        toks = _tokens(q, i)
        prompt = toks[: len(toks) - r["generated"]]
        req = Req(str(i), "", array("q", prompt), SamplingParams(max_new_tokens=64), priority=sign * r["prio"])
        req.output_ids = array("q", toks[len(prompt):])
        req.time_stats.wait_queue_entry_time = float(r["entry"])
        req.arrival_processed_tokens = r["snap"]
        made[i] = req
        queue.append(req)
    return policy, queue


def _rank(q, ordering) -> RankState:
    reqs, bt = q["reqs"], q["bt"]
    n = len(reqs)
    inputs = np.array([len(r["pages"]) * bt + r["tail"] for r in reqs], dtype=np.int64)
    w = Workload("diff", np.array([float(r["arrival"]) for r in reqs]), inputs, np.full(n, 64, dtype=np.int64),
                 np.array([r["prio"] for r in reqs], dtype=np.int64), np.zeros(n, dtype=np.int64),
                 prefix_blocks=tuple(r["pages"] for r in reqs) if n else (), block_tokens=bt)
    rs = RankState(0, get_preset("qwen3"), RequestTable(w), ordering, None)
    for chain in q["cached"]:
        rs.cache.lock(chain)
        rs.cache.unlock(chain)
    t = rs.t
    for i in q["order"]:
        r = reqs[i]
        if isinstance(ordering, ours.HrrnOrdering):
            ordering.processed_tokens = r["snap"]
        rs.enqueue(i, float(r["entry"]))
        t.generated[i] = r["generated"]
        t.fill_len[i] = t.input[i] + r["generated"]
    if isinstance(ordering, ours.HrrnOrdering):
        ordering.processed_tokens = q["processed"]
    return rs


POLICIES = [  # (upstream --schedule-policy, --enable-priority-scheduling, our copy)
    ("fcfs", False, ours.FcfsOrdering), ("fcfs", True, ours.FcfsPriorityOrdering), ("lpm", False, ours.LpmOrdering),
    ("lpm", True, ours.LpmOrdering), ("hrrn", False, ours.HrrnOrdering),
    ("shortest-prefill-first", False, ours.ShortestPrefillFirstOrdering),
    ("shortest-prefill-first", True, ours.ShortestPrefillFirstOrdering),
]


def test_calc_priority_order_equals_upstream():
    """Every policy on the same draw: upstream's calc_priority reorders its list, our copy orders the sim's queue."""
    seen = {(p, pr): {"long": 0, "deferred": 0, "cached": 0, "requeued": 0, "cases": 0} for p, pr, _ in POLICIES}

    @CASES
    @given(seed=SEEDS)
    def check(seed):
        q = draw_queue(seed)
        made: dict = {}
        for policy_name, priority, copy in POLICIES:
            policy, queue = _upstream_queue(q, policy_name, priority, made)
            rs = _rank(q, copy())
            if policy_name == "lpm" and not priority and len(queue) <= ours.WAITING_QUEUE_PREFIX_MATCH_MAX:
                # `shares_inflight_prefix` is exactly upstream's in-batch temporary_deprioritized set
                deferred = policy._compute_prefix_matches(list(queue), sp_mod.CacheAwarePolicy.LPM)
                assert {w.rid for w in rs._waiting_snapshots(0.0)[0] if w.shares_inflight_prefix} == deferred
            policy.calc_priority(queue, None, processed_tokens=q["processed"])
            snaps, _ = rs._ordered_waiting(0.0)
            assert [int(r.rid) for r in queue] == rs.waiting, (policy_name, priority)
            # the snapshot plays num_matched_prefix_tokens, which upstream computes here for cache-aware policies
            # only and, for lpm / hrrn, only up to 128 waiting
            if isinstance(policy._determine_active_policy(queue), sp_mod.CacheAwarePolicy):
                assert [s.cached_tokens for s in snaps] == [r.num_matched_prefix_tokens for r in queue]
            c = seen[(policy_name, priority)]
            c["cases"] += 1
            c["long"] += len(queue) > ours.WAITING_QUEUE_PREFIX_MATCH_MAX
            c["deferred"] += any(s.shares_inflight_prefix for s in snaps)
            c["cached"] += any(s.cached_tokens for s in snaps)
            c["requeued"] += any(s.generated_tokens for s in snaps)

    check()
    for key, c in seen.items():  # every policy saw >= 1,000 queues, and the cases this test is about did occur
        assert c["cases"] >= 1000 and min(c.values()) >= 20, (key, c)


def test_queue_persists_across_steps_like_upstreams_list():
    """Several passes over one queue: arrivals and re-queued requests join at the back, each pass sorts what the
    previous one left (or, above 128 waiting, leaves it). Same order as upstream's list after every pass."""
    rng = np.random.default_rng(0)
    for policy_name, priority, copy in POLICIES:
        for trial in range(3):
            bt = 64
            n = 160 if trial == 2 else 24
            pages = [tuple(1 + int(rng.integers(0, 2)) * 16 + d for d in range(int(rng.integers(0, 3))))
                     for _ in range(n)]
            q = dict(bt=bt, cached=[], low_first=False, processed=0, order=[],
                     reqs=[dict(pages=p, tail=int(rng.integers(1, 90)), prio=int(rng.integers(0, 3)),
                                arrival=i, entry=i, generated=0, snap=0) for i, p in enumerate(pages)])
            rs = _rank(q, copy())
            policy, queue = _upstream_queue(q, policy_name, priority)
            for step in range(12):
                processed = step * 100  # upstream's processed_tokens_counter; HRRN snapshots it at queue entry
                if isinstance(rs.ordering, ours.HrrnOrdering):
                    rs.ordering.processed_tokens = processed
                for i in range(step * n // 12, (step + 1) * n // 12):
                    q["order"] = [i]
                    _, (req,) = _upstream_queue(q, policy_name, priority)
                    req.time_stats.wait_queue_entry_time = float(step)
                    req.arrival_processed_tokens = processed
                    queue.append(req)
                    rs.enqueue(i, float(step))
                if step % 3 == 2 and queue:  # the head leaves (admitted) and is re-queued at the back later
                    head = queue.pop(0)
                    head.time_stats.wait_queue_entry_time = float(step) + 0.5
                    head.arrival_processed_tokens = processed
                    queue.append(head)
                    rs.waiting.remove(int(head.rid))
                    rs.enqueue(int(head.rid), float(step) + 0.5)
                policy.calc_priority(queue, None, processed_tokens=processed)
                rs._ordered_waiting(float(step))
                assert [int(r.rid) for r in queue] == rs.waiting, (policy_name, priority, trial, step)


# ---- HRRN's snapshot is taken when a request enters the queue -----------------------------------------------------

def test_hrrn_snapshot_at_queue_entry_not_first_ordering():
    """A request that entered the queue while 1000 tokens were prefilled before it was first ordered has waited
    1000 tokens (upstream stamps arrival_processed_tokens in _add_request_to_queue); a re-queued one starts over."""
    h = ours.HrrnOrdering()
    w = lambda rid, tokens: ours.WaitingRequest(rid, 0, 0.0, tokens)  # noqa: E731
    h.observe_enqueue("a", 0.0)  # enters at processed 0
    h.observe_prefill_tokens(1000)
    h.observe_enqueue("b", 1.0)  # enters at processed 1000
    assert h.order([w("b", 100), w("a", 900)], 1.0) == [1, 0]  # a: 1000/900 > b: 0/100
    h.observe_enqueue("a", 2.0)  # a re-queued (preempted): its wait starts over
    h.observe_prefill_tokens(50)
    assert h.order([w("a", 900), w("b", 100)], 2.0) == [1, 0]  # b: 50/100 > a: 50/900


# ---- one prefill pass: Scheduler._get_new_batch_prefill_raw + PrefillAdder vs RankState.schedule_prefill ---------

class _Captured(Exception):
    """Raised by the patched ScheduleBatch.init_new: the pass chose its batch (building it needs GPU pools)."""


class _RunningBatch:
    """Stand-in for the running ScheduleBatch: the list of requests and what preemption calls on it. release_req
    does what upstream's release_req does to the pools for a request that is not inserted into the tree: frees the
    KV it holds outside the tree and unlocks its prefix (upstream's goes through req_to_token_pool, a GPU table)."""

    def __init__(self, reqs, allocator, tree):
        self.reqs, self.allocator, self.tree = list(reqs), allocator, tree
        self.batch_is_full = False

    def is_empty(self):
        return not self.reqs

    def batch_size(self):
        return len(self.reqs)

    def release_req(self, idx, remaining_count, offload_kv=True):
        req = self.reqs[idx]
        self.allocator.free(req._private_kv)
        self.tree.dec_lock_ref(req.last_node)
        req.reset_for_retract()
        return True

    def filter_batch(self, keep_indices=None, reqs_to_exclude=None):
        self.reqs = [self.reqs[i] for i in keep_indices]


def draw_pass(seed: int) -> dict:
    """One rank at the start of a prefill pass, from a seed: KV capacity, cached page chains, running requests (each
    pinning a cached prefix and holding private KV), maybe a chunked request, the waiting queue, the flags."""
    rng = np.random.default_rng(seed)
    bt = 16
    chains = [tuple(1 + r * 16 + d for d in range(int(rng.integers(0, 5)))) for r in range(2)]
    running, waiting = [], []
    for i in range(int(rng.integers(0, 6))):
        chain = chains[int(rng.integers(0, 2))]
        pages = chain[: int(rng.integers(0, len(chain) + 1))]
        out = int(rng.choice([8, 64, 300, 5000]))
        running.append(dict(pages=pages, tail=int(rng.integers(1, 60)), output=out,
                            generated=int(rng.integers(1, min(out, 400))), prio=int(rng.integers(-15, 16)),
                            entry=float(rng.integers(0, 30)), ignore_eos=bool(rng.integers(0, 3) == 0)))
    for i in range(int(rng.integers(0, 9))):
        chain = chains[int(rng.integers(0, 2))]
        pages = chain[: int(rng.integers(0, len(chain) + 1))] + tuple(500 + 4 * i + k for k in range(
            int(rng.integers(0, 2))))
        out = int(rng.choice([1, 8, 64, 300, 5000]))
        waiting.append(dict(pages=pages, tail=int(rng.integers(1, 300)), output=out,
                            generated=int(rng.choice([0, 0, 0, min(out - 1, int(rng.integers(1, 50)))])),
                            prio=int(rng.integers(-15, 16)), entry=float(rng.integers(0, 30)),
                            ignore_eos=bool(rng.integers(0, 3) == 0)))
    chunked = None
    if rng.integers(0, 3) == 0:
        total = int(rng.integers(40, 1500))
        chunked = dict(pages=(), tail=total, output=int(rng.choice([8, 300])), generated=0, prio=0, entry=0.0,
                       prefilled=int(rng.integers(1, total)), ignore_eos=bool(rng.integers(0, 2)))
    chunk = int(rng.choice([16, 64, 256, 1024]))
    held = (len({h for ch in chains for h in ch}) * bt + sum(r["tail"] + r["generated"] for r in running)
            + (chunked["prefilled"] if chunked else 0))  # KV in use: cached pages, running requests, the chunk
    return dict(bt=bt, chains=chains, running=running, waiting=waiting, chunked=chunked,
                capacity=held + int(rng.integers(0, 5000)), chunk=chunk,
                max_prefill=int(rng.choice([chunk, 2 * chunk, 16384])), max_running=int(rng.integers(1, 9)),
                # the new-token ratio: a fixed value, or upstream's tracker after this many decode steps
                ratio=float(rng.choice([0.0, 0.3, 0.7, 1.0])), decays=int(rng.choice([-1, -1, 0, 1, 37, 599, 700])),
                threshold=int(rng.choice([0, 1, 10])),
                low_first=bool(rng.integers(0, 2)))


def _pass_tokens(bt, i, r):
    return [h * bt + j for h in r["pages"] for j in range(bt)] + [TAIL_BASE + 1000 * i + j for j in range(r["tail"])]


def _upstream_tracker(p):
    """Upstream's NewTokenRatioTracker (from its config) after p["decays"] decode steps, or fixed at p["ratio"]."""
    from sglang.srt.managers.scheduler_components.new_token_ratio_tracker import NewTokenRatioTracker

    tracker = NewTokenRatioTracker.from_config()
    if p["decays"] < 0:
        tracker.current = p["ratio"]
    for _ in range(max(p["decays"], 0)):
        tracker.decay_step()
    return tracker


def _upstream_pass(p, policy_name, priority_preemption, scheduler_mod):
    """Upstream's scheduler loop over real Reqs, PrefillAdder, RadixCache and token allocator; returns
    (batch as (rid, extend, prefix), new chunked rid, waiting rids after the pass, preempted rids, batch_is_full)."""
    import torch
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator

    bt = p["bt"]
    alloc = TokenToKVPoolAllocator(p["capacity"], torch.int64, "cpu", None, False)
    tree = RadixCache.create_simulated(mock_allocator=alloc)
    pages = {h for ch in p["chains"] for h in ch}
    for ch in p["chains"]:
        if ch:
            tree.insert(InsertParams(key=RadixKey(token_ids=array("q", [h * bt + j for h in ch for j in range(bt)])),
                                     value=None))
    assert alloc.alloc(len(pages) * bt) is not None  # the tree's pages hold KV
    sign = -1 if p["low_first"] else 1
    everyone = [("r", i, r) for i, r in enumerate(p["running"])] + [("w", i, r) for i, r in enumerate(p["waiting"])]
    if p["chunked"]:
        everyone.append(("c", 0, p["chunked"]))
    reqs = {}
    for kind, i, r in everyone:
        rid = f"{kind}{i}"
        toks = _pass_tokens(bt, i if kind != "c" else 99, r)
        gen = r["generated"]
        req = Req(rid, "", array("q", toks), SamplingParams(max_new_tokens=r["output"], ignore_eos=r["ignore_eos"]),
                  priority=sign * r["prio"])
        req.output_ids = array("q", [7] * gen)
        req.full_untruncated_fill_ids = array("q", toks + [7] * gen)  # refresh_fill_ids' result
        req.time_stats.wait_queue_entry_time = r["entry"]
        reqs[rid] = req
    running = [reqs[f"r{i}"] for i in range(len(p["running"]))]
    for i, req in enumerate(running):  # pin the cached prefix, hold the rest privately
        r = p["running"][i]
        toks = _pass_tokens(bt, i, r)
        prefix = array("q", toks[: len(r["pages"]) * bt])
        match = tree.match_prefix(sp_mod.MatchPrefixParams(key=RadixKey(token_ids=prefix)))
        req.last_node = match.last_device_node
        tree.inc_lock_ref(req.last_node)
        req._private_kv = alloc.alloc(len(toks) + r["generated"] - len(r["pages"]) * bt)
        assert req._private_kv is not None
    chunked = None
    if p["chunked"]:
        chunked = reqs["c0"]
        chunked.prefix_len = p["chunked"]["prefilled"]
        assert alloc.alloc(chunked.prefix_len) is not None
    waiting = [reqs[f"w{i}"] for i in range(len(p["waiting"]))]
    batch = _RunningBatch(running, alloc, tree)
    requeued = []

    def add_to_queue(req, is_retracted=False):
        requeued.append(req.rid)
        fake.waiting_queue.append(req)

    fake = SimpleNamespace(
        grammar_manager=SimpleNamespace(has_waiting_grammars=lambda: False),
        enable_priority_preemption=priority_preemption, is_hybrid_swa=False, waiting_queue=waiting,
        chunked_req=chunked, min_free_slots_delayer=None,
        # pp budget (pp size 1) = max_running_requests - running; the request-row pool is never the binding limit
        get_num_allocatable_reqs=lambda running_bs, beam_width=None, running_batch=None, num_held_rows=0:
            p["max_running"] - running_bs,
        policy=sp_mod.SchedulePolicy(policy_name, tree, False, priority_preemption, p["low_first"]),
        processed_tokens_counter=0, chunked_prefill_size=p["chunk"], dynamic_chunk_sizer=None,
        tp_worker=SimpleNamespace(model_runner=SimpleNamespace(attn_backend=object())),
        get_prefill_adder_class=lambda: sp_mod.PrefillAdder, page_size=1, tree_cache=tree,
        token_to_kv_pool_allocator=alloc, new_token_ratio_tracker=_upstream_tracker(p),
        max_prefill_tokens=p["max_prefill"], is_mixed_chunk=False,
        priority_scheduling_preemption_threshold=p["threshold"], max_prefill_bs=0,
        max_running_requests=p["max_running"],
        dllm_config=None, enable_lora=False, req_to_token_pool=SimpleNamespace(), enable_hicache_storage=False,
        enable_lmcache=False, truncation_align_size=None, _add_request_to_queue=add_to_queue, model_config=None,
        enable_overlap=False, spec_algorithm=None,
    )
    try:
        result, _ = scheduler_mod.Scheduler._get_new_batch_prefill_raw(fake, None, batch)
        assert result is None
        can_run = []
    except _Captured as c:
        can_run = c.args[0]
    out = [(r.rid, r.extend_end - r.prefix_len, r.prefix_len) for r in can_run]
    new_chunked = fake.chunked_req.rid if fake.chunked_req is not None else None
    return out, new_chunked, [r.rid for r in fake.waiting_queue], set(requeued), batch.batch_is_full


def _sim_pass(p, ordering, preemption):
    bt = p["bt"]
    everyone = [("r", i, r) for i, r in enumerate(p["running"])] + [("w", i, r) for i, r in enumerate(p["waiting"])]
    if p["chunked"]:
        everyone.append(("c", 0, p["chunked"]))
    n = len(everyone)
    inputs = np.array([len(r["pages"]) * bt + r["tail"] for _, _, r in everyone], dtype=np.int64)
    w = Workload("pass", np.zeros(n), inputs,
                 np.array([r["output"] for _, _, r in everyone], dtype=np.int64),
                 np.array([r["prio"] for _, _, r in everyone], dtype=np.int64), np.zeros(n, dtype=np.int64),
                 prefix_blocks=tuple(r["pages"] for _, _, r in everyone), block_tokens=bt,
                 ignore_eos=np.array([r["ignore_eos"] for _, _, r in everyone], dtype=bool))
    preset = get_preset("qwen3")
    sched = replace(preset.scheduler, kv_capacity_tokens=p["capacity"], chunked_prefill_size=p["chunk"],
                    max_prefill_tokens=p["max_prefill"], max_running_requests=p["max_running"])
    rs = RankState(0, replace(preset, scheduler=sched), RequestTable(w), ordering, preemption)
    if p["decays"] < 0:
        rs.token_ratio.current = p["ratio"]
    rs.token_ratio.decay_steps(max(p["decays"], 0))
    t = rs.t
    names = [f"{k}{i}" for k, i, _ in everyone]
    for ch in p["chains"]:
        rs.cache.lock(ch)
        rs.cache.unlock(ch)
    for x, (kind, i, r) in enumerate(everyone):
        t.generated[x] = r["generated"]
        t.fill_len[x] = t.input[x] + r["generated"]
        t.queue_entry[x] = r["entry"]
        if kind == "r":
            m = len(r["pages"])
            rs.cache.lock(r["pages"])
            t.held_blocks[x] = m
            t.private[x] = int(t.fill_len[x]) - m * bt
            rs.private_kv += int(t.private[x])
            rs.running.append(x)
        elif kind == "w":
            rs.waiting.append(x)
        else:
            t.prefilled[x] = r["prefilled"]
            t.private[x] = r["prefilled"]
            rs.private_kv += r["prefilled"]
            rs.chunked = x
    batch = rs.schedule_prefill(0.0)
    out = [(names[x], e, pre) for x, e, pre in batch]
    new_chunked = names[rs.chunked] if rs.chunked is not None else None
    requeued = {names[x] for x in rs.waiting if t.preemptions[x]}
    return out, new_chunked, [names[x] for x in rs.waiting], requeued, rs.batch_is_full


PASS_POLICIES = [  # (upstream policy, priority scheduling + preemption, our ordering, our preemption)
    ("fcfs", False, ours.FcfsOrdering, None), ("fcfs", True, ours.FcfsPriorityOrdering, "priority"),
    ("lpm", False, ours.LpmOrdering, None), ("shortest-prefill-first", False, ours.ShortestPrefillFirstOrdering, None),
]


def test_prefill_pass_equals_upstream_scheduler_and_prefill_adder(monkeypatch):
    """One pass on the same state: the same requests admitted with the same extend and prefix lengths (the chunk
    and budget arithmetic), the same chunked request, the same victims preempted and queue left behind, the same
    batch_is_full verdict."""
    import sglang.srt.managers.scheduler as scheduler_mod
    from sglang.srt.runtime_context import get_schedule

    def init_new(can_run_list, *args, **kwargs):
        raise _Captured(list(can_run_list))

    monkeypatch.setattr(scheduler_mod.ScheduleBatch, "init_new", staticmethod(init_new))
    seen = {name + ("+priority" if pr else ""): dict(cases=0, admitted=0, chunked=0, no_token=0, preempted=0)
            for name, pr, _, _ in PASS_POLICIES}

    @CASES
    @given(seed=SEEDS)
    def check(seed):
        p = draw_pass(seed)
        for name, priority, ordering, preemption in PASS_POLICIES:
            pre = ours.PriorityPreemption(p["threshold"]) if preemption else None
            with get_schedule().override(schedule_low_priority_values_first=p["low_first"]):
                theirs = _upstream_pass(p, name, priority, scheduler_mod)
            mine = _sim_pass(p, ordering(), pre)
            assert mine[0] == theirs[0], ("batch", name, priority)
            assert mine[1] == theirs[1], ("chunked", name, priority)
            assert mine[3] == theirs[3], ("preempted", name, priority)
            # the queue left behind: upstream re-queues one preemption's victims from a set (unordered)
            assert [r for r in mine[2] if r not in mine[3]] == [r for r in theirs[2] if r not in theirs[3]]
            assert set(mine[2]) == set(theirs[2])
            assert mine[4] == theirs[4], ("batch_is_full", name, priority)
            c = seen[name + ("+priority" if priority else "")]
            c["cases"] += 1
            c["admitted"] += bool(theirs[0])
            c["chunked"] += theirs[1] is not None
            c["no_token"] += theirs[4]
            c["preempted"] += bool(theirs[3])

    check()
    for key, c in seen.items():
        assert c["cases"] >= 1000 and c["admitted"] >= 100 and c["chunked"] >= 50 and c["no_token"] >= 50, (key, c)
    assert seen["fcfs+priority"]["preempted"] >= 20, seen


# ---- retraction: which running request goes first, and where it goes ---------------------------------------------

@CASES
@given(seed=SEEDS)
def test_retraction_order_equals_upstream(seed):
    """The sequence of victims RankState.retraction_victim picks is ScheduleBatch._get_decode_retraction_order popped
    from the end (fewest output tokens first, longest prompt among equals, the last in batch order among full ties)."""
    from sglang.srt.managers.schedule_batch import ScheduleBatch

    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 12))
    inputs = rng.choice([5, 8, 13], size=n).astype(np.int64)
    generated = rng.choice([1, 2, 3], size=n).astype(np.int64)
    reqs = []
    for i in range(n):
        req = Req(str(i), "", array("q", range(int(inputs[i]))), SamplingParams(max_new_tokens=64))
        req.output_ids = array("q", [7] * int(generated[i]))
        reqs.append(req)
    batch_order = [int(x) for x in rng.permutation(n)]
    upstream = ScheduleBatch._get_decode_retraction_order([reqs[i] for i in batch_order])
    theirs = [batch_order[upstream.pop()] for _ in range(n)]
    w = Workload("retract", np.zeros(n), inputs, np.full(n, 64, dtype=np.int64), np.zeros(n, dtype=np.int64),
                 np.zeros(n, dtype=np.int64))
    rs = RankState(0, get_preset("qwen3"), RequestTable(w), ours.FcfsOrdering(), None)
    rs.t.generated[:] = generated
    rs.running = list(batch_order)
    mine = []
    while rs.running:
        mine.append(rs.retraction_victim())
        rs.running.remove(mine[-1])
    assert mine == theirs


def test_retracted_and_preempted_requests_go_to_the_back_with_a_new_entry_time():
    """Scheduler._add_request_to_queue: appended, wait_queue_entry_time and HRRN's arrival snapshot taken anew."""
    n = 4
    w = Workload("requeue", np.zeros(n), np.full(n, 100, dtype=np.int64), np.full(n, 50, dtype=np.int64),
                 np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64))
    hrrn = ours.HrrnOrdering()
    preset = get_preset("qwen3")
    rs = RankState(0, replace(preset, scheduler=replace(preset.scheduler, kv_capacity_tokens=1000)), RequestTable(w),
                   hrrn, None)
    for i in (2, 3):
        rs.enqueue(i, 1.0)
    hrrn.observe_prefill_tokens(500)
    rs.running = [0, 1]
    rs.t.generated[:2] = [5, 9]
    rs.private_kv = 999  # one free token for two running requests: retract one
    rs.retract_for_decode(7.0)
    assert rs.waiting == [2, 3, 0] and rs.running == [1]  # fewest generated goes, to the back
    assert rs.t.queue_entry[0] == 7.0 and rs.t.queue_entry[2] == 1.0
    assert hrrn._arrival_processed["0"] == 500 and hrrn._arrival_processed["2"] == 0


# ---- the new-token ratio: upstream's NewTokenRatioTracker, step by step ------------------------------------------

@CASES
@given(seed=SEEDS)
def test_new_token_ratio_sequence_equals_upstream_tracker(seed):
    """A random sequence of decode steps (in runs, as the simulator's macro steps advance them), retractions (the
    estimate over the kept batch, upstream's on real Reqs) and idle resets leaves RankState's ratio exactly where
    upstream's tracker is after each event."""
    from sglang.srt.managers.scheduler_components.new_token_ratio_tracker import NewTokenRatioTracker

    rng = np.random.default_rng(seed)
    theirs = NewTokenRatioTracker.from_config()
    w = Workload("ratio", np.zeros(1), np.ones(1, dtype=np.int64), np.ones(1, dtype=np.int64),
                 np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64))
    mine = RankState(0, get_preset("qwen3"), RequestTable(w), ours.FcfsOrdering(), None).token_ratio
    assert (mine.init, mine.min, mine.decay, mine.current) == (theirs.init, theirs.min, theirs.decay, theirs.current)
    for _ in range(int(rng.integers(1, 12))):
        event = int(rng.integers(0, 4))
        if event <= 1:
            k = int(rng.choice([1, 3, 50, 400, 900]))
            for _ in range(k):
                theirs.decay_step()
            mine.decay_steps(k)
        elif event == 2:
            n = int(rng.integers(0, 6))
            out = [int(x) for x in rng.integers(1, 5000, size=n)]
            gen = [int(rng.integers(1, o + 1)) for o in out]
            reqs = []
            for o, g in zip(out, gen):
                req = Req("x", "", array("q", [1, 2]), SamplingParams(max_new_tokens=o))
                req.output_ids = array("q", [7] * g)
                reqs.append(req)
            theirs.current = NewTokenRatioTracker.estimate_new_token_ratio_after_retract(reqs)
            mine.after_retract(gen, out)
        else:
            theirs.reset()
            mine.reset()
        assert mine.current == theirs.current


def _recording_rank(monkeypatch):
    """Record (time, ratio, waiting rids) at each prefill pass of the simulator."""
    seen = []
    orig = RankState.schedule_prefill

    def spy(self, now_s, *args):
        seen.append((now_s, self.token_ratio.current, list(self.waiting), int(self.t.generated[0])))
        return orig(self, now_s, *args)

    monkeypatch.setattr(RankState, "schedule_prefill", spy)
    return seen


def test_simulation_decays_per_decode_step_and_resets_when_idle(monkeypatch):
    """Through the simulation loop (macro steps included): when request 1 arrives while request 0 decodes, the rank's
    ratio is upstream's tracker after as many decode steps as request 0 has run (its first token came from the
    prefill); when request 2 arrives after the DP group went idle, the ratio is back at init. ignore_eos requests
    reserve their whole remaining output."""
    from sglang.srt.managers.scheduler_components.new_token_ratio_tracker import NewTokenRatioTracker

    from tiersched.sim import PolicySet, simulate

    seen = _recording_rank(monkeypatch)
    w = Workload("ratio", np.array([0.0, 0.5, 100.0]), np.array([100, 100, 100]), np.array([3000, 5, 5]),
                 np.zeros(3, dtype=np.int64), np.zeros(3, dtype=np.int64))
    preset = get_preset("qwen3")
    simulate(replace(preset, dp=1), w, PolicySet(ordering="fcfs"), record_timeline=False)
    at_1 = next(s for s in seen if 1 in s[2])
    decode_steps = at_1[3] - 1
    assert decode_steps > 10  # several macro steps' worth
    tracker = NewTokenRatioTracker.from_config()
    for _ in range(decode_steps):
        tracker.decay_step()
    assert at_1[1] == tracker.current < tracker.init
    at_2 = next(s for s in seen if 2 in s[2])
    assert at_2[1] == tracker.init

    t = RequestTable(replace(w, ignore_eos=np.array([True, False, False])))
    rs = RankState(0, preset, t, ours.FcfsOrdering(), None)
    rs.running = [0, 1]
    t.generated[:2] = [1, 1]
    rs.token_ratio.current = 0.5
    assert rs._reserved_decode() == 2999 * 1.0 + 4 * 0.5
