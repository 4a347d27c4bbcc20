"""Upstream's EPLB algorithms, called as upstream calls them (not reimplemented); the one caller of them that the
simulator's upstream EPLB arms, `python -m tiersched.eplb evaluate` and the tests share.

Upstream (0.5.23, sglang/srt/eplb/eplb_algorithms) has six algorithms, chosen by `--eplb-algorithm` (default
`auto`): `deepseek`, `deepseek_hierarchical`, `deepseek_vec`, `deepseek_vec_hierarchical`, `elasticity_aware`,
`elasticity_aware_hierarchical`. `ExpertLocationMetadata.init_by_eplb` resolves the flag with
`eplb_algorithms.compute_algorithm(raw, num_groups, num_nodes)` (`auto` -> `deepseek_hierarchical` when the model
has expert groups and num_groups % num_nodes == 0, else `deepseek`) and calls `eplb_algorithms.rebalance_experts(
tokens_per_expert [W, L, E], num_physical, num_local_physical, num_groups, num_nodes, algorithm)` -> (phy2log
[L, P], log2phy [L, E, X] -1 padded, logcnt [L, E]). The deepseek and elasticity_aware families sum the windows
first; the deepseek_vec family reads every window. Upstream's recorder has no source dimension, so our
[W, L, S, E] statistics are summed over sources. elasticity_aware runs here with every rank healthy (upstream reads
the healthy ranks from its ElasticEPStateManager, which needs a torch.distributed world; we pass upstream's own
`healthy_rank_state` for the EP size), which makes it the deepseek placement. The EPLBManager triggers a rebalance
every `eplb_rebalance_num_iterations` forward passes (default 1000); the planner runs on torch CPU, never in the
per-step hot path. torch and sglang are imported on the first call, so the simulator's other arms run without them.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from tiersched.core.expert import ExpertPlanner, ExpertStats, Placement

# upstream's EplbAlgorithm members, in its order, and its flag values (the members plus "auto")
UPSTREAM_EPLB_ALGORITHMS = ("deepseek", "deepseek_hierarchical", "deepseek_vec", "deepseek_vec_hierarchical",
                            "elasticity_aware", "elasticity_aware_hierarchical")
UPSTREAM_EPLB_NAMES = (*UPSTREAM_EPLB_ALGORITHMS, "auto")


def resolve_algorithm(name: str, num_groups: Optional[int], num_nodes: int) -> str:
    """An `--eplb-algorithm` value -> the algorithm upstream runs, by upstream's own compute_algorithm."""
    from sglang.srt.eplb.eplb_algorithms import compute_algorithm

    if name not in UPSTREAM_EPLB_NAMES:
        raise ValueError(f"unknown upstream EPLB algorithm {name!r}; choose one of {', '.join(UPSTREAM_EPLB_NAMES)}.")
    return compute_algorithm(name, num_groups, num_nodes).name


def upstream_rebalance(stats: ExpertStats, num_physical: int, num_ranks: int, num_nodes: int = 1,
                       num_groups: Optional[int] = None, algorithm: str = "deepseek") -> Placement:
    """Upstream's placement for stats.source_counts float [W, L, S, E] (summed over S to upstream's
    tokens_per_expert [W, L, E]): phy2log [L, num_physical], log2phy [L, E, X] (-1 padded) and logcnt [L, E], as
    int64. The hierarchical algorithms need E % num_groups == 0 and num_groups % num_nodes == 0 (upstream asserts
    it); num_groups=None is a model without expert groups (upstream's Qwen3-MoE)."""
    import torch
    from sglang.srt.eplb import eplb_algorithms

    algorithm = resolve_algorithm(algorithm, num_groups, num_nodes)
    windows = torch.from_numpy(np.asarray(stats.source_counts, dtype=np.float64).sum(axis=2))  # [W, L, E]
    if algorithm.startswith("elasticity_aware"):
        # the branch of eplb_algorithms.rebalance_experts, with the healthy-rank state it falls back to
        from sglang.srt.elastic_ep.elastic_ep import ElasticEPStateManager
        from sglang.srt.eplb.eplb_algorithms import elasticity_aware

        out = elasticity_aware.rebalance_experts(
            weight=windows.sum(dim=0), num_replicas=num_physical, num_groups=num_groups, num_nodes=num_nodes,
            num_gpus=num_ranks, enable_hierarchical=algorithm == "elasticity_aware_hierarchical",
            active_ranks=ElasticEPStateManager.healthy_rank_state(ep_size=num_ranks, device=torch.device("cpu")))
    else:
        out = eplb_algorithms.rebalance_experts(
            tokens_per_expert=windows, num_physical_experts=num_physical,
            num_local_physical_experts=num_physical // num_ranks, num_groups=num_groups, num_nodes=num_nodes,
            algorithm=eplb_algorithms.EplbAlgorithm[algorithm])
    phy2log, log2phy, logcnt = (t.numpy().astype(np.int64) for t in out)
    return Placement(phy2log=phy2log, log2phy=log2phy, logcnt=logcnt)


def deepseek_rebalance(stats: ExpertStats, num_physical: int, num_ranks: int, num_nodes: int = 1,
                       num_groups: Optional[int] = None, hierarchical: bool = False) -> Placement:
    """Upstream's `deepseek` (or `deepseek_hierarchical`) placement; see upstream_rebalance."""
    return upstream_rebalance(stats, num_physical, num_ranks, num_nodes, num_groups,
                              "deepseek_hierarchical" if hierarchical else "deepseek")


class UpstreamEPLB(ExpertPlanner):
    """One of upstream's `--eplb-algorithm` values as the simulator's planner. num_groups: the model's expert
    groups (upstream's ModelConfigForExpertLocation.num_groups; None or 1 = no groups: `auto` then resolves to
    `deepseek`, as upstream does for Qwen3-MoE, and a hierarchical algorithm runs with one group per node)."""

    def __init__(self, algorithm: str = "deepseek", num_groups: Optional[int] = None):
        if algorithm not in UPSTREAM_EPLB_NAMES:
            raise ValueError(f"unknown upstream EPLB algorithm {algorithm!r}; "
                             f"choose one of {', '.join(UPSTREAM_EPLB_NAMES)}.")
        self.algorithm = algorithm
        self.num_groups = num_groups if num_groups and num_groups > 1 else None
        self.name = algorithm

    @property
    def hierarchical(self) -> bool:
        return self.algorithm.endswith("_hierarchical")

    def plan(self, stats: ExpertStats, num_slots: int, num_gpus: int, num_nodes: int,
             current: Optional[Placement] = None) -> Placement:
        groups = self.num_groups
        algorithm = resolve_algorithm(self.algorithm, groups, num_nodes)
        num_logical = stats.source_counts.shape[3]
        if algorithm.endswith("_hierarchical") and (groups is None or num_logical % groups or groups % num_nodes):
            groups = num_nodes  # the layout upstream's hierarchical split accepts: one group per node
        return upstream_rebalance(stats, num_slots, num_gpus, num_nodes, groups, algorithm)

