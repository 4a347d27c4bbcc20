"""Upstream SGLang's DP dispatch methods over our snapshots, for the simulator and for comparisons.

Faithful mirrors of sglang 0.5.23 `sglang/srt/managers/data_parallel_controller.py`:
- RoundRobinDispatcher: `DataParallelController.round_robin_scheduler` (counter over the active workers,
  skipping ranks whose status is down).
- TotalRequestsDispatcher / TotalTokensDispatcher: `DPBudget.update_budget` + `DPBudget.dispatch`
  (running + waiting requests, or `num_total_tokens` = KV tokens in use + waiting prompt tokens; the chosen
  rank gets +1 request and +input tokens until the next snapshot with a new timestamp; ties to the lowest
  index, TOTAL_TOKENS breaking ties on total requests). Upstream's load-aware methods do not look at the
  status list; like upstream they may pick an inactive rank.
"""
from __future__ import annotations

from typing import Sequence

from tiersched.core.engine import Decision, DispatchRequest, RankLoad


class RoundRobinDispatcher:
    def __init__(self, num_ranks: int) -> None:
        self.num_ranks = num_ranks
        self.active = [True] * num_ranks
        self.counter = 0

    def update_loads(self, loads: Sequence[RankLoad], now_s: float) -> None:
        for load in loads:
            self.active[load.rank] = load.active

    def pick(self, req: DispatchRequest, now_s: float) -> Decision:
        # upstream iterates its active-worker list (all launched ranks unless elastic EP) and skips status-down ones
        for _ in range(self.num_ranks):
            rank = self.counter % self.num_ranks
            self.counter = (self.counter + 1) % self.num_ranks
            if self.active[rank]:
                return Decision(rank=rank)
        raise RuntimeError("no active DP rank to dispatch to")


class _BudgetDispatcher:
    """DPBudget: per-rank totals refreshed from snapshots (stale timestamps skipped), bumped on dispatch."""

    def __init__(self, num_ranks: int) -> None:
        self.num_ranks = num_ranks
        self.total_requests = [0] * num_ranks
        self.total_tokens = [0] * num_ranks
        self.last_timestamp = [0.0] * num_ranks

    def update_loads(self, loads: Sequence[RankLoad], now_s: float) -> None:
        for load in loads:
            if load.timestamp_s == self.last_timestamp[load.rank]:
                continue
            self.last_timestamp[load.rank] = load.timestamp_s
            self.total_requests[load.rank] = load.running_reqs + load.queue_len
            # upstream num_total_tokens: KV tokens in use + prompt tokens of waiting requests
            self.total_tokens[load.rank] = load.kv_used_tokens + load.waiting_tokens

    def _bump(self, rank: int, req: DispatchRequest, tokens: int) -> Decision:
        self.total_requests[rank] += 1
        self.total_tokens[rank] += tokens
        return Decision(rank=rank)


class TotalRequestsDispatcher(_BudgetDispatcher):
    def pick(self, req: DispatchRequest, now_s: float) -> Decision:
        rank = self.total_requests.index(min(self.total_requests))
        return self._bump(rank, req, 0)


class TotalTokensDispatcher(_BudgetDispatcher):
    def pick(self, req: DispatchRequest, now_s: float) -> Decision:
        rank = min(range(self.num_ranks), key=lambda i: (self.total_tokens[i], self.total_requests[i]))
        return self._bump(rank, req, req.input_tokens)


BASELINES = {
    "round_robin": RoundRobinDispatcher,
    "total_requests": TotalRequestsDispatcher,
    "total_tokens": TotalTokensDispatcher,
}
