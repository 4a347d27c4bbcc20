"""Shared helpers of the simulator benchmarks: scenario construction, parallel policy runs, lower bounds.

Runs go to a process pool (fork) because each simulation is single-threaded Python; results are metrics dicts.
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from tiersched.data import shared_data_dir
from tiersched.sim import PolicySet, capacity, get_preset, simulate, workloads
from tiersched.traces import load_trace

HEADLINE = ("ttft_mean", "ttft_p95", "ttft_p99", "tpot_mean", "tpot_p95", "tpot_p99", "e2e_mean", "throughput",
            "goodput", "cache_hit_rate", "balancedness", "cross_rank_share", "migrations", "rebalances", "requests",
            "finished")
SYNTHETIC_DEFAULT_RATE = 36.0  # req/s on qwen3-dp4ep4: ~85% of the sustainable rate in our runs (docs/results.md)


@dataclass(frozen=True)
class Scenario:
    preset: str = "qwen3"
    workload: str = "auto"  # auto | mooncake | azure | sharegpt | servegen | synthetic:<Shape> | a trace file
    rate: float | None = None
    duration_s: float = 60.0
    seed: int = 0
    eplb_rebalance_steps: int | None = None
    routing_drift_steps: int = 0  # 0 = fixed routing; else a drifted routing every this many steps
    eplb_history_windows: int = 1
    extra: dict = field(default_factory=dict)
    scheduler: tuple = ()  # (SchedulerSettings field, value) pairs applied on top of the preset's

    def resolved_workload(self) -> str:
        if self.workload != "auto":
            return self.workload
        return "mooncake" if shared_data_dir() is not None else "synthetic:Random"


def build_workload(sc: Scenario):
    kind = sc.resolved_workload()
    if kind == "mooncake":
        return workloads.mooncake(rate=sc.rate, duration_s=sc.duration_s)
    if kind == "azure":
        return workloads.azure_conv(rate=sc.rate, duration_s=sc.duration_s)
    if kind == "sharegpt":
        return workloads.sharegpt(rate=sc.rate or 8.0, duration_s=sc.duration_s, seed=sc.seed)
    if kind == "servegen":
        return workloads.servegen(duration_s=sc.duration_s, seed=sc.seed)
    if kind == "mixed-priority":
        return capacity.mixed_priority_at_overload(preset=sc.preset, duration_s=sc.duration_s, seed=sc.seed)
    if kind == "decode-heavy":  # short prompts, long answers: decode steps (and expert balance) dominate
        return workloads.synthetic("Random", rate=sc.rate or 16.0, duration_s=sc.duration_s, seed=sc.seed,
                                   input_range=(64, 512), output_range=(256, 1024))
    if kind.startswith("synthetic"):
        shape = kind.partition(":")[2] or "Random"
        return workloads.synthetic(shape, rate=sc.rate or SYNTHETIC_DEFAULT_RATE, duration_s=sc.duration_s,
                                   seed=sc.seed)
    if os.path.isfile(kind) or kind.endswith((".jsonl", ".json", ".csv")) or os.sep in kind:
        return load_trace(kind, rate=sc.rate, duration_s=sc.duration_s)  # a user's trace file (tiersched.traces)
    raise ValueError(f"unknown workload {kind!r}; use auto, mooncake, azure, sharegpt, servegen, mixed-priority, "
                     f"decode-heavy, synthetic:<Shape> or the path of a trace file.")


def build_preset(sc: Scenario):
    preset = get_preset(sc.preset)
    if sc.eplb_rebalance_steps:
        preset = preset.with_scheduler(eplb_rebalance_steps=sc.eplb_rebalance_steps)
    if sc.routing_drift_steps or sc.eplb_history_windows != 1:
        preset = preset.with_scheduler(routing_drift_steps=sc.routing_drift_steps,
                                       eplb_history_windows=sc.eplb_history_windows)
    if sc.scheduler:
        preset = preset.with_scheduler(**dict(sc.scheduler))
    return preset


def simulator_refuses(sc: Scenario, changes: dict) -> str | None:
    """None when the simulator runs the scenario's preset with these SchedulerSettings changes, else why not (a
    fraction of a second of arrivals is simulated: a setting the simulator does not model raises at once)."""
    from tiersched.sim import simulate

    key = (repr(build_preset(sc)), tuple(sorted(changes.items())))
    if key in _REFUSALS:
        return _REFUSALS[key]
    _REFUSALS[key] = None
    try:
        preset = build_preset(sc).with_scheduler(**changes)
        simulate(preset, workloads.synthetic("Random", rate=20.0, duration_s=0.2, seed=0), PolicySet(),
                 record_timeline=False)
    except (NotImplementedError, ValueError) as e:
        _REFUSALS[key] = f"the simulator refuses it: {e}"
    return _REFUSALS[key]


_REFUSALS: dict = {}  # memo of simulator_refuses


def prepare_workloads(scenarios) -> None:
    """Build the scenarios' workloads in this process, so forked workers inherit them instead of rebuilding."""
    for sc in scenarios:
        cached_workload(sc)


