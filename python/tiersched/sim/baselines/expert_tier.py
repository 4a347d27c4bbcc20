"""Expert-tier baselines: upstream's DeepSeek EPLB, called as upstream calls it.

`sglang.srt.eplb.eplb_algorithms.deepseek.rebalance_experts(weight [L, E], num_replicas, num_groups, num_nodes,
num_gpus, enable_hierarchical)` runs on torch CPU, once per rebalance (never in the per-step hot path), on the
aggregate logical counts of the window (sum over source ranks: upstream's recorder has no source dimension).
Upstream's EPLBManager triggers it every `eplb_rebalance_num_iterations` forward passes (default 1000).
"""
from __future__ import annotations

import numpy as np

from tiersched.core.expert.placement import ExpertStats, Placement


class DeepSeekEPLB:
    """Global (`deepseek`) or hierarchical (`deepseek-hierarchical`) DeepSeek EPLB."""

    def __init__(self, hierarchical: bool = False, num_groups: int = 1):
        self.hierarchical = hierarchical
        self.num_groups = num_groups
        self.name = "deepseek-hierarchical" if hierarchical else "deepseek"

    def plan(self, stats: ExpertStats, num_slots: int, num_gpus: int, num_nodes: int,
             current: Placement | None = None) -> Placement:
        import torch
        from sglang.srt.eplb.eplb_algorithms.deepseek import rebalance_experts

        weight = stats.source_counts.sum(axis=(0, 2))  # [W, L, S, E] -> [L, E]
        groups = self.num_groups if self.hierarchical else 1
        nodes = num_nodes if self.hierarchical else 1
        if self.hierarchical and (weight.shape[1] % groups or groups % nodes):
            groups = nodes  # upstream requires num_groups % num_nodes == 0
        phy2log, log2phy, logcnt = rebalance_experts(
            torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)), num_slots, groups, nodes, num_gpus,
            self.hierarchical,
        )
        return Placement(phy2log=phy2log.numpy().astype(np.int64), log2phy=log2phy.numpy().astype(np.int64),
                         logcnt=logcnt.numpy().astype(np.int64))
