"""One DP rank's SGLang-like scheduler: waiting queue, chunked prefill, running decodes, KV pool, prefix cache.

Mirrors upstream `Scheduler.get_next_batch_to_run`: each step a rank either runs a prefill (extend) batch built as `Scheduler._get_new_batch_prefill_raw` and `PrefillAdder` build it (page size 1;
`PrefillPassBudget` is the adder's token arithmetic: chunked_prefill_size and max_prefill_tokens budgets, at most
one chunked request, KV budget = free + evictable - reserved future decode of running requests x new_token_ratio
(`NewTokenRatio`: upstream's per-scheduler ratio that decays every decode step, is set by a retraction and reset
when the DP group idles; 1.0 for ignore_eos requests)
- this pass's admissions; max_running_requests; the `batch_is_full` flag that stops admission until a request
leaves) or decodes every running request one token. When the KV pool cannot hold one more token per running
request, `retract_decode` sends requests back to the queue, fewest generated tokens first (longest input among
equals); their computed prefix stays in the cache. test/core/test_request_upstream_diff.py runs one pass of this
against upstream's own scheduler loop and PrefillAdder.
With `enable_mixed_chunk` (upstream --enable-mixed-chunk) the running requests take one token each off the chunk,
input and KV budgets (upstream's num_mixed_decode_tokens), and a non-empty prefill batch carries them (one decode
token each) in the same forward when the KV pool still holds one more token per running request after the prefill's
allocation (`mixes_running`); otherwise they sit out that step, without retraction, as upstream.
With `enable_prefill_delayer` the rank holds a `RankPrefillDelayer` (core/request/prefill_delayer.py):
`prefill_pass` stops where upstream's PrefillAdder negotiates (the chunked request, or the first waiting request that
passes admission), yields the rank's numbers for the DP group's all-gather and takes the verdict; a delayed rank
admits no new request that step (its chunked request still runs its chunk).
Requests live in the shared columnar `RequestTable` (index = request id).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from tiersched.core.request import OrderingPolicy, PreemptionPolicy, RankLoad, RunningRequest, WaitingRequest
from tiersched.core.request.prefill_delayer import RankPrefillDelayer
from tiersched.core.request.upstream import (CLIP_MAX_NEW_TOKENS, IN_BATCH_PREFIX_CACHING_CHECK_THRESHOLD,
                                             IN_BATCH_PREFIX_CACHING_DEPRIORITIZE_THRESHOLD)
from tiersched.sim.prefix_cache import BlockLRUCache


# PrefillAdder's AddReqResult
CONTINUE, NO_TOKEN, OTHER = "continue", "no_token", "other"


@dataclass
class PrefillPassBudget:
    """PrefillAdder's token budgets for one prefill pass, at page size 1 with one token pool (no SWA, Mamba or
    HiCache pools). Compute budgets: rem_input (max_prefill_tokens) and rem_chunk (chunked_prefill_size). KV:
    offsets against `free` = allocator available + evictable cache, which the caller reads live (a pinned prefix or
    a preempted request changes it): total_offset holds the running requests' reserved future decode
    (`reserved_output`) and every admission's extend + one page + reserved output, current_offset the admissions'
    extend + one page (upstream allocates them only when the batch is built)."""

    rem_input: float
    rem_chunk: float
    total_offset: float = 0.0
    current_offset: float = 0.0

    @staticmethod
    def reserved_output(remaining_output: int, new_token_ratio: float) -> float:
        """_get_running_request_total_token_offset: a running request's reserved future decode."""
        return min(remaining_output, CLIP_MAX_NEW_TOKENS) * new_token_ratio

    def state(self, free: float) -> str:
        """budget_state: NO_TOKEN before OTHER (input or chunk budget spent)."""
        if free - self.total_offset <= 0 or free - self.current_offset <= 0:
            return NO_TOKEN
        if self.rem_input <= 0 or self.rem_chunk <= 0:
            return OTHER
        return CONTINUE

    def charge(self, extend: int, reserved_output: int) -> None:
        """_update_prefill_budget -> PrefillBudget.reserve."""
        self.total_offset += extend + 1 + reserved_output
        self.current_offset += extend + 1
        self.rem_input -= extend
        self.rem_chunk -= extend

    def chunk_continuation(self, free: float, remaining: int, max_new_tokens: int, limit: int | None) -> int:
        """add_chunked_req: the running chunked request's next chunk (at most the KV left, unless none is left:
        the chunk must progress to free its KV), capped by the ordering's `limit`; charged with its output when
        it is the last chunk."""
        rem = min(self.rem_chunk, int(free - self.total_offset))
        if rem <= 0:
            rem = self.rem_chunk
        if limit is not None:
            rem = min(rem, limit)
        extend = int(min(remaining, rem))
        self.charge(extend, min(max_new_tokens, CLIP_MAX_NEW_TOKENS) if remaining <= rem else 0)
        return extend

    def admission(self, free: float, extend_total: int, remaining_output: int) -> tuple[str, int]:
        """add_one_req's check and chunk choice (`free` with the candidate's prefix pinned, as upstream locks it
        while checking): (NO_TOKEN, 0) if extend + remaining output + a page does not fit, (OTHER, 0) if no chunk
        budget is left, else (CONTINUE, extend), a chunk when extend < extend_total. Charge with `charge`."""
        total = extend_total + min(max(remaining_output, 0), CLIP_MAX_NEW_TOKENS) + 1
        if not total < free - self.total_offset:
            return NO_TOKEN, 0
        if extend_total > self.rem_chunk:
            extend = int(self.rem_chunk)
            return (OTHER, 0) if extend <= 0 else (CONTINUE, extend)
        return CONTINUE, extend_total

    def tokens_to_free(self, free: float, extend_total: int, max_new_tokens: int) -> float:
        """preempt_to_schedule's min_tokens_to_remove (the full output, not the remainder; no pinned prefix)."""
        return extend_total + min(max_new_tokens, CLIP_MAX_NEW_TOKENS) - (free - self.total_offset)


