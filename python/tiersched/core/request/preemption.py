"""prefix-aging preemption: which running best-effort (BE) requests a latency-sensitive (LS) waiter may preempt.

A pure function of snapshots; the SGLang adapter applies the answer through PrefillAdder, the simulator applies
it to its own queues.
"""
from __future__ import annotations

from typing import Sequence

from tiersched.core.request import PreemptionPolicy, RequestTierConfig, RunningRequest, WaitingRequest


class LatencySensitivePreemption(PreemptionPolicy):
    """Preempt the lowest-priority, newest best-effort requests, only as many as needed.

    Rules (docs/request-tier.md):
      * only an LS candidate (priority >= ls_priority) preempts, and only BE victims whose priority is lower by
        more than `preemption_threshold`, and that were preempted (or retracted) fewer than
        `max_preemptions_per_request` times before;
      * candidates are taken lowest priority first, newest first within a priority (least work lost), until
        both the slot and the KV shortfall are covered; then any victim whose removal still leaves both covered
        is put back (latest taken first), so the set is minimal;
      * None when preemption is disabled, the shortfall is KV-only and `preempt_on_kv_shortage` is off, or the
        eligible victims cannot cover the shortfall (preempting then would waste work for nothing).
    """

    name = "prefix-aging"

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
            and r.preemptions < cfg.max_preemptions_per_request
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
