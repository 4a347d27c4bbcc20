"""`python -m tiersched.bench lockstep [--json]`: the lockstep step plan against upstream's best static chunk size.

Grid: presets x synthetic length shapes x loads x seeds. Load = offered rate / the deployment's measured capacity
for that shape (upstream fcfs/round_robin at its default chunk, offered 3x the analytic estimate, requests
finished per second of the whole run). Arms per configuration, all on the same requests:
  upstream  fcfs ordering, round_robin dispatch, every chunked_prefill_size in --chunks; upstream-best is picked
            per metric (a different chunk size may win TTFT and TPOT);
  ours      the same ordering and dispatch with the step plan on (`PolicySet(step_plan="tiersched")`), with the
            preset's default chunk size as its upper budget (the plan is adaptive, so it gets no chunk tuning);
  bounds    perfect balance (`ideal_balance`, every max over ranks a mean) at chunk size 8192 and the
            lockstep-free reference (`lockstep_free`: every rank on its own clock; each request's attention stays
            on its rank) at chunk size 1024.
Headroom captured = (upstream_best - ours) / (upstream_best - bound), per metric, median over configurations at
load >= 0.7. worst_loss: the largest relative regression of ours against upstream-best on mean TTFT, mean TPOT
or throughput anywhere. Mixed priority (LS/BE at 1.5x capacity, bench request's scenario): prefix-aging with the
plan vs fcfs-priority at its best chunk size; LS tail (P99 with >= 1000 LS samples, else P95) over the LS-alone
floor, and BE throughput loss.
Upstream's --enable-prefill-delayer is not in the upstream space until the simulator models it (the output says).
Durations are shortened so the whole grid fits the time limit on 2 cores; the output states them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from tiersched.bench.stats import headroom, tail_percentile

PRESETS = ("qwen3-dp4ep4", "qwen3-dp2tp2ep4", "deepseek-v3-32")
LOADS = (0.5, 0.7, 0.85, 1.0, 1.2)
CHUNKS = (1024, 2048, 4096, 8192)
# Chunk size of each bound run: perfect balance is lowest at the largest chunk (its steps cost the mean rank, so
# long chunks stall nobody), the lockstep-free reference at the smallest (a rank's own decodes still wait for its
# prefill), as measured on qwen3-dp4ep4 Two-end at 60 req/s.
BOUND_CHUNKS = {"ideal": 8192, "free": 1024}
METRICS = ("ttft_mean", "tpot_mean", "throughput")
DURATION_S = {"qwen3-dp4ep4": 3.0, "qwen3-dp2tp2ep4": 3.0, "deepseek-v3-32": 2.0}  # --duration-s 0: these


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from tiersched.sim.workloads import SHAPES

    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--loads", default=",".join(map(str, LOADS)))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--chunks", default=",".join(map(str, CHUNKS)), help="upstream chunked_prefill_size values")
    parser.add_argument("--duration-s", type=float, default=0.0,
                        help="seconds of arrivals per configuration (0: per preset, " +
                             ", ".join(f"{k} {v:g}" for k, v in DURATION_S.items()) + ")")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--mixed-duration-s", type=float, default=30.0,
                        help="seconds of arrivals of the mixed-priority scenario (0 skips it)")
    parser.add_argument("--mixed-seeds", default="0,1,2")


def _csv(text: str, cast=str) -> list:
    return [cast(x.strip()) for x in text.split(",") if x.strip()]


def _workload(preset: str, shape: str, rate: float, duration_s: float, seed: int):
    from tiersched.sim import workloads

    return workloads.synthetic(shape, rate=rate, duration_s=duration_s, seed=seed)


def _run(job) -> tuple:
    """job = (key, preset, shape, rate, duration_s, seed, arm, chunk) -> (key, arm, chunk, metrics subset)."""
    from tiersched.sim import PolicySet, get_preset, simulate

    key, preset, shape, rate, duration_s, seed, arm, chunk = job
    p = get_preset(preset).with_scheduler(chunked_prefill_size=chunk)
    work = _workload(preset, shape, rate, duration_s, seed)
    kwargs = {"ideal": {"ideal_balance": True}, "free": {"lockstep_free": True}}.get(arm, {})
    policies = PolicySet(step_plan="tiersched") if arm == "ours" else PolicySet()
    m = simulate(p, work, policies, seed=seed, record_timeline=False, **kwargs).metrics
    return key, arm, chunk, {k: m[k] for k in METRICS + ("finished", "requests")}


def _capacity(job) -> tuple:
    """(preset, shape) -> requests/s upstream sustains: offered 3x the analytic estimate for 6 s, finished / span."""
    from tiersched.sim import capacity, get_preset, simulate

    preset, shape = job
    p = get_preset(preset)
    probe = _workload(preset, shape, 1.0, 4000.0, 999)
    rate = 3.0 * capacity.nominal_capacity_req_s(p, float(probe.input_tokens.mean()), float(probe.output_tokens.mean()))
    m = simulate(p, _workload(preset, shape, rate, 6.0, 999), record_timeline=False).metrics
    return preset, shape, m["throughput_req_s"]


def _pool(workers: int):
    import multiprocessing as mp

    return ProcessPoolExecutor(max(1, workers), mp_context=mp.get_context("fork"))


def grid(presets, shapes, loads, seeds, chunks, duration_s: float, workers: int, progress=None) -> dict:
    with _pool(workers) as pool:
        caps = {(p, s): c for p, s, c in pool.map(_capacity, [(p, s) for p in presets for s in shapes])}
        jobs = []
        for p in presets:
            dur = duration_s or DURATION_S.get(p, 4.0)
            for s in shapes:
                for load in loads:
                    for seed in seeds:
                        key = (p, s, load, seed)
                        rate = load * caps[(p, s)]
                        jobs += [(key, p, s, rate, dur, seed, "upstream", c) for c in chunks]
                        jobs.append((key, p, s, rate, dur, seed, "ours", max(chunks)))
                        jobs += [(key, p, s, rate, dur, seed, arm, c) for arm, c in BOUND_CHUNKS.items()]
        runs: dict = {}
        for i, (key, arm, chunk, m) in enumerate(pool.map(_run, jobs, chunksize=4)):
            runs.setdefault(key, {}).setdefault(arm, {})[chunk] = m
            if progress and (i + 1) % 50 == 0:
                progress(f"{i + 1}/{len(jobs)} runs")
    configs = []
    for (p, s, load, seed), arms in runs.items():
        row = {"preset": p, "shape": s, "load": load, "seed": seed, "rate": round(load * caps[(p, s)], 3),
               "duration_s": duration_s or DURATION_S.get(p, 4.0)}
        ours = arms["ours"][max(chunks)]
        for metric in METRICS:
            pick = max if metric == "throughput" else min
            best_chunk = pick(arms["upstream"], key=lambda c: arms["upstream"][c][metric])
            up = arms["upstream"][best_chunk][metric]
            row[f"upstream_best_{metric}"] = up
            row[f"upstream_best_{metric}_chunk"] = best_chunk
            row[f"ours_{metric}"] = ours[metric]
            for arm in ("ideal", "free"):
                row[f"{arm}_{metric}"] = pick(m[metric] for m in arms[arm].values())
            loss = (up - ours[metric]) / up if metric == "throughput" else (ours[metric] - up) / up
            row[f"loss_{metric}"] = loss
        for metric in ("ttft_mean", "tpot_mean"):
            row[f"headroom_{metric}_ideal"] = headroom(row[f"upstream_best_{metric}"], ours[metric],
                                                        row[f"ideal_{metric}"])
            row[f"headroom_{metric}_free"] = headroom(row[f"upstream_best_{metric}"], ours[metric],
                                                       row[f"free_{metric}"])
        row["unfinished_ours"] = ours["requests"] - ours["finished"]
        configs.append(row)
    configs.sort(key=lambda r: (r["preset"], r["shape"], r["load"], r["seed"]))
    return {"configs": configs, "capacity_req_s": {f"{p}/{s}": c for (p, s), c in caps.items()}}


def _median(values) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def mixed(duration_s: float, seeds, chunks) -> dict:
    """LS tail vs the LS-alone floor and BE throughput, prefix-aging + plan vs fcfs-priority at its best chunk."""
    import numpy as np

    from tiersched.bench.request import UPSTREAM_DEFAULT_MAX_RUNNING, _class_tokens_s, ls_alone_ttft_s
    from tiersched.core.request import RequestTierConfig
    from tiersched.core.request.ordering import AgingPrefixOrdering
    from tiersched.core.request.preemption import LatencySensitivePreemption
    from tiersched.sim import PolicySet, capacity, get_preset, simulate

    cfg = RequestTierConfig()
    per_seed = []
    for seed in seeds:
        p = get_preset("qwen3-dp4ep4").with_scheduler(max_running_requests=UPSTREAM_DEFAULT_MAX_RUNNING)
        work = capacity.mixed_priority_at_overload(ls_fraction=0.2, overload=1.5, preset=p, duration_s=duration_s,
                                                   seed=seed)
        window = float(work.arrival_s[-1])
        floor_all = ls_alone_ttft_s(p, work, seed)
        up = {}
        for c in chunks:
            res = simulate(p.with_scheduler(chunked_prefill_size=c), work, PolicySet(ordering="fcfs-priority"), seed,
                           record_timeline=False)
            up[c] = (res, _class_tokens_s(res, 1, window)["total_tok_s"])
        best_chunk = max(up, key=lambda c: up[c][1])  # fcfs-priority at its best BE throughput
        ours = simulate(p, work, PolicySet(ordering=AgingPrefixOrdering(cfg),
                                           preemption=LatencySensitivePreemption(cfg), step_plan="tiersched"),
                        seed, record_timeline=False)
        ls_ttft = ours.records["ttft"][(ours.records["class_of"] == 0) & np.isfinite(ours.records["ttft"])]
        q = tail_percentile(int(ls_ttft.size))
        per_seed.append({
            "seed": seed, "ls_samples": int(ls_ttft.size), "percentile": q,
            "ls_tail_s": float(np.percentile(ls_ttft, q)), "ls_floor_s": float(np.percentile(floor_all, q)),
            "be_tok_s_ours": _class_tokens_s(ours, 1, window)["total_tok_s"], "be_tok_s_upstream": up[best_chunk][1],
            "upstream_chunk": best_chunk,
        })
    for r in per_seed:
        r["ls_tail_over_floor"] = r["ls_tail_s"] / r["ls_floor_s"]
        r["be_throughput_loss"] = 1.0 - r["be_tok_s_ours"] / r["be_tok_s_upstream"]
    return {"per_seed": per_seed, "duration_s": duration_s,
            "ls_tail_over_floor": _median(r["ls_tail_over_floor"] for r in per_seed),
            "be_throughput_loss": _median(r["be_throughput_loss"] for r in per_seed)}


def summarise(result: dict) -> dict:
    rows = result["configs"]
    out = _summary(rows)
    out["per_preset"] = {p: _summary([r for r in rows if r["preset"] == p])
                         for p in sorted({r["preset"] for r in rows})}
    return out


def _summary(rows: list[dict]) -> dict:
    loaded = [r for r in rows if r["load"] >= 0.7]
    sat = [r for r in rows if r["load"] == max(x["load"] for x in rows)]
    worst = max(rows, key=lambda r: max(r[f"loss_{m}"] for m in METRICS))
    worst_metric = max(METRICS, key=lambda m: worst[f"loss_{m}"])
    return {
        "headroom_captured_tpot": _median(r["headroom_tpot_mean_ideal"] for r in loaded),
        "headroom_captured_ttft": _median(r["headroom_ttft_mean_ideal"] for r in loaded),
        "headroom_captured_tpot_vs_lockstep_free": _median(r["headroom_tpot_mean_free"] for r in loaded),
        "headroom_captured_ttft_vs_lockstep_free": _median(r["headroom_ttft_mean_free"] for r in loaded),
        # What the lockstep-free reference itself captures of the perfect-balance headroom: the most any plan of
        # a lockstep group can approach if it removed every lockstep stall and nothing else.
        "lockstep_free_share_of_headroom_tpot": _median(
            headroom(r["upstream_best_tpot_mean"], r["free_tpot_mean"], r["ideal_tpot_mean"]) for r in loaded),
        "lockstep_free_share_of_headroom_ttft": _median(
            headroom(r["upstream_best_ttft_mean"], r["free_ttft_mean"], r["ideal_ttft_mean"]) for r in loaded),
        "saturation_throughput_vs_bound": _median(r["ours_throughput"] / r["ideal_throughput"] for r in sat),
        "saturation_throughput_vs_lockstep_free": _median(r["ours_throughput"] / r["free_throughput"] for r in sat),
        "upstream_best_saturation_throughput_vs_bound": _median(
            r["upstream_best_throughput"] / r["ideal_throughput"] for r in sat),
        "worst_loss": worst[f"loss_{worst_metric}"],
        "worst_loss_where": {k: worst[k] for k in ("preset", "shape", "load", "seed")} | {"metric": worst_metric},
        "share_of_configs_never_worse_2pct": sum(all(r[f"loss_{m}"] <= 0.02 for m in METRICS) for r in rows) / len(rows),
    }


def main(args) -> int:
    from tiersched.sim.presets import preset_names
    from tiersched.sim.workloads import SHAPES

    presets, shapes = _csv(args.presets), _csv(args.shapes)
    for p in presets:
        if p not in preset_names():
            print(f"unknown preset {p!r}; choose from {', '.join(preset_names())}.", file=sys.stderr)
            return 2
    for s in shapes:
        if s not in SHAPES:
            print(f"unknown shape {s!r}; choose from {', '.join(SHAPES)}.", file=sys.stderr)
            return 2
    loads, seeds, chunks = _csv(args.loads, float), _csv(args.seeds, int), _csv(args.chunks, int)
    start = time.perf_counter()
    say = (lambda msg: print(f"[lockstep {time.perf_counter() - start:.0f}s] {msg}", file=sys.stderr, flush=True))
    result = grid(presets, shapes, loads, seeds, chunks, args.duration_s, args.workers, say)
    out = summarise(result)
    if args.mixed_duration_s > 0:
        say("mixed-priority scenario")
        mix = mixed(args.mixed_duration_s, _csv(args.mixed_seeds, int), chunks)
        out.update(ls_tail_over_floor=mix["ls_tail_over_floor"], be_throughput_loss=mix["be_throughput_loss"],
                   mixed_priority=mix)
    else:
        out.update(ls_tail_over_floor=None, be_throughput_loss=None)
    out.update({
        "upstream_space": {"ordering": ["fcfs"], "dispatch": ["round_robin"], "chunked_prefill_size": chunks,
                           "enable_prefill_delayer": "not modelled by the simulator yet: not searched"},
        "durations_s": {p: args.duration_s or DURATION_S.get(p, 4.0) for p in presets},
        "note": "durations shortened so the grid fits 10 minutes on 2 cores; load = rate / measured capacity",
        "capacity_req_s": result["capacity_req_s"],
        "configs": result["configs"],
        "wall_s": round(time.perf_counter() - start, 1),
    })
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            if k not in ("configs", "mixed_priority", "capacity_req_s"):
                print(f"{k}: {v}")
        print(f"configs: {len(out['configs'])} (see --json)")
    return 0
