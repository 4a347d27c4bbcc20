"""Metrics of a finished simulation: latency percentiles, throughput, goodput, per-class, cache, balance.

TTFT = first token time - arrival (the prefill step that completes a prompt emits its first token);
TPOT = (finish - first token) / (output tokens - 1) for requests with more than one output token;
goodput = requests per second that finished within the preset's SLOs (TTFT <= slo_ttft_s and TPOT <= slo_tpot_s);
balancedness = sum over steps and layers of mean-GPU / max-GPU expert load, token-weighted (1.0 = perfect);
cross_rank_share = share of (token, expert) assignments served on a GPU outside the token's DP rank.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SimResult:
    metrics: dict
    records: dict  # per request arrays: arrival, rank, ttft, tpot, e2e, cached_tokens, input, output, class, ...
    timeline: dict = field(default_factory=dict)  # time [T], running/waiting/kv_used [T, R]
    expert_load: np.ndarray | None = None  # [L, G] token-expert assignments per GPU over the run
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    sim_s: float = 0.0
    steps: int = 0
    busy: np.ndarray | None = None  # [K, 2] merged (start, end) intervals with a step in flight (record_busy)


def _summary(prefix: str, x: np.ndarray) -> dict:
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {f"{prefix}_mean": None, f"{prefix}_p50": None, f"{prefix}_p90": None, f"{prefix}_p95": None,
                f"{prefix}_p99": None}
    p50, p90, p95, p99 = np.percentile(x, [50, 90, 95, 99])
    return {f"{prefix}_mean": float(x.mean()), f"{prefix}_p50": float(p50), f"{prefix}_p90": float(p90),
            f"{prefix}_p95": float(p95), f"{prefix}_p99": float(p99)}


def latency_metrics(records: dict, mask: np.ndarray, slo_ttft: float, slo_tpot: float, span_s: float) -> dict:
    done = mask & np.isfinite(records["e2e"])
    out = {"requests": int(mask.sum()), "finished": int(done.sum())}
    out.update(_summary("ttft", records["ttft"][done]))
    out.update(_summary("tpot", records["tpot"][done]))
    out.update(_summary("e2e", records["e2e"][done]))
    # Unfinished requests waited at least until the end of the simulation: report the worst wait including them.
    wait = np.where(np.isfinite(records["ttft"]), records["ttft"], records["end_s"] - records["arrival"])
    out["max_wait_s"] = float(wait[mask].max()) if mask.any() else None
    tpot_ok = np.where(np.isfinite(records["tpot"]), records["tpot"] <= slo_tpot, True)
    good = done & (records["ttft"] <= slo_ttft) & tpot_ok
    out["slo_attainment"] = float(good.sum() / max(1, mask.sum()))
    out["goodput_req_s"] = float(good.sum() / span_s) if span_s > 0 else 0.0
    return out


def build_result(sim, wall_s: float) -> SimResult:
    """The result of a finished `loop.Simulation` that ran for `wall_s` seconds of wall time."""
    t, preset, w = sim.table, sim.preset, sim.workload
    ttft = t.first_token - t.arrival
    e2e = t.finish - t.arrival
    multi = t.output > 1
    tpot = np.where(multi, (t.finish - t.first_token) / np.maximum(t.output - 1, 1), np.nan)
    records = {
        "arrival": t.arrival, "rank": t.rank, "ttft": ttft, "tpot": tpot, "e2e": e2e,
        "input_tokens": t.input, "output_tokens": t.output, "cached_tokens": np.maximum(t.cached_at_admit, 0),
        "priority": t.priority, "class_of": np.asarray(w.class_of), "preemptions": t.preemptions,
        "end_s": np.full(t.n, sim.now),
    }
    finished = np.isfinite(e2e)
    start = float(t.arrival.min()) if t.n else 0.0
    span = max(sim.now - start, 1e-9)
    m = latency_metrics(records, np.ones(t.n, dtype=bool), preset.slo_ttft_s, preset.slo_tpot_s, span)
    out_tokens = float(t.output[finished].sum())
    m["throughput"] = out_tokens / span  # output tokens per second
    m["throughput_tok_s"] = m["throughput"]
    m["throughput_total_tok_s"] = float((t.input[finished] + t.output[finished]).sum()) / span
    m["throughput_req_s"] = float(finished.sum()) / span
    m["goodput"] = m["goodput_req_s"]
    admitted = t.cached_at_admit >= 0
    m["cache_hit_rate"] = float(t.cached_at_admit[admitted].sum() / max(1, t.input[admitted].sum()))
    acc = sim.acc
    m["balancedness"] = float(acc["bal_num"] / acc["bal_den"]) if acc["bal_den"] > 0 else None
    m["cross_rank_share"] = float(acc["cross"] / acc["assign"]) if acc["assign"] > 0 else None
    m["migrations"] = int(acc["migrations"])
    m["rebalances"] = int(acc["rebalances"])
    m["routing_drifts"] = int(sim.drifts)
    m["migration_stall_s"] = float(acc["stall_s"])
    m["preemptions"] = int(t.preemptions.sum())
    m["retractions"] = int(sum(r.retractions for r in sim.ranks))
    m["prefill_delayed_passes"] = int(sum(r.delayed_passes for r in sim.ranks))  # enable_prefill_delayer
    m["mixed_steps"] = int(sim.mixed_steps)  # enable_mixed_chunk: rank-steps that carried their decodes
    per_rank = np.bincount(t.rank[t.rank >= 0], minlength=preset.dp)
    m["requests_per_rank"] = per_rank.tolist()
    m["sim_time_s"] = float(sim.now)
    m["per_class"] = {}
    for c, name in enumerate(w.class_names):
        mask = records["class_of"] == c
        if mask.any():
            m["per_class"][name] = latency_metrics(records, mask, preset.slo_ttft_s, preset.slo_tpot_s, span)
    m["max_wait_s_per_class"] = {k: v["max_wait_s"] for k, v in m["per_class"].items()}
    timeline = {k: np.asarray(v) for k, v in sim.timeline.items()}
    return SimResult(metrics=m, records=records, timeline=timeline, expert_load=sim.expert_load, notes=sim.notes,
                     wall_s=wall_s, sim_s=float(sim.now), steps=sim.steps)
