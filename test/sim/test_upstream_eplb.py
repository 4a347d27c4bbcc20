"""The simulator's upstream EPLB arms are upstream's algorithms, called as upstream's own dispatcher
(`eplb_algorithms.rebalance_experts` after `compute_algorithm`) calls them; the registry of expert-tier planners
knows every upstream `--eplb-algorithm` value and rejects what it does not know."""
import numpy as np
import pytest
import torch
from sglang.srt.elastic_ep.elastic_ep import ElasticEPStateManager
from sglang.srt.eplb import eplb_algorithms as upstream

from tiersched.core.expert import ExpertPlanner, ExpertStats, Placement
from tiersched.sim import get_preset
from tiersched.sim.policies import EPLB_NAMES, CoreRebalance, make_eplb
from tiersched.sim.upstream_eplb import (UPSTREAM_EPLB_ALGORITHMS, UPSTREAM_EPLB_NAMES, UpstreamEPLB,
                                         deepseek_rebalance, resolve_algorithm, upstream_rebalance)

# 3 windows, 4 layers, 2 sources, 16 experts on 4 GPUs in 2 nodes, 4 expert groups, one redundant slot per GPU
W, L, S, E, GPUS, NODES, GROUPS = 3, 4, 2, 16, 4, 2, 4
P = E + GPUS


def _counts(seed: int, shape=(W, L, S, E)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, size=shape).astype(np.float64)


def assert_valid(placement: Placement, num_layers: int, num_logical: int, num_physical: int) -> None:
    """Every slot holds a real expert, every expert has a slot, and log2phy / logcnt describe phy2log."""
    phy2log, log2phy, logcnt = placement.phy2log, placement.log2phy, placement.logcnt
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == np.int64
    assert phy2log.shape == (num_layers, num_physical) and logcnt.shape == (num_layers, num_logical)
    assert ((phy2log >= 0) & (phy2log < num_logical)).all()
    for layer in range(num_layers):
        held = np.bincount(phy2log[layer], minlength=num_logical)
        np.testing.assert_array_equal(held, logcnt[layer])
        assert (held >= 1).all()
        for e in range(num_logical):
            slots = log2phy[layer, e]
            assert sorted(slots[: logcnt[layer, e]]) == sorted(np.flatnonzero(phy2log[layer] == e))
            assert (slots[logcnt[layer, e]:] == -1).all()


