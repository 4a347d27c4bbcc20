"""Fast probe of the lockstep step plan against upstream's best static settings, per metric.

    nice -n 10 python benchmark/lockstep_policy_probe.py [--seeds 0,1,2] [--workers 2] [--cache /tmp/probe.json]

Grid (default): qwen3-dp4ep4, qwen3-dp2tp2ep4, deepseek-v3-32 x shapes Two-end, Random x loads 0.85, 1.0 x seeds,
short arrival windows (`--duration-s`; default per preset as `tiersched.bench lockstep`). Load = rate / the
shape's measured capacity (bench/lockstep._capacity). Arms per configuration, all on the same requests:
  upstream  every combination of ordering/dispatch in {fcfs/round_robin, lpm/total_tokens}, chunked_prefill_size
            (per rank) in {1024, 2048, 4096, 8192}, --enable-mixed-chunk on/off, --enable-prefill-delayer off or
            on with max-delay-passes 60; upstream-best is the best combination per metric;
  ours      `--ours` (ordering/dispatch, mixed chunk, upper chunk budget) with the step plan on;
  bound     perfect balance (ideal_balance) at chunk 8192, mixed chunk off and on (the lower per metric).
Prints, per configuration, ours vs upstream-best per metric (loss: positive = ours worse) and the headroom captured
(upstream_best - ours) / (upstream_best - bound) of mean TTFT and mean TPOT; then the medians, the worst loss and
the share of configurations never worse than 2% on any metric; and the Pareto view (`frontier_gain_*`: ours
against the best upstream combination that is no worse on the other metric; `share_dominated_by_upstream`;
`share_one_upstream_best_on_both`: how often a single static setting is best on both metrics). `--cache PATH`
keeps the upstream and bound runs (they do not depend on the planner) in a JSON file, so a planner change reruns
only `ours`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from tiersched.bench.lockstep import DURATION_S

PRESETS = ("qwen3-dp4ep4", "qwen3-dp2tp2ep4", "deepseek-v3-32")
SHAPES = ("Two-end", "Random")
LOADS = (0.85, 1.0)
CHUNKS = (1024, 2048, 4096, 8192)
ORDER_DISPATCH = (("fcfs", "round_robin"), ("lpm", "total_tokens"))
DELAYER = (0, 60)  # 0: off, else --prefill-delayer-max-delay-passes (60: the compare scenario's TPOT-best)
METRICS = ("ttft_mean", "tpot_mean", "throughput")


def _run(job):
    """job = (key, arm, preset, shape, rate, duration_s, seed, ordering, dispatch, chunk, mixed, delay, plan)."""
    from tiersched.sim import PolicySet, get_preset, simulate, workloads

    key, arm, preset, shape, rate, dur, seed, ordering, dispatch, chunk, mixed, delay, plan = job[:13]
    if plan and len(job) > 13 and job[13]:  # [request] plan keys for our arm, e.g. {"plan_decode_weight": 0.2}
        import functools

        from tiersched.core.request import RequestTierConfig
        from tiersched.sim import lockstep, loop

        loop.make_planner = functools.partial(lockstep.make_planner, config=RequestTierConfig(**job[13]))
    changes = dict(chunked_prefill_size=chunk, enable_mixed_chunk=bool(mixed))
    if delay:
        changes.update(enable_prefill_delayer=True, prefill_delayer_max_delay_passes=delay)
    p = get_preset(preset).with_scheduler(**changes)
    work = workloads.synthetic(shape, rate=rate, duration_s=dur, seed=seed)
    policies = PolicySet(ordering=ordering, dispatch=dispatch, step_plan="tiersched" if plan else "none")
    m = simulate(p, work, policies, seed=seed, record_timeline=False, ideal_balance=(arm == "ideal")).metrics
    return job, {k: m[k] for k in METRICS + ("finished", "requests")}


def _jobs(presets, shapes, loads, seeds, dur, caps, ours):
    up, mine = [], []
    for p in presets:
        for s in shapes:
            for load in loads:
                for seed in seeds:
                    key = f"{p}|{s}|{load}|{seed}"
                    rate = round(load * caps[f"{p}/{s}"], 4)
                    base = (key, None, p, s, rate, dur or DURATION_S.get(p, 3.0), seed)
                    for o, d in ORDER_DISPATCH:
                        for c in CHUNKS:
                            for mixed in (False, True):
                                for delay in DELAYER:
                                    up.append(base[:1] + ("upstream",) + base[2:] + (o, d, c, mixed, delay, False))
                    for mixed in (False, True):  # the bound with and without mixed chunking: the lower per metric
                        up.append(base[:1] + ("ideal",) + base[2:] + ("fcfs", "round_robin", 8192, mixed, 0, False))
                    mine.append(base[:1] + ("ours",) + base[2:] + (ours["ordering"], ours["dispatch"], ours["chunk"],
                                                                    ours["mixed"], ours["delay"], ours["plan"],
                                                                    ours["config"]))
    return up, mine


def _capacities(presets, shapes, pool) -> dict:
    from tiersched.bench.lockstep import _capacity

    return {f"{p}/{s}": c for p, s, c in pool.map(_capacity, [(p, s) for p in presets for s in shapes])}


def summarise(runs: dict, keys: list[str]) -> dict:
    rows = []
    for key in keys:
        arms = runs[key]
        ours, up = arms["ours"], arms["upstream"]
        ideal = {m: (max if m == "throughput" else min)(r[m] for r in arms["ideal"].values()) for m in METRICS}
        row = {"config": key}
        for metric in METRICS:
            pick = max if metric == "throughput" else min
            best_label = pick(up, key=lambda lb: up[lb][metric])
            best = up[best_label][metric]
            row[f"best_{metric}"], row[f"best_{metric}_arm"], row[f"ours_{metric}"] = best, best_label, ours[metric]
            row[f"loss_{metric}"] = ((best - ours[metric]) / best if metric == "throughput"
                                     else (ours[metric] - best) / best)
            if metric != "throughput":
                gap = best - ideal[metric]
                row[f"headroom_{metric}"] = (best - ours[metric]) / gap if gap > 0 else None
        # Along the static frontier: the best upstream TPOT among combinations at least as good on TTFT as ours,
        # and the best upstream TTFT among those at least as good on TPOT (None: no combination is).
        for metric, other in (("tpot_mean", "ttft_mean"), ("ttft_mean", "tpot_mean")):
            fair = [r[metric] for r in up.values() if r[other] <= ours[other]]
            row[f"frontier_{metric}"] = min(fair) if fair else None
            row[f"frontier_gain_{metric}"] = (min(fair) - ours[metric]) / min(fair) if fair else None
        row["dominated_by_upstream"] = any(r["ttft_mean"] <= ours["ttft_mean"] and r["tpot_mean"] <= ours["tpot_mean"]
                                           for r in up.values())
        row["one_upstream_is_best_on_both"] = row["best_ttft_mean_arm"] == row["best_tpot_mean_arm"]
        rows.append(row)

    def med(name):
        vals = [r[name] for r in rows if r.get(name) is not None]
        return round(statistics.median(vals), 4) if vals else None

    worst = max(rows, key=lambda r: max(r[f"loss_{m}"] for m in METRICS))
    wm = max(METRICS, key=lambda m: worst[f"loss_{m}"])
    return {
        "headroom_captured_ttft": med("headroom_ttft_mean"), "headroom_captured_tpot": med("headroom_tpot_mean"),
        "median_loss_ttft": med("loss_ttft_mean"), "median_loss_tpot": med("loss_tpot_mean"),
        "median_loss_throughput": med("loss_throughput"),
        "worst_loss": round(worst[f"loss_{wm}"], 4), "worst_loss_where": f"{worst['config']} {wm}",
        "share_never_worse_2pct": round(sum(all(r[f"loss_{m}"] <= 0.02 for m in METRICS) for r in rows) / len(rows), 3),
        # Pareto view: gain of ours over the best upstream TPOT at no worse TTFT (and TTFT at no worse TPOT), median
        # over configurations where such a combination exists; share of configurations where some upstream
        # combination is at least as good on both; share where one upstream combination is best on both.
        "frontier_gain_tpot": med("frontier_gain_tpot_mean"), "frontier_gain_ttft": med("frontier_gain_ttft_mean"),
        "share_dominated_by_upstream": round(sum(r["dominated_by_upstream"] for r in rows) / len(rows), 3),
        "share_one_upstream_best_on_both": round(sum(r["one_upstream_is_best_on_both"] for r in rows) / len(rows), 3),
        "rows": rows,
    }


def _save(path: str, caps: dict, runs: dict) -> None:
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump({"capacity": caps, "runs": runs}, f)
        os.replace(path + ".tmp", path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--loads", default=",".join(map(str, LOADS)))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--duration-s", type=float, default=0.0,
                    help="seconds of arrivals (0: per preset as `tiersched.bench lockstep`)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--ours", default="ordering=fcfs,dispatch=round_robin,mixed=1,chunk=8192",
                    help="our arm: ordering, dispatch, mixed (0/1), the plan's upper chunk budget, delay "
                         "(upstream's prefill delayer's max passes, 0: off), plan (0: the step plan off, an ablation), "
                         "[request] plan_* keys")
    ap.add_argument("--cache", default="", help="JSON file keeping upstream and bound runs between probes")
    ap.add_argument("--json", action="store_true", help="print the summary (with rows) as one JSON object")
    args = ap.parse_args(argv)
    csv = lambda text, cast=str: [cast(x) for x in text.split(",") if x]
    ours = dict(kv.split("=") for kv in csv(args.ours))
    ours = {"ordering": ours.get("ordering", "fcfs"), "dispatch": ours.get("dispatch", "round_robin"),
            "mixed": ours.get("mixed", "1") == "1", "chunk": int(ours.get("chunk", 8192)),
            "delay": int(ours.get("delay", 0)), "plan": ours.get("plan", "1") == "1",
            "config": {k: float(v) for k, v in ours.items() if k.startswith("plan_")}}
    presets, shapes = csv(args.presets), csv(args.shapes)
    start = time.perf_counter()
    cache = {}
    if args.cache and os.path.exists(args.cache):
        with open(args.cache) as f:
            cache = json.load(f)
    import multiprocessing as mp

    with ProcessPoolExecutor(max(1, args.workers), mp_context=mp.get_context("fork")) as pool:
        caps = cache.get("capacity") or _capacities(presets, shapes, pool)
        missing = [f"{p}/{s}" for p in presets for s in shapes if f"{p}/{s}" not in caps]
        if missing:
            caps.update(_capacities(sorted({m.split("/")[0] for m in missing}),
                                    sorted({m.split("/")[1] for m in missing}), pool))
        up, mine = _jobs(presets, shapes, csv(args.loads, float), csv(args.seeds, int), args.duration_s, caps, ours)
        done = cache.get("runs", {})
        todo = mine + [j for j in up if json.dumps(j) not in done]
        print(f"[probe] {len(todo)} runs ({len(todo) - len(mine)} upstream/bound not cached)", file=sys.stderr,
              flush=True)
        results = {}
        for i, (job, m) in enumerate(pool.map(_run, todo, chunksize=2)):
            results[json.dumps(job)] = m
            if job[1] != "ours":
                done[json.dumps(job)] = m
            if (i + 1) % 100 == 0:
                print(f"[probe {time.perf_counter() - start:.0f}s] {i + 1}/{len(todo)}", file=sys.stderr, flush=True)
                _save(args.cache, caps, done)
    _save(args.cache, caps, done)
    runs: dict = {}
    for job in up + mine:
        m = results.get(json.dumps(job)) or done[json.dumps(job)]
        key, arm = job[0], job[1]
        label = "/".join(map(str, job[7:9])) + f" chunk={job[9]} mixed={int(job[10])} delay={job[11]}"
        if arm in ("upstream", "ideal"):
            runs.setdefault(key, {}).setdefault(arm, {})[label] = m
        else:
            runs.setdefault(key, {})[arm] = m
    keys = list(dict.fromkeys(j[0] for j in mine))
    out = summarise(runs, keys)
    out.update(ours=ours, duration_s=args.duration_s, wall_s=round(time.perf_counter() - start, 1))
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{'config':40s} {'TTFT ours/best (loss, headroom)':44s} {'TPOT ours/best (loss, headroom)':44s} thr loss")
    for r in out["rows"]:
        cells = []
        for m, unit, scale in (("ttft_mean", "s", 1.0), ("tpot_mean", "ms", 1e3)):
            h = r[f"headroom_{m}"]
            cells.append(f"{r[f'ours_{m}'] * scale:7.3f}/{r[f'best_{m}'] * scale:7.3f}{unit} "
                         f"({r[f'loss_{m}']:+.3f}, {'  n/a' if h is None else f'{h:+.2f}'})")
        print(f"{r['config']:40s} {cells[0]:44s} {cells[1]:44s} {r['loss_throughput']:+.3f}")
    for k, v in out.items():
        if k != "rows":
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
