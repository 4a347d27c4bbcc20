"""Capacity of a simulated deployment, and the mixed-priority scenario at a multiple of it.

Two definitions (docs/request-tier.md, "What 1.5x overload means"):
- `nominal_capacity_req_s`: a closed-form estimate from the step-time model (every rank prefills at once, then
  decodes `decode_batch` requests); cheap, and what the sweep's load fractions are relative to;
- `measured_capacity_req_s`: the saturated throughput the simulator measures for the mixed-priority length mix
  under upstream FCFS; what `mixed_priority_at_overload` uses by default.
"""
from __future__ import annotations

import functools
from dataclasses import replace

import numpy as np

from tiersched.sim.cost_model import StepCostModel
from tiersched.sim.loop import simulate
from tiersched.sim.moe_routing import ZipfRouting, token_probs
from tiersched.sim.policies import PolicySet
from tiersched.sim.presets import Preset, get_preset
from tiersched.sim.workloads import Workload, mixed_priority

# Saturation run that defines the measured capacity: its own seed (not an evaluation seed), offered load far above
# capacity, completions counted after the warm-up.
CAPACITY_SEED, CAPACITY_RUN_S, CAPACITY_WARMUP_S, CAPACITY_OVERDRIVE = 12345, 40.0, 10.0, 3.0


def nominal_capacity_req_s(preset: Preset, mean_input: float, mean_output: float, decode_batch: int = 64) -> float:
    """Rough sustainable request rate: one rank's time per request (its prefill alone plus its share of decode
    steps at `decode_batch` running requests per rank, all ranks in lockstep), times dp ranks."""
    m = preset.model
    probs = token_probs(ZipfRouting(m.moe_layers, preset.dp, m.num_experts, m.top_k, skew=0.0), preset.dp)
    cost = StepCostModel(preset, probs)
    dp = preset.dp
    prefill = cost.step_times(np.full(dp, mean_input), np.full(dp, mean_input * (mean_input + 1) / 2),
                              np.zeros(dp))[0][0]
    decode = cost.step_times(np.full(dp, float(decode_batch)), np.zeros(dp),
                             np.full(dp, decode_batch * (mean_input + mean_output / 2)))[0][0]
    per_request_s = prefill + mean_output * decode / decode_batch
    return dp / per_request_s


def _mean_lengths(ls_fraction: float, ls_input, ls_output, be_input, be_output) -> tuple[float, float]:
    mean_in = ls_fraction * np.mean(ls_input) + (1 - ls_fraction) * np.mean(be_input)
    mean_out = ls_fraction * np.mean(ls_output) + (1 - ls_fraction) * np.mean(be_output)
    return float(mean_in), float(mean_out)


@functools.lru_cache(maxsize=32)
def measured_capacity_req_s(preset: Preset | str, ls_fraction: float = 0.2, ls_input=(128, 2048),
                            ls_output=(16, 256), be_input=(4096, 16384), be_output=(128, 1024),
                            prefix_groups: int = 8, prefix_tokens: int = 1024, block_tokens: int = 64) -> float:
    """Saturated throughput (requests/s) of the simulated deployment for the mixed-priority length mix under
    upstream FCFS: a Poisson stream at CAPACITY_OVERDRIVE x the analytic estimate for CAPACITY_RUN_S seconds; the
    rate at which requests complete between CAPACITY_WARMUP_S and the last arrival (the queue never empties, so
    this is what the deployment sustains). Why not the analytic estimate: it assumes every DP rank prefills at
    once and decodes 64 requests; in lockstep DP attention one rank's long prefill step stalls all ranks, and the
    KV pool holds ~33 of these requests per rank, so the real capacity is about half of it (docs/request-tier.md).
    Cached per preset and mix (deterministic)."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    analytic = nominal_capacity_req_s(preset, *_mean_lengths(ls_fraction, ls_input, ls_output, be_input, be_output))
    w = mixed_priority(CAPACITY_OVERDRIVE * analytic, ls_fraction, CAPACITY_RUN_S, CAPACITY_SEED, ls_input,
                       ls_output, be_input, be_output, prefix_groups, prefix_tokens, block_tokens)
    result = simulate(preset, w, PolicySet(ordering="fcfs"), CAPACITY_SEED, record_timeline=False)
    finish = w.arrival_s + result.records["e2e"]
    end = float(w.arrival_s[-1])
    done = np.isfinite(finish) & (finish >= CAPACITY_WARMUP_S) & (finish < end)
    return float(done.sum()) / (end - CAPACITY_WARMUP_S)


def mixed_priority_at_overload(ls_fraction: float = 0.2, overload: float = 1.5, preset: Preset | str = "qwen3",
                               duration_s: float = 60.0, seed: int = 0, ls_input: tuple[int, int] = (128, 2048),
                               ls_output: tuple[int, int] = (16, 256), be_input: tuple[int, int] = (4096, 16384),
                               be_output: tuple[int, int] = (128, 1024), prefix_groups: int = 8,
                               prefix_tokens: int = 1024, block_tokens: int = 64,
                               capacity: str = "measured") -> Workload:
    """workloads.mixed_priority at `overload` x the capacity for this length mix on `preset`:
    `capacity="measured"` (default) = measured_capacity_req_s; `"analytic"` = nominal_capacity_req_s, which
    overestimates it ~2x for this mix (docs/request-tier.md, "What 1.5x overload means"). The workload's meta
    records both capacities and which one set the rate."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    analytic = nominal_capacity_req_s(preset, *_mean_lengths(ls_fraction, ls_input, ls_output, be_input, be_output))
    if capacity == "measured":
        capacity_req_s = measured_capacity_req_s(preset, ls_fraction, ls_input, ls_output, be_input, be_output,
                                                 prefix_groups, prefix_tokens, block_tokens)
    elif capacity == "analytic":
        capacity_req_s = analytic
    else:
        raise ValueError(f"capacity must be 'measured' or 'analytic', got {capacity!r}.")
    rate = overload * capacity_req_s
    w = mixed_priority(rate, ls_fraction, duration_s, seed, ls_input, ls_output, be_input, be_output, prefix_groups,
                       prefix_tokens, block_tokens)
    return replace(w, name=f"mixed-priority-ls{ls_fraction:g}-x{overload:g}",
                   meta={"rate": float(rate), "overload": overload, "nominal_capacity_req_s": float(capacity_req_s),
                         "capacity_method": capacity, "analytic_capacity_req_s": float(analytic),
                         "ls_fraction": ls_fraction, "ls_input": ls_input, "ls_output": ls_output,
                         "be_input": be_input, "be_output": be_output, "seed": seed})
