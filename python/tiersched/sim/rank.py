"""One DP rank's SGLang-like scheduler: waiting queue, chunked prefill, running decodes, KV pool, prefix cache.

Mirrors upstream `Scheduler.get_next_batch_to_run` without mixed chunking: each step a rank either runs a
prefill (extend) batch built by `PrefillAdder` (chunked_prefill_size and max_prefill_tokens budgets, at most one
chunked request, KV budget = free + evictable - reserved future decode tokens of running requests x
new_token_ratio, max_running_requests) or decodes every running request one token. When the KV pool cannot
hold one more token per running request, `retract_decode` sends requests back to the queue, fewest generated
tokens first (longest input among equals); their computed prefix stays in the cache.
Requests live in the shared columnar `RequestTable` (index = request id).
"""
from __future__ import annotations

import math

import numpy as np

from tiersched.core.request import OrderingPolicy, PreemptionPolicy, RunningRequest, WaitingRequest
from tiersched.core.request.upstream import (IN_BATCH_PREFIX_CACHING_CHECK_THRESHOLD,
                                             IN_BATCH_PREFIX_CACHING_DEPRIORITIZE_THRESHOLD)
from tiersched.sim.prefix_cache import BlockLRUCache


class RequestTable:
    def __init__(self, workload):
        n = len(workload)
        self.workload = workload
        self.n = n
        self.arrival = np.asarray(workload.arrival_s, dtype=float)
        self.input = np.asarray(workload.input_tokens, dtype=np.int64)
        self.output = np.asarray(workload.output_tokens, dtype=np.int64)
        self.priority = np.asarray(workload.priority, dtype=np.int64)
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


