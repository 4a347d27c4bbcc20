"""Request tier: aging priority + prefix-aware shortest-uncached-prefill ordering + LS preemption.

CONTRACT (kept stable; the simulator and the SGLang adapter code against it). Priorities are normalised by
the adapter so that a HIGHER integer is MORE urgent (upstream's default; `--schedule-low-priority-values-first`
is flipped by the adapter).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence


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
    kv_tokens: int  # KV slots it holds now (freed if preempted)
    computed_tokens: int  # tokens whose KV is computed (kept in the radix cache on preemption)


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

    def validate(self) -> None:
        pass