def _upstream_reference(counts: np.ndarray, algorithm: str, num_groups, num_nodes, monkeypatch):
    """Upstream's own entry point on tokens_per_expert [W, L, E]; the elastic-EP state (a torch.distributed
    world upstream) is stubbed as every rank healthy."""
    monkeypatch.setattr(ElasticEPStateManager, "instance",
                        classmethod(lambda cls: type("State", (), {"active_ranks": torch.ones(GPUS, dtype=torch.int32)})))
    member = upstream.compute_algorithm(algorithm, num_groups, num_nodes)
    return upstream.rebalance_experts(torch.from_numpy(counts.sum(2)), P, P // GPUS, num_groups, num_nodes, member)


@pytest.mark.parametrize("algorithm", UPSTREAM_EPLB_NAMES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_algorithm_matches_upstream_rebalance_experts(algorithm, seed, monkeypatch):
    """Windows [W, L, S, E] summed over sources give upstream's placement, for every `--eplb-algorithm` value."""
    counts = _counts(seed)
    ours = upstream_rebalance(ExpertStats(source_counts=counts), P, GPUS, NODES, GROUPS, algorithm)
    assert_valid(ours, L, E, P)
    theirs = _upstream_reference(counts, algorithm, GROUPS, NODES, monkeypatch)
    for mine, reference in zip((ours.phy2log, ours.log2phy, ours.logcnt), theirs):
        np.testing.assert_array_equal(mine, reference.numpy())
    # the simulator's planner makes the same call when the groups split over the nodes
    planned = UpstreamEPLB(algorithm, num_groups=GROUPS).plan(ExpertStats(source_counts=counts), P, GPUS, NODES)
    np.testing.assert_array_equal(planned.phy2log, ours.phy2log)


def test_vec_reads_every_window_while_deepseek_reads_their_sum():
    """deepseek_vec is not deepseek under another name: it scores each window (upstream's tokens_per_expert
    [W, L, E]), so moving load between windows with the same sum changes its plan but not deepseek's."""
    counts = _counts(5)
    shuffled = counts.copy()
    shuffled[0], shuffled[1] = counts[0] + counts[1] * 0.9, counts[1] * 0.1  # same sum over windows
    a, b = (ExpertStats(source_counts=c) for c in (counts, shuffled))
    np.testing.assert_array_equal(upstream_rebalance(a, P, GPUS, algorithm="deepseek").phy2log,
                                  upstream_rebalance(b, P, GPUS, algorithm="deepseek").phy2log)
    vec = [upstream_rebalance(s, P, GPUS, algorithm="deepseek_vec").phy2log for s in (a, b)]
    assert not np.array_equal(vec[0], vec[1])


def test_elasticity_aware_with_every_rank_healthy_is_deepseek():
    """With no failed rank, upstream's elasticity_aware takes deepseek's global or hierarchical branch."""
    stats = ExpertStats(source_counts=_counts(7))
    for suffix in ("", "_hierarchical"):
        ea = upstream_rebalance(stats, P, GPUS, NODES, GROUPS, "elasticity_aware" + suffix)
        ds = upstream_rebalance(stats, P, GPUS, NODES, GROUPS, "deepseek" + suffix)
        for x, y in zip((ea.phy2log, ea.log2phy, ea.logcnt), (ds.phy2log, ds.log2phy, ds.logcnt)):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("num_groups, num_nodes, want", [(None, 1, "deepseek"), (None, 2, "deepseek"),
                                                         (8, 4, "deepseek_hierarchical"), (4, 3, "deepseek"),
                                                         (8, 1, "deepseek_hierarchical")])
def test_auto_resolves_as_upstream(num_groups, num_nodes, want):
    assert resolve_algorithm("auto", num_groups, num_nodes) == want
    assert upstream.compute_algorithm("auto", num_groups, num_nodes).name == want
    assert resolve_algorithm("deepseek_vec", num_groups, num_nodes) == "deepseek_vec"
    with pytest.raises(ValueError, match="choose one of deepseek, deepseek_hierarchical"):
        resolve_algorithm("source_aware", num_groups, num_nodes)


def test_auto_planner_resolves_with_the_model_groups():
    """A model without groups (Qwen3: preset expert_groups 1 = upstream's num_groups None) plans `deepseek`;
    DeepSeek-V3's 8 groups over 4 nodes plan `deepseek_hierarchical`."""
    stats = ExpertStats(source_counts=_counts(9, shape=(1, 2, 2, 32)))
    flat = UpstreamEPLB("auto", num_groups=1).plan(stats, 40, 8, 4)
    np.testing.assert_array_equal(flat.phy2log, upstream_rebalance(stats, 40, 8, 4, None, "deepseek").phy2log)
    grouped = UpstreamEPLB("auto", num_groups=8).plan(stats, 40, 8, 4)
    np.testing.assert_array_equal(grouped.phy2log,
                                  upstream_rebalance(stats, 40, 8, 4, 8, "deepseek_hierarchical").phy2log)
    assert not np.array_equal(flat.phy2log, grouped.phy2log)


@pytest.mark.parametrize("algorithm", [a for a in UPSTREAM_EPLB_ALGORITHMS if a.endswith("_hierarchical")])
def test_hierarchical_falls_back_to_one_group_per_node_when_groups_do_not_split(algorithm):
    """E % num_groups != 0: upstream would fail its assertion; the planner uses num_nodes groups instead."""
    stats = ExpertStats(source_counts=_counts(3, shape=(2, 2, 1, 12)))
    got = UpstreamEPLB(algorithm, num_groups=5).plan(stats, 16, 4, 2)
    assert_valid(got, 2, 12, 16)
    want = upstream_rebalance(stats, 16, 4, 2, num_groups=2, algorithm=algorithm)
    np.testing.assert_array_equal(got.phy2log, want.phy2log)


@pytest.mark.parametrize("preset_name", ["qwen3", "deepseek-v3"])
@pytest.mark.parametrize("algorithm", UPSTREAM_EPLB_NAMES)
def test_every_algorithm_plans_the_presets(preset_name, algorithm):
    """Each registered upstream planner gives a valid placement at a preset's real shape (layers cut to 2)."""
    preset = get_preset(preset_name)
    model = preset.model
    counts = _counts(11, shape=(2, 2, preset.dp, model.num_experts))
    nodes = max(1, preset.num_gpus // preset.hardware.gpus_per_node)
    planner = make_eplb(algorithm, preset)
    placement = planner.plan(ExpertStats(source_counts=counts), preset.num_slots, preset.num_gpus, nodes)
    assert_valid(placement, 2, model.num_experts, preset.num_slots)


def test_deepseek_rebalance_is_the_deepseek_algorithm():
    stats = ExpertStats(source_counts=_counts(4))
    for hierarchical, name in ((False, "deepseek"), (True, "deepseek_hierarchical")):
        np.testing.assert_array_equal(deepseek_rebalance(stats, P, GPUS, NODES, GROUPS, hierarchical).phy2log,
                                      upstream_rebalance(stats, P, GPUS, NODES, GROUPS, name).phy2log)


def test_make_eplb_names_objects_and_errors():
    preset = get_preset("deepseek-v3")
    assert make_eplb("none", preset) is None
    for name in UPSTREAM_EPLB_NAMES:
        planner = make_eplb(name, preset)
        assert isinstance(planner, UpstreamEPLB) and planner.name == name
        assert planner.num_groups == preset.model.expert_groups
    hier = make_eplb("deepseek-hierarchical", preset)  # hyphenated spelling of upstream's flag value
    assert hier.name == "deepseek_hierarchical" and hier.hierarchical
    assert isinstance(make_eplb("source_aware", preset), CoreRebalance)
    assert set(EPLB_NAMES) == {"none", *UPSTREAM_EPLB_NAMES, "source_aware"}
    assert UPSTREAM_EPLB_NAMES == tuple(m.name for m in upstream.EplbAlgorithm) + ("auto",)
    planner = CoreRebalance()
    assert make_eplb(planner, preset) is planner and isinstance(planner, ExpertPlanner)
    with pytest.raises(ValueError, match="choose one of none, deepseek, deepseek_hierarchical, deepseek_vec"):
        make_eplb("deepseek_fast", preset)
    with pytest.raises(TypeError, match="ExpertPlanner"):
        make_eplb(object(), preset)
