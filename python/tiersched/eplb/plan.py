"""`python -m tiersched.eplb plan`: statistics -> a placement file stock upstream loads with
`--init-expert-location` (compute_initial_expert_location_metadata in sglang/srt/eplb/expert_location.py
accepts .json/.pt with `physical_to_logical_map` [L, P] and passes it to ExpertLocationMetadata.init_by_mapping)."""
from __future__ import annotations

import json
from typing import Optional, Sequence

import numpy as np

from tiersched.core.expert import Placement, PlacementConfig, placement_from_phy2log
from tiersched.core.expert.placement import rebalance
from tiersched.eplb.stats_io import load_windows


def load_placement(path: str, num_logical: int) -> Placement:
    if path.endswith(".pt"):
        import torch

        data = torch.load(path, weights_only=True, map_location="cpu")
    else:
        data = json.loads(open(path).read())
    return placement_from_phy2log(np.asarray(data["physical_to_logical_map"], dtype=np.int64), num_logical)


def write_placement(path: str, placement: Placement) -> None:
    phy2log = np.asarray(placement.phy2log, dtype=np.int64)
    if path.endswith(".pt"):
        import torch

        torch.save({"physical_to_logical_map": torch.from_numpy(phy2log)}, path)
    else:
        with open(path, "w") as f:
            json.dump({"physical_to_logical_map": phy2log.tolist()}, f)


def plan(stats_files: Sequence[str], out: str, num_physical: int, num_ranks: int, num_nodes: int,
         config: PlacementConfig, prev_path: Optional[str] = None) -> Placement:
    stats = load_windows(stats_files)
    prev = load_placement(prev_path, stats.source_counts.shape[3]) if prev_path else None
    placement = rebalance(stats, num_physical, num_ranks, num_nodes, prev, config)
    write_placement(out, placement)
    return placement
