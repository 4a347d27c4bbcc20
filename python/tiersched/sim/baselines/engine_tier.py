"""Engine-tier baselines: upstream SGLang's DP-controller dispatch methods and vLLM's DP balancer.

Mirrors `sglang/srt/managers/data_parallel_controller.py`: DataParallelController.round_robin_scheduler,
DPBudget.update_budget / DPBudget.dispatch for total_requests and total_tokens (optimistic +1 request / +input
tokens until the next snapshot; the controller refreshes at most every 20 ms: refresh_load_budget). vLLM:
`vllm/v1/engine/core_client.py` DPLBAsyncMPClient.get_core_engine_for_request, score = 4 * waiting + running.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from tiersched.core.engine import Decision, DispatchRequest, RankLoad


@dataclass(frozen=True, slots=True)
class SimRankLoad(RankLoad):
    """RankLoad plus upstream's num_total_tokens ingredient: prompt tokens of waiting requests (seqlen)."""

    waiting_prompt_tokens: int = 0


class _SnapshotDispatcher:
    def __init__(self) -> None:
        self.active: list[int] = []
        self.requests: dict[int, float] = {}
        self.tokens: dict[int, float] = {}

    def update_loads(self, loads: Sequence[RankLoad], now_s: float) -> None:
        self.active = [l.rank for l in loads if l.active]
        for l in loads:
            self.requests[l.rank] = l.running_reqs + l.queue_len
            self.tokens[l.rank] = l.kv_used_tokens + getattr(l, "waiting_prompt_tokens", l.remaining_prefill_tokens)


class RoundRobinDispatcher(_SnapshotDispatcher):
    """`--load-balance-method round_robin`: next active rank in turn."""

    name = "round_robin"

    def __init__(self) -> None:
        super().__init__()
        self.counter = 0

    def pick(self, req: DispatchRequest, now_s: float) -> Decision:
        rank = self.active[self.counter % len(self.active)]
        self.counter = (self.counter + 1) % len(self.active)
        return Decision(rank=rank)


class TotalRequestsDispatcher(_SnapshotDispatcher):
    """`total_requests`: DPBudget.dispatch, min running+waiting (first index on ties), then +1 optimistically."""

    name = "total_requests"

    def pick(self, req: DispatchRequest, now_s: float) -> Decision:
        rank = min(self.active, key=lambda r: (self.requests[r], r))
        self.requests[rank] += 1
        self.tokens[rank] += req.input_tokens
        return Decision(rank=rank)


class TotalTokensDispatcher(_SnapshotDispatcher):
    """`total_tokens`: DPBudget.dispatch, min (num_total_tokens, total_requests), then + input tokens."""

    name = "total_tokens"

    def pick(self, req: DispatchRequest, now_s: float) -> Decision:
        rank = min(self.active, key=lambda r: (self.tokens[r], self.requests[r], r))
        self.requests[rank] += 1
        self.tokens[rank] += req.input_tokens
        return Decision(rank=rank)


class VLLMDPDispatcher(_SnapshotDispatcher):
    """vLLM's DP load balancer: min 4 * waiting + running over engines' published counts, +4 optimistically
    (the request counts as waiting until the next stats update)."""

    name = "vllm-dp"

    def update_loads(self, loads: Sequence[RankLoad], now_s: float) -> None:
        super().update_loads(loads, now_s)
        self.score = {l.rank: 4 * l.queue_len + l.running_reqs for l in loads}

    def pick(self, req: DispatchRequest, now_s: float) -> Decision:
        rank = min(self.active, key=lambda r: (self.score[r], r))
        self.score[rank] += 4
        return Decision(rank=rank)
