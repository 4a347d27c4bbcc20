"""Expert-tier adapter: `--eplb-algorithm source_aware | source_aware_hierarchical` inside upstream's EPLB.

Upstream path (sglang/srt/eplb/): `EPLBManager.rebalance` dumps the stat recorder (all-reduced `logical_count`
[buffer, L, E]) and calls `ExpertLocationMetadata.init_by_eplb`, which asks `eplb_algorithms.compute_algorithm`
for an `EplbAlgorithm` enum member and calls `eplb_algorithms.rebalance_experts(...)` -> (phy2log [L, P],
log2phy [L, E, X], logcnt [L, E]). `--eplb-algorithm` is a free string (arg_groups/fields/exec_.py), so no
argparse change is needed; the enum is closed, so `compute_algorithm` returns our own marker object for our
names and `rebalance_experts` dispatches that marker to `tiersched.core.expert.placement.rebalance`, returning
exactly upstream's tuple (int64 torch tensors, log2phy width = max replicas, -1 padded).

Statistics: the per-source recorder (capture.py / recorder.py) when it ran, else upstream's
aggregate counts (S == 1). Previous placement: the global ExpertLocationMetadata.physical_to_logical_map.
Bad statistics or a planner failure: the core keeps the current placement and logs one line. Every rank plans
the same data; rank 0's phy2log is broadcast so all ranks apply one placement even if a solver time budget cut
a layer short on one of them. Rows for every hooked target: patches/expert-tier.toml.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from tiersched.core.expert import (ExpertStats, Placement, PlacementConfig, check_stats, placement_from_phy2log,
                                   trivial_placement)
from tiersched.core.expert.metrics import placement_pressure
from tiersched.core.expert.placement import rebalance
from tiersched.sglang.engine.loads import set_expert_pressure_provider
from tiersched.sglang.expert.recorder import densify
from tiersched.sglang.expert.state import STATE, Window, is_ours

logger = logging.getLogger("tiersched.expert_tier")

FAULT_ENV = "TIERSCHED_EXPERT_INJECT_BAD_STATS"  # test-only: comma list, i-th entry applies to the i-th rebalance

HOOKS = (
    ("sglang.srt.eplb.eplb_algorithms.compute_algorithm", "AROUND", "compute_algorithm"),
    ("sglang.srt.eplb.eplb_algorithms.rebalance_experts", "AROUND", "rebalance_experts"),
    ("sglang.srt.arg_groups.validation_hook.check_server_args", "BEFORE", "validate_server_args"),
)


@dataclass(frozen=True)
class SourceAwareAlgorithm:
    """Stands where upstream expects an EplbAlgorithm member (only rebalance_experts reads it)."""

    name: str
    hierarchical: bool


def configure(config: PlacementConfig) -> None:
    """Set this process's planner config (validated) and feed the engine tier this rank's expert pressure."""
    STATE.configure(config)
    set_expert_pressure_provider(scheduler_pressure)


# ---- startup validation -------------------------------------------------------------------------------------


def validate_server_args(server_args, *args, **kwargs):
    """With one of our algorithms, check at start-up what upstream checks only at the first rebalance. Any other
    `--eplb-algorithm` value is upstream's (or another plugin's) to accept or reject."""
    name = server_args.eplb_algorithm
    if not is_ours(name):
        return None
    redundant = server_args.ep_num_redundant_experts or 0
    if redundant < 0:
        raise ValueError(f"--ep-num-redundant-experts must be >= 0 for {name}, got {redundant}.")
    iterations = server_args.eplb_rebalance_num_iterations or 0
    if server_args.enable_eplb and iterations <= 0:
        raise ValueError(f"--eplb-rebalance-num-iterations must be > 0 for {name}, got {iterations}.")
    return None


# ---- algorithm seam -------------------------------------------------------------------------------------------


def compute_algorithm(original_fn, raw_algorithm, *args, **kwargs):
    if is_ours(raw_algorithm):
        return SourceAwareAlgorithm(raw_algorithm, raw_algorithm.endswith("_hierarchical"))
    return original_fn(raw_algorithm, *args, **kwargs)


def rebalance_experts(original_fn, tokens_per_expert, num_physical_experts, num_local_physical_experts,
                      num_groups, num_nodes, algorithm, *args, **kwargs):
    if not isinstance(algorithm, SourceAwareAlgorithm):
        return original_fn(tokens_per_expert, num_physical_experts, num_local_physical_experts, num_groups,
                           num_nodes, algorithm, *args, **kwargs)
    import torch

    prev = _current_phy2log()
    phy2log = plan(tokens_per_expert, num_physical_experts, num_local_physical_experts, num_nodes, algorithm, prev)
    phy2log = _agree_across_ranks(phy2log)
    return placement_tensors(phy2log, int(tokens_per_expert.shape[-1]), torch)


def placement_tensors(phy2log: np.ndarray, num_logical: int, torch):
    """Upstream's tuple from phy2log int [L, P]: (phy2log, log2phy [L, E, max replicas] -1 padded, logcnt [L, E]),
    all int64 CPU tensors like deepseek.rebalance_experts returns."""
    placement = placement_from_phy2log(phy2log, num_logical)
    return (torch.from_numpy(placement.phy2log.copy()), torch.from_numpy(placement.log2phy.copy()),
            torch.from_numpy(placement.logcnt.copy()))


def plan(tokens_per_expert, num_physical: int, num_local_physical: int, num_nodes: int,
         algorithm: SourceAwareAlgorithm, prev_phy2log: Optional[np.ndarray]) -> np.ndarray:
    """phy2log int64 [L, P] for the next placement. tokens_per_expert: upstream's logical_count [B, L, E] (or
    [L, E]); the per-source window gathered at the last dump replaces it when its shape matches."""
    aggregate = np.asarray(_to_numpy(tokens_per_expert), dtype=np.float64)
    if aggregate.ndim == 3:
        aggregate = aggregate.sum(0)
    num_ranks = num_physical // max(num_local_physical, 1)
    nodes = max(int(num_nodes), 1) if algorithm.hierarchical else 1
    window, source = _take_window(aggregate, num_ranks)
    STATE.rebalances += 1
    window = _inject_fault(window, STATE.rebalances)
    num_layers, num_logical = (aggregate.shape if aggregate.ndim == 2 else (None, None))
    if prev_phy2log is not None and num_logical:
        prev = placement_from_phy2log(prev_phy2log, num_logical)
    else:  # no metadata yet (in-process use): upstream's trivial layout is what is loaded
        prev = trivial_placement(num_layers, num_logical, num_physical) if num_logical else None
    config = STATE.config
    candidate = ExpertStats(source_counts=np.asarray(window.counts)[None] if np.ndim(window.counts) == 3
                            else np.asarray(window.counts))
    problem = check_stats(candidate, num_layers, num_logical)
    if problem:  # the core logs one line and returns the current placement
        placement = rebalance(candidate, num_physical, num_ranks, nodes, prev, config)
        STATE.last = {"n": STATE.rebalances, "kept": True, "problem": problem, "source": source}
        return placement.phy2log
    STATE.history.append(window)
    stats = history_stats(list(STATE.history), num_logical)
    placement = rebalance(stats, num_physical, num_ranks, nodes, prev, config)
    kept = placement is prev  # the core fell back (solver failure) and already logged why
    _update_pressure(placement, window, num_ranks)
    moved = float((placement.phy2log != prev.phy2log).mean()) if prev is not None else float("nan")
    STATE.last = {"n": STATE.rebalances, "kept": kept, "problem": "planner failed" if kept else "",
                      "source": source, "windows": stats.source_counts.shape[0],
                      "sources": stats.source_counts.shape[2], "migrated_fraction": moved}
    if not kept:
        logger.info("tiersched expert tier: rebalance #%d planned %s (%d windows, %d sources, %s statistics); "
                    "migrated %.3f of slots", STATE.rebalances, algorithm.name, stats.source_counts.shape[0],
                    stats.source_counts.shape[2], source, moved)
    return placement.phy2log


def history_stats(windows: list, num_logical: int) -> ExpertStats:
    """ExpertStats [W, L, S, E] from the stored windows that share the newest window's shape (most recent last);
    co-activation summed over them (densified from top-K) when every one of them has it."""
    newest = windows[-1]
    same = [w for w in windows if w.counts.shape == newest.counts.shape]
    counts = np.stack([w.counts for w in same]).astype(np.float64)
    coact = None
    if all(w.coact_index is not None for w in same) and counts.shape[1] > 1:
        coact = sum(densify(w.coact_index, w.coact_value, num_logical) for w in same)
    return ExpertStats(source_counts=counts, coactivation=coact)


def _take_window(aggregate: np.ndarray, num_ranks: int) -> tuple[Window, str]:
    """The per-source window from the last dump when it matches the aggregate's [L, E], else the aggregate."""
    pending, STATE.pending = STATE.pending, None
    if pending is not None and aggregate.ndim == 2:
        counts = np.asarray(pending.counts)
        if counts.ndim == 3 and counts.shape[0] == aggregate.shape[0] and counts.shape[2] == aggregate.shape[1]:
            if counts.shape[1] not in (1, num_ranks):  # sources that are not ranks: plan on the aggregate
                pending = Window(counts.sum(1, keepdims=True), pending.coact_index, pending.coact_value)
            return pending, "per-source" if pending.counts.shape[1] > 1 else "recorder"
    return Window(counts=aggregate[:, None, :] if aggregate.ndim == 2 else aggregate), "aggregate"


