"""Upstream's DeepSeek EPLB, called as upstream calls it (not reimplemented).

Mirrors `sglang.srt.eplb.eplb_algorithms.rebalance_experts` for EplbAlgorithm.deepseek[_hierarchical]: it
passes `tokens_per_expert.sum(dim=0)` (the recorded windows summed) to `deepseek.rebalance_experts`."""
from __future__ import annotations

import numpy as np

from tiersched.core.expert.placement import ExpertStats, Placement, placement_from_phy2log


def deepseek_placement(stats: ExpertStats, num_physical: int, num_ranks: int, num_nodes: int = 1,
                       num_groups: int | None = None, hierarchical: bool = False) -> Placement:
    import torch
    from sglang.srt.eplb.eplb_algorithms.deepseek import rebalance_experts

    weight = torch.tensor(np.asarray(stats.source_counts, dtype=np.float64).sum(axis=(0, 2)))  # [L, E]
    phy2log, _, _ = rebalance_experts(
        weight=weight, num_replicas=num_physical, num_groups=num_groups, num_nodes=num_nodes,
        num_gpus=num_ranks, enable_hierarchical=hierarchical,
    )
    return placement_from_phy2log(phy2log.numpy().astype(np.int64), weight.shape[1])
