"""Request-tier adapter state: what prefix-aging keeps per SchedulePolicy, and the lockstep signal per process.

`PolicyState` belongs to one prefix-aging `SchedulePolicy` (attribute `tiersched_policy` of that policy, set by
the `SchedulePolicy.__init__` hook, None for every other policy); a PrefillAdder reaches it only while its
scheduler's prefill pass runs (hooks.scope_prefill_pass). `LockstepState` is per process: the MLP-sync seams it
feeds are module functions and batch records that carry no scheduler (PD and PP loops reach them without
`get_next_batch_to_run`), and upstream runs one scheduler per process.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import Optional

from tiersched.core.request import RequestTierConfig
from tiersched.core.request.lockstep import LockstepLsSignal
from tiersched.core.request.overtake import LsOvertakeBudget

POLICY_NAME = "prefix-aging"
POLICY_ATTR = "tiersched_policy"  # our attribute on upstream's SchedulePolicy
FIRST_ARRIVAL_ATTR = "tiersched_first_arrival"  # our attribute on upstream's Req


def stamp_first_arrival(req) -> None:
    """Record when `req` first entered a waiting queue, once. Upstream's `Scheduler._add_request_to_queue` stamps
    `time_stats.wait_queue_entry_time` again each time a preempted or retracted request is re-queued, so a request
    aged from that field would start over after every preemption; this stamp is never overwritten."""
    if getattr(req, FIRST_ARRIVAL_ATTR, None) is None:
        setattr(req, FIRST_ARRIVAL_ATTR, req.time_stats.wait_queue_entry_time or time.perf_counter())


def first_arrival(req, now_s: float) -> float:
    """The time (time.perf_counter clock) `req` ages from: its first queue entry; a request that never passed
    `_add_request_to_queue` (in-process use) falls back to its queue-entry time, else `now_s`."""
    stamped = getattr(req, FIRST_ARRIVAL_ATTR, None)
    return stamped if stamped is not None else (req.time_stats.wait_queue_entry_time or now_s)


def normalised_priority(req, low_values_first: bool) -> int:
    """Core convention: higher = more urgent. Upstream's --schedule-low-priority-values-first flips it."""
    p = req.priority if req.priority is not None else 0
    return -p if low_values_first else p


@dataclass
class PreemptionCounts:
    """Preemptions made by the PrefillAdders of one scheduler (read by tests and the log line)."""

    slots: int = 0
    kv: int = 0
    victims: int = 0


@dataclass
class PolicyState:
    """One prefix-aging SchedulePolicy's own state: the tier config it was built with, its priority direction, its
    LS overtake budget (kept across steps), and the preemptions made for it."""

    config: RequestTierConfig
    low_values_first: bool
    overtake: LsOvertakeBudget
    preemptions: PreemptionCounts = field(default_factory=PreemptionCounts)

    @classmethod
    def build(cls, config: RequestTierConfig, low_values_first: bool) -> "PolicyState":
        return cls(config, bool(low_values_first),
                   LsOvertakeBudget(config.ls_overtake_burst, config.ls_overtakes_per_promoted, config.aging_cap_s))

    def priority(self, req) -> int:
        return normalised_priority(req, self.low_values_first)

    def is_ls(self, req) -> bool:
        return self.config.is_latency_sensitive(self.priority(req))


def policy_state(policy) -> Optional[PolicyState]:
    """The PolicyState of an upstream SchedulePolicy, None unless it was built with prefix-aging. getattr: a
    policy made with `SchedulePolicy.__new__` (no __init__, so our hook never ran) or a test double has no such
    attribute, or answers anything."""
    state = getattr(policy, POLICY_ATTR, None)
    return state if isinstance(state, PolicyState) else None


@dataclass
class LockstepCounters:
    gathers: int = 0
    gathers_with_ls: int = 0
    same_step_reduces: int = 0
    same_step_reduces_with_ls: int = 0
    be_chunks_capped: int = 0
    be_chunks_capped_by_group: int = 0
    be_admissions_capped: int = 0
    # the priced cap's decisions where the fixed rule would cap (BE chunk or BE admission while LS work waits):
    # kept = priced as paying, dropped = not paying, so not capped (request/lockstep.note_priced)
    priced_caps_kept: int = 0
    priced_caps_dropped: int = 0


@dataclass
class LockstepState:
    """The lockstep "LS work waiting" signal of this process's scheduler (request/lockstep.py).

    enabled / low_values_first: None follows upstream's resolved schedule config, read at each use
    (`--schedule-policy prefix-aging`, `--schedule-low-priority-values-first`: the same on every rank, so every
    rank's MLP-sync row has the same width); True/False set them explicitly (in-process use without a server)."""

    config: RequestTierConfig
    signal: LockstepLsSignal
    enabled: Optional[bool] = None
    low_values_first: Optional[bool] = None
    scheduler: Optional[weakref.ref] = None  # the scheduler whose get_next_batch_to_run runs in this process
    iteration: int = 0
    local_ls: int = 0
    group_ls: int = 0
    gathered_at: int = -1
    same_step_decided: bool = False  # same_step_group is decided once, at the first iteration
    same_step_group: object = None  # the process group of the same-step all-reduce, None: no reduce
    same_step_ranks: int = 0  # DP ranks in that group
    same_step_ls: int = 0
    reduced_at: int = -1
    source: str = "hold"
    counters: LockstepCounters = field(default_factory=LockstepCounters)

    @classmethod
    def fresh(cls, config: RequestTierConfig) -> "LockstepState":
        return cls(config, LockstepLsSignal(config))


@dataclass
class RequestTierState:
    """The request tier in one process: its configuration (from tiersched's config at plugin registration) and
    this process's lockstep signal."""

    config: RequestTierConfig = field(default_factory=RequestTierConfig)
    lockstep: LockstepState = field(default_factory=lambda: LockstepState.fresh(RequestTierConfig()))

    def configure(self, config: RequestTierConfig) -> None:
        config.validate()
        self.config = config
        self.lockstep = LockstepState.fresh(config)


STATE = RequestTierState()
