"""Request tier: which running requests a latency-sensitive (LS) waiter may preempt, and the chunk cap.

Both are pure functions of snapshots (tiersched.core.request.ordering); the SGLang adapter applies the answer
through PrefillAdder, the simulator applies it to its own queues.
"""
from __future__ import annotations

import math
from typing import Sequence

from tiersched.core.request.ordering import RequestTierConfig, RunningRequest, WaitingRequest


class LatencySensitivePreemption:
    """Preempt the lowest-priority, newest best-effort requests, only as many as needed.

    Rules (docs/request-tier.md):
      * only an LS candidate (priority >= ls_priority) preempts, and only BE victims whose priority is lower by
        more than `preemption_threshold`;
      * candidates are taken lowest priority first, newest first within a priority (least work lost), until
        both the slot and the KV shortfall are covered; then any victim whose removal still leaves both covered
        is put back (latest taken first), so the set is minimal;
      * None when preemption is disabled, the shortfall is KV-only and `preempt_on_kv_shortage` is off, or the
        eligible victims cannot cover the shortfall (preempting then would waste work for nothing).
    """

    def __init__(self, config: RequestTierConfig | None = None):
        self.config = config or RequestTierConfig()

    def choose_victims(
        self,
        candidate: WaitingRequest,
        running: Sequence[RunningRequest],
        slots_short: int,
        kv_tokens_short: int,
        now_s: float,
    ) -> list[str] | None:
        cfg = self.config
        slots_short = max(0, slots_short)
        kv_tokens_short = max(0, kv_tokens_short)
        if not cfg.enable_preemption or not cfg.is_latency_sensitive(candidate.priority):
            return None
        if slots_short == 0 and kv_tokens_short == 0:
            return []
        if slots_short == 0 and not cfg.preempt_on_kv_shortage:
            return None
        eligible = [
            r
            for r in running
            if not cfg.is_latency_sensitive(r.priority)
            and candidate.priority - r.priority > cfg.preemption_threshold
        ]
        eligible.sort(key=lambda r: (r.priority, -r.arrival_s))
        chosen: list[RunningRequest] = []
        freed_slots = freed_kv = 0
        for r in eligible:
            if freed_slots >= slots_short and freed_kv >= kv_tokens_short:
                break
            chosen.append(r)
            freed_slots += 1
            freed_kv += r.kv_tokens
        if freed_slots < slots_short or freed_kv < kv_tokens_short:
            return None
        # Put back victims that turned out unnecessary (a later, larger victim may cover an earlier one).
        for r in reversed(list(chosen)):
            if freed_slots - 1 >= slots_short and freed_kv - r.kv_tokens >= kv_tokens_short:
                chosen.remove(r)
                freed_slots -= 1
                freed_kv -= r.kv_tokens
        return [r.rid for r in chosen]


class UpstreamPriorityPreemption:
    """Baseline: upstream PrefillAdder.preempt_to_schedule (sglang/srt/managers/schedule_policy.py), as upstream calls it.

    The scheduler (`Scheduler._get_new_batch_prefill_raw`) calls it only while `running_batch.batch_is_full`,
    i.e. when no running slot is free; a KV shortage (`add_one_req` -> NO_TOKEN) ends the pass without
    preemption, so this returns None when `slots_short` is 0. Victims: running requests sorted lowest priority
    first, newest first among equals; each is taken while the candidate's priority exceeds its priority by more
    than the threshold (default 10; the first one that does not ends the walk); the candidate's token need
    (`kv_tokens_short`, upstream's min_tokens_to_remove) is reduced only by each victim's reserved future decode
    tokens (`_get_running_request_total_token_offset`, RunningRequest.reserved_tokens), not by the KV it holds.
    At least `slots_short` victims (upstream's call frees one slot); None if the walk ends short. (The request being
    chunk-prefilled is not in the running batch, so it is never a victim.)"""

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


