"""Expert tier under routing drift, at scale: does planning EPLB on a history of windows pay off in TPOT?

    .venv/bin/python benchmark/sim_drift.py [--json] [--duration 120] [--rate 16] [--steps 200]

DeepSeek-V3 on 32 ranks (32 redundant slots), total_tokens dispatch, fcfs; default workload decode-heavy
(prompts 64-512, answers 256-1024 tokens, Poisson): with long prompts every lockstep step carries some rank's
prefill chunk and TPOT measures prefill stalls, not expert balance (synthetic:Random shows that).
The routing drifts to a fresh window every --steps forward steps (RoutingModel.drift around the base model,
strength 1 = the spread measured between recorded DeepSeek-V3 windows) and every EPLB rebalances on the same
interval, so each placement is planned on past windows and served on the next one (held out).
Arms: no EPLB; upstream `deepseek` on the last window (its recorder default) and on the last 4 windows summed
(a longer recorder buffer: its best setting is whichever of the two is better); ours (`source_aware`,
tiersched.core.expert.placement.rebalance) on the last 4 windows; each with and without drift.
"""
from __future__ import annotations

import argparse
import json
import sys

from tiersched.bench.runner import Scenario, run_many
from tiersched.sim import PolicySet

ARMS = (("no-eplb", "none", 1), ("deepseek-last", "deepseek", 1), ("deepseek-hist4", "deepseek", 4),
        ("tiersched-hist4", "source_aware", 4))
KEYS = ("ttft_mean", "tpot_mean", "tpot_p99", "throughput", "balancedness", "migrations", "migration_stall_s",
        "rebalances", "routing_drifts")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--preset", default="deepseek-v3")
    ap.add_argument("--duration", type=float, default=120.0)
    ap.add_argument("--rate", type=float, default=16.0)
    ap.add_argument("--steps", type=int, default=200, help="drift and rebalance interval (forward steps)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workload", default="decode-heavy",
                    help="decode-heavy (prompts 64-512, answers 256-1024) or synthetic:<Shape> (prefill-heavy)")
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args()
    jobs = []
    for drift in (0, args.steps):
        for name, eplb, hist in ARMS:
            sc = Scenario(preset=args.preset, workload=args.workload, rate=args.rate, duration_s=args.duration,
                          seed=args.seed, eplb_rebalance_steps=args.steps, routing_drift_steps=drift,
                          eplb_history_windows=hist)
            jobs.append((sc, f"{name}{'+drift' if drift else ''}", PolicySet(dispatch="total_tokens", eplb=eplb),
                         False))
    results = run_many(jobs, args.workers)
    table = {r["name"]: ({k: r["metrics"].get(k) for k in KEYS} if "metrics" in r else {"error": r["error"]})
             for r in results}
    report = {"preset": args.preset, "workload": args.workload, "rate_req_s": args.rate, "duration_s": args.duration, "interval_steps":
              args.steps, "seed": args.seed, "arms": table}
    for suffix in ("", "+drift"):
        best = min((f"deepseek-last{suffix}", f"deepseek-hist4{suffix}"), key=lambda n: table[n]["tpot_mean"])
        ours = table[f"tiersched-hist4{suffix}"]["tpot_mean"]
        report[f"tpot_change_vs_best_deepseek{suffix or '_fixed'}".replace("+", "_")] = (
            ours / table[best]["tpot_mean"] - 1.0)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{'arm':<22}" + "".join(f"{k:>18}" for k in KEYS))
        for name, row in table.items():
            print(f"{name:<22}" + "".join(f"{row.get(k, float('nan')):>18.4g}" for k in KEYS))
        print({k: round(v, 4) for k, v in report.items() if k.startswith("tpot_change")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
