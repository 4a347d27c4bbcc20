"""The mixed-priority scenario: what "1.5x overload" means (measured capacity) and the LS-alone lower bound."""
from __future__ import annotations

import numpy as np
import pytest

from tiersched.bench.request import UPSTREAM_DEFAULT_MAX_RUNNING, ls_alone_ttft_s
from tiersched.core.request import RequestTierConfig
from tiersched.core.request.ordering import AgingPrefixOrdering
from tiersched.core.request.preemption import LatencySensitivePreemption
from tiersched.sim import PolicySet, capacity, simulate, workloads
from tiersched.sim.presets import get_preset


@pytest.fixture(scope="module")
def preset():
    return get_preset("qwen3").with_scheduler(max_running_requests=UPSTREAM_DEFAULT_MAX_RUNNING)


def _ttft_by_arrival_third(preset, overload: float) -> tuple[float, float]:
    w = capacity.mixed_priority_at_overload(overload=overload, preset=preset, duration_s=60.0, seed=7)
    ttft = simulate(preset, w, PolicySet(ordering="fcfs"), 7, record_timeline=False).records["ttft"]
    third = len(w) // 3
    return float(np.nanmean(ttft[:third])), float(np.nanmean(ttft[-third:]))


def test_measured_capacity_is_what_the_deployment_sustains(preset):
    measured = capacity.measured_capacity_req_s(preset)
    w = capacity.mixed_priority_at_overload(overload=1.0, preset=preset, duration_s=1.0, seed=0)
    assert w.meta["capacity_method"] == "measured" and w.meta["nominal_capacity_req_s"] == pytest.approx(measured)
    # The capacity only sets the rate: the pure generator at that rate draws the same requests.
    pure = workloads.mixed_priority(w.meta["rate"], duration_s=1.0, seed=0)
    for name in ("arrival_s", "input_tokens", "output_tokens", "priority", "class_of"):
        np.testing.assert_array_equal(getattr(pure, name), getattr(w, name))
    assert pure.prefix_blocks == w.prefix_blocks
    # The closed-form estimate assumes all DP ranks prefill at once and 64 decoding requests per rank; in lockstep
    # one rank's long prefill stalls every rank, so it overestimates the mix's capacity (docs/request-tier.md).
    assert measured < 0.7 * w.meta["analytic_capacity_req_s"]
    # Below the measured capacity FCFS keeps up (late arrivals wait about as long as early ones); above it the
    # backlog grows, so late arrivals wait many seconds longer.
    early, late = _ttft_by_arrival_third(preset, 0.6)
    assert late < early + 2.0, (early, late)
    early, late = _ttft_by_arrival_third(preset, 1.5)
    assert late > early + 5.0, (early, late)


def test_capacity_choice_is_validated(preset):
    with pytest.raises(ValueError, match="capacity must be"):
        capacity.mixed_priority_at_overload(preset=preset, duration_s=1.0, capacity="guess")


def test_ls_alone_bound_is_below_every_simulated_ls_ttft(preset):
    w = capacity.mixed_priority_at_overload(overload=1.5, preset=preset, duration_s=20.0, seed=3)
    cfg = RequestTierConfig()
    bound = ls_alone_ttft_s(preset, w, 3)
    ls = np.flatnonzero(w.class_of == 0)
    for policies in (PolicySet(ordering="fcfs-priority"),
                     PolicySet(ordering=AgingPrefixOrdering(cfg), preemption=LatencySensitivePreemption(cfg))):
        ttft = simulate(preset, w, policies, 3, record_timeline=False).records["ttft"][ls]
        assert ttft.shape == bound.shape and np.all(np.isfinite(ttft))
        assert np.all(ttft >= bound - 1e-9), float((ttft - bound).min())
    assert np.all(bound > 0)


def test_request_tier_bench_takes_tunables_as_tiersched_set_gives_them(capsys):
    """`bench request --set request.KEY=VALUE`: the tiersched arms run with that config (the printed cap follows),
    and a key the tier does not have stops the command with one sentence."""
    import argparse
    import json

    from tiersched.bench import request as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.main(parser.parse_args(["--skip-sim", "--reps", "2", "--json", "--set",
                                         "request.aging_cap_s=12.5"])) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["aging_cap_s"] == 12.5 and out["request_tier_set"] == "request.aging_cap_s=12.5"
    with pytest.raises(SystemExit, match="no key 'bogus'"):
        bench.main(parser.parse_args(["--skip-sim", "--json", "--set", "request.bogus=1"]))