def _workload_key(sc: Scenario) -> tuple:
    return (sc.resolved_workload(), sc.rate, sc.duration_s, sc.seed, sc.preset)


_WORKLOAD_CACHE: dict = {}


def run_one(args) -> dict:
    """(scenario, name, policies, ideal_balance) -> {"name", "label", "metrics", "wall_s", "sim_s", "notes"}."""
    sc, name, policies, ideal = args
    result = simulate(build_preset(sc), cached_workload(sc), policies, seed=sc.seed, ideal_balance=ideal,
                      record_timeline=False)
    return {"name": name, "label": policies.label(), "metrics": result.metrics, "wall_s": result.wall_s,
            "sim_s": result.sim_s, "notes": result.notes}


def cached_workload(sc: Scenario):
    """build_workload once per (workload, rate, duration, seed, preset) in this process."""
    key = _workload_key(sc)
    if key not in _WORKLOAD_CACHE:
        _WORKLOAD_CACHE[key] = build_workload(sc)
    return _WORKLOAD_CACHE[key]


def run_many(jobs: list, workers: int | None = None, pool: ProcessPoolExecutor | None = None) -> list[dict]:
    """run_one over `jobs`, in `pool` when given (see `worker_pool`), else in a pool of `workers` made for it."""
    for job in jobs:  # build (and check: a bad trace file stops here) every workload before simulating any
        cached_workload(job[0])
    if pool is not None and len(jobs) > 1:
        return list(pool.map(run_one, jobs))
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers <= 1 or len(jobs) <= 1:
        return [run_one(j) for j in jobs]
    with worker_pool(workers) as own:
        return list(own.map(run_one, jobs))


def worker_pool(workers: int | None) -> ProcessPoolExecutor | None:
    """A fork pool of `workers` processes (None for one worker: run in this process). Fork after
    `prepare_workloads`, so the workers share the built workloads."""
    import multiprocessing as mp

    workers = workers or os.cpu_count() or 1
    if workers <= 1:
        return None
    return ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"))


def idle_cluster_bound(sc: Scenario, chunk: int | None = None) -> dict:
    """Lower bound: every request alone on an idle cluster (its prompt prefilled in chunks of `chunk` tokens, default
    the preset's chunk size, no cache hit assumed, then batch-1 decode steps)."""
    from tiersched.sim.cost_model import StepCostModel
    from tiersched.sim.moe_routing import make_routing, token_probs

    preset = build_preset(sc)
    w = build_workload(sc)
    cost = StepCostModel(preset, token_probs(make_routing(preset, sc.seed), preset.dp))
    dp = preset.dp
    ttft, tpot = np.empty(len(w)), np.full(len(w), np.nan)
    chunk = chunk or preset.scheduler.chunked_prefill_size
    for i, (n_in, n_out) in enumerate(zip(w.input_tokens, w.output_tokens)):
        t, done = 0.0, 0
        while done < n_in:  # chunked prefill of a lone request
            e = min(chunk, int(n_in) - done)
            tok = np.zeros(dp); tok[0] = e
            pairs = np.zeros(dp); pairs[0] = e * (done + (e + 1) / 2)
            t += float(cost.step_times(tok, pairs, np.zeros(dp))[0][0])
            done += e
        ttft[i] = t
        if n_out > 1:
            tok = np.zeros(dp); tok[0] = 1
            ctx = np.zeros(dp); ctx[0] = n_in + n_out / 2
            tpot[i] = float(cost.step_times(tok, np.zeros(dp), ctx)[0][0])
    fin = tpot[np.isfinite(tpot)]
    pct = lambda x, q: float(np.percentile(x, q)) if x.size else None
    return {"ttft_mean": float(ttft.mean()), "ttft_p95": pct(ttft, 95), "ttft_p99": pct(ttft, 99),
            "tpot_mean": float(fin.mean()) if fin.size else None, "tpot_p95": pct(fin, 95),
            "tpot_p99": pct(fin, 99), "throughput": None, "requests": len(w), "finished": len(w)}


def pick_best(results: list[dict], metric: str = "ttft_mean") -> dict:
    ok = [r for r in results if "metrics" in r and r["metrics"].get(metric) is not None]
    return min(ok, key=lambda r: (r["metrics"][metric], -r["metrics"]["throughput"]))
