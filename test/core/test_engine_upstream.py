"""Upstream DP dispatch (tiersched.core.engine.upstream) against upstream's own code, side by side.

SGLang's `DPBudget` and `DataParallelController.round_robin_scheduler` run in-process (no server): the budget is a
plain class fed real `LoadSnapshot`s, and round robin is called on a stand-in controller holding the attributes it
reads, with `sock_send` captured. Each case drives both with the same snapshots (stale timestamps, inactive ranks,
ties included) and requires the same rank for every request. vLLM is not installed here: its balancer is checked on
hand-computed cases.
"""
from __future__ import annotations

import random
import types

import pytest

from tiersched.core.engine import Dispatcher, DispatchRequest, RankLoad
from tiersched.core.engine.upstream import (BASELINES, RoundRobinDispatcher, TotalRequestsDispatcher,
                                            TotalTokensDispatcher, VLLMDPDispatcher)


@pytest.fixture(scope="module")
def dpc():
    return pytest.importorskip("sglang.srt.managers.data_parallel_controller")


@pytest.fixture(scope="module")
def load_snapshot():
    return pytest.importorskip("sglang.srt.managers.load_snapshot").LoadSnapshot


def _random_round(rng: random.Random, n: int, step: int, previous: list[float]):
    """One refresh: per rank fresh counts with a new timestamp, or the previous timestamp again (a stale read),
    small numbers so ties are frequent; some ranks inactive."""
    rows = []
    for r in range(n):
        stale = step > 0 and rng.random() < 0.35
        ts = previous[r] if stale else step + 1.0 + r / 100
        rows.append(dict(rank=r, ts=ts, running=rng.randint(0, 3), waiting=rng.randint(0, 3),
                         used=rng.choice([0, 64, 128]), waiting_tokens=rng.choice([0, 64]),
                         active=rng.random() > 0.25))
    return rows


def _ours(rows) -> list[RankLoad]:
    return [RankLoad(rank=x["rank"], active=x["active"], running_reqs=x["running"], queue_len=x["waiting"],
                     kv_used_tokens=x["used"], waiting_tokens=x["waiting_tokens"], timestamp_s=x["ts"])
            for x in rows]


def _theirs(rows, load_snapshot):
    return [load_snapshot(timestamp=x["ts"], dp_rank=x["rank"], num_running_reqs=x["running"],
                          num_waiting_reqs=x["waiting"], num_used_tokens=x["used"],
                          num_total_tokens=x["used"] + x["waiting_tokens"]) for x in rows]


@pytest.mark.parametrize("method", ["total_requests", "total_tokens"])
def test_dpbudget_methods_match_upstream_dpbudget(dpc, load_snapshot, method):
    picks = inactive_picks = stale_rounds = 0
    for seed in range(8):
        rng = random.Random(seed)
        n = rng.randint(2, 6)
        ours = BASELINES[method](n)
        budget = dpc.DPBudget(n)
        lbm = dpc.LoadBalanceMethod.TOTAL_TOKENS if method == "total_tokens" else dpc.LoadBalanceMethod.TOTAL_REQUESTS
        timestamps = [0.0] * n
        for step in range(40):
            rows = _random_round(rng, n, step, timestamps)
            stale_rounds += any(x["ts"] == timestamps[x["rank"]] for x in rows)
            timestamps = [x["ts"] for x in rows]
            ours.update_loads(_ours(rows), step + 1.0)
            budget.update_budget(_theirs(rows, load_snapshot))
            for i in range(rng.randint(1, 6)):
                tokens = rng.choice([32, 64, 100])
                rank = ours.pick(DispatchRequest(f"{step}-{i}", tokens), step + 1.0).rank
                # upstream's schedulers: total_tokens passes len(input_ids), total_requests no estimate
                expected = budget.dispatch(lbm, estimated_tokens=tokens) if method == "total_tokens" \
                    else budget.dispatch(lbm)
                assert rank == expected
                picks += 1
                inactive_picks += not rows[rank]["active"]
            assert ours.total_requests == budget.total_requests and ours.total_tokens == budget.total_tokens
    assert picks >= 1000  # dispatch decisions compared for this method
    assert stale_rounds > 0 and inactive_picks > 0  # the cases this test is about did occur


def test_stale_snapshot_keeps_the_optimistic_bumps():
    d = TotalTokensDispatcher(2)
    d.update_loads([RankLoad(rank=r, timestamp_s=1.0) for r in range(2)], 1.0)
    assert [d.pick(DispatchRequest(str(i), 100), 1.0).rank for i in range(3)] == [0, 1, 0]
    d.update_loads([RankLoad(rank=r, timestamp_s=1.0) for r in range(2)], 1.02)  # same publication read again
    assert d.total_tokens == [200, 100] and d.total_requests == [2, 1]
    d.update_loads([RankLoad(rank=0, kv_used_tokens=10, waiting_tokens=5, running_reqs=1, timestamp_s=1.5)], 1.5)
    assert d.total_tokens == [15, 100] and d.total_requests == [1, 1]  # rank 0 republished, rank 1 kept its bump
    assert TotalRequestsDispatcher(2).pick(DispatchRequest("x", 100), 0.0).rank == 0


def test_first_snapshot_at_timestamp_zero_is_skipped_as_upstream_does():
    """DPBudget starts every last_timestamp at 0.0, so a snapshot stamped 0.0 is taken as already seen."""
    d = TotalRequestsDispatcher(2)
    d.update_loads([RankLoad(rank=0, running_reqs=5, timestamp_s=0.0)], 0.0)
    assert d.total_requests == [0, 0]
    d.update_loads([RankLoad(rank=0, running_reqs=5, timestamp_s=0.5)], 0.5)
    assert d.total_requests == [5, 0]


