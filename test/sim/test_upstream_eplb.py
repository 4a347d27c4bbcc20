"""The simulator's DeepSeek EPLB is upstream's, called as upstream's own dispatcher calls it; the registry of
expert-tier planners rejects what it does not know."""
import numpy as np
import pytest
import torch
from sglang.srt.eplb import eplb_algorithms as upstream

from tiersched.core.expert import ExpertPlanner, ExpertStats
from tiersched.sim import get_preset
from tiersched.sim.policies import EPLB_NAMES, CoreRebalance, make_eplb
from tiersched.sim.upstream_eplb import DeepSeekEPLB, deepseek_rebalance


@pytest.mark.parametrize("hierarchical", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_deepseek_matches_upstream_rebalance_experts(hierarchical, seed):
    """Windows [W, L, S, E] summed over sources equal upstream's tokens_per_expert [W, L, E] through
    eplb_algorithms.rebalance_experts with EplbAlgorithm.deepseek[_hierarchical]."""
    rng = np.random.default_rng(seed)
    num_windows, num_layers, num_sources, num_logical, num_gpus, num_nodes, num_groups = 3, 4, 2, 16, 4, 2, 4
    num_physical = num_logical + num_gpus
    counts = rng.integers(0, 1000, size=(num_windows, num_layers, num_sources, num_logical)).astype(np.float64)
    ours = deepseek_rebalance(ExpertStats(source_counts=counts), num_physical, num_gpus, num_nodes, num_groups,
                              hierarchical)
    algorithm = upstream.EplbAlgorithm.deepseek_hierarchical if hierarchical else upstream.EplbAlgorithm.deepseek
    theirs = upstream.rebalance_experts(torch.from_numpy(counts.sum(2)), num_physical, num_physical // num_gpus,
                                        num_groups, num_nodes, algorithm)
    for mine, reference in zip((ours.phy2log, ours.log2phy, ours.logcnt), theirs):
        np.testing.assert_array_equal(mine, reference.numpy())
    # the simulator's planner: the same call (groups and nodes only matter to the hierarchical split)
    planned = DeepSeekEPLB(hierarchical=hierarchical, num_groups=num_groups).plan(
        ExpertStats(source_counts=counts), num_physical, num_gpus, num_nodes)
    np.testing.assert_array_equal(planned.phy2log, ours.phy2log)


def test_hierarchical_falls_back_to_one_group_per_node_when_groups_do_not_split():
    """E % num_groups != 0: upstream would fail its assertion; the planner uses num_nodes groups instead."""
    counts = np.random.default_rng(3).integers(1, 100, size=(1, 2, 1, 12)).astype(np.float64)
    stats = ExpertStats(source_counts=counts)
    got = DeepSeekEPLB(hierarchical=True, num_groups=5).plan(stats, 16, 4, 2)
    want = deepseek_rebalance(stats, 16, 4, 2, num_groups=2, hierarchical=True)
    np.testing.assert_array_equal(got.phy2log, want.phy2log)


def test_make_eplb_names_objects_and_errors():
    preset = get_preset("deepseek-v3")
    assert make_eplb("none", preset) is None
    assert isinstance(make_eplb("deepseek", preset), DeepSeekEPLB)
    hier = make_eplb("deepseek-hierarchical", preset)
    assert hier.hierarchical and hier.num_groups == preset.model.expert_groups
    assert isinstance(make_eplb("source_aware", preset), CoreRebalance)
    assert set(EPLB_NAMES) == {"none", "deepseek", "deepseek-hierarchical", "source_aware"}
    planner = CoreRebalance()
    assert make_eplb(planner, preset) is planner and isinstance(planner, ExpertPlanner)
    with pytest.raises(ValueError, match="choose one of none, deepseek, deepseek-hierarchical, source_aware"):
        make_eplb("deepseek_vec", preset)
    with pytest.raises(TypeError, match="ExpertPlanner"):
        make_eplb(object(), preset)
