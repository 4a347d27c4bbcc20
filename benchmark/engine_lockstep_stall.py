"""The engine tier's lockstep stall term on vs off, in the simulator, on the same requests.

    nice -n 10 python benchmark/engine_lockstep_stall.py [--weights 0,1,4] [--presets ...] [--shapes ...]
        [--loads 0.7,1.0,1.2] [--seeds 0,1,2] [--arms plan,plan+mixed] [--workers 1] [--json]

Arms: tiersched's score dispatch (`ScoreDispatcher`, EngineTierConfig defaults but `weight_stall`), fcfs ordering,
with the lockstep step plan (`plan`) or without (`noplan`), each optionally with `--enable-mixed-chunk` (`+mixed`);
the preset's chunk size. Load = rate / the shape's measured capacity (bench/lockstep._capacity), arrival windows as
`tiersched.bench lockstep` (3 s qwen3, 2 s deepseek-v3-32). The first weight is the reference ("off"); for every
other weight and configuration (preset x shape x load x seed x arm) it prints the relative change of mean TTFT, mean
TPOT and throughput (change > 0 on TTFT/TPOT or < 0 on throughput = worse), then per weight: the mean change per
metric over the configurations, the worst change, the share of configurations no metric of which is worse by more
than 2%, and the same for the means over seeds (one value per preset x shape x load x arm).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from tiersched.bench.lockstep import DURATION_S, PRESETS, _capacity, _workload
from tiersched.sim.workloads import SHAPES

METRICS = ("ttft_mean", "tpot_mean", "throughput")


def _run(job: tuple) -> tuple:
    from tiersched.core.engine import EngineTierConfig
    from tiersched.core.engine.score import ScoreDispatcher
    from tiersched.sim import PolicySet, get_preset, simulate

    preset, shape, rate, seed, arm, weight = job
    p = get_preset(preset).with_scheduler(enable_mixed_chunk=arm.endswith("+mixed"))
    policies = PolicySet(dispatch=ScoreDispatcher(p.dp, EngineTierConfig(weight_stall=weight)),
                         step_plan="tiersched" if arm.startswith("plan") else "none")
    m = simulate(p, _workload(shape, rate, DURATION_S[preset], seed), policies, seed=seed,
                 record_timeline=False).metrics
    return job, {k: m[k] for k in METRICS + ("finished", "requests")}


def _change(metric: str, off: float, on: float) -> float:
    """Relative change, > 0 = worse (TTFT/TPOT up, throughput down)."""
    rel = on / off - 1.0 if off else 0.0
    return -rel if metric == "throughput" else rel


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="0,4")
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--loads", default="0.7,0.85,1.0,1.2")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--arms", default="plan,plan+mixed")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    csv = lambda s, f=str: [f(x) for x in s.split(",") if x]  # noqa: E731
    weights, presets, shapes = csv(args.weights, float), csv(args.presets), csv(args.shapes)
    loads, seeds, arms = csv(args.loads, float), csv(args.seeds, int), csv(args.arms)
    start, cpu0 = time.time(), os.times()
    with ProcessPoolExecutor(max(1, args.workers)) as pool:
        caps = {(p, s): c for p, s, c in pool.map(_capacity, [(p, s) for p in presets for s in shapes])}
        jobs = [(p, s, load * caps[(p, s)], seed, arm, w) for p in presets for s in shapes for load in loads
                for seed in seeds for arm in arms for w in weights]
        res = dict(pool.map(_run, jobs, chunksize=4))
    rows, summary = [], {}
    for w in weights[1:]:
        per_cfg, per_mean = [], {}
        for p in presets:
            for s in shapes:
                for load in loads:
                    for arm in arms:
                        for seed in seeds:
                            base = (p, s, load * caps[(p, s)], seed, arm)
                            off, on = res[base + (weights[0],)], res[base + (w,)]
                            ch = {m: _change(m, off[m], on[m]) for m in METRICS}
                            per_cfg.append(ch)
                            per_mean.setdefault((p, s, load, arm), []).append((off, on))
                            rows.append({"preset": p, "shape": s, "load": load, "arm": arm, "seed": seed,
                                         "weight": w, **{f"change_{m}": round(v, 4) for m, v in ch.items()},
                                         **{f"off_{m}": off[m] for m in METRICS}, **{f"on_{m}": on[m] for m in METRICS},
                                         "unfinished": on["requests"] - on["finished"]})
        means = []
        for key, pairs in per_mean.items():
            means.append({m: _change(m, statistics.fmean(o[m] for o, _ in pairs),
                                     statistics.fmean(n[m] for _, n in pairs)) for m in METRICS})
        summary[f"{w:g}"] = {
            "configurations": len(per_cfg),
            "mean_change": {m: round(statistics.fmean(c[m] for c in per_cfg), 4) for m in METRICS},
            "median_change": {m: round(statistics.median(c[m] for c in per_cfg), 4) for m in METRICS},
            "worst_change": {m: round(max(c[m] for c in per_cfg), 4) for m in METRICS},
            "share_never_worse_2pct": round(sum(all(c[m] <= 0.02 for m in METRICS) for c in per_cfg)
                                            / len(per_cfg), 3),
            "seed_means": {"groups": len(means),
                           "worst_change": {m: round(max(c[m] for c in means), 4) for m in METRICS},
                           "share_never_worse_2pct": round(sum(all(c[m] <= 0.02 for m in METRICS) for c in means)
                                                           / len(means), 3)},
        }
    cpu = os.times()
    out = {"weights": weights, "reference_weight": weights[0], "presets": presets, "shapes": shapes, "loads": loads,
           "seeds": seeds, "arms": arms, "capacity_req_s": {f"{p}/{s}": c for (p, s), c in caps.items()},
           "summary": summary, "rows": rows, "simulations": len(res), "wall_s": round(time.time() - start, 1),
           "cpu_s": round(cpu.children_user + cpu.children_system + cpu.user - cpu0.user, 1),
           "load_average": os.getloadavg()[0]}
    if args.json:
        print(json.dumps(out))
    else:
        for w, sm in summary.items():
            print(f"weight_stall {w} vs {weights[0]:g}: {json.dumps(sm)}")
        print(f"{out['simulations']} simulations, {out['wall_s']} s wall, {out['cpu_s']} CPU-s, "
              f"load {out['load_average']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
