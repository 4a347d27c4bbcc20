"""`python -m tiersched.eplb evaluate`: our planner next to upstream's `deepseek`, in the same run.

Two parts (docs/expert-tier.md has the reasoning):
* held-out (does a plan made on past windows hold on the next?): aggregate `logical_count` windows;
  leave-one-window-out (plan on the others, evaluate on the one left out), or `--plan-stats`/`--eval-stats`;
  in-sample = on the planning windows themselves.
* source-aware (what per-source statistics buy): per-source windows drawn from RoutingModel calibrated on the
  same counts (all windows summed), R sources = R ranks; balancedness and cross-rank share on the planning
  window, migrated fraction of a re-plan on the next stationary window, solve time of the whole model (wall and
  CPU seconds of this process, ours and upstream's `deepseek` timed in the same run), and cross-rank share under
  both routing models (combine every layer / tokens stay with their expert), for ours with and without
  inter-layer co-location.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Optional, Sequence

import numpy as np

from tiersched.core.expert import metrics
from tiersched.core.expert import ExpertStats, PlacementConfig
from tiersched.core.expert.placement import rebalance
from tiersched.eplb.stats_io import load_windows
from tiersched.sim.moe_routing import RoutingModel
from tiersched.sim.upstream_eplb import deepseek_rebalance


def _window(stats: ExpertStats, idx) -> ExpertStats:
    return ExpertStats(source_counts=stats.source_counts[idx])


def _timed(fn, *args):
    """(result, wall seconds, CPU seconds of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def heldout(plan: ExpertStats, evals: Sequence[ExpertStats], num_physical: int, num_ranks: int, num_nodes: int,
            config: PlacementConfig) -> dict:
    """Balancedness of ours and deepseek planned on `plan`, on each of `evals` and in-sample."""
    ours, solve_s, solve_cpu = _timed(rebalance, plan, num_physical, num_ranks, num_nodes, None, config)
    base = deepseek_rebalance(plan, num_physical, num_ranks, num_nodes)
    return {
        "ours": [metrics.balancedness(ours, e, num_ranks) for e in evals],
        "deepseek": [metrics.balancedness(base, e, num_ranks) for e in evals],
        "ours_in": metrics.balancedness(ours, plan, num_ranks),
        "deepseek_in": metrics.balancedness(base, plan, num_ranks),
        "solve_s": solve_s,
        "solve_cpu_s": solve_cpu,
    }


def heldout_summary(results: list[dict]) -> dict:
    ours = np.concatenate([r["ours"] for r in results])
    base = np.concatenate([r["deepseek"] for r in results])
    return {
        "heldout_balancedness_mean": float(ours.mean()),
        "heldout_balancedness_min": float(ours.min()),
        "heldout_balancedness_mean_deepseek": float(base.mean()),
        "heldout_balancedness_min_deepseek": float(base.min()),
        "insample_balancedness": float(np.mean([r["ours_in"] for r in results])),
        "insample_balancedness_deepseek": float(np.mean([r["deepseek_in"] for r in results])),
        "heldout_solve_s_max": float(max(r["solve_s"] for r in results)),
        "heldout_solve_cpu_s_max": float(max(r["solve_cpu_s"] for r in results)),
        "heldout_folds": [round(float(x), 4) for x in ours],
        "heldout_folds_deepseek": [round(float(x), 4) for x in base],
    }


def source_aware(counts: np.ndarray, num_physical: int, num_ranks: int, num_nodes: int, config: PlacementConfig,
                 source_skew: float, seed: int, tokens_per_source: float, lift: Optional[float] = None) -> dict:
    """counts float [L, E]: calibrates the routing model; returns the source-aware fields above."""
    extra = {} if lift is None else {"lift": lift}
    model = RoutingModel.from_logical_counts(counts, num_ranks, source_skew=source_skew, seed=seed, **extra)
    rng = np.random.default_rng(seed)
    tokens = np.full(num_ranks, tokens_per_source)
    first = model.sample_window(tokens, rng, coactivation=True)
    second = model.sample_window(tokens, rng)  # stationary: same model, fresh sample
    ours, solve_s, solve_cpu = _timed(rebalance, first, num_physical, num_ranks, num_nodes, None, config)
    again, resolve_s, resolve_cpu = _timed(rebalance, second, num_physical, num_ranks, num_nodes, ours, config)
    base, base_s, base_cpu = _timed(deepseek_rebalance, first, num_physical, num_ranks, num_nodes)
    base_again = deepseek_rebalance(second, num_physical, num_ranks, num_nodes)
    no_chain = rebalance(first, num_physical, num_ranks, num_nodes, None, replace(config, colocation_weight=0.0))
    placements = {"ours": ours, "ours_without_colocation": no_chain, "deepseek": base}
    return {
        "balancedness": metrics.balancedness(ours, first),
        "balancedness_deepseek": metrics.balancedness(base, first),
        "cross_rank_share": metrics.cross_rank_share(ours, first),
        "cross_rank_share_deepseek": metrics.cross_rank_share(base, first),
        "migrated_fraction": metrics.migrated_fraction(again, ours),
        "migrated_fraction_deepseek": metrics.migrated_fraction(base_again, base),
        "balancedness_after_replan": metrics.balancedness(again, second),
        "solve_s": max(solve_s, resolve_s),
        "solve_cpu_s": max(solve_cpu, resolve_cpu),
        "solve_s_deepseek": base_s,
        "solve_cpu_s_deepseek": base_cpu,
        "expert_pressure_max": float(metrics.placement_pressure(ours, first).max()),
        "routing_models": {
            "combine_every_layer": {k: metrics.cross_rank_share(p, first) for k, p in placements.items()},
            "tokens_stay_with_expert": {k: metrics.cross_rank_share_stay(p, first) for k, p in placements.items()},
            "balancedness": {k: metrics.balancedness(p, first) for k, p in placements.items()},
            "inter_layer_lift": model.lift,
        },
    }


def evaluate(plan_files: Sequence[str], eval_files: Optional[Sequence[str]], num_physical: int, num_ranks: int,
             num_nodes: int, config: PlacementConfig, source_skew: float, seed: int, tokens_per_source: float,
             lift: Optional[float] = None) -> dict:
    windows = load_windows(plan_files)
    num_windows = windows.source_counts.shape[0]
    if eval_files:
        evals = [_window(load_windows(eval_files), slice(i, i + 1)) for i in range(len(eval_files))]
        folds = [heldout(windows, evals, num_physical, num_ranks, num_nodes, config)]
        protocol = "plan on --plan-stats, evaluate on each --eval-stats file"
    elif num_windows >= 2:
        folds = [heldout(_window(windows, np.delete(np.arange(num_windows), i)), [_window(windows, slice(i, i + 1))],
                         num_physical, num_ranks, num_nodes, config) for i in range(num_windows)]
        protocol = "leave-one-window-out"
    else:
        folds = []
        protocol = "single window: no held-out evaluation"
    result = {"num_ranks": num_ranks, "num_physical_experts": num_physical, "num_windows": num_windows,
              "heldout_protocol": protocol}
    if folds:
        result.update(heldout_summary(folds))
    aggregate = windows.source_counts.sum(axis=(0, 2))
    sa = source_aware(aggregate, num_physical, num_ranks, num_nodes, config, source_skew, seed, tokens_per_source, lift)
    result.update(sa)
    result["source_model"] = {"source_skew": source_skew, "seed": seed, "tokens_per_source": tokens_per_source,
                              "inter_layer_lift": sa["routing_models"]["inter_layer_lift"]}
    return result
