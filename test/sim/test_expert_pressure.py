"""RankLoad.expert_pressure has one definition (core.expert.metrics.expert_pressure): the simulator's dispatch
snapshot and the expert-tier adapter's feedback give the same number from the same per-source counts."""
import numpy as np
import pytest

from tiersched.core.expert import placement_from_phy2log
from tiersched.sglang.expert import hooks as expert_tier
from tiersched.sglang.expert.state import STATE, Window
from tiersched.sim import PolicySet, get_preset, workloads
from tiersched.sim.loop import Simulation


@pytest.fixture(autouse=True)
def _clean_state():
    STATE.pressure = None
    yield
    STATE.pressure = None


@pytest.mark.parametrize("seed", [0, 1])
def test_simulator_and_adapter_pressure_agree(seed):
    """A shuffled single-replica placement (qwen3-dp4ep4: P == E, so the simulator's even split over replicas and
    the adapter's local-replica-first dispatch coincide), skewed per-rank token counts: the simulator's snapshot
    pressure (its per-token GPU shares and the GPU load those tokens make) equals the adapter's, planned from the
    window counts = tokens x routing probabilities."""
    preset = get_preset("qwen3-dp4ep4")
    rng = np.random.default_rng(seed)
    sim = Simulation(preset, workloads.synthetic("Random", rate=1.0, duration_s=1.0, seed=seed),
                     PolicySet(expert_feedback=True), seed=seed, record_timeline=False)
    L, E, R = preset.model.moe_layers, preset.model.num_experts, preset.dp
    assert preset.num_slots == E and preset.num_gpus == R
    placement = placement_from_phy2log(np.stack([rng.permutation(E) for _ in range(L)]), E)
    sim.cost.set_placement(placement)
    tokens = np.array([900.0, 300.0, 150.0, 50.0])
    _, stats = sim.cost.moe_time(tokens)
    sim.recent_gpu_load = stats["gpu_load"]
    from_sim = np.array([load.expert_pressure for load in sim._snapshot()])

    counts = tokens[None, :, None] * sim.cost.probs  # [L, S, E] assignments of this step's tokens
    expert_tier._update_pressure(placement, Window(counts), R)
    from_adapter = np.array([expert_tier.expert_pressure_for_rank(r) for r in range(R)])
    np.testing.assert_allclose(from_sim, from_adapter, rtol=1e-9)
    assert from_sim.max() - from_sim.min() > 1e-3  # the placement and skew make the ranks differ
