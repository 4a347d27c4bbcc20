"""tiersched's three tiers with and without upstream's static scheduler flags (mixed chunk, prefill delayer).

Behind docs/results.md "Mixed chunk and the prefill delayer on tiersched's rows": the measurement that decided
which static flags the compare/sweep headline rows run with. One JSON line per (seed, variant) on stdout:

    python benchmark/tiersched_static_flags.py "qwen3|auto|None|60" 0,1,2 base,mixed,delayer,mixed+delayer
    python benchmark/tiersched_static_flags.py "qwen3-dp4ep4|synthetic:Two-end|30.5|30" 0,1,2 base,mixed,mixed+delayer
    python benchmark/tiersched_static_flags.py "qwen3-dp2tp2ep4|synthetic:Random|22.1|30" 0,1,2 base,mixed,mixed+delayer

A scenario is PRESET|WORKLOAD|RATE|DURATION_S as `tiersched.bench.runner.Scenario` takes them (RATE None: the
workload's own arrivals). The table in the docs is the mean over seeds of each variant.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from tiersched.bench.runner import Scenario, prepare_workloads, run_many
from tiersched.sim import PolicySet

VARIANTS = {
    "base": (),
    "mixed": (("enable_mixed_chunk", True),),
    "delayer": (("enable_prefill_delayer", True),),
    "mixed+delayer": (("enable_mixed_chunk", True), ("enable_prefill_delayer", True)),
    "c1024": (("chunked_prefill_size", 1024),),
    "c1024+mixed": (("chunked_prefill_size", 1024), ("enable_mixed_chunk", True)),
    "c1024+mixed+delayer60": (("chunked_prefill_size", 1024), ("enable_mixed_chunk", True),
                              ("enable_prefill_delayer", True), ("prefill_delayer_max_delay_passes", 60)),
    "mixed+delayer60": (("enable_mixed_chunk", True), ("enable_prefill_delayer", True),
                        ("prefill_delayer_max_delay_passes", 60)),
}
FIELDS = ("ttft_mean", "ttft_p95", "tpot_mean", "throughput", "finished", "mixed_steps", "prefill_delayed_passes")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", help="PRESET|WORKLOAD|RATE|DURATION_S, e.g. 'qwen3|auto|None|60'")
    parser.add_argument("seeds", help="comma-separated seeds")
    parser.add_argument("variants", nargs="?", default=",".join(VARIANTS), help=f"any of {', '.join(VARIANTS)}")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    try:
        preset, workload, rate, duration = args.scenario.split("|")
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error("scenario must be PRESET|WORKLOAD|RATE|DURATION_S and seeds integers")
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    policies = PolicySet(ordering="tiersched", dispatch="tiersched", eplb="source_aware")
    jobs = [(Scenario(preset=preset, workload=workload, rate=None if rate == "None" else float(rate),
                      duration_s=float(duration), seed=s, scheduler=VARIANTS[v]), v, policies, False)
            for s in seeds for v in args.variants.split(",")]
    prepare_workloads([j[0] for j in jobs])
    t0 = time.time()
    for job, result in zip(jobs, run_many(jobs, args.workers)):
        m = result["metrics"]
        print(json.dumps({"scenario": args.scenario, "seed": job[0].seed, "variant": job[1],
                          **{k: m.get(k) for k in FIELDS}, "wall_s": round(result["wall_s"], 1)}), flush=True)
    print(f"{len(jobs)} runs in {time.time() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
