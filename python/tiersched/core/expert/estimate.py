"""Expert tier, step 1 of the planner: from recorded windows to planning scenarios (docs/expert-tier.md).

estimate(): each window -> load shares; recency weights 2**(-age/half_life); robust load per expert
u = mean + variance_weight * std (observed spread between windows + an assumed drift prior); scenarios = every
planning window + the robust estimate; locality gain of a replica per (rank, expert) from per-source counts.
replica_counts(): upstream's `replicate_experts` rule (sglang/srt/eplb/eplb_algorithms/deepseek.py), applied to
the robust load instead of the mean.
Shapes: W windows, L layers, S sources, E experts, R ranks; Wp = W + 1 scenarios.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tiersched.core.expert import ExpertStats, PlacementConfig


def default_rank_distance(num_ranks: int, num_nodes: int, cross_node_weight: float) -> np.ndarray:
    """float [R, R]: 0 on the diagonal, 1 within a node, 1 + cross_node_weight across nodes."""
    node = np.arange(num_ranks) // (num_ranks // num_nodes)
    dist = np.where(node[:, None] == node[None, :], 1.0, 1.0 + cross_node_weight)
    np.fill_diagonal(dist, 0.0)
    return dist


def replica_counts(load: np.ndarray, num_physical: int) -> np.ndarray:
    """int [L, E] >= 1 summing to num_physical per layer, minimising max load / count (greedy, optimal);
    load float [L, E]."""
    num_layers, num_logical = load.shape
    counts = np.ones((num_layers, num_logical), dtype=np.int64)
    rows = np.arange(num_layers)
    for _ in range(num_physical - num_logical):
        pick = np.argmax(load / counts, axis=1)
        counts[rows, pick] += 1
    return counts


@dataclass
class Estimate:
    """Planning input for the L layers, in units where each scenario's mean rank load is 1."""

    scen: np.ndarray  # [L, Wp, S, E] planning scenarios, each scaled so mean rank load is 1
    weight: np.ndarray  # [Wp] scenario weights summing to 1
    robust: np.ndarray  # [L, E] robust load (same units)
    gain: np.ndarray  # [L, R, E] locality gain (traffic share saved) of a replica of e on rank r
    active: np.ndarray  # [L] layers with tokens


def estimate(stats: ExpertStats, num_ranks: int, config: PlacementConfig, dist: np.ndarray) -> Estimate:
    """Scenarios, weights, robust load and locality gain from stats.source_counts float [W, L, S, E];
    dist float [R, R] rank distances. The gain is zero unless S == R (per-source statistics)."""
    counts = np.asarray(stats.source_counts, dtype=np.float64)  # [W, L, S, E]
    num_windows, num_layers, num_sources, num_logical = counts.shape
    totals = counts.sum(axis=(2, 3))  # [W, L]
    shares = np.divide(counts, totals[:, :, None, None], out=np.zeros_like(counts), where=totals[:, :, None, None] > 0)
    ages = np.arange(num_windows)[::-1]
    omega = (2.0 ** (-ages / config.window_half_life))[:, None] * (totals > 0)  # [W, L]
    omega = omega / np.maximum(omega.sum(0, keepdims=True), 1e-300)
    mean_src = np.einsum("wl,wlse->lse", omega, shares)
    agg = shares.sum(2)  # [W, L, E]
    mean_agg = mean_src.sum(1)
    var = np.einsum("wl,wle->le", omega, (agg - mean_agg[None]) ** 2) + (config.prior_drift_sigma * mean_agg) ** 2
    robust = mean_agg + config.variance_weight * np.sqrt(var)
    # robust scenario: per-source split of the mean, scaled per expert to the robust load, renormalised
    scale = np.divide(robust, mean_agg, out=np.ones_like(robust), where=mean_agg > 0)
    robust_src = mean_src * scale[:, None, :]
    robust_src /= np.maximum(robust_src.sum(axis=(1, 2), keepdims=True), 1e-300)
    scen = np.concatenate([np.transpose(shares, (1, 0, 2, 3)), robust_src[:, None]], axis=1) * num_ranks
    weight = np.append(np.full(num_windows, 1.0 / num_windows), 1.0) / 2.0
    if num_sources == num_ranks:
        dbar = dist.mean(1)  # expected distance from source s to a random rank
        gain = np.einsum("lse,sr->lre", mean_src, dbar[:, None] - dist)
    else:
        gain = np.zeros((num_layers, num_ranks, num_logical))
    active = totals.sum(0) > 0
    return Estimate(scen, weight, robust * num_ranks, gain, active)
