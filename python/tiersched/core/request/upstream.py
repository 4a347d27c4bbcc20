"""Upstream SGLang's waiting-queue orderings and priority preemption over the request tier's snapshots.

Mirrors `sglang/srt/managers/schedule_policy.py` (SchedulePolicy.calc_priority and its _sort_by_* helpers, and
PrefillAdder.preempt_to_schedule); test/core/test_request_upstream_diff.py runs each against upstream's own objects.
`order` receives the waiting queue in its current order (the order upstream's list has: arrivals and re-queued
requests appended at the back, then whatever the previous step's sort left) and returns a permutation, like
upstream's stable in-place `list.sort`. `WaitingRequest.cached_tokens` plays `req.num_matched_prefix_tokens`,
`entry_s` `req.time_stats.wait_queue_entry_time` (reset when a request is re-queued); `shares_inflight_prefix`
plays the in-batch `temporary_deprioritized` set (the simulator computes it as upstream's waiting-queue radix tree
check does); `max_new_tokens` plays `req.sampling_params.max_new_tokens` (the simulator passes the request's output
length: benchmark clients set the budget to the length they ask for and ignore EOS). Priorities: higher = more
urgent (upstream's default, schedule_low_priority_values_first=False).
"""
from __future__ import annotations

import random
from typing import Sequence

from tiersched.core.request import OrderingPolicy, PreemptionPolicy, RunningRequest, WaitingRequest

# schedule_policy.WAITING_QUEUE_PREFIX_MATCH_MAX: above this queue length lpm and hrrn skip prefix matching and
# leave the queue as it is (SchedulePolicy._determine_active_policy -> FCFS, which does not sort).
WAITING_QUEUE_PREFIX_MATCH_MAX = 128
# schedule_policy's in-batch prefix caching (defaults of the env variables of the same names): a waiting request
# whose cache hit is at most CHECK tokens is deferred when it shares at least DEPRIORITIZE tokens with a request
# ahead of it in the queue (SchedulePolicy._compute_prefix_matches).
IN_BATCH_PREFIX_CACHING_CHECK_THRESHOLD = 32
IN_BATCH_PREFIX_CACHING_DEPRIORITIZE_THRESHOLD = 32
# schedule_policy.CLIP_MAX_NEW_TOKENS (SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION): admission budgets count at most this
# many future output tokens per request.
CLIP_MAX_NEW_TOKENS = 4096


class FcfsOrdering(OrderingPolicy):
    """`--schedule-policy fcfs` without priority scheduling: upstream does not sort, the queue stays in the order
    requests entered it (a re-queued request goes to the back)."""

    name = "fcfs"

    def order(self, waiting: Sequence[WaitingRequest], now_s: float) -> list[int]:
        return list(range(len(waiting)))


class FcfsPriorityOrdering(OrderingPolicy):
    """fcfs + `--enable-priority-scheduling`: SchedulePolicy._sort_by_priority_and_fcfs (priority, then the time
    the request last entered the queue)."""

    name = "fcfs-priority"

    def order(self, waiting: Sequence[WaitingRequest], now_s: float) -> list[int]:
        return sorted(range(len(waiting)), key=lambda i: (-waiting[i].priority, waiting[i].entry_s))


class LpmOrdering(OrderingPolicy):
    """`lpm`: SchedulePolicy._sort_by_longest_prefix (most cached tokens first, in-batch duplicates last)."""

    name = "lpm"

    def order(self, waiting: Sequence[WaitingRequest], now_s: float) -> list[int]:
        if len(waiting) > WAITING_QUEUE_PREFIX_MATCH_MAX:  # _determine_active_policy -> FCFS: queue left as is
            return list(range(len(waiting)))
        key = lambda i: (float("inf") if waiting[i].shares_inflight_prefix else -waiting[i].cached_tokens)
        return sorted(range(len(waiting)), key=key)  # stable: ties keep queue order, like list.sort