def test_load_aware_methods_ignore_status_like_upstream():
    loads = [RankLoad(rank=0, active=False, timestamp_s=1.0), RankLoad(rank=1, running_reqs=2, timestamp_s=1.0)]
    for cls in (TotalRequestsDispatcher, TotalTokensDispatcher):
        d = cls(2)
        d.update_loads(loads, 1.0)
        assert d.pick(DispatchRequest("a", 10), 1.0).rank == 0  # DPBudget never reads the status list


def test_total_tokens_breaks_ties_on_requests_then_index():
    d = TotalTokensDispatcher(3)
    d.update_loads([RankLoad(rank=0, kv_used_tokens=50, running_reqs=2, timestamp_s=1.0),
                    RankLoad(rank=1, kv_used_tokens=50, running_reqs=1, timestamp_s=1.0),
                    RankLoad(rank=2, kv_used_tokens=40, waiting_tokens=10, running_reqs=1, timestamp_s=1.0)], 1.0)
    assert d.pick(DispatchRequest("a", 0), 1.0).rank == 1  # 50 tokens everywhere; 1 request on ranks 1 and 2


def _upstream_round_robin(dpc, monkeypatch, n: int):
    """Upstream's round_robin_scheduler on a stand-in controller (without elastic EP `_active_workers` is every
    launched rank; `status` is what update_active_ranks sets)."""
    sent: list[int] = []
    monkeypatch.setattr(dpc, "sock_send", lambda worker, req: sent.append(worker))
    controller = types.SimpleNamespace(_active_workers=list(range(n)), status=[True] * n, round_robin_counter=0,
                                       workers=list(range(n)), maybe_external_dp_rank_routing=lambda req: False)

    def dispatch() -> int:
        dpc.DataParallelController.round_robin_scheduler(controller, object())
        return sent[-1]

    return controller, dispatch


def test_round_robin_matches_upstream_with_ranks_going_down_and_up(dpc, monkeypatch):
    picks = skipped = 0
    for seed in range(10):
        rng = random.Random(seed)
        n = rng.randint(2, 6)
        controller, upstream_dispatch = _upstream_round_robin(dpc, monkeypatch, n)
        ours = RoundRobinDispatcher(n)
        for step in range(30):
            status = [rng.random() > 0.3 for _ in range(n)]
            if not any(status):
                status[rng.randrange(n)] = True
            controller.status = list(status)
            ours.update_loads([RankLoad(rank=r, active=a, timestamp_s=1.0) for r, a in enumerate(status)], step + 1.0)
            for i in range(rng.randint(1, 2 * n)):
                before = controller.round_robin_counter
                rank = ours.pick(DispatchRequest(str(i), 10), step + 1.0).rank
                assert rank == upstream_dispatch()
                assert ours.counter == controller.round_robin_counter
                picks += 1
                skipped += rank != before
    assert picks >= 1000  # dispatch decisions compared
    assert skipped > 0  # some picks had to step over a down rank


def test_round_robin_with_every_rank_down_raises_as_upstream(dpc, monkeypatch):
    controller, upstream_dispatch = _upstream_round_robin(dpc, monkeypatch, 2)
    controller.status = [False, False]
    with pytest.raises(RuntimeError):
        upstream_dispatch()
    ours = RoundRobinDispatcher(2)
    ours.update_loads([RankLoad(rank=r, active=False) for r in range(2)], 0.0)
    with pytest.raises(RuntimeError):
        ours.pick(DispatchRequest("a", 1), 0.0)


def test_vllm_dp_scores_four_per_waiting_and_bumps_waiting():
    loads = [RankLoad(rank=0, running_reqs=3, queue_len=0, timestamp_s=1.0),
             RankLoad(rank=1, running_reqs=1, queue_len=1, timestamp_s=1.0)]
    v = VLLMDPDispatcher(2)
    v.update_loads(loads, 1.0)
    assert [v.pick(DispatchRequest(str(i), 400), 1.0).rank for i in range(3)] == [0, 1, 0]  # 3|5, 7|5, 7|9
    v.update_loads(loads, 1.05)  # the same published counts: the local bumps stay
    assert v.waiting == [2, 2]
    v.update_loads([RankLoad(rank=0, running_reqs=9, timestamp_s=1.1)], 1.1)  # score 9, as rank 1
    assert v.waiting == [0, 2] and v.pick(DispatchRequest("x", 1), 1.1).rank == 0  # ties -> lowest index
    v.update_loads([RankLoad(rank=0, active=False, timestamp_s=1.1)], 1.1)  # scaled away: not a candidate
    assert v.pick(DispatchRequest("y", 1), 1.1).rank == 1
    v.update_loads([RankLoad(rank=1, active=False, timestamp_s=1.2)], 1.2)
    with pytest.raises(RuntimeError):
        v.pick(DispatchRequest("z", 1), 1.2)


def test_every_baseline_is_a_dispatcher_named_as_registered():
    assert set(BASELINES) == {"round_robin", "total_requests", "total_tokens", "vllm-dp"}
    for name, cls in BASELINES.items():
        d = cls(3)
        assert isinstance(d, Dispatcher) and d.name == name and d.num_ranks == 3
        # defaults of the interface: nothing accounted for a request routed elsewhere, no cache, no work estimate
        assert d.record(1, DispatchRequest("r", 10), 0.0) == 0 and d.pending_work() is None
        d.forget_cache()
        with pytest.raises(ValueError, match="rank 3"):
            d.update_loads([RankLoad(rank=3, timestamp_s=1.0)], 1.0)
    with pytest.raises(TypeError):
        Dispatcher()  # abstract: update_loads and pick must be written
