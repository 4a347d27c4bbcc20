"""Upstream DP dispatch over our snapshots: the one copy tiersched has, used by the simulator, `bench engine` and
the tests (differential tests against upstream's own DPBudget and round_robin_scheduler: test/core/test_engine_upstream.py).

SGLang 0.5.23 `sglang/srt/managers/data_parallel_controller.py`, `--load-balance-method`:
- round_robin: `DataParallelController.round_robin_scheduler`. A counter over the launched ranks (`_active_workers`,
  every rank unless elastic EP shrinks it) that skips ranks whose status is down (RankLoad.active False); all down
  is an error. Status comes with every RankLoad, whatever its timestamp.
- total_requests / total_tokens: `DPBudget.update_budget` + `DPBudget.dispatch`. A snapshot whose timestamp equals
  the last one taken from that rank is skipped (the scheduler has not republished, so the optimistic bumps since
  stay). total_requests = running + waiting; total_tokens = `num_total_tokens` = KV tokens in use + prompt tokens
  of waiting requests (RankLoad.kv_used_tokens + waiting_tokens). The pick is the lowest total over every rank,
  first index on ties, total_tokens breaking ties on total_requests; DPBudget does not read the status list, so
  these pick an inactive rank when it is the least loaded, as upstream does. The chosen rank gets +1 request and,
  for total_tokens only, + the prompt's tokens (total_requests_scheduler passes no token estimate).

vLLM `vllm/v1/engine/core_client.py` `DPLBAsyncMPClient.get_core_engine_for_request`:
- vllm-dp: the lowest 4 * waiting + running over the engines' published counts, first index on ties (one
  front-end, so the scan starts at engine 0), then the chosen engine's waiting count +1 until the next published
  counts replace it. vLLM has no per-engine status; an engine scaled away leaves the list, so inactive ranks are
  not candidates. Counts with an unchanged timestamp are the same publication and are skipped, as above.
"""
from __future__ import annotations

from typing import Sequence

from tiersched.core.engine import Decision, DispatchRequest, Dispatcher, RankLoad


def _rank_of(load: RankLoad, num_ranks: int) -> int:
    if not 0 <= load.rank < num_ranks:
        raise ValueError(f"load for rank {load.rank} but the dispatcher has {num_ranks} ranks")
    return load.rank


class RoundRobinDispatcher(Dispatcher):
    """`--load-balance-method round_robin`."""

    name = "round_robin"

    def __init__(self, num_ranks: int) -> None:
        self.num_ranks = num_ranks
        self.active = [True] * num_ranks
        self.counter = 0

    def update_loads(self, loads: Sequence[RankLoad], now_s: float) -> None:
        for load in loads:
            self.active[_rank_of(load, self.num_ranks)] = load.active

    def pick(self, req: DispatchRequest, now_s: float) -> Decision:
        for _ in range(self.num_ranks):
            rank = self.counter % self.num_ranks
            self.counter = (self.counter + 1) % self.num_ranks
            if self.active[rank]:
                return Decision(rank=rank)
        raise RuntimeError("no active DP rank to dispatch to")


class _DPBudgetDispatcher(Dispatcher):
    """DPBudget: per-rank totals refreshed from snapshots (stale timestamps skipped), bumped on every pick."""

    def __init__(self, num_ranks: int) -> None:
        self.num_ranks = num_ranks
        self.total_requests = [0] * num_ranks
        self.total_tokens = [0] * num_ranks
        self.last_timestamp = [0.0] * num_ranks

    def update_loads(self, loads: Sequence[RankLoad], now_s: float) -> None:
        for load in loads:
            rank = _rank_of(load, self.num_ranks)
            if load.timestamp_s == self.last_timestamp[rank]:
                continue
            self.last_timestamp[rank] = load.timestamp_s
            self.total_requests[rank] = load.running_reqs + load.queue_len
            self.total_tokens[rank] = load.kv_used_tokens + load.waiting_tokens

    def _bump(self, rank: int, tokens: int) -> Decision:
        self.total_requests[rank] += 1
        self.total_tokens[rank] += tokens
        return Decision(rank=rank)


class TotalRequestsDispatcher(_DPBudgetDispatcher):
    """`--load-balance-method total_requests`."""

    name = "total_requests"

    def pick(self, req: DispatchRequest, now_s: float) -> Decision:
        return self._bump(self.total_requests.index(min(self.total_requests)), 0)


class TotalTokensDispatcher(_DPBudgetDispatcher):
    """`--load-balance-method total_tokens`."""

    name = "total_tokens"

    def pick(self, req: DispatchRequest, now_s: float) -> Decision:
        rank = min(range(self.num_ranks), key=lambda i: (self.total_tokens[i], self.total_requests[i]))
        return self._bump(rank, req.input_tokens)


class VLLMDPDispatcher(Dispatcher):
    """vLLM's DP load balancer (score 4 * waiting + running)."""

    name = "vllm-dp"

    def __init__(self, num_ranks: int) -> None:
        self.num_ranks = num_ranks
        self.active = [True] * num_ranks
        self.waiting = [0] * num_ranks
        self.running = [0] * num_ranks
        self.last_timestamp = [0.0] * num_ranks

    def update_loads(self, loads: Sequence[RankLoad], now_s: float) -> None:
        for load in loads:
            rank = _rank_of(load, self.num_ranks)
            self.active[rank] = load.active
            if load.timestamp_s == self.last_timestamp[rank]:
                continue
            self.last_timestamp[rank] = load.timestamp_s
            self.waiting[rank] = load.queue_len
            self.running[rank] = load.running_reqs

    def pick(self, req: DispatchRequest, now_s: float) -> Decision:
        best, best_score = -1, 0
        for rank in range(self.num_ranks):
            score = 4 * self.waiting[rank] + self.running[rank]
            if self.active[rank] and (best < 0 or score < best_score):
                best, best_score = rank, score
        if best < 0:
            raise RuntimeError("no active DP rank to dispatch to")
        self.waiting[best] += 1
        return Decision(rank=best)


BASELINES: dict[str, type[Dispatcher]] = {
    cls.name: cls for cls in (RoundRobinDispatcher, TotalRequestsDispatcher, TotalTokensDispatcher, VLLMDPDispatcher)
}
