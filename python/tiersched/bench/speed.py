"""`python -m tiersched.bench speed [--json]`: simulator speed, simulated seconds per wall second.

Scenarios: Qwen3-30B-A3B DP4·EP4 at 4 req/s and DeepSeek-V3 on 32 ranks, both on the built-in
synthetic workload (Random shape, shared system prompts) so the numbers do not depend on ../shared. Wall time
covers the whole `simulate()` call (routing model construction included); no EPLB (its solver time is a policy
cost, not the simulator's). The machine may be shared: besides wall-clock factors the report gives the
process-CPU-time factor (`realtime_factor_cpu`, what the simulator costs regardless of other jobs) and the load
average during the run, so numbers from a loaded machine are read for what they are.
"""
from __future__ import annotations

import json
import os
import sys
import time

from tiersched.sim import PolicySet, simulate, workloads


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of arrivals per scenario")
    parser.add_argument("--trace", default=None, metavar="PATH",
                        help="also time a trace file (Mooncake JSONL, Azure CSV, BurstGPT CSV; its own timing, the "
                             "first --duration seconds) on Qwen3 DP4·EP4, reported as `trace`")


def measure(preset: str, rate: float | None, duration_s: float, policies: PolicySet, work=None) -> dict:
    """Time one simulation of `work` (default: the synthetic Random workload at `rate`)."""
    work = work if work is not None else workloads.synthetic("Random", rate=rate, duration_s=duration_s, seed=0)
    start, cpu_start = time.perf_counter(), time.process_time()
    result = simulate(preset, work, policies, record_timeline=False)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"realtime_factor_cpu": round(result.sim_s / cpu, 1), "cpu_s": round(cpu, 3), "preset": preset, "rate_req_s": rate, "requests": len(work), "simulated_s": round(result.sim_s, 3),
            "wall_s": round(wall, 3), "realtime_factor": round(result.sim_s / wall, 1),
            "requests_per_wall_s": round(len(work) / wall, 1), "steps": result.steps,
            "steps_per_wall_s": round(result.steps / wall, 1)}


def _load_average() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def main(args) -> int:
    trace = None
    if args.trace:  # load (and check) the file before timing anything
        from tiersched.traces import load_trace

        trace = load_trace(args.trace, duration_s=args.duration)
    qwen = measure("qwen3", 4.0, args.duration, PolicySet(dispatch="total_tokens"))
    deepseek = measure("deepseek-v3", 4.0, args.duration / 2, PolicySet(dispatch="total_tokens"))
    report = {"realtime_factor": qwen["realtime_factor"], "requests_per_wall_s": qwen["requests_per_wall_s"],
              "realtime_factor_cpu": qwen["realtime_factor_cpu"], "goal_realtime_factor": 300,
              "load_average": _load_average(), "cpu_count": os.cpu_count(), "qwen3": qwen, "deepseek_v3_32": deepseek}
    names = ["qwen3", "deepseek_v3_32"]
    if trace is not None:
        rate = len(trace) / max(float(trace.arrival_s[-1]), 1e-9) if len(trace) else 0.0
        report["trace"] = {**measure("qwen3", rate, args.duration, PolicySet(dispatch="total_tokens"), trace),
                           "trace": args.trace}
        names.append("trace")
    if args.json:
        print(json.dumps(report))
    else:
        for name in names:
            r = report[name]
            print(f"{name:<16} {r['realtime_factor']:>8.1f}x real time  {r['requests_per_wall_s']:>8.1f} req/wall-s  "
                  f"({r['simulated_s']} s simulated in {r['wall_s']} s wall, {r['cpu_s']} s CPU = "
                  f"{r['realtime_factor_cpu']}x, {r['steps']} steps)")
        print(f"load average {report['load_average']} on {report['cpu_count']} CPUs")
    return 0
