"""Routing drift over time in the simulator and EPLB history windows."""
from __future__ import annotations

import numpy as np
import pytest

from tiersched.core.expert import ExpertPlanner
from tiersched.sim import PolicySet, get_preset, simulate
from tiersched.sim.loop import Simulation
from tiersched.sim.moe_routing import MoeRouting, RoutingModel, ZipfRouting, make_routing
from tiersched.sim.workloads import synthetic


def _preset(**sched):
    return get_preset("qwen3").with_scheduler(**sched)


def test_drift_changes_routing_every_window_and_is_deterministic():
    work = synthetic("Random", rate=8.0, duration_s=20.0, seed=1)
    a = simulate(_preset(routing_drift_steps=200), work, PolicySet(dispatch="round_robin"), seed=3,
                 record_timeline=False)
    b = simulate(_preset(routing_drift_steps=200), work, PolicySet(dispatch="round_robin"), seed=3,
                 record_timeline=False)
    fixed = simulate(_preset(), work, PolicySet(dispatch="round_robin"), seed=3, record_timeline=False)
    assert a.metrics["routing_drifts"] == a.steps // 200 > 3
    assert fixed.metrics["routing_drifts"] == 0
    assert a.metrics["tpot_mean"] == b.metrics["tpot_mean"]  # deterministic for a seed
    assert a.metrics["balancedness"] != fixed.metrics["balancedness"]


def test_drifted_probabilities_move_by_the_calibrated_spread_and_keep_top_k():
    preset = _preset(routing_drift_steps=1)
    sim = Simulation(preset, synthetic("Random", rate=1.0, duration_s=2.0), PolicySet(), seed=0)
    before = sim.cost.probs.copy()
    sim.steps = 1
    sim._maybe_drift()
    after = sim.cost.probs
    np.testing.assert_allclose(after.sum(-1), preset.model.top_k, rtol=1e-9)  # still top_k assignments per token
    # log-ratio spread of popularity around the base model ~ sigma (0.26) for strength 1
    base = sim.base_routing.popularity
    spread = np.std(np.log(sim.routing.popularity / base))
    assert 0.15 < spread < 0.4, spread
    assert not np.allclose(before, after)
    # the cost model's per-GPU token shares follow the new routing
    np.testing.assert_allclose(sim.cost.gpu_probs.sum(-1), preset.model.top_k, rtol=1e-9)


def test_rebalance_sees_history_windows():
    class Recorder(ExpertPlanner):
        name = "recorder"

        def __init__(self):
            self.windows = []

        def plan(self, stats, num_slots, num_gpus, num_nodes, current=None):
            self.windows.append(stats.source_counts.shape[0])
            return current

    rec = Recorder()
    preset = _preset(eplb_rebalance_steps=100, eplb_history_windows=3, routing_drift_steps=100)
    simulate(preset, synthetic("Random", rate=8.0, duration_s=15.0, seed=2), PolicySet(eplb=rec),
             record_timeline=False)
    assert len(rec.windows) >= 4
    assert rec.windows[:4] == [1, 2, 3, 3]
    assert isinstance(RoutingModel.synthetic(2, 8, 2, 2), RoutingModel)


def test_decode_heavy_scenario_and_drift_settings_reach_the_preset():
    from tiersched.bench.runner import Scenario, build_preset, build_workload

    sc = Scenario(preset="deepseek-v3", workload="decode-heavy", rate=4.0, duration_s=10.0,
                  eplb_rebalance_steps=50, routing_drift_steps=50, eplb_history_windows=4)
    work = build_workload(sc)
    assert work.input_tokens.min() >= 64 and work.input_tokens.max() <= 512
    assert work.output_tokens.min() >= 256 and work.output_tokens.max() <= 1024
    sched = build_preset(sc).scheduler
    assert (sched.eplb_rebalance_steps, sched.routing_drift_steps, sched.eplb_history_windows) == (50, 50, 4)


def test_a_fixed_routing_with_drift_steps_is_rejected_at_start_up():
    p = _preset(routing_drift_steps=200)
    m = p.model
    fixed = ZipfRouting(m.moe_layers, p.dp, m.num_experts, m.top_k)
    assert not fixed.can_drift and make_routing(p).can_drift
    with pytest.raises(ValueError, match="routing that drifts|routing model that drifts"):
        Simulation(p, synthetic("Random", rate=1.0, duration_s=1.0), PolicySet(), routing=fixed)
    with pytest.raises(TypeError, match="cannot drift"):
        fixed.drift(np.random.default_rng(0))
    assert Simulation(_preset(), synthetic("Random", rate=1.0, duration_s=1.0), PolicySet(),
                      routing=fixed).notes == ["routing model: zipf"]


def test_a_routing_model_must_give_expected_counts():
    class NoCounts(MoeRouting):
        name = "incomplete"

    with pytest.raises(TypeError, match="abstract"):
        NoCounts()
    model = make_routing(_preset(), seed=4)
    assert isinstance(model, RoutingModel) and model.name == "synthetic-zipf"
    tokens = np.array([1.0, 2.0, 0.0, 3.0])
    counts = model.expected_counts(tokens)  # [L, S, E]
    assert counts.shape == (model.num_layers, 4, model.num_experts)
    np.testing.assert_allclose(counts.sum(-1), np.tile(tokens * model.top_k, (model.num_layers, 1)))
