"""The bench commands built on the simulator: JSON shape of compare, resumable sweep, baselines' behaviour."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from tiersched.bench import compare, sweep
from tiersched.bench.runner import Scenario
from tiersched.core.request import RunningRequest, WaitingRequest
from tiersched.core.request.upstream import (FcfsOrdering, FcfsPriorityOrdering, HrrnOrdering, LpmOrdering,
                                             PriorityPreemption, ShortestPrefillFirstOrdering)
from tiersched.core.engine import Dispatcher
from tiersched.core.engine.upstream import TotalTokensDispatcher
from tiersched.sim import PolicySet, get_preset, simulate, workloads
from tiersched.sim.policies import DISPATCHERS, make_dispatcher


def test_sweep_is_resumable_and_reports_upstream_best_and_headroom(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    sweep.add_arguments(parser)
    argv = ["--results", str(tmp_path / "s.jsonl"), "--presets", "qwen3", "--shapes", "Average", "--load", "0.5",
            "--seeds", "0,1", "--duration", "3", "--workers", "1", "--search-passes", "1", "--json"]
    old = {"key": "qwen3|Average|0.5|0|0|3.0", "runs": {}}  # a line from before the upstream search: not reused
    (tmp_path / "s.jsonl").write_text(json.dumps(old) + "\n")
    assert sweep.main(parser.parse_args(argv)) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    lines = (tmp_path / "s.jsonl").read_text().splitlines()
    assert first["configs"] == 2 and len(lines) == 3
    for line in lines[1:]:
        row = json.loads(line)
        assert {"upstream_best_ttft", "upstream_best_tpot", "upstream_best_p99"} <= set(row)
        assert row["upstream_best_space"]["runs"] >= 12  # at least every ordering x load-balance method
        assert {"bound:perfect-balance", "bound:idle-cluster", "tiersched"} <= set(row["runs"])
        assert {"ttft_mean", "tpot_mean"} <= set(row["headroom_captured"])
        best, ours = row["runs"]["upstream-best-ttft"]["ttft_mean"], row["runs"]["tiersched"]["ttft_mean"]
        bound = row["runs"]["bound:idle-cluster"]["ttft_mean"]
        assert row["headroom_captured"]["ttft_mean"] == pytest.approx((best - ours) / (best - bound), abs=1e-4)
    heads = [json.loads(line)["headroom_captured"]["ttft_mean"] for line in lines[1:]]
    assert first["metrics"]["ttft_mean"]["headroom_captured_median"] == pytest.approx(float(np.median(heads)),
                                                                                      abs=1e-4)
    assert first["metrics"]["tpot_mean"]["against"] == "upstream-best-tpot"
    at_chunk = [json.loads(line)["runs"]["tiersched@upstream-chunk"]["ttft_mean"] for line in lines[1:]]
    best = [json.loads(line)["runs"]["upstream-best-ttft"]["ttft_mean"] for line in lines[1:]]
    assert first["metrics_at_upstream_chunk"]["ttft_mean"]["median_change"] == pytest.approx(
        float(np.median([(o - b) / b for o, b in zip(at_chunk, best)])), abs=1e-4)
    for line in lines[1:]:  # the arm's static-flag variants ran and say which flags they used
        row = json.loads(line)
        assert {"tiersched+mixed", "tiersched@upstream-tpot-flags"} <= set(row["runs"])
        assert "--enable-mixed-chunk" in row["arm_static_flags"]["tiersched+mixed"]
        assert "--enable-mixed-chunk" not in row["arm_static_flags"]["tiersched"]
    assert first["metrics_with_mixed_chunk"]["tpot_mean"]["n"] == 2
    assert sweep.main(parser.parse_args(argv)) == 0  # nothing left to run: the file does not grow
    assert (tmp_path / "s.jsonl").read_text().splitlines() == lines


def test_sweep_eplb_steps_make_eplb_act_and_are_part_of_the_key(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    sweep.add_arguments(parser)
    argv = ["--results", str(tmp_path / "s.jsonl"), "--presets", "qwen3", "--shapes", "Average", "--load", "0.7",
            "--seeds", "0", "--duration", "2", "--workers", "1", "--search-passes", "0", "--with-eplb", "--json"]
    assert sweep.main(parser.parse_args(argv + ["--eplb-steps", "20"])) == 0
    every20 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert every20["rebalances_tiersched"]["min"] >= 1
    assert sweep.main(parser.parse_args(argv)) == 0  # preset default (1000 steps): another configuration
    default = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert default["rebalances_tiersched"]["max"] < every20["rebalances_tiersched"]["min"]
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 2
    with pytest.raises(SystemExit):
        sweep.main(parser.parse_args(argv + ["--eplb-steps", "0"]))


def _w(rid, prio=0, arrival=0.0, tokens=100, cached=0, defer=False):
    return WaitingRequest(rid, prio, arrival, tokens, cached, defer)


def test_upstream_orderings_hand_cases():
    q = [_w("a", arrival=0, tokens=900, cached=0), _w("b", arrival=1, tokens=500, cached=400),
         _w("c", prio=5, arrival=2, tokens=50, cached=0, defer=True)]
    assert FcfsOrdering().order(q, 3) == [0, 1, 2]
    assert FcfsPriorityOrdering().order(q, 3) == [2, 0, 1]
    assert LpmOrdering().order(q, 3) == [1, 0, 2]  # most cached first, deferred last
    assert ShortestPrefillFirstOrdering().order(q, 3) == [1, 0, 2]  # uncached 100 < 900; deferred last
    hrrn = HrrnOrdering()
    hrrn.order(q[:1], 0)  # a seen at processed 0
    hrrn.observe_prefill_tokens(1000)
    assert hrrn.order(q[:2], 1) == [0, 1]  # a waited 1000 tokens / 900 uncached; b just arrived


def test_lof_and_random_orderings_match_upstreams_sorts():
    """lof / lof-priority order as upstream's SchedulePolicy._sort_by_longest_output on the same requests (random
    queues, ties included); random is a fresh permutation per call, repeatable for a seed."""
    import random
    from types import SimpleNamespace

    from sglang.srt.managers.schedule_policy import SchedulePolicy

    from tiersched.core.request.upstream import LofOrdering, LofPriorityOrdering, RandomOrdering

    rng = random.Random(3)
    for case in range(300):
        q = [WaitingRequest(f"r{i}", rng.choice([0, 5, 20]), float(i), 100,
                            max_new_tokens=rng.choice([16, 64, 256]))
             for i in range(rng.randint(0, 12))]
        for priority, ours in ((False, LofOrdering()), (True, LofPriorityOrdering())):
            reqs = [SimpleNamespace(rid=w.rid, priority=w.priority,
                                    sampling_params=SimpleNamespace(max_new_tokens=w.max_new_tokens)) for w in q]
            SchedulePolicy._sort_by_longest_output(reqs, priority, -1)  # -1: higher priority first (default)
            assert [q[i].rid for i in ours.order(q, 0.0)] == [r.rid for r in reqs], (case, priority)
    q = [_w(f"r{i}") for i in range(8)]
    a, b = RandomOrdering(seed=1), RandomOrdering(seed=1)
    first, second = a.order(q, 0.0), a.order(q, 0.0)
    assert sorted(first) == list(range(8)) and first != second  # a fresh shuffle each call
    assert b.order(q, 0.0) == first


def test_upstream_priority_preemption_threshold_and_order():
    pre = PriorityPreemption(threshold=10)
    running = [RunningRequest("old", 0, 0.0, 300, 300), RunningRequest("new", 0, 5.0, 200, 200),
               RunningRequest("mid", 8, 1.0, 100, 100)]
    assert pre.choose_victims(_w("x", prio=20), running, 1, 0, 6.0) == ["new"]  # newest of the lowest first
    assert pre.choose_victims(_w("x", prio=20), running, 0, 450, 6.0) is None  # upstream: never on KV shortage alone
    assert pre.choose_victims(_w("x", prio=15), running, 3, 0, 6.0) is None  # 15 - 8 <= 10: cannot cover


def test_simulator_builds_dispatchers_from_the_registry():
    preset = get_preset("qwen3")
    assert set(DISPATCHERS) == {"round_robin", "total_requests", "total_tokens", "vllm-dp", "tiersched"}
    for name, cls in DISPATCHERS.items():
        d = make_dispatcher(name, preset)
        assert type(d) is cls and isinstance(d, Dispatcher) and d.name == name and d.num_ranks == preset.dp
    mine = TotalTokensDispatcher(preset.dp)
    copied = make_dispatcher(mine, preset)
    assert type(copied) is TotalTokensDispatcher and copied is not mine  # objects are deep-copied, not shared
    with pytest.raises(ValueError, match="round_robin, total_requests, total_tokens, vllm-dp, tiersched"):
        make_dispatcher("least_loaded", preset)
    with pytest.raises(TypeError, match="Dispatcher"):
        make_dispatcher(object(), preset)


def test_simulator_publishes_waiting_tokens_to_the_dispatcher():
    """The simulator's snapshot carries upstream's num_total_tokens ingredients: KV in use + waiting prompt tokens
    (RankLoad.waiting_tokens), with the request counts DPBudget adds up."""
    seen = []

    class Spy(TotalTokensDispatcher):
        name = "spy"

        def update_loads(self, loads, now_s):
            seen.extend(loads)
            super().update_loads(loads, now_s)

    preset = get_preset("qwen3")
    work = workloads.synthetic("Random", rate=200.0, duration_s=2.0, seed=1)  # overloaded: queues form
    result = simulate(preset, work, PolicySet(dispatch=Spy(preset.dp)), duration_s=2.0)
    assert any(load.queue_len > 0 for load in seen)
    for load in seen:  # every waiting prompt has at least 128 tokens (the workload's input range)
        assert (load.waiting_tokens == 0) if load.queue_len == 0 else (load.waiting_tokens >= 128 * load.queue_len)
    same = simulate(preset, work, PolicySet(dispatch="total_tokens"), duration_s=2.0)
    assert list(result.records["rank"]) == list(same.records["rank"])  # the object runs as its registry name does