class ShortestPrefillFirstOrdering(OrderingPolicy):
    """`shortest-prefill-first`: SchedulePolicy._sort_by_shortest_prefill (deprioritised, uncached work, entry time)."""

    name = "shortest-prefill-first"
    limits_chunks = True

    def order(self, waiting: Sequence[WaitingRequest], now_s: float) -> list[int]:
        def key(i: int):
            w = waiting[i]
            return (w.shares_inflight_prefix, max(1, w.input_tokens - w.cached_tokens), w.entry_s)

        return sorted(range(len(waiting)), key=key)

    def chunk_limit(self, chunked_priority: int, chunked_remaining: int, waiting_uncached: Sequence[tuple[int, int]],
                    budget: int, page_size: int, group_ls_waiting: int = 0, load=None,
                    chunked_prefix: int = 0) -> int | None:
        """SchedulePolicy.shortest_prefill_chunk_limit: reserve budget for waiters (in queue order) whose
        uncached work is shorter than the running chunk's remainder (no lockstep signal and no pricing:
        group_ls_waiting, load and chunked_prefix unused)."""
        page = max(1, page_size)
        if budget < 2 * page:
            return None
        reserved = 0
        for _, uncached in waiting_uncached:
            work = max(1, uncached)
            charge = -(-work // page) * page
            if work >= chunked_remaining or reserved + charge > budget - page:
                break
            reserved += charge
        if not reserved:
            return None
        return (budget - reserved) // page * page


class HrrnOrdering(OrderingPolicy):
    """`hrrn`: SchedulePolicy._sort_by_hrrn, token-based aging. The scheduler reports prefill tokens processed
    (`observe_prefill_tokens`, upstream's processed_tokens_counter) and every entry into the queue
    (`observe_enqueue`), where the request's arrival snapshot is taken, as Scheduler._add_request_to_queue does
    (a re-queued request starts over). A request never announced is snapshotted the first time it is ordered."""

    name = "hrrn"

    def __init__(self) -> None:
        self.processed_tokens = 0
        self._arrival_processed: dict[str, int] = {}

    def observe_prefill_tokens(self, tokens: int) -> None:
        self.processed_tokens += tokens

    def observe_enqueue(self, rid: str, now_s: float) -> None:
        self._arrival_processed[rid] = self.processed_tokens

    def order(self, waiting: Sequence[WaitingRequest], now_s: float) -> list[int]:
        seen = self._arrival_processed
        for w in waiting:
            seen.setdefault(w.rid, self.processed_tokens)
        if len(seen) > 4 * len(waiting) + 1024:  # forget requests no longer waiting
            live = {w.rid for w in waiting}
            self._arrival_processed = seen = {k: v for k, v in seen.items() if k in live}
        if len(waiting) > WAITING_QUEUE_PREFIX_MATCH_MAX:  # _determine_active_policy -> FCFS: queue left as is
            return list(range(len(waiting)))

        def key(i: int):
            w = waiting[i]
            if w.shares_inflight_prefix:
                return (float("inf"), w.rid)
            # _uncached_len: the original prompt only (origin_input_ids), not the output it regenerates
            uncached = max(0, w.input_tokens - w.generated_tokens - w.cached_tokens)
            if uncached <= 0:
                return (-float("inf"), w.rid)
            return (-max(0, self.processed_tokens - seen[w.rid]) / uncached, w.rid)

        return sorted(range(len(waiting)), key=key)


class LofOrdering(OrderingPolicy):
    """`lof`: SchedulePolicy._sort_by_longest_output without priority scheduling (largest max_new_tokens first;
    stable, so ties keep queue order). Cache-agnostic: no fallback above 128 waiting, no in-batch deferral."""

    name = "lof"

    def order(self, waiting: Sequence[WaitingRequest], now_s: float) -> list[int]:
        return sorted(range(len(waiting)), key=lambda i: -waiting[i].max_new_tokens)


class LofPriorityOrdering(OrderingPolicy):
    """lof + `--enable-priority-scheduling`: _sort_by_longest_output with priority (priority, then largest
    max_new_tokens)."""

    name = "lof-priority"

    def order(self, waiting: Sequence[WaitingRequest], now_s: float) -> list[int]:
        return sorted(range(len(waiting)), key=lambda i: (-waiting[i].priority, -waiting[i].max_new_tokens))


class RandomOrdering(OrderingPolicy):
    """`random`: SchedulePolicy._sort_randomly, a fresh shuffle each time the queue is ordered (upstream shuffles
    with the process-global `random`; here a per-queue generator seeded by `seed`, so runs repeat)."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def order(self, waiting: Sequence[WaitingRequest], now_s: float) -> list[int]:
        order = list(range(len(waiting)))
        self._rng.shuffle(order)
        return order


class PriorityPreemption(PreemptionPolicy):
    """`--enable-priority-scheduling` preemption: PrefillAdder.preempt_to_schedule
    (sglang/srt/managers/schedule_policy.py), as upstream calls it.

    The scheduler (`Scheduler._get_new_batch_prefill_raw`) calls it only while `running_batch.batch_is_full`,
    i.e. when no running slot is free; a KV shortage (`add_one_req` -> NO_TOKEN) ends the pass without
    preemption, so this returns None when `slots_short` is 0. Victims: running requests sorted lowest priority
    first, newest first among equals; each is taken while the candidate's priority exceeds its priority by more
    than the threshold (default 10; the first one that does not ends the walk); the candidate's token need
    (`kv_tokens_short`, upstream's min_tokens_to_remove) is reduced only by each victim's reserved future decode
    tokens (`_get_running_request_total_token_offset`, RunningRequest.reserved_tokens), not by the KV it holds.
    At least `slots_short` victims (upstream's call frees one slot); None if the walk ends short. (The request being
    chunk-prefilled is not in the running batch, so it is never a victim.)"""

    name = "priority"
    preempts_on_kv_shortage = False

    def __init__(self, threshold: int = 10) -> None:
        self.threshold = threshold

    def choose_victims(self, candidate: WaitingRequest, running: Sequence[RunningRequest], slots_short: int,
                       kv_tokens_short: int, now_s: float) -> list[str] | None:
        if slots_short <= 0:
            return None
        victims: list[str] = []
        tokens_needed = kv_tokens_short
        for r in sorted(running, key=lambda r: (r.priority, -r.entry_s)):
            if candidate.priority - r.priority <= self.threshold:
                break
            victims.append(r.rid)
            tokens_needed -= r.reserved_tokens
            if tokens_needed <= 0 and len(victims) >= slots_short:
                break
        if len(victims) < slots_short or tokens_needed > 0:
            return None
        return victims
