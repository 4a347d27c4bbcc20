"""`python -m tiersched.bench sweep`: a grid of scenarios, resumable, with a win-share summary.

Grid: 5 length shapes x rates x seeds x presets (default 5 x 4 x 3 x 2 = 120 configurations). Rates are
fractions of each preset's nominal capacity (capacity.nominal_capacity_req_s). In every configuration the
upstream baselines {fcfs/round_robin, lpm/total_tokens, shortest-prefill-first/total_requests,
hrrn/total_tokens} run and the best one (lowest mean TTFT) is compared with tiersched's ordering + dispatch
(`--with-eplb` adds DeepSeek EPLB to the baselines and source-aware placement to tiersched; slower).
Each configuration's result is one line of the results JSONL; a rerun skips configurations already there.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from tiersched.sim import PolicySet, capacity, get_preset, workloads

BASELINES = (("fcfs", "round_robin"), ("lpm", "total_tokens"), ("shortest-prefill-first", "total_requests"),
             ("hrrn", "total_tokens"))
METRICS = {"ttft_mean": -1, "ttft_p99": -1, "tpot_mean": -1, "e2e_mean": -1, "throughput": 1, "goodput": 1}


def add_arguments(parser) -> None:
    parser.add_argument("--results", default="out/sweep.jsonl", help="results JSONL (appended; resumable)")
    parser.add_argument("--presets", default="qwen3-dp4ep4,qwen3-dp2tp2ep4")
    parser.add_argument("--shapes", default=",".join(workloads.SHAPES))
    parser.add_argument("--load", default="0.5,0.7,0.85,1.0", help="rates as fractions of nominal capacity")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--with-eplb", action="store_true")
    parser.add_argument("--eplb-steps", type=int, default=None,
                        help="with --with-eplb: rebalance every N forward steps in every arm (upstream's "
                             "--eplb-rebalance-num-iterations; default: the preset's, upstream's 1000)")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--summary-only", action="store_true", help="summarise the results file, run nothing")


def _config_key(c: dict) -> str:
    key = f"{c['preset']}|{c['shape']}|{c['load']}|{c['seed']}|{int(c['with_eplb'])}|{c['duration_s']}"
    return key + (f"|eplb{c['eplb_steps']}" if c.get("eplb_steps") else "")  # older files: no suffix


def run_config(c: dict) -> dict:
    from tiersched.sim import simulate

    preset = get_preset(c["preset"])
    if c.get("eplb_steps"):
        preset = preset.with_scheduler(eplb_rebalance_steps=int(c["eplb_steps"]))
    base = workloads.synthetic(c["shape"], rate=1.0, duration_s=10.0, seed=c["seed"])
    cap = capacity.nominal_capacity_req_s(preset, float(base.input_tokens.mean()), float(base.output_tokens.mean()))
    work = workloads.synthetic(c["shape"], rate=c["load"] * cap, duration_s=c["duration_s"], seed=c["seed"])
    eplb = "deepseek" if c["with_eplb"] else "none"
    runs = {}
    for o, d in BASELINES:
        runs[f"{o}/{d}"] = simulate(preset, work, PolicySet(ordering=o, dispatch=d, eplb=eplb), seed=c["seed"],
                                    record_timeline=False).metrics
    runs["tiersched"] = simulate(preset, work, PolicySet(ordering="tiersched", dispatch="tiersched",
                                                         eplb="source_aware" if c["with_eplb"] else "none"),
                                 seed=c["seed"], record_timeline=False).metrics
    keep = lambda m: {k: m.get(k) for k in (*METRICS, "cache_hit_rate", "balancedness", "finished", "requests",
                                            "rebalances", "migrations")}
    best = min(BASELINES, key=lambda od: runs[f"{od[0]}/{od[1]}"]["ttft_mean"])
    return {**c, "key": _config_key(c), "rate_req_s": c["load"] * cap, "upstream_best": "/".join(best),
            "runs": {k: keep(v) for k, v in runs.items()}}


def summarise(rows: list[dict]) -> dict:
    out = {"configs": len(rows), "metrics": {}}
    for metric, sign in METRICS.items():
        changes = []
        for r in rows:
            base = r["runs"][r["upstream_best"]].get(metric)
            ours = r["runs"]["tiersched"].get(metric)
            if base and ours is not None:
                changes.append((ours - base) / base)
        if not changes:
            continue
        ch = np.array(changes)
        better = ch * sign > 0  # sign -1: lower is better
        worst = ch.max() if sign < 0 else ch.min()
        out["metrics"][metric] = {"win_share": round(float(better.mean()), 4), "median_change": round(float(np.median(ch)), 4),
                                  "worst_change": round(float(worst), 4), "n": int(ch.size)}
    # Did EPLB act? (rows written before these were kept have none)
    for arm, pick in (("upstream_best", lambda r: r["runs"][r["upstream_best"]]), ("tiersched", lambda r: r["runs"]["tiersched"])):
        counts = [pick(r).get("rebalances") for r in rows if pick(r).get("rebalances") is not None]
        if counts:
            out[f"rebalances_{arm}"] = {"median": float(np.median(counts)), "min": int(min(counts)),
                                        "max": int(max(counts))}
    return out


def main(args) -> int:
    from tqdm import tqdm

    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[row["key"]] = row
    if args.eplb_steps is not None and (args.eplb_steps < 1 or not args.with_eplb):
        raise SystemExit("--eplb-steps needs --with-eplb and a positive number of forward steps.")
    configs = [dict(preset=p, shape=s, load=float(l), seed=int(seed), duration_s=args.duration,
                    with_eplb=args.with_eplb, eplb_steps=args.eplb_steps)
               for p in args.presets.split(",") for s in args.shapes.split(",") for l in args.load.split(",")
               for seed in args.seeds.split(",")]
    todo = [c for c in configs if _config_key(c) not in done]
    if todo and not args.summary_only:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        workers = args.workers or os.cpu_count() or 1
        with open(path, "a") as f, ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
            for row in tqdm(pool.map(run_config, todo), total=len(todo), desc="sweep", file=sys.stderr):
                f.write(json.dumps(row) + "\n")
                f.flush()
                done[row["key"]] = row
    rows = [done[_config_key(c)] for c in configs if _config_key(c) in done]
    summary = summarise(rows)
    summary["results"] = str(path)
    if args.json:
        print(json.dumps(summary))
    else:
        ours = "ordering + dispatch + source-aware EPLB" if args.with_eplb else "ordering + dispatch"
        print(f"{summary['configs']} configurations ({path}); tiersched ({ours}) vs the best upstream "
              f"baseline per configuration")
        print(f"{'metric':<12}{'win share':>11}{'median change':>15}{'worst change':>14}")
        for k, v in summary["metrics"].items():
            print(f"{k:<12}{v['win_share']:>11.1%}{v['median_change']:>+15.1%}{v['worst_change']:>+14.1%}")
        for arm in ("upstream_best", "tiersched"):
            if f"rebalances_{arm}" in summary:
                r = summary[f"rebalances_{arm}"]
                print(f"EPLB rebalances per run, {arm}: median {r['median']:g} (min {r['min']}, max {r['max']})")
    return 0
