"""`python -m tiersched.bench speed [--json]`: simulator speed, simulated seconds per wall second.

Scenarios (issue 6): Qwen3-30B-A3B DP4·EP4 at 4 req/s and DeepSeek-V3 on 32 ranks, both on the built-in
synthetic workload (Random shape, shared system prompts) so the numbers do not depend on ../shared. Wall time
covers the whole `simulate()` call (routing model construction included); no EPLB (its solver time is a policy
cost, not the simulator's).
"""
from __future__ import annotations

import json
import sys
import time

from tiersched.sim import PolicySet, simulate, workloads


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of arrivals per scenario")


def measure(preset: str, rate: float, duration_s: float, policies: PolicySet) -> dict:
    work = workloads.synthetic("Random", rate=rate, duration_s=duration_s, seed=0)
    start = time.perf_counter()
    result = simulate(preset, work, policies, record_timeline=False)
    wall = time.perf_counter() - start
    return {"preset": preset, "rate_req_s": rate, "requests": len(work), "simulated_s": round(result.sim_s, 3),
            "wall_s": round(wall, 3), "realtime_factor": round(result.sim_s / wall, 1),
            "requests_per_wall_s": round(len(work) / wall, 1), "steps": result.steps,
            "steps_per_wall_s": round(result.steps / wall, 1)}


def main(args) -> int:
    qwen = measure("qwen3", 4.0, args.duration, PolicySet(dispatch="total_tokens"))
    deepseek = measure("deepseek-v3", 4.0, args.duration / 2, PolicySet(dispatch="total_tokens"))
    report = {"realtime_factor": qwen["realtime_factor"], "requests_per_wall_s": qwen["requests_per_wall_s"],
              "goal_realtime_factor": 300, "qwen3": qwen, "deepseek_v3_32": deepseek}
    if args.json:
        print(json.dumps(report))
    else:
        for name in ("qwen3", "deepseek_v3_32"):
            r = report[name]
            print(f"{name:<16} {r['realtime_factor']:>8.1f}x real time  {r['requests_per_wall_s']:>8.1f} req/wall-s  "
                  f"({r['simulated_s']} s simulated in {r['wall_s']} s, {r['steps']} steps)")
    return 0
