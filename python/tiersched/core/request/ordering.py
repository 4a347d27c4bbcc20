"""Request tier: aging priority + prefix-aware shortest-uncached-prefill ordering + LS preemption.

CONTRACT (kept stable; the simulator and the SGLang adapter code against it). Priorities are normalised by
the adapter so that a HIGHER integer is MORE urgent (upstream's default; `--schedule-low-priority-values-first`
is flipped by the adapter).

Order key of a waiting request w at time `now` (smallest first; docs/request-tier.md proves the wait bound):

    wait      = now - w.arrival_s
    promoted  = wait >= aging_cap_s
    k0 class  = -inf if promoted else -min(w.priority + floor(aging_rate * wait), max priority waiting)
    k1 defer  = (not promoted) and w.shares_inflight_prefix        # LPM-style: compute a shared prefix once
    k2 work   = 0 if promoted else (w.input_tokens - w.cached_tokens) - token_credit_per_s * wait
    k3 arrival

Promoted requests therefore run before everything else, first come first served among themselves, which is
what bounds every wait (see `wait_bound_s`), except that a bounded number of LS requests may overtake them
(`LsOvertakeBudget` in request_overtake.py), so sustained overload does not turn LS into FCFS behind the
promoted backlog.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np


@dataclass(frozen=True, slots=True)
class WaitingRequest:
    rid: str
    priority: int  # higher = more urgent
    arrival_s: float
    input_tokens: int
    cached_tokens: int = 0  # prefix already in this rank's radix cache when ordering runs
    shares_inflight_prefix: bool = False  # an uncached prefix it shares is being prefilled now: defer (LPM-like)


@dataclass(frozen=True, slots=True)
class RunningRequest:
    rid: str
    priority: int
    arrival_s: float
    kv_tokens: int  # KV slots it holds now plus its reserved future decode (freed if preempted)
    computed_tokens: int  # tokens whose KV is computed (kept in the radix cache on preemption)
    # Future decode tokens the admission budget reserves for it (upstream PrefillAdder.
    # _get_running_request_total_token_offset: remaining max_new_tokens x new_token_ratio); part of kv_tokens.
    reserved_tokens: float = 0.0


class OrderingPolicy(Protocol):
    def order(self, waiting: Sequence[WaitingRequest], now_s: float) -> list[int]:
        """Indices into `waiting`, most urgent first (a permutation of range(len(waiting)))."""


class PreemptionPolicy(Protocol):
    def choose_victims(
        self,
        candidate: WaitingRequest,
        running: Sequence[RunningRequest],
        slots_short: int,
        kv_tokens_short: int,
        now_s: float,
    ) -> list[str] | None:
        """rids to preempt so `candidate` fits (fewest needed), or None when it may not / cannot."""


@dataclass(frozen=True)
class RequestTierConfig:
    """Tunables of this tier: section [request] of the TIERSCHED_CONFIG file (see tiersched.config).
    Every field has a default; validate() raises ValueError with one sentence saying what to fix."""

    aging_rate: float = 0.5  # priority levels a waiting request gains per second waited
    aging_cap_s: float = 20.0  # a request that waited this long outranks every class (FCFS among such)
    token_credit_per_s: float = 2000.0  # uncached-prefill tokens forgiven per second waited, within a class
    ls_priority: int = 1  # priority >= this is latency-sensitive (LS); below is best-effort (BE)
    preemption_threshold: int = 0  # an LS request preempts a BE victim only if priority difference > this
    enable_preemption: bool = True
    preempt_on_kv_shortage: bool = True  # upstream preempts only when running slots are full
    be_chunk_tokens: int = 512  # while LS work waits, a BE chunked prefill advances at most this many tokens
    min_chunk_tokens: int = 64  # a chunk is never capped below this (the long prefill always progresses)
    # DP attention runs every rank's forward step in lockstep, so the BE cap applies on every rank of the group
    # while ANY rank has LS work waiting (docs/request-tier.md, "Lockstep"); False: only this rank's LS waiters.
    lockstep_chunk_cap: bool = True
    # The LS cap also bounds BE requests newly admitted in the step (their first chunk), not only the running one.
    cap_be_admissions: bool = True
    # After the group last had LS work waiting, BE prefill stays capped this many seconds: the step already
    # running when the NEXT LS request arrives cannot be shortened any more, so while LS traffic is active BE
    # steps stay short (0: cap only while LS work is seen waiting).
    ls_hold_s: float = 4.0
    # Under DP attention, all-reduce (MAX) each rank's LS count once per scheduler iteration BEFORE batch
    # formation, so every rank's cap of THIS step sees LS work on any rank (one tiny extra collective per
    # iteration, benchmark/request_tier_signal_cost.py). False: only the count carried by upstream's MLP-sync
    # all-gather, which runs after batch formation and so reaches the other ranks one step late.
    same_step_signal: bool = True
    # Under sustained overload the promoted set never empties; these let LS requests overtake promoted ones, a
    # bounded number (core/request/overtake.py): up to `ls_overtake_burst` at once, and per promoted request
    # admitted `ls_overtakes_per_promoted` more. Both 0: promoted requests always go first.
    ls_overtake_burst: int = 4
    ls_overtakes_per_promoted: float = 1.0

    def validate(self) -> None:
        if not (math.isfinite(self.aging_rate) and self.aging_rate >= 0):
            raise ValueError(f"aging_rate must be a finite number >= 0 (priority levels per second), got {self.aging_rate!r}.")
        if not (math.isfinite(self.aging_cap_s) and self.aging_cap_s > 0):
            raise ValueError(f"aging_cap_s must be a finite number of seconds > 0, got {self.aging_cap_s!r}.")
        if not (math.isfinite(self.token_credit_per_s) and self.token_credit_per_s >= 0):
            raise ValueError(f"token_credit_per_s must be a finite number >= 0, got {self.token_credit_per_s!r}.")
        if self.preemption_threshold < 0:
            raise ValueError(f"preemption_threshold must be >= 0, got {self.preemption_threshold!r}.")
        if self.min_chunk_tokens < 1:
            raise ValueError(f"min_chunk_tokens must be >= 1, got {self.min_chunk_tokens!r}.")
        if not (math.isfinite(self.ls_hold_s) and self.ls_hold_s >= 0):
            raise ValueError(f"ls_hold_s must be a finite number of seconds >= 0, got {self.ls_hold_s!r}.")
        if not isinstance(self.same_step_signal, bool):
            raise ValueError(f"same_step_signal must be true or false, got {self.same_step_signal!r}.")
        if not (isinstance(self.ls_overtake_burst, int) and self.ls_overtake_burst >= 0):
            raise ValueError(f"ls_overtake_burst must be an integer >= 0 (LS requests), got {self.ls_overtake_burst!r}.")
        if not (math.isfinite(self.ls_overtakes_per_promoted) and self.ls_overtakes_per_promoted >= 0):
            raise ValueError("ls_overtakes_per_promoted must be a finite number >= 0, "
                             f"got {self.ls_overtakes_per_promoted!r}.")
        if self.be_chunk_tokens < self.min_chunk_tokens:
            raise ValueError(
                f"be_chunk_tokens ({self.be_chunk_tokens}) must be >= min_chunk_tokens ({self.min_chunk_tokens})."
            )

    def is_latency_sensitive(self, priority: int) -> bool:
        return priority >= self.ls_priority


def wait_bound_s(aging_cap_s: float, max_step_s: float, older_backlog_s: float, overtakes: float = 0.0,
                 max_ls_service_s: float = 0.0) -> float:
    """Upper bound on a request's queueing wait (docs/request-tier.md, Theorem 1).

    aging_cap_s: config cap; max_step_s: the longest single scheduling step (non-preemptive service);
    older_backlog_s: service time of requests that arrived earlier and still wait when this one is promoted;
    overtakes: LS requests allowed to overtake it after its promotion (`max_overtakes`); max_ls_service_s: the
    longest LS service.
    """
    return aging_cap_s + max_step_s + older_backlog_s + overtakes * max_ls_service_s


def max_overtakes(config: "RequestTierConfig", promoted_ahead: int) -> float:
    """LS requests that can overtake a promoted request: the burst plus `ls_overtakes_per_promoted` per promoted
    request admitted before it (those are older, so part of its backlog)."""
    return config.ls_overtake_burst + config.ls_overtakes_per_promoted * promoted_ahead


def order_keys(
    priority: np.ndarray,
    arrival_s: np.ndarray,
    uncached_tokens: np.ndarray,
    deferred: np.ndarray,
    now_s: float,
    config: RequestTierConfig,
) -> np.ndarray:
    """Permutation (int64[n]) sorting the waiting set most urgent first.

    priority, arrival_s, uncached_tokens: float64[n]; deferred: bool[n]. Vectorised so one scheduling step
    over 1k waiting requests costs well under a millisecond.
    """
    wait = np.maximum(now_s - arrival_s, 0.0)
    promoted = wait >= config.aging_cap_s
    # Aging lifts a request at most to the most urgent class present: it lets a lower class catch up with a
    # higher one, but never reorders requests of the top class among themselves (with one class, the order is
    # pure shortest-uncached-prefill with token credit, not FCFS in aging-rate buckets).
    lifted = np.minimum(priority + np.floor(config.aging_rate * wait), priority.max() if priority.size else 0.0)
    k0 = np.where(promoted, -np.inf, -lifted)
    k1 = deferred & ~promoted
    k2 = np.where(promoted, 0.0, uncached_tokens - config.token_credit_per_s * wait)
    # np.lexsort sorts by the LAST key first.
    return np.lexsort((arrival_s, k2, k1, k0))


class AgingPrefixOrdering:
    """`prefix-aging`: priority class with aging, then uncached prefill minus aging credit, then arrival.
    Stateful (the LS overtake credit): one instance per waiting queue."""

    def __init__(self, config: RequestTierConfig | None = None):
        from tiersched.core.request.overtake import LsOvertakeBudget

        self.config = config or RequestTierConfig()
        self.overtake = LsOvertakeBudget(self.config.ls_overtake_burst, self.config.ls_overtakes_per_promoted,
                                         self.config.aging_cap_s)
        # Steps between a rank publishing its LS count and the group using it, read by the simulator: 0 = the
        # same-step all-reduce before batch formation (`same_step_signal`, what the adapter does by default),
        # 1 = only upstream's per-step MLP-sync all-gather, which runs after batch formation.
        self.lockstep_signal_lag_steps = 0 if self.config.same_step_signal else 1

    def order(self, waiting: Sequence[WaitingRequest], now_s: float) -> list[int]:
        n = len(waiting)
        if n == 0:
            return []
        priority = np.fromiter((w.priority for w in waiting), np.float64, n)
        arrival = np.fromiter((w.arrival_s for w in waiting), np.float64, n)
        uncached = np.fromiter((w.input_tokens - w.cached_tokens for w in waiting), np.float64, n)
        deferred = np.fromiter((w.shares_inflight_prefix for w in waiting), np.bool_, n)
        perm = order_keys(priority, arrival, np.maximum(uncached, 0.0), deferred, now_s, self.config)
        is_ls = priority >= self.config.ls_priority
        return self.overtake.reorder(perm, lambda i: waiting[i].rid, is_ls, arrival, now_s).tolist()

    def chunk_limit(self, chunked_priority: int, chunked_remaining: int, waiting_uncached, budget: int,
                    page_size: int, group_ls_waiting: int = 0) -> int | None:
        """Cap on the running chunked prefill this step (request_preemption.chunk_token_limit)."""
        from tiersched.core.request.preemption import chunk_token_limit

        return chunk_token_limit(chunked_priority, chunked_remaining, waiting_uncached, budget, page_size,
                                 self.config, group_ls_waiting)

    def be_admission_tokens(self, local_ls_waiting: int, group_ls_waiting: int, be_tokens_this_step: int) -> int | None:
        """Tokens a newly admitted BE request may prefill this step (request_preemption.be_admission_budget)."""
        from tiersched.core.request.preemption import be_admission_budget

        return be_admission_budget(local_ls_waiting, group_ls_waiting, be_tokens_this_step, self.config)


class FcfsPriorityOrdering:
    """Baseline: upstream `--schedule-policy fcfs --enable-priority-scheduling`, i.e. the sort in
    sglang.srt.managers.schedule_policy.SchedulePolicy._sort_by_priority_and_fcfs (priority, then
    queue-entry time; no aging, no prefix awareness)."""

    def order(self, waiting: Sequence[WaitingRequest], now_s: float) -> list[int]:
        return sorted(range(len(waiting)), key=lambda i: (-waiting[i].priority, waiting[i].arrival_s))