@dataclass
class NewTokenRatio:
    """Upstream's NewTokenRatioTracker (scheduler_components/new_token_ratio_tracker.py), one per rank: the share
    of a running request's remaining output that admission reserves. Starts at `init`, loses `decay` per decode step
    down to `min`, is set from the kept batch after a retraction and back to `init` when the scheduler idles."""

    init: float
    min: float
    decay: float
    current: float
    retract_decode_steps: int = 20

    @classmethod
    def from_settings(cls, s) -> "NewTokenRatio":
        """from_config with the init ratio already scaled by --schedule-conservativeness."""
        init = min(s.new_token_ratio, 1.0)
        low = min(init * s.min_new_token_ratio_factor, 1.0)
        return cls(init=init, min=low, decay=(init - low) / s.new_token_ratio_decay_steps, current=init,
                   retract_decode_steps=s.retract_decode_steps)

    def decay_steps(self, steps: int) -> None:
        """`steps` decode steps without retraction (decay_step each), subtracting one decay at a time as upstream."""
        for _ in range(steps):
            if self.current <= self.min:
                self.current = max(self.current, self.min)
                break
            self.current = max(self.current - self.decay, self.min)

    def reset(self) -> None:
        self.current = self.init

    def after_retract(self, decoded: list[int], max_new_tokens: list[int]) -> None:
        """estimate_new_token_ratio_after_retract over the requests the retraction kept."""
        self.current = min(1.0, (sum(decoded) + self.retract_decode_steps * len(decoded)) / (sum(max_new_tokens) + 1))


class RequestTable:
    def __init__(self, workload):
        n = len(workload)
        self.workload = workload
        self.n = n
        self.arrival = np.asarray(workload.arrival_s, dtype=float)
        self.input = np.asarray(workload.input_tokens, dtype=np.int64)
        self.output = np.asarray(workload.output_tokens, dtype=np.int64)
        self.priority = np.asarray(workload.priority, dtype=np.int64)
        # ignore_eos requests reserve their whole remaining output (upstream: a fixed length gains nothing from the
        # early-EOS estimate)
        self.ignore_eos = (np.zeros(n, dtype=bool) if workload.ignore_eos is None
                           else np.asarray(workload.ignore_eos, dtype=bool))
        self.blocks = workload.prefix_blocks if workload.prefix_blocks else ((),) * n
        self.rid = [str(i) for i in range(n)]
        self.rank = np.full(n, -1, dtype=np.int64)
        self.generated = np.zeros(n, dtype=np.int64)
        self.fill_len = self.input.copy()  # tokens whose KV must exist before decoding (input + generated)
        self.prefilled = np.zeros(n, dtype=np.int64)
        self.private = np.zeros(n, dtype=np.int64)  # KV tokens held outside the shared cache
        self.held_blocks = np.zeros(n, dtype=np.int64)
        self.cached_at_admit = np.full(n, -1, dtype=np.int64)  # first admission only: the cache hit
        self.first_token = np.full(n, np.nan)
        self.finish = np.full(n, np.nan)
        self.preemptions = np.zeros(n, dtype=np.int64)
        self.queue_entry = self.arrival.copy()  # when it last entered a waiting queue (upstream wait_queue_entry_time)
        # prefix upstream's Req.prefix_len holds between passes (set when the admission loop reaches it, 0 when new
        # or re-queued): what preempt_to_schedule reads, before the request is matched again
        self.last_prefix = np.zeros(n, dtype=np.int64)


