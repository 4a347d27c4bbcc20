"""`python -m tiersched.bench sweep`: a grid of scenarios, resumable, with a win-share and headroom summary.

Grid: 5 length shapes x rates x seeds x presets (default 5 x 4 x 3 x 2 = 120 configurations). Rates are
fractions of each preset's nominal capacity (capacity.nominal_capacity_req_s). Every configuration runs `compare`
on its own seed: upstream-best per metric (mean TTFT, mean TPOT, tail TTFT) from the search over upstream's flags
(bench/upstream_space.py), tiersched's arm, the perfect-balance and idle-cluster bounds, and the headroom captured.
tiersched's arm is its ordering + dispatch on top of the winner's EPLB setting; `--with-eplb` makes it all three
tiers (source-aware placement instead). Each configuration's result is one line of the results JSONL; a rerun
skips configurations already there (lines from before this search carry another key and are not reused).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from tiersched.sim import capacity, get_preset, workloads

# metric -> (sign: -1 lower is better, the upstream-best run it is compared with)
METRICS = {"ttft_mean": (-1, "upstream-best-ttft"), "ttft_tail": (-1, "upstream-best-p99"),
           "tpot_mean": (-1, "upstream-best-tpot"), "e2e_mean": (-1, "upstream-best-ttft"),
           "throughput": (1, "upstream-best-ttft"), "goodput": (1, "upstream-best-ttft")}
SEARCH_VERSION = "search1"  # part of the key: rows from before the upstream-best search are not reused
# tiersched's arm with other static upstream flags, beside the headline arm (compare's rows of these suffixes):
# the mean-TTFT winner's chunk size, --enable-mixed-chunk, every static scheduler flag of the mean-TPOT winner.
VARIANTS = ("@upstream-chunk", "+mixed", "@upstream-tpot-flags")
SUMMARY_OF = {"@upstream-chunk": "metrics_at_upstream_chunk", "+mixed": "metrics_with_mixed_chunk",
              "@upstream-tpot-flags": "metrics_at_upstream_tpot_flags"}


def add_arguments(parser) -> None:
    parser.add_argument("--results", default="out/sweep.jsonl", help="results JSONL (appended; resumable)")
    parser.add_argument("--presets", default="qwen3-dp4ep4,qwen3-dp2tp2ep4")
    parser.add_argument("--shapes", default=",".join(workloads.SHAPES))
    parser.add_argument("--trace", default=None, metavar="PATH",
                        help="a trace file (Mooncake JSONL, Azure CSV, BurstGPT CSV) instead of the synthetic shapes: "
                             "its requests, re-timed to each load's rate")
    parser.add_argument("--load", default="0.5,0.7,0.85,1.0", help="rates as fractions of nominal capacity")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--with-eplb", action="store_true")
    parser.add_argument("--eplb-steps", type=int, default=None,
                        help="with --with-eplb: rebalance every N forward steps in every arm (upstream's "
                             "--eplb-rebalance-num-iterations; default: the preset's, upstream's 1000)")
    parser.add_argument("--search-passes", type=int, default=2,
                        help="coordinate-descent passes per metric in each configuration's upstream search")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--summary-only", action="store_true", help="summarise the results file, run nothing")


def _config_key(c: dict) -> str:
    shape = c["shape"] if not c.get("trace") else f"trace:{c['trace']}"
    key = f"{c['preset']}|{shape}|{c['load']}|{c['seed']}|{int(c['with_eplb'])}|{c['duration_s']}"
    key += f"|eplb{c['eplb_steps']}" if c.get("eplb_steps") else ""
    return key + f"|{SEARCH_VERSION}|passes{c.get('search_passes', 2)}"


KEEP = ("ttft_mean", "ttft_p95", "ttft_p99", "tpot_mean", "tpot_p95", "tpot_p99", "e2e_mean", "throughput",
        "goodput", "cache_hit_rate", "balancedness", "finished", "requests", "rebalances", "migrations")


def run_config(c: dict) -> dict:
    from tiersched.bench.compare import compare
    from tiersched.bench.runner import Scenario

    preset = get_preset(c["preset"])
    if c.get("eplb_steps"):
        preset = preset.with_scheduler(eplb_rebalance_steps=int(c["eplb_steps"]))
    if c.get("trace"):
        from tiersched.traces import load_trace

        base, workload = load_trace(c["trace"], duration_s=c["duration_s"]), c["trace"]
    else:
        base = workloads.synthetic(c["shape"], rate=1.0, duration_s=10.0, seed=c["seed"])
        workload = f"synthetic:{c['shape']}"
    cap = capacity.nominal_capacity_req_s(preset, float(base.input_tokens.mean()), float(base.output_tokens.mean()))
    sc = Scenario(preset=c["preset"], workload=workload, rate=c["load"] * cap,
                  duration_s=c["duration_s"], seed=c["seed"], eplb_rebalance_steps=c.get("eplb_steps"))
    arm = "tiersched" if c["with_eplb"] else "ordering+dispatch"
    rep = compare(sc, workers=1, seeds=1, search_passes=c.get("search_passes", 2), quiet=True,
                  arms=(arm,) + tuple(f"{arm}{v}" for v in VARIANTS))
    pol = rep["policies"]
    keep = lambda e: {k: e.get(k) for k in KEEP}
    runs = {"upstream-best-ttft": keep(pol["upstream-best"]), "upstream-best-tpot": keep(pol["upstream-best-tpot"]),
            "upstream-best-p99": keep(pol["upstream-best-p99"]), "tiersched": keep(pol[arm]),
            # not the headline: tiersched's arm with other static upstream flags (VARIANTS)
            **{f"tiersched{v}": keep(pol[f"{arm}{v}"]) for v in VARIANTS if f"{arm}{v}" in pol},
            "bound:perfect-balance": keep(pol["bound:perfect-balance"]),
            "bound:idle-cluster": keep(pol["bound:idle-cluster"])}
    sp = rep["upstream_best_space"]
    return {**c, "key": _config_key(c), "rate_req_s": c["load"] * cap, "arm": pol[arm]["label"],
            "arm_static_flags": {f"tiersched{v}": pol[f"{arm}{v}"]["static_flags"] for v in ("",) + VARIANTS
                                 if f"{arm}{v}" in pol},
            "upstream_best": "upstream-best-ttft", "tail_percentile": rep["tail_percentile"],
            **{f"upstream_best_{n}": {k: rep[f"upstream_best_{n}"][k] for k in ("label", "flags", "metric")}
               for n in ("ttft", "tpot", "p99")},
            "upstream_best_space": {"runs": sp["runs"], "full_grid_size": sp["full_grid_size"],
                                    "passes": sp["passes"], "dimensions": list(sp["dimensions"])},
            "ratio_vs_upstream_best": pol[arm]["ratio_vs_upstream_best"],
            "headroom_captured": pol[arm]["headroom_captured"],
            "headroom_captured_vs_perfect_balance": pol[arm]["headroom_captured_vs_perfect_balance"],
            "runs": runs}


def _tail(metric: str, row: dict) -> str:
    return f"ttft_p{row['tail_percentile']}" if metric == "ttft_tail" else metric


def _metrics(rows: list[dict], arm: str) -> dict:
    """Per metric: win share, median and worst change of `arm` against that metric's winner, and the median headroom
    captured against the idle-cluster bound (and, for the headline arm, against the perfect-balance bound)."""
    from tiersched.bench.stats import headroom

    out = {}
    for metric, (sign, best_run) in METRICS.items():
        changes, heads, heads_bal = [], [], []
        for r in rows:
            m = _tail(metric, r)
            base, ours = r["runs"][best_run].get(m), r["runs"][arm].get(m)
            if base and ours is not None:
                changes.append((ours - base) / base)
            h = headroom(base, ours, r["runs"]["bound:idle-cluster"].get(m))
            if h is not None:
                heads.append(h)
            hb = r.get("headroom_captured_vs_perfect_balance", {}).get(m) if arm == "tiersched" else None
            if hb is not None:
                heads_bal.append(hb)
        if not changes:
            continue
        ch = np.array(changes)
        better = ch * sign > 0  # sign -1: lower is better
        worst = ch.max() if sign < 0 else ch.min()
        entry = {"against": best_run, "win_share": round(float(better.mean()), 4),
                 "median_change": round(float(np.median(ch)), 4), "worst_change": round(float(worst), 4),
                 "n": int(ch.size)}
        if heads:
            entry["headroom_captured_median"] = round(float(np.median(heads)), 4)
        if heads_bal:
            entry["headroom_captured_vs_perfect_balance_median"] = round(float(np.median(heads_bal)), 4)
        out[metric] = entry
    return out


def summarise(rows: list[dict]) -> dict:
    """Per metric, over configurations: how often tiersched beats that metric's upstream-best, the median and worst
    change, and the median headroom captured (idle-cluster and perfect-balance bounds); `metrics_at_upstream_chunk`,
    `metrics_with_mixed_chunk`, `metrics_at_upstream_tpot_flags`: the same for tiersched's arm with those static
    upstream flags (VARIANTS; not the headline)."""
    out = {"configs": len(rows), "metrics": _metrics(rows, "tiersched"), "tail_percentiles": {}}
    for v in VARIANTS:
        out[SUMMARY_OF[v]] = _metrics([r for r in rows if f"tiersched{v}" in r["runs"]], f"tiersched{v}")
    for r in rows:
        out["tail_percentiles"][str(r["tail_percentile"])] = out["tail_percentiles"].get(str(r["tail_percentile"]),
                                                                                        0) + 1
    for name in ("ttft", "tpot", "p99"):
        counts: dict[str, int] = {}
        for r in rows:
            label = r[f"upstream_best_{name}"]["label"]
            counts[label] = counts.get(label, 0) + 1
        out[f"upstream_best_{name}_winners"] = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
    out["upstream_search_runs_median"] = float(np.median([r["upstream_best_space"]["runs"] for r in rows])) \
        if rows else None
    # Did EPLB act? (per arm: rebalances in each configuration's run)
    for arm, pick in (("upstream_best", lambda r: r["runs"][r["upstream_best"]]),
                      ("tiersched", lambda r: r["runs"]["tiersched"])):
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
    if args.eplb_steps is not None and args.eplb_steps < 1:
        raise SystemExit("--eplb-steps needs a positive number of forward steps.")
    if args.trace:  # check the file before anything runs: a malformed record stops here with its line and field
        from tiersched.traces import read_trace

        read_trace(args.trace)
    shapes = ["trace"] if args.trace else args.shapes.split(",")
    configs = [dict(preset=p, shape=s, load=float(l), seed=int(seed), duration_s=args.duration,
                    with_eplb=args.with_eplb, eplb_steps=args.eplb_steps, search_passes=args.search_passes,
                    **({"trace": args.trace} if args.trace else {}))
               for p in args.presets.split(",") for s in shapes for l in args.load.split(",")
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
        print(f"{summary['configs']} configurations ({path}); tiersched ({ours}) vs upstream at its best per "
              f"configuration and metric (searched; tails: {summary['tail_percentiles']} configurations at P99/P95)")
        print(f"{'metric':<12}{'against':>20}{'win share':>11}{'median change':>15}{'worst change':>14}"
              f"{'headroom (median)':>19}{'vs balance':>12}")
        for k, v in summary["metrics"].items():
            h, hb = v.get("headroom_captured_median"), v.get("headroom_captured_vs_perfect_balance_median")
            print(f"{k:<12}{v['against']:>20}{v['win_share']:>11.1%}{v['median_change']:>+15.1%}"
                  f"{v['worst_change']:>+14.1%}{'-' if h is None else format(h, '+.2f'):>19}"
                  f"{'-' if hb is None else format(hb, '+.2f'):>12}")
        for v, what in (("@upstream-chunk", "at the mean-TTFT winner's chunk size"),
                        ("+mixed", "with --enable-mixed-chunk"),
                        ("@upstream-tpot-flags", "with the mean-TPOT winner's static scheduler flags")):
            other = summary[SUMMARY_OF[v]]
            if other:
                print(f"tiersched's arm {what} (not the headline): " + ", ".join(
                    f"{k} {e['win_share']:.0%} wins, median {e['median_change']:+.1%}" for k, e in other.items()))
        for name in ("ttft", "tpot", "p99"):
            top = list(summary[f"upstream_best_{name}_winners"].items())[:3]
            print(f"upstream best on {name}: " + ", ".join(f"{label} ({n})" for label, n in top))
        for arm in ("upstream_best", "tiersched"):
            if f"rebalances_{arm}" in summary:
                r = summary[f"rebalances_{arm}"]
                print(f"EPLB rebalances per run, {arm}: median {r['median']:g} (min {r['min']}, max {r['max']})")
    return 0
