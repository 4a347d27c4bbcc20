"""Engine tier: which DP rank gets each request (the DP controller's choice).

This module is the tier's interface: the snapshot a rank publishes (RankLoad), the request as the dispatcher sees
it (DispatchRequest), its answer (Decision), the `Dispatcher` ABC every policy implements, and EngineTierConfig.
Policies: score.ScoreDispatcher (tiersched's), upstream.* (SGLang's --load-balance-method choices, vLLM's DP
balancer). The simulator and the DP-controller adapter call only what `Dispatcher` declares.
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import ClassVar, Mapping, Sequence

from tiersched.core.request.step_plan import StepTimeModel


@dataclass(frozen=True, slots=True)
class RankLoad:
    """What one DP rank's scheduler publishes (a superset of upstream's shared-memory load snapshot)."""

    rank: int
    active: bool = True  # upstream's per-rank status; upstream's total_requests/total_tokens do not read it
    kv_capacity_tokens: int = 0
    kv_used_tokens: int = 0
    remaining_prefill_tokens: int = 0  # uncached waiting work + what is left of chunked prefills
    queue_len: int = 0  # waiting requests
    running_reqs: int = 0
    running_decode_tokens: int = 0  # sum of context lengths of running decodes (KV read per step)
    expert_pressure: float = 1.0  # load of the ranks this rank's tokens go to / mean (core.expert.metrics); 1 = neutral
    timestamp_s: float = 0.0
    waiting_tokens: int = 0  # prompt tokens of waiting requests, cached or not (upstream total_tokens' share)


@dataclass(frozen=True, slots=True)
class DispatchRequest:
    rid: str
    input_tokens: int
    # keys of the prompt's full KV pages, chained (page i covers 0..i): a tuple of ints, or the same keys packed
    # (prefix_index.PageKeys, what the DP-controller adapter builds)
    prefix_blocks: Sequence[int] = ()
    session_key: str | None = None  # user/session id for stickiness
    priority: int = 0


@dataclass(slots=True)
class Decision:
    rank: int
    expected_cached_tokens: int = 0
    scores: Mapping[int, Mapping[str, float]] = field(default_factory=dict)  # rank -> scorer -> weighted score
    filtered: dict[int, str] = field(default_factory=dict)  # rank -> why it was not a candidate


@dataclass(frozen=True)
class LockstepGroup:
    """The DP ranks run every forward step in lockstep (DP attention with more than one rank): a step lasts as long
    as the slowest rank. How the dispatcher prices such a step: `model` (the step planner's step-time model of the
    deployment, core.request.step_plan), prefill chunks of `chunk_tokens` per rank and step (upstream's
    chunked_prefill_size), and whether a prefilling rank's running decodes ride in its prefill step
    (--enable-mixed-chunk)."""

    model: StepTimeModel
    chunk_tokens: int
    mixed_chunk: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.model, StepTimeModel):
            raise TypeError(f"LockstepGroup.model must be a StepTimeModel (core.request.step_plan), got "
                            f"{type(self.model).__name__}.")
        if self.chunk_tokens < 1:
            raise ValueError(f"LockstepGroup.chunk_tokens is {self.chunk_tokens}; give the prefill chunk size (>= 1).")


class Dispatcher(abc.ABC):
    """A DP dispatch policy over `num_ranks` ranks: snapshots in, one rank per request out.

    Call order: `update_loads` whenever the caller reads the ranks' snapshots (the simulator and the adapter do it
    at most every `snapshot_refresh_s`, as upstream's DataParallelController.refresh_load_budget), then `pick` once
    per request. Between snapshots a dispatcher accounts for its own picks (optimistic updates), so a burst does
    not herd onto the rank that looked idlest. Subclasses set `name` (the registry and report name) and take the
    rank count as their first constructor argument.
    """

    name: ClassVar[str]

    @abc.abstractmethod
    def update_loads(self, loads: Sequence[RankLoad], now_s: float) -> None:
        """Take the ranks' snapshots (any subset of ranks). A snapshot whose `timestamp_s` equals the last one seen
        from that rank is the same publication read again: it holds none of the picks made since."""

    @abc.abstractmethod
    def pick(self, req: DispatchRequest, now_s: float) -> Decision:
        """Choose a rank and account for the request optimistically until a newer snapshot covers it.
        Raises RuntimeError when no rank can take it."""

    def record(self, rank: int, req: DispatchRequest, now_s: float) -> int:
        """A request someone else sent to `rank` (upstream's explicit `routed_dp_rank`); returns the cached tokens
        the dispatcher expected there. Default: nothing to account (upstream's DPBudget ignores such requests)."""
        return 0

    def forget_cache(self, rank: int | None = None) -> None:
        """The rank's (or every rank's) prefix cache was flushed. Default: nothing to forget (no cache model)."""

    def wants_lockstep(self) -> bool:
        """Whether this dispatcher prices lockstep steps (so the caller builds a `LockstepGroup` for it; building
        one fits a step-time model). Default: False."""
        return False

    def set_lockstep(self, group: LockstepGroup | None) -> None:
        """Whether the ranks run in lockstep and how a step is priced (None: they do not: one rank, or no DP
        attention). The caller that knows the deployment (simulator, DP-controller adapter) sets it once before
        dispatching. Default: ignored, this dispatcher has no lockstep term."""

    def pending_work(self) -> list[int] | None:
        """Per-rank uncached prefill tokens the dispatcher believes are queued (last snapshot plus its own picks),
        for the imbalance metric. Default: None, this dispatcher keeps no such estimate."""
        return None


@dataclass(frozen=True)
class EngineTierConfig:
    """Tunables of this tier: section [engine] of the TIERSCHED_CONFIG file (see tiersched.config).
    Every field has a default; validate() raises ValueError with one sentence saying what to fix.

    Every weight turns its scorer's raw value into prefill-token equivalents (docs/engine-tier.md).
    """

    weight_prefill: float = 1.0  # per uncached prefill token already queued on the rank (incl. optimistic)
    weight_prefix: float = 2.0  # per token of THIS request the rank does not have cached (a hit also saves cluster work)
    weight_decode: float = 0.1  # per context token of the rank's running decodes (KV read every step)
    weight_kv: float = 0.02  # per KV token in use, scaled to a mean-capacity rank
    weight_queue: float = 8.0  # per request waiting or running on the rank (fixed per-request overhead)
    weight_expert: float = 0.5  # per (expert_pressure - 1) x tokens this rank will prefill
    weight_session: float = 1.0  # per context token of the request's session cached on its sticky rank
    # per prefill-token equivalent of lockstep stall the request's prefill on the rank would add to the group's
    # steps (0 without lockstep: one rank or no DP attention; docs/engine-tier.md "Lockstep stall")
    weight_stall: float = 0.0
    block_tokens: int = 32  # tokens per prefix-index page (prompt pages are hashed at this size)
    max_blocks_per_rank: int = 32768  # memory bound of the prefix index per rank (LRU beyond it)
    kv_overload_fraction: float = 0.95  # a rank at or above this KV use is filtered out (unless all are)
    tie_tokens: float = 1.0  # costs less than this above the lowest are a tie, won by the rank holding fewest pages
    max_sessions: int = 100_000  # session -> rank entries kept (LRU)
    optimistic_grace_s: float = 0.01  # keep optimistic charges this long past a snapshot's timestamp
    snapshot_refresh_s: float = 0.02  # adapter: read the ranks' load snapshot at most this often (upstream: 20 ms)
    drain_ranks: str = ""  # adapter: comma list of DP ranks marked inactive at start (receive nothing)

    def weights(self) -> dict[str, float]:
        return {
            "prefill": self.weight_prefill,
            "prefix": self.weight_prefix,
            "decode": self.weight_decode,
            "kv": self.weight_kv,
            "queue": self.weight_queue,
            "expert": self.weight_expert,
            "session": self.weight_session,
            "stall": self.weight_stall,
        }

    def drained(self) -> tuple[int, ...]:
        return tuple(int(x) for x in self.drain_ranks.replace(" ", "").split(",") if x)

    def validate(self) -> None:
        for name, value in self.weights().items():
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"weight_{name} is {value!r}; set it to a finite number >= 0.")
        if not any(self.weights().values()):
            raise ValueError("all weights are 0; give at least one scorer a positive weight.")
        if self.block_tokens < 1:
            raise ValueError(f"block_tokens is {self.block_tokens}; set it to a positive page size in tokens.")
        if self.max_blocks_per_rank < 1 or self.max_sessions < 1:
            raise ValueError("max_blocks_per_rank and max_sessions must be at least 1.")
        if not (math.isfinite(self.tie_tokens) and self.tie_tokens >= 0):
            raise ValueError(f"tie_tokens is {self.tie_tokens!r}; set it to a finite number of tokens >= 0.")
        if not (0.0 < self.kv_overload_fraction <= 1.0):
            raise ValueError(f"kv_overload_fraction is {self.kv_overload_fraction}; use a fraction in (0, 1].")
        if not (self.optimistic_grace_s >= 0 and self.snapshot_refresh_s >= 0):
            raise ValueError("optimistic_grace_s and snapshot_refresh_s must be >= 0 seconds.")
        try:
            drained = self.drained()
        except ValueError:
            raise ValueError(f"drain_ranks is {self.drain_ranks!r}; use a comma list of DP rank numbers.") from None
        if any(r < 0 for r in drained):
            raise ValueError(f"drain_ranks is {self.drain_ranks!r}; DP ranks are >= 0.")
