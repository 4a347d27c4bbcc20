"""Measure what a change to the simulator's copies of upstream's scheduler does to the numbers (docs/simulator.md,
"Deviations from upstream").

Runs one scenario under each upstream ordering (round_robin dispatch, no EPLB) and prints one JSON object per arm
with TTFT / TPOT means and P99s, retractions and preemptions. Run it on two checkouts (before / after a change), or
with --new-token-ratio to see what the reserved share of running requests' remaining output does.

    PYTHONPATH=python python benchmark/sim_upstream_deviations.py --duration 30
    PYTHONPATH=python python benchmark/sim_upstream_deviations.py --duration 30 --new-token-ratio 1.0
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace

import numpy as np

from tiersched.bench.runner import Scenario, build_preset, build_workload
from tiersched.sim import PolicySet, simulate

ARMS = ("fcfs", "fcfs-priority", "lpm", "hrrn", "shortest-prefill-first", "tiersched")
FIELDS = ("ttft_mean", "ttft_p99", "tpot_mean", "tpot_p99", "finished", "retractions", "preemptions")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="auto")
    ap.add_argument("--rate", type=float, default=None)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default="qwen3")
    ap.add_argument("--new-token-ratio", type=float, default=None,
                    help="override the preset's initial new_token_ratio (upstream: SGLANG_INIT_NEW_TOKEN_RATIO x "
                         "--schedule-conservativeness); it still decays and resets as upstream's")
    ap.add_argument("--ignore-eos", action="store_true",
                    help="send every request with ignore_eos (sglang.bench_serving's traffic): admission reserves "
                         "the whole remaining output of running requests")
    ap.add_argument("--arms", default=",".join(ARMS))
    args = ap.parse_args()
    sc = Scenario(preset=args.preset, workload=args.workload, rate=args.rate, duration_s=args.duration, seed=args.seed)
    preset = build_preset(sc)
    if args.new_token_ratio is not None:
        preset = preset.with_scheduler(new_token_ratio=args.new_token_ratio)
    workload = build_workload(sc)
    if args.ignore_eos:
        workload = replace(workload, ignore_eos=np.ones(len(workload), dtype=bool))
    for arm in args.arms.split(","):
        r = simulate(preset, workload, PolicySet(ordering=arm), seed=sc.seed, record_timeline=False)
        row = {k: r.metrics.get(k) for k in FIELDS}
        print(json.dumps({"arm": arm, "workload": sc.resolved_workload(), "rate": sc.rate, "duration_s": sc.duration_s,
                          "new_token_ratio": preset.scheduler.new_token_ratio,
                          "ignore_eos": args.ignore_eos, **row}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