class RankState:
    def __init__(self, rank: int, preset, table: RequestTable, ordering: OrderingPolicy,
                 preemption: PreemptionPolicy | None, delayer: RankPrefillDelayer | None = None):
        self.rank = rank
        self.s = preset.scheduler
        self.t = table
        self.ordering = ordering
        self.preemption = preemption
        self.cache = BlockLRUCache(table.workload.block_tokens)
        self.waiting: list[int] = []
        self.running: list[int] = []
        self.chunked: int | None = None
        self.private_kv = 0
        self.retractions = 0
        self.preemption_events = 0
        self.capped_chunks = 0  # steps whose chunked prefill the ordering's chunk_limit shortened
        # running_batch.batch_is_full: set when slots or KV ran out; no admission is tried until a request leaves
        # the running batch (reset every pass when a preemption policy runs, as with upstream's priority preemption)
        self.batch_is_full = False
        # Lockstep LS signal: the ordering's view of the DP-attention group's LS-waiting count, set by the loop each
        # step for orderings with `lockstep_signal_lag_steps` (the request tier's DP-wide chunk cap).
        self.group_ls_waiting = 0
        self.token_ratio = NewTokenRatio.from_settings(self.s)
        self._retracted_this_step = False  # that step's decode does not decay the ratio
        self.delayer = delayer  # upstream's prefill delayer (enable_prefill_delayer), else None
        self.delayed_passes = 0  # passes the delayer's verdict held back this rank's new admissions

    # ---- accounting -------------------------------------------------------------------------------------
    def free_for_alloc(self) -> int:
        """KV tokens allocatable now: free + evictable cache (evicted on demand)."""
        return self.s.kv_capacity_tokens - self.private_kv - self.cache.locked_tokens

    def ratios(self, idx: np.ndarray) -> np.ndarray:
        """Per request: 1.0 when ignore_eos, else the rank's current new-token ratio."""
        return np.where(self.t.ignore_eos[idx], 1.0, self.token_ratio.current)

    def _reserved_decode(self) -> float:
        """Sum of _get_running_request_total_token_offset over the running batch, in its order (as upstream sums)."""
        if not self.running:
            return 0.0
        idx = np.fromiter(self.running, dtype=np.int64, count=len(self.running))
        remaining = np.minimum(self.t.output[idx] - self.t.generated[idx], CLIP_MAX_NEW_TOKENS)
        return sum((remaining * self.ratios(idx)).tolist())

    def _allocate(self, tokens: int) -> None:
        free = self.s.kv_capacity_tokens - self.private_kv - self.cache.total_tokens
        if tokens > free:
            self.cache.evict(tokens - free)
        self.private_kv += tokens

    def kv_used(self) -> int:
        return self.private_kv + self.cache.locked_tokens

    def decode_context(self) -> int:
        if not self.running:
            return 0
        idx = np.fromiter(self.running, dtype=np.int64, count=len(self.running))
        return int((self.t.input[idx] + self.t.generated[idx]).sum())

    # ---- request lifecycle ----------------------------------------------------------------------------------
    def release(self, rid: int) -> None:
        t = self.t
        self.cache.unlock(t.blocks[rid][: t.held_blocks[rid]])
        self.private_kv -= int(t.private[rid])
        t.private[rid] = 0
        t.held_blocks[rid] = 0

    def enqueue(self, rid: int, now_s: float) -> None:
        """Scheduler._add_request_to_queue: append to the back of the waiting queue and stamp the entry (its
        wait_queue_entry_time, and the ordering's snapshot, e.g. HRRN's processed-token count)."""
        self.waiting.append(rid)
        self.t.queue_entry[rid] = now_s
        self.ordering.observe_enqueue(self.t.rid[rid], now_s)

    def requeue(self, rid: int, now_s: float) -> None:
        """Retraction or preemption: free KV, keep the computed prefix cached, recompute input + output later;
        the request goes to the back of the queue with a new entry time, as upstream re-adds it."""
        t = self.t
        self.release(rid)
        t.fill_len[rid] = t.input[rid] + t.generated[rid]
        t.prefilled[rid] = 0
        t.last_prefix[rid] = 0  # Req.reset_for_retract
        t.preemptions[rid] += 1
        self.enqueue(rid, now_s)

    def retract_for_decode(self, now_s: float) -> None:
        """retract_decode: free enough KV for one more token per running request. Victim: fewest generated tokens,
        longest input among equals, the last in running order among full ties (upstream sorts the batch stably in
        reverse and pops from the end)."""
        if not self.running or self.free_for_alloc() >= len(self.running):
            return
        while self.running and self.free_for_alloc() < len(self.running):
            victim = self.retraction_victim()
            self.running.remove(victim)
            self.requeue(victim, now_s)
            self.retractions += 1
            self.batch_is_full = False
        t = self.t
        self.token_ratio.after_retract([int(t.generated[r]) for r in self.running],
                                       [int(t.output[r]) for r in self.running])
        self._retracted_this_step = bool(self.running)  # its decode follows this step

    def retraction_victim(self) -> int:
        """The running request retract_decode takes next (ScheduleBatch._get_decode_retraction_order's last)."""
        t = self.t
        return min(reversed(self.running), key=lambda r: (t.generated[r], -t.input[r]))

    # ---- prefill admission (PrefillAdder) -------------------------------------------------------------------
    def _waiting_snapshots(self, now_s: float) -> tuple[list[WaitingRequest], list[int]]:
        """Snapshots in queue order. Deferral is SchedulePolicy._compute_prefix_matches' in-batch check: a request
        whose cache hit is at most IN_BATCH_PREFIX_CACHING_CHECK_THRESHOLD tokens is matched against the requests
        ahead of it that were checked and not deferred (upstream's waiting-queue radix tree; with chained page
        hashes, a set of the pages they bring); it is deferred when that match reaches the deprioritize threshold,
        otherwise its pages join the set."""
        t, bt = self.t, self.cache.block_tokens
        snaps, matched = [], []
        inflight_pages: set[int] = set()
        for rid in self.waiting:
            blocks = t.blocks[rid]
            m = self.cache.match(blocks) if blocks else 0
            cached = min(m * bt, int(t.fill_len[rid]) - 1)
            defer = False
            if m * bt <= IN_BATCH_PREFIX_CACHING_CHECK_THRESHOLD:
                shared = 0
                for h in blocks:
                    if h not in inflight_pages:
                        break
                    shared += 1
                defer = shared * bt >= IN_BATCH_PREFIX_CACHING_DEPRIORITIZE_THRESHOLD
                if not defer:
                    inflight_pages.update(blocks)
            snaps.append(WaitingRequest(t.rid[rid], int(t.priority[rid]), float(t.arrival[rid]),
                                        int(t.fill_len[rid]), max(0, cached), defer,
                                        float(t.queue_entry[rid]), int(t.fill_len[rid] - t.input[rid]),
                                        max_new_tokens=int(t.output[rid])))
            matched.append(m)
        return snaps, matched

    def _running_snapshots(self) -> list[RunningRequest]:
        """kv_tokens: what preempting it frees for admission (its private KV, its pinned prompt pages, which turn
        evictable, and its reserved future decode); reserved_tokens: the reserve alone (upstream's
        _get_running_request_total_token_offset)."""
        t, bt = self.t, self.cache.block_tokens
        out = []
        for r in self.running:
            ratio = 1.0 if t.ignore_eos[r] else self.token_ratio.current
            reserved = PrefillPassBudget.reserved_output(int(t.output[r] - t.generated[r]), ratio)
            held = int(t.private[r]) + int(t.held_blocks[r]) * bt
            out.append(RunningRequest(t.rid[r], int(t.priority[r]), float(t.arrival[r]), int(held + reserved),
                                      int(t.input[r] + t.generated[r]), reserved, float(t.queue_entry[r]),
                                      int(t.preemptions[r])))
        return out

    def _ordered_waiting(self, now_s: float) -> tuple[list[WaitingRequest], list[int]]:
        """calc_priority: sort the waiting queue in place (as upstream does); snapshots and matches in that order."""
        snaps, matched = self._waiting_snapshots(now_s)
        order = self.ordering.order(snaps, now_s)
        self.waiting = [self.waiting[i] for i in order]
        return [snaps[i] for i in order], [matched[i] for i in order]

    def _preempt_for(self, snap: WaitingRequest, slots_short: int, kv_short: float, budget: PrefillPassBudget,
                     now_s: float) -> bool:
        """Ask the preemption policy to make room for `snap` (upstream: preempt_to_schedule, asked when the batch
        is full; a policy with `preempts_on_kv_shortage` is also asked on a KV shortage). Victims go back to the
        queue and their reserved decode leaves the pass's budget. True when somebody was preempted."""
        running = self._running_snapshots()
        victims = self.preemption.choose_victims(snap, running, slots_short, kv_short, now_s)
        if not victims:
            return False
        reserved = {r.rid: r.reserved_tokens for r in running}
        for v in victims:
            vid = int(v)
            self.running.remove(vid)
            self.requeue(vid, now_s)
            budget.total_offset -= reserved[v]
        self.preemption_events += 1
        return True

    def schedule_prefill(self, now_s: float, plan_tokens: int | None = None) -> list[tuple[int, int, int]]:
        """Build this step's prefill batch: [(rid, extend_tokens, prefix_tokens_before)] (empty: decode).
        Without a delayer; with one, the loop drives `prefill_pass` for every rank together."""
        gen = self.prefill_pass(now_s, plan_tokens)
        try:
            next(gen)
        except StopIteration as done:
            return done.value
        raise RuntimeError("prefill_pass asked for a prefill-delayer verdict on a rank without a delayer")

    def prefill_pass(self, now_s: float, plan_tokens: int | None = None):
        """Generator building this step's prefill batch; returns [(rid, extend_tokens, prefix_tokens_before)].

        As upstream's _get_new_batch_prefill_raw: nothing while the batch is full (unless a chunk runs);
        calc_priority sorts the queue; the running chunked request gets its next chunk (capped by the ordering's
        `chunk_limit` when it `limits_chunks`, upstream's shortest_prefill_chunk_limit seam); then waiting requests
        in order until a budget is spent: when the slots are full the preemption policy must make room for each
        further one; a request that does not fit (NO_TOKEN) ends the pass and marks the batch full. Only one
        chunked request at a time. `plan_tokens`: this rank's prefill tokens in the lockstep step plan
        (core/request/step_plan.py), a cap on both compute budgets (None: upstream's budgets).
        With a delayer it yields once, where upstream negotiates, (running_batch, waiting_queue_len) and is sent the
        verdict (True = prefill allowed); a pass that never yields was not prefillable."""
        t, s = self.t, self.s
        batch: list[tuple[int, int, int]] = []
        if self.preemption is not None or not self.running:
            self.batch_is_full = False
        if (self.batch_is_full or not self.waiting) and self.chunked is None:
            return batch
        if s.max_running_requests - len(self.running) <= 0 and self.chunked is None and self.preemption is None:
            self.batch_is_full = True
            return batch
        ordering = self.ordering
        snaps, matched = self._ordered_waiting(now_s) if self.waiting else ([], [])
        rem_input, rem_chunk = s.max_prefill_tokens, s.chunked_prefill_size
        if plan_tokens is not None:
            rem_input, rem_chunk = min(rem_input, plan_tokens), min(rem_chunk, plan_tokens)
        queue_len = len(self.waiting)  # upstream's waiting_queue_len: the queue when the adder is built
        mixed = len(self.running) if s.enable_mixed_chunk else 0  # decode rows riding along: a token each
        budget = PrefillPassBudget(rem_input - mixed, rem_chunk - mixed, self._reserved_decode() + mixed, mixed)
        allow: bool | None = None  # the delayer's verdict once asked
        allocated = 0  # tokens this pass allocated already (upstream allocates when the batch is built)

        def free() -> int:
            return self.free_for_alloc() + allocated

        chunk_unfinished = False
        load: RankLoad | None = None  # this rank now, for orderings that price their caps (built when first asked)

        def rank_load(waiting_behind: int) -> RankLoad:
            nonlocal load
            if load is None:
                load = RankLoad(len(self.running), self.decode_context(), len(snaps), int(s.chunked_prefill_size))
            return replace(load, waiting_requests=waiting_behind)

        if self.chunked is not None:
            rid = self.chunked
            remaining = int(t.fill_len[rid] - t.prefilled[rid])
            limit = None
            if ordering.limits_chunks and (snaps or self.group_ls_waiting):
                waiting_uncached = [(w.priority, max(1, w.input_tokens - w.cached_tokens)) for w in snaps]
                limit = ordering.chunk_limit(int(t.priority[rid]), remaining, waiting_uncached, int(budget.rem_chunk),
                                             1, group_ls_waiting=self.group_ls_waiting, load=rank_load(len(snaps)),
                                             chunked_prefix=int(t.prefilled[rid]))
                if limit is not None and limit < min(remaining, budget.rem_chunk):
                    self.capped_chunks += 1
            if self.delayer is not None:  # a mid-chunk rank prefills regardless of the verdict (upstream)
                allow = yield len(self.running), queue_len
            extend = budget.chunk_continuation(free(), remaining, int(t.output[rid]), limit)
            if extend > 0:  # (only mixed decode rows filling the whole chunk budget leave none)
                batch.append((rid, extend, int(t.prefilled[rid])))
                self._allocate(extend)
                allocated += extend
                t.private[rid] += extend
            if t.prefilled[rid] + extend < t.fill_len[rid]:
                chunk_unfinished = True
            else:
                self.chunked = None
        admitted: list[int] = []
        # LS protection also bounds NEW best-effort admissions this step (request tier: be_admission_budget).
        tells_ls = ordering.ls_priority is not None
        is_ls = ordering.is_latency_sensitive
        local_ls = sum(1 for w in snaps if is_ls(w.priority)) if tells_ls else 0
        be_tokens = sum(e for r, e, _ in batch if not is_ls(int(t.priority[r]))) if tells_ls else 0
        for pos, rid in enumerate(list(self.waiting)):  # preemption appends victims to self.waiting
            if pos >= len(snaps) or budget.state(free()) == OTHER:
                break
            snap = snaps[pos]
            if len(batch) >= s.max_running_requests - len(self.running):
                self.batch_is_full = True
            if self.batch_is_full:
                extend_now = int(t.fill_len[rid]) - int(t.last_prefix[rid])
                if self.preemption is None or not self._preempt_for(
                        snap, 1, budget.tokens_to_free(free(), extend_now, int(t.output[rid])), budget, now_s):
                    break
            t.last_prefix[rid] = snap.cached_tokens  # init_next_round_input matches it again
            m = matched[pos]
            extend_total = int(t.fill_len[rid]) - snap.cached_tokens
            remaining_output = int(t.output[rid] - t.generated[rid])
            verdict, extend = budget.admission(free() - self.cache.unlocked_tokens(t.blocks[rid][:m]), extend_total,
                                               remaining_output)
            if verdict == NO_TOKEN and self.preemption is not None and self.preemption.preempts_on_kv_shortage:
                short = (extend_total + min(remaining_output, CLIP_MAX_NEW_TOKENS) + 1
                         - (free() - self.cache.unlocked_tokens(t.blocks[rid][:m]) - budget.total_offset) + 1)
                if self._preempt_for(snap, 0, short, budget, now_s):
                    verdict, extend = budget.admission(free() - self.cache.unlocked_tokens(t.blocks[rid][:m]),
                                                       extend_total, remaining_output)
            if verdict != CONTINUE:
                if verdict == NO_TOKEN:
                    self.batch_is_full = bool(batch) or bool(self.running)
                break
            if tells_ls and not is_ls(int(t.priority[rid])):
                be_left = ordering.be_admission_tokens(
                    local_ls, self.group_ls_waiting, be_tokens, load=rank_load(len(snaps) - pos - 1),
                    request_tokens=extend_total, request_prefix=snap.cached_tokens,
                    step_tokens=sum(e for _, e, _ in batch), room_tokens=extend)
                if be_left is not None:
                    if be_left <= 0:
                        break
                    extend = min(extend, be_left)
                    be_tokens += extend
            if extend < extend_total and chunk_unfinished:
                break  # one chunked request at a time
            if self.delayer is not None:
                if allow is None:  # the first request that passes admission: negotiate with the DP group
                    allow = yield len(self.running), queue_len
                if not allow:
                    self.delayed_passes += 1
                    break
            self.cache.lock(t.blocks[rid][:m])
            t.held_blocks[rid] = m
            t.prefilled[rid] = snap.cached_tokens
            if t.cached_at_admit[rid] < 0:
                t.cached_at_admit[rid] = snap.cached_tokens
            self._allocate(extend)
            allocated += extend
            t.private[rid] += extend
            batch.append((rid, extend, snap.cached_tokens))
            admitted.append(rid)
            budget.charge(extend, min(int(t.output[rid]), CLIP_MAX_NEW_TOKENS) if extend == extend_total else 0)
            if extend < extend_total:
                self.chunked = rid
                break
            verdict = budget.state(free())
            if verdict != CONTINUE:
                if verdict == NO_TOKEN:
                    self.batch_is_full = True
                break
        if admitted:
            gone = set(admitted)
            self.waiting = [r for r in self.waiting if r not in gone]
        return batch

    def mixes_running(self, batch: list[tuple[int, int, int]]) -> bool:
        """enable_mixed_chunk: does this prefill batch carry the running decodes? Upstream mixes when the batch is
        non-empty and, after the prefill's allocation, the pool holds one more token per running request."""
        return bool(self.s.enable_mixed_chunk and batch and self.running
                    and self.free_for_alloc() >= len(self.running))

    def finish_prefill(self, batch: list[tuple[int, int, int]], now_s: float) -> list[int]:
        """Account a completed prefill step; returns requests that finished outright (one output token)."""
        t, bt = self.t, self.cache.block_tokens
        done, processed = [], 0
        for rid, extend, _ in batch:
            t.prefilled[rid] += extend
            processed += extend
            if t.prefilled[rid] < t.fill_len[rid]:
                self.batch_is_full = False  # the chunked request leaves the finished batch before it merges
                continue
            blocks = t.blocks[rid]
            full = min(len(blocks), int(t.prefilled[rid]) // bt)
            held = int(t.held_blocks[rid])
            if full > held:  # cache_unfinished_req: the prompt's new full pages join the tree (pinned)
                self.cache.lock(blocks[held:full])
                moved = (full - held) * bt
                t.private[rid] -= moved
                self.private_kv -= moved
                t.held_blocks[rid] = full
            t.generated[rid] += 1
            if np.isnan(t.first_token[rid]):
                t.first_token[rid] = now_s
            if t.generated[rid] >= t.output[rid]:
                t.finish[rid] = now_s
                self.release(rid)
                done.append(rid)
                self.batch_is_full = False
            else:
                self.running.append(rid)
        self.ordering.observe_prefill_tokens(processed)
        return done

    def advance_decode(self, steps: int, now_s: float) -> list[int]:
        """Every running request generates `steps` tokens; returns those that finished. Each step decays the
        new-token ratio (update_running_batch), except the one whose retraction set it."""
        retracted, self._retracted_this_step = self._retracted_this_step, False
        if not self.running:
            return []
        self.token_ratio.decay_steps(steps - 1 if retracted else steps)
        t = self.t
        idx = np.fromiter(self.running, dtype=np.int64, count=len(self.running))
        self._allocate(steps * len(idx))
        t.private[idx] += steps
        t.generated[idx] += steps
        finished = idx[t.generated[idx] >= t.output[idx]]
        if finished.size:
            self.batch_is_full = False
            gone = set(finished.tolist())
            self.running = [r for r in self.running if r not in gone]
            for rid in gone:
                t.finish[rid] = now_s
                self.release(rid)
        return finished.tolist()

    def idle(self) -> bool:
        """is_fully_idle: nothing running, waiting or chunked."""
        return not self.running and not self.waiting and self.chunked is None

    def on_group_idle(self) -> None:
        """on_idle: upstream's scheduler runs it when no rank of the DP-attention group has a batch (an idle rank of
        a busy group runs an idle batch instead); a fully idle rank resets its ratio."""
        if self.idle():
            self.token_ratio.reset()

    def min_remaining(self) -> int:
        idx = np.fromiter(self.running, dtype=np.int64, count=len(self.running))
        return int((self.t.output[idx] - self.t.generated[idx]).min())
