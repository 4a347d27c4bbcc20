"""Where the LS TTFT tail of the request-tier scenario comes from: per-LS-request decomposition, reproducible.

Runs `bench request`'s mixed-priority scenario (same workload, preset and arms) with the simulator's prefill
steps logged (wrapping `RankState.schedule_prefill` / `finish_prefill`; nothing in the simulator changes), and
splits every LS request's TTFT into
  * `in_progress_s`: from its arrival to the end of the lockstep PREFILL step already running when it arrived
    (steps are non-preemptive: no scheduler can shorten it once chosen); a decode-only step in progress is not
    logged, so its remainder counts in `queued_s`;
  * `queued_steps` / `queued_s`: whole prefill steps that ran after that one and before the step that prefilled it
    (0 means it was admitted at the first scheduling point after arrival);
  * `own_s`: the step(s) that prefilled it, up to its first token;
and records what made those steps long: the largest per-rank BE prefill tokens in the step in progress and in
its own first step, whether the DP-wide LS signal was set, and the time since the previous LS arrival.
It prints the top LS TTFTs per seed (the P99 is the second-largest of ~110) and a summary, or `--json`.

    .venv/bin/python benchmark/request_tier_tail.py [--seeds 0,1,2] [--arm tiersched|fcfs-priority]
        [--set request.KEY=VALUE,...] [--top 4] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def _logged_run(preset, work, policies, seed):
    """simulate() with every prefill step's (start, end, per-rank batch, per-rank group LS signal) logged."""
    from tiersched.sim import rank as rank_mod
    from tiersched.sim import simulate

    steps: dict[float, dict] = {}  # keyed by start time: all ranks of one lockstep step share it
    orig_schedule, orig_finish = rank_mod.RankState.schedule_prefill, rank_mod.RankState.finish_prefill

    def schedule(self, now_s, budget=None):
        batch = orig_schedule(self, now_s, budget)
        if batch:
            step = steps.setdefault(now_s, {"start": now_s, "end": None, "batches": {}, "signal": {}})
            step["batches"][self.rank] = list(batch)
            step["signal"][self.rank] = int(getattr(self, "group_ls_waiting", 0))
        return batch

    def finish(self, batch, now_s):
        # The engine finishes every rank's batch of a lockstep step before scheduling the next one, so the step
        # being finished is the last one logged.
        last = steps[next(reversed(steps))]
        assert last["batches"].get(self.rank) == batch, "prefill batch finished out of order"
        last["end"] = now_s
        return orig_finish(self, batch, now_s)

    rank_mod.RankState.schedule_prefill, rank_mod.RankState.finish_prefill = schedule, finish
    try:
        result = simulate(preset, work, policies, seed)
    finally:
        rank_mod.RankState.schedule_prefill, rank_mod.RankState.finish_prefill = orig_schedule, orig_finish
    return result, sorted((s for s in steps.values() if s["end"] is not None), key=lambda s: s["start"])


def decompose(work, result, steps, frontend_s: float) -> list[dict]:
    """One row per LS request: its TTFT split into step in progress / queued steps / own prefill step(s)."""
    rec = result.records
    starts = np.array([s["start"] for s in steps])
    ends = np.array([s["end"] for s in steps])
    is_be = np.asarray(work.class_of) == 1
    first_step = {}
    for k, s in enumerate(steps):
        for batch in s["batches"].values():
            for rid, _, _ in batch:
                first_step.setdefault(int(rid), k)
    ls_ids = np.flatnonzero(np.asarray(work.class_of) == 0)
    rows, prev_arrival = [], None

    def be_tokens(s) -> int:
        return max((sum(e for rid, e, _ in b if is_be[rid]) for b in s["batches"].values()), default=0)

    for i in ls_ids:
        a, ttft = float(rec["arrival"][i]), float(rec["ttft"][i])
        gap = None if prev_arrival is None else a - prev_arrival
        prev_arrival = a
        if not np.isfinite(ttft) or int(i) not in first_step:
            continue
        k_own = first_step[int(i)]
        running = np.flatnonzero((starts <= a) & (ends > a))
        k_run = int(running[-1]) if running.size else None
        in_progress = (float(ends[k_run]) - a) if k_run is not None else 0.0
        queued_from = a + in_progress
        own_start = float(starts[k_own])
        rows.append({
            "rid": int(i), "arrival_s": a, "ttft_s": ttft, "gap_since_prev_ls_s": gap,
            "in_progress_s": in_progress,
            "in_progress_max_be_tokens_per_rank": be_tokens(steps[k_run]) if k_run is not None else 0,
            "queued_steps": int(((starts >= queued_from - 1e-12) & (starts < own_start)).sum()),
            "queued_s": max(0.0, own_start - queued_from),
            "own_s": a + ttft - frontend_s - own_start,
            "own_step_s": float(ends[k_own] - own_start),
            "own_step_max_be_tokens_per_rank": be_tokens(steps[k_own]),
            "own_step_signal": max(steps[k_own]["signal"].values()),
            "input_tokens": int(rec["input_tokens"][i]),
        })
    return rows


