"""Upstream's DeepSeek EPLB, called as upstream calls it (not reimplemented); the one copy that the simulator's
`deepseek` / `deepseek-hierarchical` arms, `python -m tiersched.eplb evaluate` and the tests share.

`sglang.srt.eplb.eplb_algorithms.rebalance_experts` hands `tokens_per_expert.sum(dim=0)` (the recorded windows
summed) to `deepseek.rebalance_experts(weight [L, E], num_replicas, num_groups, num_nodes, num_gpus,
enable_hierarchical)`, which runs on torch CPU once per rebalance (never in the per-step hot path). Upstream's
recorder has no source dimension, so the weight is summed over sources too. Upstream's EPLBManager triggers it
every `eplb_rebalance_num_iterations` forward passes (default 1000). torch and sglang are imported on the first
call, so the simulator's other arms run without them.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from tiersched.core.expert import ExpertPlanner, ExpertStats, Placement


def deepseek_rebalance(stats: ExpertStats, num_physical: int, num_ranks: int, num_nodes: int = 1,
                       num_groups: Optional[int] = None, hierarchical: bool = False) -> Placement:
    """Upstream's placement for stats.source_counts float [W, L, S, E] summed to weight [L, E]: phy2log
    [L, num_physical], log2phy [L, E, max replicas] (-1 padded) and logcnt [L, E], all int64 as upstream
    returns them. num_groups and num_nodes matter only when hierarchical (upstream then needs
    E % num_groups == 0 and num_groups % num_nodes == 0)."""
    import torch
    from sglang.srt.eplb.eplb_algorithms.deepseek import rebalance_experts

    weight = np.asarray(stats.source_counts, dtype=np.float64).sum(axis=(0, 2))  # [W, L, S, E] -> [L, E]
    phy2log, log2phy, logcnt = rebalance_experts(
        weight=torch.from_numpy(weight), num_replicas=num_physical, num_groups=num_groups, num_nodes=num_nodes,
        num_gpus=num_ranks, enable_hierarchical=hierarchical,
    )
    return Placement(phy2log=phy2log.numpy().astype(np.int64), log2phy=log2phy.numpy().astype(np.int64),
                     logcnt=logcnt.numpy().astype(np.int64))


class DeepSeekEPLB(ExpertPlanner):
    """Global (`deepseek`) or hierarchical (`deepseek-hierarchical`, num_groups = the model's expert groups)."""

    def __init__(self, hierarchical: bool = False, num_groups: int = 1):
        self.hierarchical = hierarchical
        self.num_groups = num_groups
        self.name = "deepseek-hierarchical" if hierarchical else "deepseek"

    def plan(self, stats: ExpertStats, num_slots: int, num_gpus: int, num_nodes: int,
             current: Optional[Placement] = None) -> Placement:
        groups = self.num_groups if self.hierarchical else 1
        nodes = num_nodes if self.hierarchical else 1
        if self.hierarchical and (stats.source_counts.shape[3] % groups or groups % nodes):
            groups = nodes  # the layout upstream's hierarchical split accepts: one group per node
        return deepseek_rebalance(stats, num_slots, num_gpus, nodes, groups, self.hierarchical)