class RankState:
    def __init__(self, rank: int, preset, table: RequestTable, ordering: OrderingPolicy,
                 preemption: PreemptionPolicy | None):
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
        # Lockstep LS signal: the ordering's view of the DP-attention group's LS-waiting count, set by the loop each
        # step for orderings with `lockstep_signal_lag_steps` (the request tier's DP-wide chunk cap).
        self.group_ls_waiting = 0

    # ---- accounting -------------------------------------------------------------------------------------
    def free_for_alloc(self) -> int:
        """KV tokens allocatable now: free + evictable cache (evicted on demand)."""
        return self.s.kv_capacity_tokens - self.private_kv - self.cache.locked_tokens

    def _reserved_decode(self) -> float:
        if not self.running:
            return 0.0
        idx = np.fromiter(self.running, dtype=np.int64, count=len(self.running))
        return float((self.t.output[idx] - self.t.generated[idx]).sum()) * self.s.new_token_ratio

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
        t.preemptions[rid] += 1
        self.enqueue(rid, now_s)

    def retract_for_decode(self, now_s: float) -> None:
        """retract_decode: free enough KV for one more token per running request. Victim: fewest generated tokens,
        longest input among equals, the last in running order among full ties (upstream sorts the batch stably in
        reverse and pops from the end)."""
        t = self.t
        while self.running and self.free_for_alloc() < len(self.running):
            victim = min(reversed(self.running), key=lambda r: (t.generated[r], -t.input[r]))
            self.running.remove(victim)
            self.requeue(victim, now_s)
            self.retractions += 1

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
                                        float(t.queue_entry[rid]), int(t.fill_len[rid] - t.input[rid])))
            matched.append(m)
        return snaps, matched

    def _running_snapshots(self) -> list[RunningRequest]:
        """kv_tokens: what preempting it frees for admission (its private KV, its pinned prompt pages, which turn
        evictable, and its reserved future decode); reserved_tokens: the reserve alone (upstream's
        _get_running_request_total_token_offset)."""
        t, bt, ratio = self.t, self.cache.block_tokens, self.s.new_token_ratio
        out = []
        for r in self.running:
            reserved = float(t.output[r] - t.generated[r]) * ratio
            held = int(t.private[r]) + int(t.held_blocks[r]) * bt
            out.append(RunningRequest(t.rid[r], int(t.priority[r]), float(t.arrival[r]), int(held + reserved),
                                      int(t.input[r] + t.generated[r]), reserved, float(t.queue_entry[r])))
        return out

    def _ordered_waiting(self, now_s: float) -> tuple[list[WaitingRequest], list[int]]:
        """calc_priority: sort the waiting queue in place (as upstream does); snapshots and matches in that order."""
        snaps, matched = self._waiting_snapshots(now_s)
        order = self.ordering.order(snaps, now_s)
        self.waiting = [self.waiting[i] for i in order]
        return [snaps[i] for i in order], [matched[i] for i in order]

    def _preempt_for(self, snap: WaitingRequest, rid: int, slots: int, rem_total: float, now_s: float) -> int:
        """Ask the preemption policy to make room for `snap`; returns the slots freed (0: nobody preempted).
        Upstream only asks when slots are full; a policy with `preempts_on_kv_shortage = False` is not asked
        on a KV-only shortage. The KV shortfall is upstream's min_tokens_to_remove (extend + remaining output)."""
        t = self.t
        kv_short = int(math.ceil(max(0.0, snap.input_tokens - snap.cached_tokens
                                     + float(t.output[rid] - t.generated[rid]) - rem_total)))
        if slots > 0 and not self.preemption.preempts_on_kv_shortage:
            return 0
        victims = self.preemption.choose_victims(snap, self._running_snapshots(), max(0, 1 - slots), kv_short, now_s)
        if not victims:
            return 0
        for v in victims:
            vid = int(v)
            self.running.remove(vid)
            self.requeue(vid, now_s)
        self.preemption_events += 1
        return len(victims)

    def schedule_prefill(self, now_s: float) -> list[tuple[int, int, int]]:
        """Build this step's prefill batch: [(rid, extend_tokens, prefix_tokens_before)] (empty: decode).

        Order as upstream's _get_new_batch_prefill_raw: calc_priority sorts the queue, then the running chunked
        request gets its next chunk (capped by the ordering's `chunk_limit` when it `limits_chunks`, as upstream's
        shortest_prefill_chunk_limit seam), then waiting requests fill the remaining budgets; while a chunked
        request is unfinished only whole requests join (upstream tracks one chunked request)."""
        t, s = self.t, self.s
        batch: list[tuple[int, int, int]] = []
        budget_chunk, budget_input = s.chunked_prefill_size, s.max_prefill_tokens
        rem_total = self.free_for_alloc() - self._reserved_decode()
        ordering = self.ordering
        snaps: list[WaitingRequest] = []
        matched: list[int] = []
        if self.waiting and (self.chunked is None or ordering.limits_chunks):
            snaps, matched = self._ordered_waiting(now_s)
        chunk_unfinished = False
        if self.chunked is not None:
            rid = self.chunked
            remaining = int(t.fill_len[rid] - t.prefilled[rid])
            cap = budget_chunk
            if ordering.limits_chunks and (snaps or self.group_ls_waiting):
                waiting_uncached = [(w.priority, max(1, w.input_tokens - w.cached_tokens)) for w in snaps]
                limit = ordering.chunk_limit(int(t.priority[rid]), remaining, waiting_uncached, budget_chunk, 1,
                                             group_ls_waiting=self.group_ls_waiting)
                if limit is not None and limit < min(remaining, cap):
                    cap = limit
                    self.capped_chunks += 1
            extend = int(min(remaining, cap))
            batch.append((rid, extend, int(t.prefilled[rid])))
            self._allocate(extend)
            t.private[rid] += extend
            budget_chunk -= extend
            budget_input -= extend
            rem_total -= extend
            if t.prefilled[rid] + extend < t.fill_len[rid]:
                chunk_unfinished = True
            else:
                self.chunked = None
        if budget_chunk <= 0 or budget_input <= 0 or not self.waiting:
            return batch
        if not snaps:  # the chunk finished this step and the ordering was not needed to size it
            snaps, matched = self._ordered_waiting(now_s)
        slots = s.max_running_requests - len(self.running) - len(batch)
        admitted: list[int] = []
        # LS protection also bounds NEW best-effort admissions this step (request tier: be_admission_budget).
        tells_ls = ordering.ls_priority is not None
        is_ls = ordering.is_latency_sensitive
        local_ls = sum(1 for w in snaps if is_ls(w.priority)) if tells_ls else 0
        be_tokens = sum(e for r, e, _ in batch if not is_ls(int(t.priority[r]))) if tells_ls else 0
        for pos, rid in enumerate(list(self.waiting)):  # preemption appends victims to self.waiting
            if pos >= len(snaps):
                break
            snap = snaps[pos]
            extend_total = int(t.fill_len[rid]) - snap.cached_tokens
            need = extend_total + (t.output[rid] - t.generated[rid]) * s.new_token_ratio
            if slots <= 0 or need > rem_total:
                if self.preemption is None:
                    break
                freed = self._preempt_for(snap, rid, slots, rem_total, now_s)
                if not freed:
                    break
                slots += freed
                rem_total = self.free_for_alloc() - self._reserved_decode() - sum(e for _, e, _ in batch)
                if slots <= 0 or need > rem_total:
                    break
            if budget_chunk <= 0 or budget_input <= 0:
                break
            extend = min(extend_total, budget_chunk)
            if tells_ls and not is_ls(int(t.priority[rid])):
                be_left = ordering.be_admission_tokens(local_ls, self.group_ls_waiting, be_tokens)
                if be_left is not None:
                    if be_left <= 0:
                        break
                    extend = min(extend, be_left)
                    be_tokens += extend
            if extend < extend_total and chunk_unfinished:
                break  # one chunked request at a time
            m = matched[pos]
            self.cache.lock(t.blocks[rid][:m])
            t.held_blocks[rid] = m
            t.prefilled[rid] = snap.cached_tokens
            if t.cached_at_admit[rid] < 0:
                t.cached_at_admit[rid] = snap.cached_tokens
            self._allocate(extend)
            t.private[rid] += extend
            batch.append((rid, extend, snap.cached_tokens))
            admitted.append(rid)
            budget_chunk -= extend
            budget_input -= extend
            rem_total -= need
            slots -= 1
            if extend < extend_total:
                self.chunked = rid
                break
        if admitted:
            gone = set(admitted)
            self.waiting = [r for r in self.waiting if r not in gone]
        return batch

    def finish_prefill(self, batch: list[tuple[int, int, int]], now_s: float) -> list[int]:
        """Account a completed prefill step; returns requests that finished outright (one output token)."""
        t, bt = self.t, self.cache.block_tokens
        done, processed = [], 0
        for rid, extend, _ in batch:
            t.prefilled[rid] += extend
            processed += extend
            if t.prefilled[rid] < t.fill_len[rid]:
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
            else:
                self.running.append(rid)
        self.ordering.observe_prefill_tokens(processed)
        return done

    def advance_decode(self, steps: int, now_s: float) -> list[int]:
        """Every running request generates `steps` tokens; returns those that finished."""
        if not self.running:
            return []
        t = self.t
        idx = np.fromiter(self.running, dtype=np.int64, count=len(self.running))
        self._allocate(steps * len(idx))
        t.private[idx] += steps
        t.generated[idx] += steps
        finished = idx[t.generated[idx] >= t.output[idx]]
        if finished.size:
            gone = set(finished.tolist())
            self.running = [r for r in self.running if r not in gone]
            for rid in gone:
                t.finish[rid] = now_s
                self.release(rid)
        return finished.tolist()

    def min_remaining(self) -> int:
        idx = np.fromiter(self.running, dtype=np.int64, count=len(self.running))
        return int((self.t.output[idx] - self.t.generated[idx]).min())
