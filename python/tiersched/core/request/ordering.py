"""prefix-aging: aging priority + prefix-aware shortest-uncached-prefill ordering (`--schedule-policy prefix-aging`).

Order key of a waiting request w at time `now` (smallest first; docs/request-tier.md proves the wait bound):

    wait      = now - w.arrival_s
    promoted  = wait >= aging_cap_s
    k0 class  = -inf if promoted else -min(w.priority + floor(aging_rate * wait), max priority waiting)
    k1 defer  = (not promoted) and w.shares_inflight_prefix        # LPM-style: compute a shared prefix once
    k2 work   = 0 if promoted else (w.input_tokens - w.cached_tokens) - token_credit_per_s * wait
    k3 arrival

Promoted requests therefore run before everything else, first come first served among themselves, which is
what bounds every wait (see `wait_bound_s`), except that a bounded number of LS requests may overtake them
(`LsOvertakeBudget` in overtake.py), so sustained overload does not turn LS into FCFS behind the promoted backlog.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from tiersched.core.request import OrderingPolicy, RankLoad, RequestTierConfig, WaitingRequest
from tiersched.core.request.lockstep import LockstepLsSignal, LsCapPricing, be_admission_budget, chunk_token_limit
from tiersched.core.request.overtake import LsOvertakeBudget


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



class AgingPrefixOrdering(OrderingPolicy):
    """`prefix-aging`: priority class with aging, then uncached prefill minus aging credit, then arrival; LS
    requests overtake promoted ones within `LsOvertakeBudget`; BE prefill is capped while LS work waits
    (lockstep.py). Stateful (the overtake credit, the lockstep signal's hold): one instance per waiting queue."""

    name = "prefix-aging"
    limits_chunks = True

    def __init__(self, config: RequestTierConfig | None = None):
        self.config = config or RequestTierConfig()
        self.overtake = LsOvertakeBudget(self.config.ls_overtake_burst, self.config.ls_overtakes_per_promoted,
                                         self.config.aging_cap_s)
        self.ls_signal = LockstepLsSignal(self.config)
        # 0 = the same-step all-reduce before batch formation (`same_step_signal`, what the adapter does by
        # default), 1 = only upstream's per-step MLP-sync all-gather, which runs after batch formation.
        self.lockstep_signal_lag_steps = 0 if self.config.same_step_signal else 1
        self.step_model = None  # set_step_model: prices the LS cap (lockstep.ls_cap_pays)
        self.full_sequence_attention = False
        self.group_ranks = 1

    def set_step_model(self, model, full_sequence_attention: bool = False, group_ranks: int = 1) -> None:
        self.step_model = model
        self.full_sequence_attention = bool(full_sequence_attention)
        self.group_ranks = max(1, int(group_ranks))

    def pricing(self, load: RankLoad | None) -> LsCapPricing | None:
        """The LS cap's pricing inputs now: the step model, this rank's load, the group signal's LS arrival rate
        and fresh count (None without a model or a load)."""
        if self.step_model is None or load is None:
            return None
        sig = self.ls_signal
        return LsCapPricing(self.step_model, sig.ls_rate_per_s(sig.last_observed_s), sig.fresh, load.decode_count,
                            load.decode_context, load.waiting_requests, load.upstream_budget,
                            self.full_sequence_attention, self.group_ranks)

    @property
    def ls_priority(self) -> int:
        return self.config.ls_priority

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

    def chunk_limit(self, chunked_priority: int, chunked_remaining: int, waiting_uncached: Sequence[tuple[int, int]],
                    budget: int, page_size: int, group_ls_waiting: int = 0, load: RankLoad | None = None,
                    chunked_prefix: int = 0) -> int | None:
        return chunk_token_limit(chunked_priority, chunked_remaining, waiting_uncached, budget, page_size,
                                 self.config, group_ls_waiting, self.pricing(load), chunked_prefix)

    def be_admission_tokens(self, local_ls_waiting: int, group_ls_waiting: int, be_tokens_this_step: int,
                            load: RankLoad | None = None, request_tokens: int = 0, request_prefix: int = 0,
                            step_tokens: int = 0, room_tokens: int | None = None) -> int | None:
        return be_admission_budget(local_ls_waiting, group_ls_waiting, be_tokens_this_step, self.config,
                                   self.pricing(load), request_tokens, request_prefix, step_tokens, room_tokens)

    def observe_group_ls_waiting(self, group_ls_waiting: int, now_s: float) -> int:
        return self.ls_signal.observe(group_ls_waiting, now_s)