def run(seeds, arm: str, cfg, duration_s: float, preset_name: str, top: int) -> dict:
    from tiersched.bench.request import UPSTREAM_DEFAULT_MAX_RUNNING, ls_alone_ttft_s
    from tiersched.core.request.ordering import AgingPrefixOrdering
    from tiersched.core.request.preemption import LatencySensitivePreemption
    from tiersched.sim import PolicySet, capacity
    from tiersched.sim.presets import get_preset

    p = get_preset(preset_name).with_scheduler(max_running_requests=UPSTREAM_DEFAULT_MAX_RUNNING)
    out = {}
    for seed in seeds:
        work = capacity.mixed_priority_at_overload(ls_fraction=0.2, overload=1.5, preset=p, duration_s=duration_s,
                                                   seed=seed)
        pol = (PolicySet(ordering=arm) if arm != "tiersched" else
               PolicySet(ordering=AgingPrefixOrdering(cfg), preemption=LatencySensitivePreemption(cfg)))
        result, steps = _logged_run(p, work, pol, seed)
        rows = decompose(work, result, steps, p.hardware.frontend_latency_s)
        ttft = np.array([r["ttft_s"] for r in rows])
        alone = ls_alone_ttft_s(p, work, seed)
        tail = sorted(rows, key=lambda r: -r["ttft_s"])[:top]
        out[str(seed)] = {
            "ls_requests": len(rows), "ls_p99_ttft_s": float(np.percentile(ttft, 99)),
            "ls_p50_ttft_s": float(np.percentile(ttft, 50)),
            "ls_alone_p99_s": float(np.percentile(alone, 99)),
            "admitted_at_first_step_share": float(np.mean([r["queued_steps"] == 0 for r in rows])),
            "mean_in_progress_s": float(np.mean([r["in_progress_s"] for r in rows])),
            "mean_own_s": float(np.mean([r["own_s"] for r in rows])),
            "tail": tail,
        }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--arm", default="tiersched", choices=("tiersched", "fcfs-priority", "fcfs"))
    ap.add_argument("--set", default="", metavar="request.KEY=VALUE,...")
    ap.add_argument("--duration-s", type=float, default=90.0)
    ap.add_argument("--preset", default="qwen3")
    ap.add_argument("--top", type=int, default=4, help="LS requests with the largest TTFT shown per seed")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from tiersched.config import ConfigError, load_config
    from tiersched.core.request import RequestTierConfig

    try:
        cfg = load_config({"TIERSCHED_SET": args.set}).tier("request") if args.set else RequestTierConfig()
    except ConfigError as exc:
        raise SystemExit(f"--set: {exc}") from None
    t0 = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    out = {"arm": args.arm, "set": args.set or None, "per_seed": run(seeds, args.arm, cfg, args.duration_s,
                                                                     args.preset, args.top)}
    out["wall_s"] = time.perf_counter() - t0
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"arm {args.arm}  set {args.set or '(defaults)'}  ({out['wall_s']:.0f} s)")
    for seed, r in out["per_seed"].items():
        print(f"seed {seed}: {r['ls_requests']} LS, p50 {r['ls_p50_ttft_s']:.3f} s, p99 {r['ls_p99_ttft_s']:.3f} s "
              f"(LS-alone p99 {r['ls_alone_p99_s']:.4f} s); admitted at the first step after arrival: "
              f"{r['admitted_at_first_step_share']:.0%}; mean step-in-progress wait {r['mean_in_progress_s']:.3f} s, "
              f"mean own step(s) {r['mean_own_s']:.3f} s")
        print("   rid  arrival   ttft  in-prog (BE tok/rank)  queued(steps)  own (BE tok/rank, signal)  gap-prev-LS  in-tok")
        for t in r["tail"]:
            gap = "-" if t["gap_since_prev_ls_s"] is None else f"{t['gap_since_prev_ls_s']:.2f}"
            print(f"  {t['rid']:4d} {t['arrival_s']:8.2f} {t['ttft_s']:6.3f}  {t['in_progress_s']:.3f} "
                  f"({t['in_progress_max_be_tokens_per_rank']:5d})  {t['queued_s']:.3f} ({t['queued_steps']})  "
                  f"{t['own_s']:.3f} ({t['own_step_max_be_tokens_per_rank']:5d}, {t['own_step_signal']})  "
                  f"{gap:>8s}  {t['input_tokens']:5d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
