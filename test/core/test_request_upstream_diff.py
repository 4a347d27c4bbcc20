"""The simulator's copies of upstream's request-tier policies against upstream's own objects, side by side.

Each case builds one rank's state twice from the same random draw: upstream's real `Req`s, `SchedulePolicy`,
`RadixCache` (a simulated one: no KV pool, the tree only) and `PrefillAdder`, and the simulator's `RankState`
(tiersched.sim.rank) running the copies in tiersched.core.request.upstream. Requests are made of pages of
`block_tokens` tokens named by chained hashes (what the simulator caches); upstream sees the same pages as token ids
(page hash h -> tokens h*bt .. h*bt+bt-1, so different pages never share a token), plus a private tail.
"""
from __future__ import annotations

from array import array
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
