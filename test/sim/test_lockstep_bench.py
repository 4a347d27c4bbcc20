"""`bench lockstep` on a small grid (every checked field, upstream-best searched with the prefill delayer and mixed
chunking), the lockstep-free reference with mixed chunking, and the simulator memos that keep the bench fast."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tiersched.sim import PolicySet, get_preset, simulate, workloads
from tiersched.sim.cost_model import StepCostModel
from tiersched.sim.lockstep import fit_roofline, prior_model, sample_steps
from tiersched.sim.moe_routing import RoutingModel, make_routing, token_probs

PRESET = get_preset("qwen3-dp4ep4")


@pytest.fixture(scope="module")
def bench_out():
    from tiersched.bench.__main__ import main

    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["lockstep", "--json", "--presets", "qwen3-dp2tp2ep4", "--shapes", "Two-end", "--loads", "0.7,1.2",
                   "--seeds", "0", "--duration-s", "1.0", "--search-passes", "1", "--workers", "1",
                   "--mixed-duration-s", "0", "--quiet"])
    assert rc == 0
    return json.loads(buf.getvalue())


def test_bench_lockstep_prints_every_checked_field(bench_out):
    out = bench_out
    for key in ("headroom_captured_tpot", "headroom_captured_ttft", "headroom_captured_tpot_vs_lockstep_free",
                "headroom_captured_ttft_vs_lockstep_free", "headroom_of_lockstep_free_vs_perfect_balance",
                "saturation_throughput_vs_bound", "worst_loss", "ls_tail_over_floor", "be_throughput_loss",
                "configurations", "configs", "per_preset", "upstream_space_searched", "cpu_s", "wall_s",
                "load_average"):
        assert key in out, key
    assert out["configurations"] == ["qwen3-dp2tp2ep4/Two-end/load=0.7/seed=0",
                                      "qwen3-dp2tp2ep4/Two-end/load=1.2/seed=0"]
    assert set(out["per_preset"]) == {"qwen3-dp2tp2ep4"}
    assert 0 < out["saturation_throughput_vs_bound"] <= 1.05
    assert set(out["headroom_of_lockstep_free_vs_perfect_balance"]) == {"tpot", "ttft"}
    for row in out["configs"]:
        # upstream-best is the best of its candidates: never worse than the default fcfs/round_robin candidate
        assert row["upstream_best_ttft_mean"] > 0 and row["upstream_best_throughput"] > 0
        assert row["unfinished_ours"] == 0
        assert row["loss_ttft_mean"] == pytest.approx(
            (row["ours_ttft_mean"] - row["upstream_best_ttft_mean"]) / row["upstream_best_ttft_mean"])


def test_upstream_best_searches_the_delayer_and_mixed_chunking(bench_out):
    space = bench_out["upstream_space_searched"]
    assert "--enable-prefill-delayer" in space["dimensions"] and "--enable-mixed-chunk" in space["dimensions"]
    assert "--prefill-delayer-max-delay-passes" in space["dimensions"]
    search = space["per_preset_shape"]["qwen3-dp2tp2ep4/Two-end"]
    assert any("delayer=True" in c for c in search["candidates"])
    assert any("mixed=True" in c for c in search["candidates"])
    assert search["forced_variant_runs"] > 0
    # pruned: far fewer runs than the full grid of the searched dimensions
    assert search["runs"] < space["full_grid_size"] / 10
    labels = {row[f"upstream_best_{m}_label"] for row in bench_out["configs"]
              for m in ("ttft_mean", "tpot_mean", "throughput")}
    assert labels <= set(search["candidates"])


def test_every_distinct_run_simulates_once(bench_out):
    search = bench_out["upstream_space_searched"]["per_preset_shape"]["qwen3-dp2tp2ep4/Two-end"]
    # per configuration: the candidates, ours per metric and on upstream's defaults, at most 3 runs per reference
    per_config = len(search["candidates"]) + 3 + 1 + 2 * 3
    upper = (search["runs"] + search["perfect_balance_reference_runs"] + search["lockstep_free_reference_runs"]
             + len(search["ours_variants_at_search_load"]) + 2 * per_config)
    assert bench_out["simulations"] <= upper


def test_ours_gets_the_static_flags_of_upstream_winners(bench_out):
    search = bench_out["upstream_space_searched"]["per_preset_shape"]["qwen3-dp2tp2ep4/Two-end"]
    variants = search["ours_variants_at_search_load"]
    assert "fcfs/round_robin/none chunk=8192 +plan" in variants
    assert "fcfs/tiersched/none chunk=8192 +plan" in variants  # the engine tier's score dispatch is ours to use
    assert any("mixed=True" in v for v in variants) and not any("delayer=True" in v for v in variants)
    for metric, label in search["ours"].items():  # each metric's choice is the best variant on it
        pick = max if metric == "throughput" else min
        assert variants[label][metric] == pick(v[metric] for v in variants.values())
    assert set(bench_out["plan_on_upstream_defaults"]) >= {"headroom_captured_tpot", "headroom_captured_ttft",
                                                          "worst_loss"}


@pytest.fixture(scope="module")
def two_end():
    return workloads.synthetic("Two-end", rate=40.0, duration_s=3.0, seed=1)


def test_lockstep_free_with_mixed_chunk_rides_decodes_in_prefill_steps(two_end):
    p = PRESET.with_scheduler(chunked_prefill_size=2048)
    plain = simulate(p, two_end, record_timeline=False, lockstep_free=True)
    mixed = simulate(p.with_scheduler(enable_mixed_chunk=True), two_end, record_timeline=False, lockstep_free=True)
    assert plain.metrics["mixed_steps"] == 0 < mixed.metrics["mixed_steps"]
    assert mixed.metrics["finished"] == plain.metrics["finished"] == len(two_end)
    # the rank's own prefill no longer stalls its own decodes
    assert mixed.metrics["tpot_mean"] < plain.metrics["tpot_mean"]
    lock = simulate(p.with_scheduler(enable_mixed_chunk=True), two_end, record_timeline=False).metrics
    assert mixed.metrics["tpot_mean"] < lock["tpot_mean"]


def test_lockstep_free_refuses_the_prefill_delayer(two_end):
    with pytest.raises(ValueError, match="prefill delayer"):
        simulate(PRESET.with_scheduler(enable_prefill_delayer=True), two_end, lockstep_free=True)


def test_routing_memo_is_read_only_and_equal_to_a_fresh_build():
    a = make_routing(PRESET, 3)
    assert make_routing(PRESET, 3) is a and make_routing(PRESET, 4) is not a
    m = PRESET.model
    fresh = RoutingModel.synthetic(num_layers=m.moe_layers, num_sources=PRESET.dp, num_experts=m.num_experts,
                                   top_k=m.top_k, seed=3)
    for name in ("popularity", "home", "successor"):
        assert np.array_equal(getattr(a, name), getattr(fresh, name))
        with pytest.raises(ValueError):
            getattr(a, name)[0, 0] = 0


def test_prior_model_memo_equals_the_fit_and_keys_on_the_deployment():
    cost = StepCostModel(PRESET, token_probs(make_routing(PRESET, 0), PRESET.dp))
    model = prior_model(cost, samples=120)
    assert model == fit_roofline(*sample_steps(cost, 120))
    assert prior_model(cost, samples=120) is model
    other = StepCostModel(PRESET, token_probs(make_routing(PRESET, 1), PRESET.dp))
    assert prior_model(other, samples=120) is not model
    ideal = StepCostModel(PRESET, cost.probs, ideal_balance=True)
    assert prior_model(ideal, samples=120) is not model


def test_simulate_is_repeatable_with_the_memos(two_end):
    runs = [simulate(PRESET, two_end, PolicySet(step_plan="tiersched"), seed=2, record_timeline=False)
            for _ in range(2)]
    for key in ("ttft", "e2e"):
        assert np.array_equal(runs[0].records[key], runs[1].records[key], equal_nan=True)
