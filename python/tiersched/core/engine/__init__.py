"""Engine tier: score-based DP dispatch (filters -> weighted scorers -> picker).

CONTRACT (kept stable; the simulator and the DP-controller adapter code against it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, Sequence


@dataclass(frozen=True, slots=True)
class RankLoad:
    """What one DP rank's scheduler publishes (a superset of upstream's shared-memory load snapshot)."""

    rank: int
    active: bool = True  # upstream status/active set; inactive ranks never receive requests
    kv_capacity_tokens: int = 0
    kv_used_tokens: int = 0
    remaining_prefill_tokens: int = 0  # uncached waiting work + what is left of chunked prefills
    queue_len: int = 0  # waiting requests
    running_reqs: int = 0
    running_decode_tokens: int = 0  # sum of context lengths of running decodes (KV read per step)
    expert_pressure: float = 1.0  # MoE load this rank's experts carry / mean (expert tier); 1.0 = neutral
    timestamp_s: float = 0.0
    waiting_tokens: int = 0  # prompt tokens of waiting requests, cached or not (upstream total_tokens' share)


@dataclass(frozen=True, slots=True)
class DispatchRequest:
    rid: str
    input_tokens: int
    prefix_blocks: tuple[int, ...] = ()  # hashes of the prompt's full KV pages, chained (page i covers 0..i)
    session_key: str | None = None  # user/session id for stickiness
    priority: int = 0


@dataclass(slots=True)
class Decision:
    rank: int
    expected_cached_tokens: int = 0
    scores: dict[int, dict[str, float]] = field(default_factory=dict)  # rank -> scorer -> weighted score
    filtered: dict[int, str] = field(default_factory=dict)  # rank -> why it was not a candidate


class Dispatcher(Protocol):
    def update_loads(self, loads: Sequence[RankLoad], now_s: float) -> None:
        """A fresh snapshot from the ranks (replaces optimistic estimates made since the last one)."""

    def pick(self, req: DispatchRequest, now_s: float) -> Decision:
        """Choose a rank and account for the request optimistically until the next snapshot."""


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
    block_tokens: int = 32  # tokens per prefix-index page (prompt pages are hashed at this size)
    max_blocks_per_rank: int = 32768  # memory bound of the prefix index per rank (LRU beyond it)
    kv_overload_fraction: float = 0.95  # a rank at or above this KV use is filtered out (unless all are)
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
