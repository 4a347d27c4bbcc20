"""Engine tier: score-based DP dispatch (filters -> weighted scorers -> picker).

CONTRACT (kept stable; the simulator and the DP-controller adapter code against it).
"""
from __future__ import annotations

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


class Dispatcher(Protocol):
    def update_loads(self, loads: Sequence[RankLoad], now_s: float) -> None:
        """A fresh snapshot from the ranks (replaces optimistic estimates made since the last one)."""

    def pick(self, req: DispatchRequest, now_s: float) -> Decision:
        """Choose a rank and account for the request optimistically until the next snapshot."""


@dataclass(frozen=True)
class DispatchConfig:
    """Tunables of this tier: section [engine] of the TIERSCHED_CONFIG file (see tiersched.config).
    Every field has a default; validate() raises ValueError with one sentence saying what to fix."""

    def validate(self) -> None:
        pass
