"""The upstream-best search (bench/upstream_space.py) and compare's statistics: descent, winners, bounds, CIs."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from tiersched.bench import compare
from tiersched.bench import upstream_space as space
from tiersched.bench.runner import Scenario
from tiersched.sim import get_preset
from tiersched.sim.upstream_eplb import UPSTREAM_EPLB_NAMES


def _dims():
    return [
        space.Dimension("ordering", "--schedule-policy", ("fcfs", "lpm", "hrrn"), "fcfs", "policy"),
        space.Dimension("dispatch", "--load-balance-method", ("round_robin", "total_tokens"), "round_robin", "policy"),
        space.Dimension("chunked_prefill_size", "--chunked-prefill-size", (1024, 2048, 4096, 8192), 8192),
        space.Dimension("eplb", "--eplb-algorithm", ("none", "deepseek"), "none", "policy"),
        space.Dimension("eplb_rebalance_steps", "--eplb-rebalance-num-iterations", (100, 1000), 1000,
                        active=lambda c: c["eplb"] != "none"),
    ]


def _objective(c: dict) -> dict:
    """A made-up landscape: ttft prefers lpm, total_tokens, chunk 2048, deepseek every 100 steps; tpot prefers the
    smallest chunk and fcfs; eplb steps must not matter without EPLB (the search may not vary them there)."""
    ttft = ({"fcfs": 3.0, "lpm": 1.0, "hrrn": 2.0}[c["ordering"]] + (0 if c["dispatch"] == "total_tokens" else 0.5)
            + abs(np.log2(c["chunked_prefill_size"] / 2048)) * 0.3)
    if c["eplb"] != "none":
        ttft -= 0.4 if c["eplb_rebalance_steps"] == 100 else 0.1
    tpot = c["chunked_prefill_size"] / 1000 + (0 if c["ordering"] == "fcfs" else 1.0)
    return {"ttft_mean": ttft, "tpot_mean": tpot, "throughput": 1.0}


def test_search_finds_each_metrics_optimum_with_fewer_runs_than_the_grid():
    dims = _dims()
    seen = []

    def run(combos):
        for c in combos:
            if c["eplb"] == "none":
                assert c["eplb_rebalance_steps"] == 1000  # inactive dimension stays at its default
            seen.append(space.combination_key(c))
        return [_objective(c) for c in combos]

    res = space.search(dims, ["ttft_mean", "tpot_mean"], run)
    assert len(seen) == len(set(seen))  # memoised: no combination runs twice
    grid = [dict(zip([d.name for d in dims], v)) for v in itertools.product(*[d.values for d in dims])]
    assert len(res.runs) < len({space.combination_key(space.normalise(c, dims)) for c in grid})
    best_ttft = res.combos[res.winners["ttft_mean"]]
    assert best_ttft == {"ordering": "lpm", "dispatch": "total_tokens", "chunked_prefill_size": 2048,
                         "eplb": "deepseek", "eplb_rebalance_steps": 100}
    assert res.combos[res.winners["tpot_mean"]]["chunked_prefill_size"] == 1024
    assert res.combos[res.winners["tpot_mean"]]["ordering"] == "fcfs"
    for metric in ("ttft_mean", "tpot_mean"):  # never worse than anything it ran
        assert res.runs[res.winners[metric]][metric] == min(m[metric] for m in res.runs.values())
    assert space.label(best_ttft, dims) == "lpm/total_tokens/deepseek chunked_prefill_size=2048 eplb_rebalance_steps=100"


def test_usable_dimensions_leave_out_what_the_simulator_refuses_or_lacks():
    dims = _dims() + [space.Dimension("enable_mixed_chunk", "--enable-mixed-chunk", (False, True), False),
                      space.Dimension("no_such_field", "--no-such-flag", (0, 1), 0)]
    kept, dropped = space.usable_dimensions(
        dims, lambda changes: "refused" if changes.get("enable_mixed_chunk") else None)
    assert [d.name for d in kept] == [d.name for d in _dims()]
    assert dropped == {"--enable-mixed-chunk": "refused",
                       "--no-such-flag": "no SchedulerSettings field for it in the simulator yet"}


def test_upstream_space_comes_from_the_registries_and_flags_read_as_upstreams():
    preset = get_preset("qwen3")
    dims = space.dimensions(preset, has_priorities=False)
    by = {d.name: d for d in dims}
    assert "tiersched" not in by["ordering"].values and "fcfs-priority" not in by["ordering"].values
    assert "fcfs-priority" in {d.name: d for d in space.dimensions(preset, True)}["ordering"].values
    assert set(by["dispatch"].values) == {"round_robin", "total_requests", "total_tokens"}
    assert by["eplb"].values == ("none", *UPSTREAM_EPLB_NAMES) and "deepseek_vec" in UPSTREAM_EPLB_NAMES
    assert set(space.CHUNK_SIZES) <= set(by["chunked_prefill_size"].values)
    assert {1000, space.TUNED_EPLB_STEPS} <= set(by["eplb_rebalance_steps"].values)
    combo = dict(space.default_combination(dims), ordering="fcfs-priority", chunked_prefill_size=1024,
                 eplb="deepseek")
    text = space.flags(combo, dims, preset)
    assert f"--chunked-prefill-size {1024 * preset.dp}" in text  # upstream divides the flag by the DP size
    assert "--schedule-policy fcfs --enable-priority-scheduling" in text
    assert "--enable-eplb --eplb-algorithm deepseek" in text


def test_headroom_and_bootstrap():
    assert compare.headroom(2.0, 1.5, 1.0) == pytest.approx(0.5)
    assert compare.headroom(2.0, 2.5, 1.0) == pytest.approx(-0.5)
    assert compare.headroom(1.0, 0.9, 1.0) is None  # no gap between upstream-best and the bound
    ours, best = np.array([0.9, 1.0, 0.8, 0.95, 0.85]), np.array([1.0, 1.1, 1.0, 1.0, 0.9])
    ci = compare.bootstrap_ci(lambda o, b: o / b, [ours, best])
    assert ci[0] < ours.mean() / best.mean() < ci[1] and ci[1] < 1.0
    assert ci == compare.bootstrap_ci(lambda o, b: o / b, [ours, best])  # seeded: reproducible
    assert compare.bootstrap_ci(lambda o, b: o / b, [ours[:1], best[:1]]) is None


def test_compare_reports_upstream_best_per_metric_bounds_headroom_and_cis():
    report = compare.compare(Scenario(workload="synthetic:Random", rate=20.0, duration_s=3.0), workers=1, seeds=2,
                             search_passes=2)
    space_report = report["upstream_best_space"]
    assert space_report["runs"] == len(space_report["results"]) >= 12
    assert "--chunked-prefill-size" in space_report["dimensions"]
    assert "--schedule-policy dfs-weight" in space_report["not_searched"]
    assert report["tail_percentile"] == 95  # 60 requests per run: fewer than 1,000
    for name, metric in (("ttft", "ttft_mean"), ("tpot", "tpot_mean"), ("p99", "ttft_p95")):
        winner = report[f"upstream_best_{name}"]
        assert winner["metric"] == metric and winner["flags"].startswith("--schedule-policy")
        assert winner["search_value"] == min(r[metric] for r in space_report["results"])
    policies = report["policies"]
    for name in ("upstream-best", "upstream-best-tpot", "upstream-best-p99", "tiersched", "dispatch-only",
                 "ordering-only", "expert-only", "tiersched+feedback", "vllm-dp", "tiersched@upstream-chunk",
                 "bound:perfect-balance", "bound:idle-cluster"):
        for key in ("ttft_mean", "ttft_p95", "tpot_mean", "throughput"):
            assert key in policies[name], (name, key)
    for row in ("tiersched", "dispatch-only", "ordering-only", "expert-only", "vllm-dp", "tiersched+feedback"):
        e = policies[row]
        assert e["seeds"] == 2
        for m in ("ttft_mean", "tpot_mean", "ttft_p95"):
            assert m in e["headroom_captured"] and len(e["ratio_vs_upstream_best_ci95"][m]) == 2
        best = report["upstream_best_ttft"]["ttft_mean"]
        bound = policies["bound:idle-cluster"]["ttft_mean"]
        assert e["headroom_captured"]["ttft_mean"] == pytest.approx((best - e["ttft_mean"]) / (best - bound),
                                                                    abs=1e-4)
        assert e["ratio_vs_upstream_best"]["tpot_mean"] == pytest.approx(
            e["tpot_mean"] / report["upstream_best_tpot"]["tpot_mean"], abs=1e-4)
    assert policies["bound:idle-cluster"]["ttft_mean"] <= report["upstream_best_ttft"]["ttft_mean"]
    # Our rows say which static upstream flags they run with; the headline row runs neither mixed chunk nor delayer.
    assert "--enable-mixed-chunk" not in policies["tiersched"]["static_flags"]
    assert "--enable-prefill-delayer" not in policies["tiersched"]["static_flags"]
    assert policies["tiersched+mixed"]["static_flags"] == policies["tiersched"]["static_flags"] + " --enable-mixed-chunk"
    assert policies["tiersched+mixed"]["ttft_mean"] != policies["tiersched"]["ttft_mean"]  # it ran with the flag
    sched_flags = lambda text: {f.strip() for f in text.split("--") if f.strip() and not f.startswith(
        ("schedule-policy", "load-balance-method", "enable-eplb", "eplb-", "enable-priority-scheduling"))}
    assert sched_flags(policies["tiersched@upstream-tpot-flags"]["static_flags"]) == sched_flags(
        report["upstream_best_tpot"]["flags"])
    assert "our_rows_static_flags" in report


def _user_traces(tmp_path):
    """A Mooncake JSONL and an Azure CSV of 60 requests over ~6 s (shared prefixes in the Mooncake one)."""
    import json

    rng = np.random.default_rng(5)
    times = np.sort(rng.uniform(0, 6.0, 60))
    rows = [{"timestamp": int(t * 1000), "input_length": int(n), "output_length": int(o),
             "hash_ids": [0, 1] + [100 + i]} for i, (t, n, o) in
            enumerate(zip(times, rng.integers(1100, 3000, 60), rng.integers(8, 120, 60)))]
    mooncake = tmp_path / "user.jsonl"
    mooncake.write_text("".join(json.dumps(r) + "\n" for r in rows))
    azure = tmp_path / "user.csv"
    azure.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        f"2023-11-16 18:15:{10 + t:010.7f},{r['input_length']},{r['output_length']}\n" for t, r in zip(times, rows)))
    return mooncake, azure


def test_compare_sweep_and_speed_take_a_users_trace_file(tmp_path, capsys):
    import argparse
    import json

    from tiersched.bench import speed, sweep

    for path in _user_traces(tmp_path):
        parser = argparse.ArgumentParser()
        compare.add_arguments(parser)
        args = parser.parse_args(["--json", "--trace", str(path), "--seeds", "2", "--search-passes", "0",
                                  "--workers", "1", "--quiet"])
        assert compare.main(args) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["scenario"]["workload"] == str(path) and report["scenario"]["requests"] == 60
        assert {"upstream_best_space", "upstream_best_ttft", "upstream_best_tpot", "upstream_best_p99"} <= set(report)
        row = report["policies"]["tiersched"]
        assert {"ttft_mean", "tpot_mean"} <= set(row["headroom_captured"])
        assert {"ttft_mean", "tpot_mean"} <= set(row["ratio_vs_upstream_best_ci95"])
    parser = argparse.ArgumentParser()
    sweep.add_arguments(parser)
    assert sweep.main(parser.parse_args(["--results", str(tmp_path / "s.jsonl"), "--presets", "qwen3", "--trace",
                                         str(path), "--load", "0.5", "--seeds", "0", "--duration", "2",
                                         "--search-passes", "0", "--workers", "1", "--json"])) == 0
    row = json.loads((tmp_path / "s.jsonl").read_text().splitlines()[0])
    assert row["trace"] == str(path) and row["runs"]["tiersched"]["requests"] > 0
    capsys.readouterr()
    parser = argparse.ArgumentParser()
    speed.add_arguments(parser)
    assert speed.main(parser.parse_args(["--json", "--duration", "6", "--trace", str(path)])) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["trace"]["requests"] == 60 and out["trace"]["realtime_factor"] > 0


def test_every_upstream_schedule_policy_is_searched_or_listed_with_its_reason():
    """Upstream's own policy enums: each value is searched or named in not_searched; `priority`, a parser choice,
    is refused by SchedulePolicy itself (as the note says)."""
    sp = pytest.importorskip("sglang.srt.managers.schedule_policy")
    upstream = {p.value for p in sp.CacheAwarePolicy} | {p.value for p in sp.CacheAgnosticPolicy}
    searched = set(space.upstream_orderings(has_priorities=False))
    listed = {k.split()[-1] for k in space.NOT_MODELLED if k.startswith("--schedule-policy ")}
    assert upstream == (searched | listed) - {"priority"}
    assert not searched & listed

    class Cache:
        disable = False

    with pytest.raises(ValueError, match="Unknown schedule_policy"):
        sp.SchedulePolicy._validate_and_adjust_policy(None, "priority", Cache())
    assert sp.SchedulePolicy._validate_and_adjust_policy(None, "dfs-weight", Cache()) == sp.CacheAwarePolicy.DFS_WEIGHT