def test_sustained_overload_does_not_turn_ls_into_fcfs_behind_promoted_requests(preset):
    """120 s at 1.5x capacity: the promoted (aged-out) BE backlog never empties. If promoted requests always went
    first (overtake budget 0), LS requests would queue behind the promoted backlog (LS P99 13.3 s here with the
    priced LS cap, 26 s with the fixed one, against upstream fcfs-with-priority's 1.1 s); with the default budget
    LS requests overtake them a bounded number of times and stay far below upstream fcfs-with-priority (0.16 s),
    while the longest BE wait stays below upstream's."""
    w = capacity.mixed_priority_at_overload(overload=1.5, preset=preset, duration_s=120.0, seed=1)

    def run(policies):
        return simulate(preset, w, policies, 1, record_timeline=False).metrics["per_class"]

    def ours(cfg):
        return PolicySet(ordering=AgingPrefixOrdering(cfg), preemption=LatencySensitivePreemption(cfg))

    upstream = run(PolicySet(ordering="fcfs-priority"))
    default = run(ours(RequestTierConfig()))
    strict = run(ours(RequestTierConfig(ls_overtake_burst=0, ls_overtakes_per_promoted=0.0)))
    assert strict["LS"]["ttft_p99"] > max(upstream["LS"]["ttft_p99"], 20 * default["LS"]["ttft_p99"]), strict["LS"]
    assert default["LS"]["ttft_p99"] < upstream["LS"]["ttft_p99"] / 5, (default["LS"], upstream["LS"])
    assert default["LS"]["max_wait_s"] < 1.0, default["LS"]
    assert default["BE"]["max_wait_s"] < upstream["BE"]["max_wait_s"], (default["BE"], upstream["BE"])


def test_bench_reports_the_backlog_drain_and_the_long_overload_block():
    """The `bench request` JSON explains the longest BE wait by the backlog left at the last arrival: the last BE
    request to start arrived by then, so the longest wait is at least the drain time in every arm."""
    from tiersched.bench import request as bench

    out = bench.mixed_priority(30.0, "qwen3", 0)
    for arm in ("fcfs", "fcfs_priority", "tiersched"):
        assert out[f"max_be_wait_s_{arm}"] >= out[f"be_drain_s_{arm}"] - 1e-9
        assert out[f"be_unstarted_at_last_arrival_{arm}"] >= 0
    # Tail rule: a 30 s run has far fewer than 1,000 LS requests per arm, so the LS tail is P95.
    assert out["ls_samples_min"] < 1000 and out["ls_tail_percentile"] == 95
    assert out["ls_tail_ttft_ratio"] == pytest.approx(out["ls_p95_ttft_s_fcfs_priority"] / out["ls_p95_ttft_s_tiersched"])
    other = dict(out, ls_p95_ttft_ratio=out["ls_p95_ttft_ratio"] * 1.2)
    summary = bench.summarise_seeds({0: out, 1: other})
    assert summary["ls_tail_percentile"] == 95 and summary["ls_samples_min"] == out["ls_samples_min"]
    lo, hi = summary["ls_tail_ttft_ratio_mean_ci95"]
    assert lo <= summary["ls_tail_ttft_ratio_mean"] <= hi and lo >= out["ls_p95_ttft_ratio"] - 1e-4
    long = bench.sustained_overload(30.0, "qwen3", [0], RequestTierConfig())
    row = long["per_seed"]["0"]
    assert long["ls_p99_ttft_ratio"] == pytest.approx(row["ls_p99_ttft_s_fcfs_priority"] / row["ls_p99_ttft_s_tiersched"])
    assert long["max_be_wait_s"] == row["max_be_wait_s_tiersched"] and long["duration_s"] == 30.0


def test_tail_decomposition_benchmark_accounts_for_every_ls_request():
    """benchmark/request_tier_tail.py (quoted in docs/request-tier.md): one row per finished LS request, its P99
    equals the simulator's LS P99, and each TTFT splits into non-negative parts: the prefill step in progress at
    arrival, queued time, and its own prefill step(s), the last at least as long as the step it was admitted in."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "request_tier_tail", Path(__file__).resolve().parents[2] / "benchmark" / "request_tier_tail.py")
    tail = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tail)
    p = get_preset("qwen3").with_scheduler(max_running_requests=UPSTREAM_DEFAULT_MAX_RUNNING)
    w = capacity.mixed_priority_at_overload(overload=1.5, preset=p, duration_s=20.0, seed=2)
    cfg = RequestTierConfig()
    result, steps = tail._logged_run(p, w, PolicySet(ordering=AgingPrefixOrdering(cfg),
                                                     preemption=LatencySensitivePreemption(cfg)), 2)
    rows = tail.decompose(w, result, steps, p.hardware.frontend_latency_s)
    assert len(rows) == result.metrics["per_class"]["LS"]["finished"] > 10
    ttft = np.array([r["ttft_s"] for r in rows])
    assert np.percentile(ttft, 99) == pytest.approx(result.metrics["per_class"]["LS"]["ttft_p99"])
    for r in rows:
        assert r["in_progress_s"] >= 0 and r["queued_s"] >= 0 and r["own_s"] >= r["own_step_s"] - 1e-9 > 0, r
        # Exact only if its own step started after the step in progress ended (none starts before its arrival).
        parts = r["in_progress_s"] + r["queued_s"] + r["own_s"] + p.hardware.frontend_latency_s
        assert parts == pytest.approx(r["ttft_s"], abs=1e-9), r
