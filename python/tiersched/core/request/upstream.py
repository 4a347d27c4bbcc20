"""Upstream SGLang's waiting-queue orderings and priority preemption over the request tier's snapshots.

Mirrors `sglang/srt/managers/schedule_policy.py` (SchedulePolicy.calc_priority and its _sort_by_* helpers, and
PrefillAdder.preempt_to_schedule). `WaitingRequest.cached_tokens` plays `req.num_matched_prefix_tokens`;
`shares_inflight_prefix` plays the in-batch `temporary_deprioritized` set (the simulator sets it for a request
whose first uncached page another waiting request ahead of it also needs, as upstream's waiting-queue radix tree
check does). Priorities: higher = more urgent (upstream's default, schedule_low_priority_values_first=False).
"""
from __future__ import annotations

from typing import Sequence

from tiersched.core.request import OrderingPolicy, PreemptionPolicy, RunningRequest, WaitingRequest

# schedule_policy.WAITING_QUEUE_PREFIX_MATCH_MAX: lpm/hrrn fall back to FCFS above this queue length.
WAITING_QUEUE_PREFIX_MATCH_MAX = 128


class FcfsOrdering(OrderingPolicy):
    """`--schedule-policy fcfs` without priority scheduling: the queue stays in arrival order."""

    name = "fcfs"

    def order(self, waiting: Sequence[WaitingRequest], now_s: float) -> list[int]:
        return sorted(range(len(waiting)), key=lambda i: waiting[i].arrival_s)


class FcfsPriorityOrdering(OrderingPolicy):
    """fcfs + `--enable-priority-scheduling`: SchedulePolicy._sort_by_priority_and_fcfs (priority, then entry time)."""

    name = "fcfs-priority"

    def order(self, waiting: Sequence[WaitingRequest], now_s: float) -> list[int]:
        return sorted(range(len(waiting)), key=lambda i: (-waiting[i].priority, waiting[i].arrival_s))


class LpmOrdering(OrderingPolicy):
    """`lpm`: SchedulePolicy._sort_by_longest_prefix (most cached tokens first, in-batch duplicates last)."""

    name = "lpm"

    def order(self, waiting: Sequence[WaitingRequest], now_s: float) -> list[int]:
        if len(waiting) > WAITING_QUEUE_PREFIX_MATCH_MAX:  # _determine_active_policy -> FCFS
            return FcfsOrdering().order(waiting, now_s)
        key = lambda i: (float("inf") if waiting[i].shares_inflight_prefix else -waiting[i].cached_tokens)
        return sorted(range(len(waiting)), key=key)  # stable: ties keep queue (arrival) order, like list.sort


class ShortestPrefillFirstOrdering(OrderingPolicy):
    """`shortest-prefill-first`: SchedulePolicy._sort_by_shortest_prefill (deprioritised, uncached work, entry time)."""

    name = "shortest-prefill-first"
    limits_chunks = True

    def order(self, waiting: Sequence[WaitingRequest], now_s: float) -> list[int]:
        def key(i: int):
            w = waiting[i]
            return (w.shares_inflight_prefix, max(1, w.input_tokens - w.cached_tokens), w.arrival_s)

        return sorted(range(len(waiting)), key=key)

    def chunk_limit(self, chunked_priority: int, chunked_remaining: int, waiting_uncached: Sequence[tuple[int, int]],
                    budget: int, page_size: int, group_ls_waiting: int = 0) -> int | None:
        """SchedulePolicy.shortest_prefill_chunk_limit: reserve budget for waiters (in queue order) whose
        uncached work is shorter than the running chunk's remainder (no lockstep signal: group_ls_waiting unused)."""
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
    (`observe_prefill_tokens`, upstream's processed_tokens counter); a request's arrival snapshot is taken the first
    time it is seen waiting (upstream snapshots at queue entry; the simulator orders every step, so they agree)."""

    name = "hrrn"

    def __init__(self) -> None:
        self.processed_tokens = 0
        self._arrival_processed: dict[str, int] = {}

    def observe_prefill_tokens(self, tokens: int) -> None:
        self.processed_tokens += tokens

    def order(self, waiting: Sequence[WaitingRequest], now_s: float) -> list[int]:
        seen = self._arrival_processed
        for w in waiting:
            seen.setdefault(w.rid, self.processed_tokens)
        if len(waiting) > WAITING_QUEUE_PREFIX_MATCH_MAX:
            return FcfsOrdering().order(waiting, now_s)

        def key(i: int):
            w = waiting[i]
            if w.shares_inflight_prefix:
                return (float("inf"), w.rid)
            uncached = max(0, w.input_tokens - w.cached_tokens)
            if uncached <= 0:
                return (-float("inf"), w.rid)
            return (-(self.processed_tokens - seen[w.rid]) / uncached, w.rid)

        if len(seen) > 4 * len(waiting) + 1024:  # forget requests no longer waiting
            live = {w.rid for w in waiting}
            self._arrival_processed = {k: v for k, v in seen.items() if k in live}
        return sorted(range(len(waiting)), key=key)


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
        for r in sorted(running, key=lambda r: (r.priority, -r.arrival_s)):
            if candidate.priority - r.priority <= self.threshold:
                break
            victims.append(r.rid)
            tokens_needed -= r.reserved_tokens
            if tokens_needed <= 0 and len(victims) >= slots_short:
                break
        if len(victims) < slots_short or tokens_needed > 0:
            return None
        return victims