def _inject_fault(window: Window, rebalance_number: int) -> Window:
    """Test-only (env TIERSCHED_EXPERT_INJECT_BAD_STATS="ok,nan,negative,shape,empty"): corrupt the statistics
    of the i-th rebalance as the i-th entry says, to prove serving survives bad input."""
    faults = [f.strip() for f in os.environ.get(FAULT_ENV, "").split(",") if f.strip()]
    fault = faults[rebalance_number - 1] if rebalance_number <= len(faults) else "ok"
    counts = np.array(window.counts, dtype=np.float64)
    if fault == "nan":
        counts.flat[0] = np.nan
    elif fault == "negative":
        counts.flat[0] = -1.0
    elif fault == "shape":
        counts = counts[:, :, :-1]
    elif fault == "empty":
        counts = np.zeros((0,) + counts.shape[1:])
    else:
        return window
    logger.warning("tiersched expert tier: test fault %r injected into rebalance #%d", fault, rebalance_number)
    return Window(counts)


# ---- feedback for the engine tier -------------------------------------------------------------------------------


def _update_pressure(placement: Placement, window: Window, num_ranks: int) -> None:
    try:
        stats = ExpertStats(source_counts=np.asarray(window.counts, dtype=np.float64)[None])
        STATE.pressure = placement_pressure(placement, stats, num_ranks=num_ranks)
    except Exception as exc:  # feedback is advisory: never fail a rebalance for it
        logger.warning("tiersched expert tier: expert pressure not updated (%s)", exc)