def chunk_token_limit(
    chunked_priority: int,
    chunked_remaining_tokens: int,
    waiting_uncached: Sequence[tuple[int, int]],
    budget_tokens: int,
    page_size: int,
    config: RequestTierConfig,
    group_ls_waiting: int = 0,
) -> int | None:
    """Cap on the tokens the running chunked prefill may advance this step, or None for no cap.

    chunked_priority / chunked_remaining_tokens: the request being chunk-prefilled.
    waiting_uncached: (priority, uncached_tokens) of waiters, in scheduling order.
    budget_tokens: this step's prefill token budget (upstream's rem_chunk_tokens).
    group_ls_waiting: the largest LS-waiting count any rank of this rank's lockstep (DP-attention) group
    published (0 without DP attention); counts when `config.lockstep_chunk_cap` is on.

    Two rules, the smaller cap wins:
      * shorter-waiter reservation (as upstream shortest-prefill-first's shortest_prefill_chunk_limit): reserve
        budget for waiters whose uncached work is shorter than the chunk's remainder, in order, while the chunk
        keeps at least `min_chunk_tokens`; so a long prefill never blocks short waiters for more than a step;
      * LS protection (the QLLM analog in SGLang's whole-step execution): while an LS request waits behind a BE
        chunk, the BE chunk advances at most `be_chunk_tokens`, so the step the LS request waits on is short.
        Under DP attention every rank's step is one lockstep step, so "waits" means on ANY rank of the group.
    Page-aligned; never below `min_chunk_tokens` rounded up to a page.
    """
    page = max(1, page_size)
    floor = -(-config.min_chunk_tokens // page) * page
    if budget_tokens <= floor:
        return None
    caps: list[int] = []
    reserved = 0
    for priority, uncached in waiting_uncached:
        charge = -(-max(uncached, 1) // page) * page
        if uncached >= chunked_remaining_tokens or reserved + charge > budget_tokens - floor:
            break
        reserved += charge
    if reserved:
        caps.append(budget_tokens - reserved)
    ls_waiting = any(config.is_latency_sensitive(p) for p, _ in waiting_uncached) or (
        config.lockstep_chunk_cap and group_ls_waiting > 0)
    if ls_waiting and not config.is_latency_sensitive(chunked_priority):
        caps.append(config.be_chunk_tokens)
    if not caps:
        return None
    limit = max(floor, min(caps) // page * page)
    return limit if limit < budget_tokens else None


def be_admission_budget(local_ls_waiting: int, group_ls_waiting: int, be_tokens_this_step: int,
                        config: RequestTierConfig) -> int | None:
    """Prefill tokens a BE request newly admitted this step may take (None: no cap; 0: admit no BE this step).

    While LS work waits (on this rank, or with `lockstep_chunk_cap` on any rank of the lockstep group), this
    rank's BE prefill per step is bounded by `be_chunk_tokens` in total: the capped running chunk plus new BE
    admissions (without this, a BE request admitted on an idle rank takes a whole 8192-token first chunk and
    the LS request on another rank waits for that step). `be_tokens_this_step`: BE tokens already in this
    step's batch. A remainder below `min_chunk_tokens` admits nothing (the BE request waits one short step).
    """
    ls_active = local_ls_waiting > 0 or (config.lockstep_chunk_cap and group_ls_waiting > 0)
    if not ls_active or not config.cap_be_admissions:
        return None
    left = config.be_chunk_tokens - max(0, be_tokens_this_step)
    return left if left >= config.min_chunk_tokens else 0


class LockstepLsSignal:
    """The DP-wide "LS work waiting" signal one rank applies, from the per-step group counts it receives.

    `observe(group_ls_waiting, now_s)` is called once per scheduling step with the largest LS-waiting count
    any rank of the lockstep group published (SGLang: gathered with the previous step's MLP-sync all-gather);
    it returns the value the chunk cap uses this step: the count itself, or 1 while `ls_hold_s` has not passed
    since a nonzero count was last seen. Every rank observes the same gathered values, so all ranks of a group
    agree. `expire(now_s)` is for a step without a fresh count (no gather ran): only the hold remains, and it
    runs out, so a stale signal cannot keep BE capped.
    """

    def __init__(self, config: RequestTierConfig):
        self.config = config
        self.last_seen_s = -math.inf

    def observe(self, group_ls_waiting: int, now_s: float) -> int:
        if group_ls_waiting > 0:
            self.last_seen_s = now_s
            return int(group_ls_waiting)
        return self.expire(now_s)

    def expire(self, now_s: float) -> int:
        return 1 if now_s - self.last_seen_s <= self.config.ls_hold_s else 0
