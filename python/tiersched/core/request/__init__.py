"""Request tier (each SGLang scheduler): how one rank orders, admits and preempts its waiting requests.

This module is the tier's interface and imports none of its submodules: the snapshots a policy sees
(`WaitingRequest`, `RunningRequest`), the tunables (`RequestTierConfig`), the wait bound, and the two policy ABCs.
Every method the simulator (tiersched.sim.rank) or the SGLang adapter calls on a policy is declared here; a
policy overrides only what it uses.

  ordering.py       prefix-aging: `order_keys`, `AgingPrefixOrdering`
  preemption.py     `LatencySensitivePreemption`
  overtake.py       `LsOvertakeBudget`: how many LS requests may go ahead of promoted ones
  lockstep.py       LS protection under lockstep steps: `chunk_token_limit`, `be_admission_budget`, `LockstepLsSignal`
  step_plan.py      the DP-attention group's per-step prefill budgets: `plan_step`, `StepTimeModel`, `fit_roofline`
  upstream.py       upstream SGLang's orderings (fcfs, fcfs-priority, lpm, hrrn, shortest-prefill-first, lof,
                    lof-priority, random) and its priority preemption: the only copy, used by the simulator, the
                    benchmarks and the tests
  single_server.py  one non-preemptive server running an ordering: the model behind the wait-bound proof
  prefill_delayer.py  upstream's DP-attention prefill alignment (--enable-prefill-delayer): its per-pass decision

Priorities are normalised by the adapter so that a HIGHER integer is MORE urgent (upstream's default;
`--schedule-low-priority-values-first` is flipped by the adapter).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Sequence


@dataclass(frozen=True, slots=True)
class WaitingRequest:
    rid: str
    priority: int  # higher = more urgent
    arrival_s: float  # first arrival: kept when the request is preempted or retracted and re-queued (it ages)
    input_tokens: int
    cached_tokens: int = 0  # prefix already in this rank's radix cache when ordering runs
    shares_inflight_prefix: bool = False  # an uncached prefix it shares is being prefilled now: defer (LPM-like)
    # When it last entered the waiting queue (upstream's time_stats.wait_queue_entry_time): its arrival, or the
    # time it was re-queued after a preemption or retraction. None: never re-queued, same as arrival_s.
    queue_entry_s: float | None = None
    # Output tokens generated before a preemption or retraction; counted in input_tokens, which they re-enter as
    # prompt to recompute (upstream keeps them apart: origin_input_ids vs output_ids).
    generated_tokens: int = 0
    max_new_tokens: int = 0  # its output budget (upstream sampling_params.max_new_tokens; 0 = not known)

    @property
    def entry_s(self) -> float:
        return self.arrival_s if self.queue_entry_s is None else self.queue_entry_s


@dataclass(frozen=True, slots=True)
class RunningRequest:
    rid: str
    priority: int
    arrival_s: float  # first arrival, as WaitingRequest.arrival_s
    kv_tokens: int  # KV slots it holds now plus its reserved future decode (freed if preempted)
    computed_tokens: int  # tokens whose KV is computed (kept in the radix cache on preemption)
    # Future decode tokens the admission budget reserves for it (upstream PrefillAdder.
    # _get_running_request_total_token_offset: remaining max_new_tokens x new_token_ratio); part of kv_tokens.
    reserved_tokens: float = 0.0
    queue_entry_s: float | None = None  # when it last entered the waiting queue (None: arrival_s)
    # Times it was already preempted or retracted (upstream Req.retraction_count); a request that reached
    # `max_preemptions_per_request` is no longer a victim.
    preemptions: int = 0

    @property
    def entry_s(self) -> float:
        return self.arrival_s if self.queue_entry_s is None else self.queue_entry_s


@dataclass(frozen=True, slots=True)
class RankLoad:
    """One rank when it sizes a step's prefill: what pricing a best-effort cap reads beside the waiting queue
    (core/request/lockstep.py `LsCapPricing`). decode_count / decode_context: its running requests and their
    context tokens; waiting_requests: requests in its waiting queue; upstream_budget: its uncapped per-step
    prefill budget (upstream's chunked_prefill_size)."""

    decode_count: int = 0
    decode_context: int = 0
    waiting_requests: int = 0
    upstream_budget: int = 0


class OrderingPolicy(ABC):
    """Orders one rank's waiting queue each scheduling step (upstream SchedulePolicy.calc_priority).

    One instance per waiting queue (the simulator deep-copies a policy object per rank), so an ordering may
    keep state between steps. Only `order` is required; the hooks below default to "no opinion".
    """

    name: ClassVar[str] = ""  # registry / report name (tiersched.sim.policies)

    # Requests with priority >= ls_priority are latency-sensitive (LS), the rest best-effort (BE); None: the
    # ordering tells no LS class apart (then `be_admission_tokens` is never asked, and no LS signal is counted).
    ls_priority: int | None = None

    # None: the ordering reads no lockstep (DP-attention) LS signal. 0 or 1: each step the simulator publishes
    # the largest LS-waiting count of any rank of the group, passes it through `observe_group_ls_waiting` and
    # hands the result to `chunk_limit` / `be_admission_tokens` as `group_ls_waiting`: 0 = counted before batch
    # formation and used in the same step, 1 = counted after batch formation (upstream's MLP-sync all-gather)
    # and used in the next one.
    lockstep_signal_lag_steps: int | None = None

    # True when `chunk_limit` can return a cap. The simulator then orders the queue before it sizes the running
    # chunked prefill (the cap depends on who waits, in order); otherwise it orders only when admitting.
    limits_chunks: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "chunk_limit" in cls.__dict__ and not cls.limits_chunks:
            raise TypeError(f"{cls.__name__} overrides chunk_limit, so it must set limits_chunks = True.")

    @abstractmethod
    def order(self, waiting: Sequence[WaitingRequest], now_s: float) -> list[int]:
        """Indices into `waiting`, most urgent first (a permutation of range(len(waiting)))."""

    def is_latency_sensitive(self, priority: int) -> bool:
        return self.ls_priority is not None and priority >= self.ls_priority

    def set_step_model(self, model, full_sequence_attention: bool = False, group_ranks: int = 1) -> None:
        """The deployment's step-time model (core/request/step_plan.StepTimeModel; None: none known) for orderings
        that price their caps with it; `full_sequence_attention`: the prefill backend attends each chunk over its
        whole sequence; group_ranks: ranks in the lockstep group. Called by the simulator for a DP-attention group
        and by the adapter. Default: ignored."""

    def chunk_limit(self, chunked_priority: int, chunked_remaining: int, waiting_uncached: Sequence[tuple[int, int]],
                    budget: int, page_size: int, group_ls_waiting: int = 0, load: RankLoad | None = None,
                    chunked_prefix: int = 0) -> int | None:
        """Tokens the running chunked prefill may advance this step, or None for no cap beyond `budget`
        (upstream SchedulePolicy.shortest_prefill_chunk_limit). chunked_priority / chunked_remaining: the
        request being chunk-prefilled; waiting_uncached: (priority, uncached tokens) of the waiters, in this
        step's order; budget: the step's chunk budget; group_ls_waiting: see `lockstep_signal_lag_steps`;
        load: this rank now (None: not known); chunked_prefix: the chunked request's computed tokens.
        Only called when `limits_chunks` is set."""
        return None

    def be_admission_tokens(self, local_ls_waiting: int, group_ls_waiting: int, be_tokens_this_step: int,
                            load: RankLoad | None = None, request_tokens: int = 0, request_prefix: int = 0,
                            step_tokens: int = 0, room_tokens: int | None = None) -> int | None:
        """Prefill tokens a BE request newly admitted this step may take (None: no cap; 0: admit no BE now).
        local_ls_waiting: LS requests waiting on this rank; be_tokens_this_step: BE tokens already in the batch;
        load: this rank now (None: not known); request_tokens / request_prefix: the request's uncached and cached
        tokens; step_tokens: all prefill tokens already in the batch; room_tokens: the budget left uncapped.
        Only called when `ls_priority` is set."""
        return None

    def observe_prefill_tokens(self, tokens: int) -> None:
        """Prefill tokens the rank processed in the step that just ended (upstream's `processed_tokens`)."""

    def observe_enqueue(self, rid: str, now_s: float) -> None:
        """`rid` entered the waiting queue (on arrival, or re-queued after a preemption or retraction), as
        upstream's Scheduler._add_request_to_queue stamps it."""

    def observe_group_ls_waiting(self, group_ls_waiting: int, now_s: float) -> int:
        """The group LS-waiting value this step's hooks use, given the largest count any rank of the lockstep
        group published; called once per step when `lockstep_signal_lag_steps` is set."""
        return group_ls_waiting


class PreemptionPolicy(ABC):
    """Chooses running requests to preempt so a waiting request fits (upstream PrefillAdder.preempt_to_schedule)."""

    name: ClassVar[str] = ""

    # False: asked only when every running slot is taken (upstream's rule), never on a KV-only shortage.
    preempts_on_kv_shortage: ClassVar[bool] = True

    @abstractmethod
    def choose_victims(self, candidate: WaitingRequest, running: Sequence[RunningRequest], slots_short: int,
                       kv_tokens_short: int, now_s: float) -> list[str] | None:
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
    # A request preempted or retracted this many times is not chosen as a victim again: victims are taken newest
    # first, so without a bound the same request could be picked every time an LS request needs room.
    max_preemptions_per_request: int = 3
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
    # Price the LS cap with the deployment's step-time model where one is known (core/request/lockstep.py,
    # `ls_cap_pays`): BE prefill is capped only when the LS stall saved outweighs the cost of the extra, shorter
    # steps (decodes sitting out, the fixed cost of a step, later chunks re-reading the prompt). False: always cap.
    ls_cap_pricing: bool = True
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
    # Lockstep step planning (core/request/step_plan.py, docs/lockstep.md): under DP attention the group plans
    # each rank's prefill budget per step from every rank's summary. Off until the sweep shows it never loses.
    step_plan: bool = False
    plan_ls_weight: float = 8.0  # one waiting LS request counts as this many waiting requests in the plan's cost
    plan_decode_weight: float = 0.1  # a running request's second of decode delay against a waiting one's
    plan_align_weight: float = 1.0  # > 0: the plan keeps a prefill small while other ranks have none (alignment)
    # > 0: the plan may hold every rank's prefill for a step while some ranks have none, when the predicted
    # lockstep stall saved outweighs the waiting requests' added wait; never once a rank's oldest waiting request
    # has waited this long (0: never hold)
    plan_hold_s: float = 0.0

    def validate(self) -> None:
        if not (math.isfinite(self.aging_rate) and self.aging_rate >= 0):
            raise ValueError(f"aging_rate must be a finite number >= 0 (priority levels per second), got {self.aging_rate!r}.")
        if not (math.isfinite(self.aging_cap_s) and self.aging_cap_s > 0):
            raise ValueError(f"aging_cap_s must be a finite number of seconds > 0, got {self.aging_cap_s!r}.")
        if not (math.isfinite(self.token_credit_per_s) and self.token_credit_per_s >= 0):
            raise ValueError(f"token_credit_per_s must be a finite number >= 0, got {self.token_credit_per_s!r}.")
        if self.preemption_threshold < 0:
            raise ValueError(f"preemption_threshold must be >= 0, got {self.preemption_threshold!r}.")
        if not (isinstance(self.max_preemptions_per_request, int) and self.max_preemptions_per_request >= 0):
            raise ValueError("max_preemptions_per_request must be an integer >= 0 (0: never preempt), "
                             f"got {self.max_preemptions_per_request!r}.")
        if self.min_chunk_tokens < 1:
            raise ValueError(f"min_chunk_tokens must be >= 1, got {self.min_chunk_tokens!r}.")
        if not (math.isfinite(self.ls_hold_s) and self.ls_hold_s >= 0):
            raise ValueError(f"ls_hold_s must be a finite number of seconds >= 0, got {self.ls_hold_s!r}.")
        if not isinstance(self.ls_cap_pricing, bool):
            raise ValueError(f"ls_cap_pricing must be true or false, got {self.ls_cap_pricing!r}.")
        if not isinstance(self.same_step_signal, bool):
            raise ValueError(f"same_step_signal must be true or false, got {self.same_step_signal!r}.")
        if not (isinstance(self.ls_overtake_burst, int) and self.ls_overtake_burst >= 0):
            raise ValueError(f"ls_overtake_burst must be an integer >= 0 (LS requests), got {self.ls_overtake_burst!r}.")
        if not (math.isfinite(self.ls_overtakes_per_promoted) and self.ls_overtakes_per_promoted >= 0):
            raise ValueError("ls_overtakes_per_promoted must be a finite number >= 0, "
                             f"got {self.ls_overtakes_per_promoted!r}.")
        if not isinstance(self.step_plan, bool):
            raise ValueError(f"step_plan must be true or false, got {self.step_plan!r}.")
        if not (math.isfinite(self.plan_ls_weight) and self.plan_ls_weight >= 1):
            raise ValueError(f"plan_ls_weight must be a finite number >= 1, got {self.plan_ls_weight!r}.")
        if not (math.isfinite(self.plan_decode_weight) and self.plan_decode_weight >= 0):
            raise ValueError(f"plan_decode_weight must be a finite number >= 0, got {self.plan_decode_weight!r}.")
        if not (math.isfinite(self.plan_align_weight) and self.plan_align_weight >= 0):
            raise ValueError(f"plan_align_weight must be a finite number >= 0, got {self.plan_align_weight!r}.")
        if not (math.isfinite(self.plan_hold_s) and self.plan_hold_s >= 0):
            raise ValueError(f"plan_hold_s must be a finite number of seconds >= 0, got {self.plan_hold_s!r}.")
        if self.be_chunk_tokens < self.min_chunk_tokens:
            raise ValueError(
                f"be_chunk_tokens ({self.be_chunk_tokens}) must be >= min_chunk_tokens ({self.min_chunk_tokens})."
            )

    def is_latency_sensitive(self, priority: int) -> bool:
        return priority >= self.ls_priority


def wait_bound_s(aging_cap_s: float, max_step_s: float, older_backlog_s: float, overtakes: float = 0.0,
                 max_ls_service_s: float = 0.0) -> float:
    """Upper bound on a request's queueing wait under prefix-aging (docs/request-tier.md, Theorem 1).

    aging_cap_s: config cap; max_step_s: the longest single scheduling step (non-preemptive service);
    older_backlog_s: service time of requests that arrived earlier and still wait when this one is promoted;
    overtakes: LS requests allowed to overtake it after its promotion (`max_overtakes`); max_ls_service_s: the
    longest LS service.
    """
    return aging_cap_s + max_step_s + older_backlog_s + overtakes * max_ls_service_s


def max_overtakes(config: RequestTierConfig, promoted_ahead: int) -> float:
    """LS requests that can overtake a promoted request: the burst plus `ls_overtakes_per_promoted` per promoted
    request admitted before it (those are older, so part of its backlog)."""
    return config.ls_overtake_burst + config.ls_overtakes_per_promoted * promoted_ahead