def expert_pressure_for_rank(rank: int) -> Optional[float]:
    """Expert pressure of EP rank `rank` as a token source (core.expert.metrics.placement_pressure: the load of
    the ranks its tokens go to under the current placement, from the last rebalance's window; 1.0 = average-loaded
    destinations); None before the first successful rebalance."""
    pressure = STATE.pressure
    if pressure is None or not 0 <= rank < len(pressure):
        return None
    return float(pressure[rank])


def scheduler_pressure(scheduler) -> Optional[float]:
    """Provider for tiersched.sglang.engine.loads: this scheduler's EP rank (= its DP rank when each DP
    attention rank is one EP rank)."""
    from sglang.srt.runtime_context import get_parallel  # deferred: the runtime context imports torch

    try:
        rank = int(get_parallel().moe_ep_rank)
    except Exception:  # noqa: BLE001 - no published topology (in-process use): no pressure, not a failure
        return None
    return expert_pressure_for_rank(rank)


# ---- upstream state ---------------------------------------------------------------------------------------------


def _to_numpy(value):
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _current_phy2log() -> Optional[np.ndarray]:
    try:
        from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

        metadata = get_global_expert_location_metadata()
    except Exception:
        return None
    if metadata is None:
        return None
    return _to_numpy(metadata.physical_to_logical_map_cpu).astype(np.int64)


def _agree_across_ranks(phy2log: np.ndarray) -> np.ndarray:
    """Broadcast rank 0's plan (every rank reaches this point in lockstep inside init_by_eplb)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return phy2log
    tensor = torch.from_numpy(np.ascontiguousarray(phy2log, dtype=np.int64))
    if dist.get_backend() == "nccl":  # the default group of a GPU deployment only moves device tensors
        tensor = tensor.cuda()
    dist.broadcast(tensor, src=0)
    return tensor.cpu().numpy()
