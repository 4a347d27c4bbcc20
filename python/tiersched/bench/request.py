"""`python -m tiersched.bench request [--json]`: request-tier ordering overhead and mixed-priority scenario.

Ordering overhead (one scheduling step, median ms): ours = the adapter's prefix-aging `calc_priority` hook over
real upstream `Req` objects (above upstream's WAITING_QUEUE_PREFIX_MATCH_MAX=128 waiting it skips the radix
match, as upstream does); upstream = its real `SchedulePolicy._sort_by_hrrn` over the same `Req` objects. (Upstream's
`calc_priority` itself turns hrrn into fcfs above 128 waiting and needs a published server runtime context, so
the hrrn sort is what we time.) `core_order_ms_*`: the pure core over snapshots.
Mixed-priority scenario (simulator, 20% LS, Poisson, 1.5x the deployment's measured capacity for the mix, 90 s):
upstream fcfs-with-priority vs tiersched, and the LS-alone lower bound (the best ratio any scheduler could reach);
`long_overload`: the same run for `--long-duration-s` (default 120 s), where the promoted backlog never empties,
with an arm that puts promoted requests strictly first (what the LS overtake budget prevents).
Arms: `tiersched` = the defaults, i.e. the same-step DP-wide LS signal (`same_step_signal`, lag 0: the adapter's
all-reduce before batch formation); `tiersched-lag1-signal` = `same_step_signal = false` (only upstream's MLP-sync
gather, one step late); `tiersched-local-cap` = the per-rank rule; `tiersched-no-chunk-cap`. The `*_ideal_signal`
keys of earlier versions named the same-step arm when SGLang could not deliver it; they are kept as aliases of
the `tiersched` values.
"""
from __future__ import annotations

import argparse
import array
import json
import math
import random
import statistics
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--reps", type=int, default=30, help="timed scheduling steps per queue size")
    parser.add_argument("--duration-s", type=float, default=90.0,
                        help="simulated seconds of arrivals in the mixed scenario (at 1.5x the measured capacity the "
                             "KV pool fills after ~30 s, so 90 s is needed for the overload to show)")
    parser.add_argument("--preset", default="qwen3")
    parser.add_argument("--seed", type=int, default=0, help="seed of the ordering microbenchmark")
    parser.add_argument("--seeds", default="0,1,2",
                        help="comma list of mixed-scenario seeds; headline fields summarise all of them (median ratio, "
                             "mean loss, worst wait) so no single lucky seed is the result")
    parser.add_argument("--skip-sim", action="store_true", help="only the ordering microbenchmark")
    parser.add_argument("--long-duration-s", type=float, default=120.0,
                        help="also run a longer sustained overload (fcfs-priority, tiersched, and tiersched with "
                             "promoted requests strictly first) and report it under `long_overload`; 0 skips it")
    parser.add_argument("--set", default="", metavar="request.KEY=VALUE,...",
                        help="tiersched arms' tunables, as TIERSCHED_SET gives them to a server (e.g. "
                             "request.ls_hold_s=30); default: the documented defaults")


def _make_queue(n: int, seed: int):
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    rng = random.Random(seed)
    now = time.perf_counter()
    queue = []
    for i in range(n):
        length = rng.randint(16, 512)
        start = rng.randint(0, 1_000_000)
        r = Req(f"r{i}", "", array.array("q", range(start, start + length)), SamplingParams(max_new_tokens=64),
                priority=rng.choice((0, 0, 0, 0, 10)))
        # Waits up to 30 s: about a third are past the default 20 s cap, so the LS overtake path is timed too.
        r.time_stats.set_wait_queue_entry_time(now - rng.uniform(0.0, 30.0))
        r.arrival_processed_tokens = rng.randint(0, 100_000)
        queue.append(r)
    return queue


def _time_steps(step, queue, reps: int, seed: int) -> float:
    """Median ms of `step(queue)`; the queue is reshuffled (untimed) before each step like fresh arrivals."""
    rng = random.Random(seed)
    samples = []
    for _ in range(reps):
        rng.shuffle(queue)
        t0 = time.perf_counter()
        step(queue)
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def ordering_overhead(reps: int, seed: int) -> dict:
    from sglang.srt.managers.schedule_policy import SchedulePolicy
    from sglang.srt.mem_cache.radix_cache import RadixCache

    from tiersched.core.request import RequestTierConfig, WaitingRequest
    from tiersched.core.request.ordering import AgingPrefixOrdering
    from tiersched.sglang.request import hooks as request_tier

    request_tier.configure(RequestTierConfig())
    out = {}
    for n in (1000, 4000):
        queue = _make_queue(n, seed)
        ours = SchedulePolicy.__new__(SchedulePolicy)
        request_tier.init_schedule_policy(SchedulePolicy.__init__, ours, "prefix-aging", RadixCache.create_simulated(),
                                          False, True, False)
        k = n // 1000
        out[f"order_ms_{k}k"] = _time_steps(
            lambda q: request_tier.calc_priority(SchedulePolicy.calc_priority, ours, q, None, 0), queue, reps, seed)
        out[f"hrrn_ms_{k}k"] = _time_steps(lambda q: SchedulePolicy._sort_by_hrrn(q, set(), 200_000),
                                           queue, reps, seed)
        snaps = [WaitingRequest(r.rid, r.priority, r.time_stats.wait_queue_entry_time, len(r.origin_input_ids))
                 for r in queue]
        core = AgingPrefixOrdering()
        now = time.perf_counter()
        out[f"core_order_ms_{k}k"] = _time_steps(lambda s: core.order(s, now), snaps, reps, seed)
    return out


# Upstream's default running-request limit per DP worker when --max-running-requests is unset:
# KVCacheConfigurator.resolve_max_num_reqs -> max(min(capacity / context_len * 512, 4096), 2048), <= capacity // 2.
UPSTREAM_DEFAULT_MAX_RUNNING = 2048
NO_CAP = 1 << 30


def _class_tokens_s(result, cls: int, window_s: float) -> dict:
    """Per-class throughput while requests arrive: tokens of that class's requests finished by `window_s`."""
    import numpy as np

    rec = result.records
    done = (rec["class_of"] == cls) & np.isfinite(rec["e2e"]) & (rec["arrival"] + rec["e2e"] <= window_s)
    out_tok = float(rec["output_tokens"][done].sum())
    all_tok = float((rec["input_tokens"][done] + rec["output_tokens"][done]).sum())
    return {"output_tok_s": out_tok / window_s, "total_tok_s": all_tok / window_s}


def ls_alone_ttft_s(preset, work, seed: int):
    """Per-LS-request lower bound on TTFT: its prefill as the only work on the deployment (no queueing, no other
    rank's step to wait for, the shared system prompt already cached), priced with the simulator's step model
    and routing. No scheduler can beat it, so fcfs-priority's P99 / the P99 of this is the largest LS P99 ratio
    any request-tier policy can reach in the scenario. float [n_ls]."""
    import numpy as np

    from tiersched.sim.cost_model import StepCostModel
    from tiersched.sim.moe_routing import make_routing, token_probs

    cost = StepCostModel(preset, token_probs(make_routing(preset, seed), preset.dp))
    out = []
    for i in np.flatnonzero(work.class_of == 0):
        shared_tokens = sum(1 for b in work.blocks(i) if b < 10**12) * work.block_tokens  # system-prompt pages
        extend = max(1, int(work.input_tokens[i]) - shared_tokens)
        tokens, pairs = np.zeros(preset.dp), np.zeros(preset.dp)
        tokens[0], pairs[0] = extend, extend * (shared_tokens + (extend + 1) / 2)
        out.append(float(cost.step_times(tokens, pairs, np.zeros(preset.dp))[0][0]))
    return np.asarray(out)


def mixed_priority(duration_s: float, preset: str, seed: int, cfg=None) -> dict:
    from dataclasses import replace

    from tiersched.core.request import RequestTierConfig
    from tiersched.core.request.ordering import AgingPrefixOrdering
    from tiersched.core.request.preemption import LatencySensitivePreemption
    from tiersched.sim import PolicySet, capacity, simulate
    from tiersched.sim.presets import get_preset
    from tiersched.bench.stats import tail_percentile

    p = get_preset(preset).with_scheduler(max_running_requests=UPSTREAM_DEFAULT_MAX_RUNNING)
    work = capacity.mixed_priority_at_overload(ls_fraction=0.2, overload=1.5, preset=p, duration_s=duration_s,
                                               seed=seed)
    cfg = cfg or RequestTierConfig()
    no_cap = replace(cfg, be_chunk_tokens=NO_CAP)
    # The previous per-rank rule: cap only the running BE chunk, only while THIS rank has LS waiting.
    local_cap = replace(cfg, lockstep_chunk_cap=False, cap_be_admissions=False)
    lag1 = replace(cfg, same_step_signal=False)  # only the count in upstream's MLP-sync gather: one step late

    def arm(ordering_cfg):
        return PolicySet(ordering=AgingPrefixOrdering(ordering_cfg), preemption=LatencySensitivePreemption(ordering_cfg))

    arms = {
        "fcfs-priority": PolicySet(ordering="fcfs-priority"),  # + upstream PriorityPreemption (threshold 10)
        # Plain FCFS (no priority): on one server it minimises the longest wait, so its max BE wait says how far
        # below the cap any order can keep the longest wait under this overload.
        "fcfs": PolicySet(ordering="fcfs"),
        "tiersched": arm(cfg),  # defaults: DP-wide signal of the same step (the adapter's all-reduce)
        "tiersched-lag1-signal": arm(lag1),
        "tiersched-local-cap": arm(local_cap),
        "tiersched-no-chunk-cap": arm(no_cap),
    }
    import numpy as np

    results = {name: simulate(p, work, pol, seed) for name, pol in arms.items()}
    window = float(work.arrival_s[-1])
    out: dict = {}
    for name, res in results.items():
        m = res.metrics
        ls, be = m["per_class"]["LS"], m["per_class"]["BE"]
        key = name.replace("-", "_")
        out[f"ls_p99_ttft_s_{key}"] = ls["ttft_p99"]
        out[f"ls_p95_ttft_s_{key}"] = ls["ttft_p95"]
        out[f"ls_finished_{key}"] = ls["finished"]
        out[f"ls_p50_ttft_s_{key}"] = ls["ttft_p50"]
        out[f"max_be_wait_s_{key}"] = be["max_wait_s"]
        # Sustained overload leaves a backlog at the last arrival; the longest wait is about the time to drain it.
        rec = res.records
        first = rec["arrival"] + np.where(np.isfinite(rec["ttft"]), rec["ttft"], rec["end_s"] - rec["arrival"])
        is_be = rec["class_of"] == 1
        out[f"be_unstarted_at_last_arrival_{key}"] = int((is_be & (first > window)).sum())
        out[f"be_drain_s_{key}"] = float(first[is_be].max() - window)
        out[f"be_p99_ttft_s_{key}"] = be["ttft_p99"]
        out[f"preemptions_{key}"] = m["preemptions"]
        out[f"retractions_{key}"] = m["retractions"]
        for cls, label in ((0, "ls"), (1, "be")):
            for k, v in _class_tokens_s(res, cls, window).items():
                out[f"{label}_{k}_{key}"] = v

    alone_p99 = float(np.percentile(ls_alone_ttft_s(p, work, seed), 99))
    out["ls_p99_ttft_s_alone_lower_bound"] = alone_p99
    out["ls_p99_ttft_ratio_upper_bound"] = out["ls_p99_ttft_s_fcfs_priority"] / alone_p99
    base, ours, uncapped, local = (out[f"be_total_tok_s_{k}"] for k in (
        "fcfs_priority", "tiersched", "tiersched_no_chunk_cap", "tiersched_local_cap"))
    fcfs_p99 = out["ls_p99_ttft_s_fcfs_priority"]
    # Tail rule: P99 only where every arm finished >= TAIL_MIN_SAMPLES LS requests, else P95 (ls_tail_*).
    ls_samples = min(out[f"ls_finished_{name.replace('-', '_')}"] for name in arms)
    tail = tail_percentile(ls_samples)
    out.update({
        "ls_p95_ttft_ratio": out["ls_p95_ttft_s_fcfs_priority"] / out["ls_p95_ttft_s_tiersched"],
        "ls_samples_min": ls_samples,
        "ls_tail_percentile": tail,
    })
    out.update({
        "ls_p99_ttft_ratio": fcfs_p99 / out["ls_p99_ttft_s_tiersched"],
        "ls_p99_ttft_ratio_local_cap": fcfs_p99 / out["ls_p99_ttft_s_tiersched_local_cap"],
        "ls_p99_ttft_ratio_lag1_signal": fcfs_p99 / out["ls_p99_ttft_s_tiersched_lag1_signal"],
        "ls_p99_ttft_ratio_ideal_signal": fcfs_p99 / out["ls_p99_ttft_s_tiersched"],  # alias (see docstring)
        "ls_p99_ttft_ratio_no_chunk_cap": fcfs_p99 / out["ls_p99_ttft_s_tiersched_no_chunk_cap"],
        "be_throughput_loss": 1.0 - ours / base,  # BE tokens (prompt + output) per second, ours vs upstream
        "be_throughput_loss_local_cap": 1.0 - local / base,
        "chunk_cap_be_throughput_cost": 1.0 - ours / uncapped,  # same measure, chunk cap on vs off
        "lockstep_cap_be_throughput_cost": 1.0 - ours / local,  # DP-wide cap vs the per-rank cap
        "max_be_wait_s": out["max_be_wait_s_tiersched"],
        "max_be_wait_s_local_cap": out["max_be_wait_s_tiersched_local_cap"],
        "be_throughput_loss_lag1_signal": 1.0 - out["be_total_tok_s_tiersched_lag1_signal"] / base,
        "lockstep_signal_lag_steps": AgingPrefixOrdering(cfg).lockstep_signal_lag_steps,
        "lockstep_signal_lag_steps_lag1_arm": AgingPrefixOrdering(lag1).lockstep_signal_lag_steps,
        "sim_requests": int(len(work.input_tokens)),
        "sim_ls_requests": int((work.class_of == 0).sum()),
        "sim_duration_s": duration_s,
        "sim_offered_req_s": work.meta["rate"],
        "sim_nominal_capacity_req_s": work.meta["nominal_capacity_req_s"],  # measured saturated throughput
        "sim_capacity_method": work.meta["capacity_method"],
        "sim_analytic_capacity_req_s": work.meta["analytic_capacity_req_s"],
        "sim_max_running_requests": UPSTREAM_DEFAULT_MAX_RUNNING,
        "sim_preset": p.name,
    })
    out["ls_tail_ttft_ratio"] = out[f"ls_p{tail}_ttft_ratio"]
    return out


def sustained_overload(duration_s: float, preset: str, seeds, cfg) -> dict:
    """The same scenario run longer: the promoted BE backlog never empties, so this shows what the LS overtake
    budget (core/request/overtake.py) buys: arm `strict_promotion` = the same config with promoted requests always
    first (ls_overtake_burst = ls_overtakes_per_promoted = 0). Headline = median over seeds, worst wait."""
    from dataclasses import replace

    from tiersched.core.request.ordering import AgingPrefixOrdering
    from tiersched.core.request.preemption import LatencySensitivePreemption
    from tiersched.sim import PolicySet, capacity, simulate
    from tiersched.sim.presets import get_preset

    p = get_preset(preset).with_scheduler(max_running_requests=UPSTREAM_DEFAULT_MAX_RUNNING)
    strict = replace(cfg, ls_overtake_burst=0, ls_overtakes_per_promoted=0.0)
    per_seed = {}
    for seed in seeds:
        work = capacity.mixed_priority_at_overload(ls_fraction=0.2, overload=1.5, preset=p, duration_s=duration_s,
                                                   seed=seed)
        row = {}
        for name, pol in (("fcfs_priority", PolicySet(ordering="fcfs-priority")),
                          ("tiersched", PolicySet(ordering=AgingPrefixOrdering(cfg),
                                                  preemption=LatencySensitivePreemption(cfg))),
                          ("strict_promotion", PolicySet(ordering=AgingPrefixOrdering(strict),
                                                         preemption=LatencySensitivePreemption(strict)))):
            per_class = simulate(p, work, pol, seed, record_timeline=False).metrics["per_class"]
            row[f"ls_p99_ttft_s_{name}"] = per_class["LS"]["ttft_p99"]
            row[f"max_be_wait_s_{name}"] = per_class["BE"]["max_wait_s"]
        row["ls_p99_ttft_ratio"] = row["ls_p99_ttft_s_fcfs_priority"] / row["ls_p99_ttft_s_tiersched"]
        row["ls_p99_ttft_ratio_strict_promotion"] = (row["ls_p99_ttft_s_fcfs_priority"]
                                                     / row["ls_p99_ttft_s_strict_promotion"])
        per_seed[str(seed)] = row
    rows = per_seed.values()
    return {
        "duration_s": duration_s,
        "ls_p99_ttft_ratio": statistics.median(r["ls_p99_ttft_ratio"] for r in rows),
        "ls_p99_ttft_ratio_strict_promotion": statistics.median(r["ls_p99_ttft_ratio_strict_promotion"] for r in rows),
        "max_be_wait_s": max(r["max_be_wait_s_tiersched"] for r in rows),
        "max_be_wait_s_fcfs_priority": max(r["max_be_wait_s_fcfs_priority"] for r in rows),
        "per_seed": per_seed,
    }


def summarise_seeds(per_seed: dict[int, dict]) -> dict:
    """Headline = median LS ratio, mean BE loss, worst BE wait over the seeds; every seed's numbers kept."""
    import statistics

    import numpy as np

    from tiersched.bench.stats import TAIL_MIN_SAMPLES, bootstrap_ci, tail_percentile

    first = per_seed[min(per_seed)]
    out = {k: v for k, v in first.items() if k.startswith("sim_") and k != "sim_requests"}
    for key in [k for k in first if k.startswith(("ls_p99_ttft_ratio", "ls_p95_ttft_ratio"))
                and k != "ls_p99_ttft_ratio_upper_bound"]:
        out[key] = statistics.median(r[key] for r in per_seed.values())
        out[key + "_min"] = min(r[key] for r in per_seed.values())
    # The tail every seed can carry: P95 if any seed's run has fewer than TAIL_MIN_SAMPLES LS requests in an arm.
    out["ls_samples_min"] = min(r["ls_samples_min"] for r in per_seed.values())
    tail = tail_percentile(out["ls_samples_min"])
    out["ls_tail_percentile"] = tail
    ratios = [r[f"ls_p{tail}_ttft_ratio"] for r in per_seed.values()]
    out["ls_tail_ttft_ratio"] = statistics.median(ratios)
    out["ls_tail_ttft_ratio_min"] = min(ratios)
    ci = bootstrap_ci(lambda m: m, [np.array(ratios)])
    if ci is not None:  # of the mean over seeds of the per-seed ratio (upstream fcfs-priority / tiersched)
        out["ls_tail_ttft_ratio_mean"] = float(np.mean(ratios))
        out["ls_tail_ttft_ratio_mean_ci95"] = ci
    out["ls_tail_rule"] = (f"LS TTFT tail = P99 only where every arm of every seed finished >= {TAIL_MIN_SAMPLES} "
                           f"LS requests, else P95; fewest here: {out['ls_samples_min']}")
    for key in [k for k in first if k.startswith(("be_throughput_loss", "chunk_cap_be", "lockstep_cap_be"))]:
        out[key] = statistics.fmean(r[key] for r in per_seed.values())
    for key in [k for k in first if k.startswith(("max_be_wait_s", "be_drain_s", "be_unstarted_at_last_arrival"))]:
        out[key] = max(r[key] for r in per_seed.values())
    # The best ratio any scheduler could reach on these seeds (median, as the headline ratio).
    out["ls_p99_ttft_ratio_upper_bound"] = statistics.median(r["ls_p99_ttft_ratio_upper_bound"]
                                                             for r in per_seed.values())
    out["lockstep_signal_lag_steps"] = first["lockstep_signal_lag_steps"]
    out["lockstep_signal_lag_steps_lag1_arm"] = first["lockstep_signal_lag_steps_lag1_arm"]
    out["sim_seeds"] = sorted(per_seed)
    out["per_seed"] = {str(seed): r for seed, r in sorted(per_seed.items())}
    return out


def main(args) -> int:
    from tiersched.core.request import RequestTierConfig

    t0 = time.perf_counter()
    from tiersched.config import ConfigError, load_config

    try:
        cfg = load_config({"TIERSCHED_SET": args.set}).tier("request") if args.set else RequestTierConfig()
    except ConfigError as exc:
        raise SystemExit(f"--set: {exc}") from None
    result: dict = {"aging_cap_s": cfg.aging_cap_s, "request_tier_set": args.set or None}
    result.update(ordering_overhead(args.reps, args.seed))
    keys = ("ls_p99_ttft_ratio", "be_throughput_loss", "max_be_wait_s")
    if args.skip_sim:
        result.update({k: None for k in keys}, sim_status="skipped (--skip-sim)")
    else:
        try:
            seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
            result.update(summarise_seeds({seed: mixed_priority(args.duration_s, args.preset, seed, cfg) for seed in seeds}))
            if args.long_duration_s > 0:
                result["long_overload"] = sustained_overload(args.long_duration_s, args.preset, seeds, cfg)
            result["sim_status"] = "ok"
        except Exception as exc:  # the simulator is a separate component; report why instead of a number
            result.update({k: None for k in keys}, sim_status=f"unavailable: {type(exc).__name__}: {exc}")
    result["wall_s"] = time.perf_counter() - t0
    if args.json:
        print(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in result.items()}))
    else:
        for k, v in result.items():
            if k == "long_overload":
                print(f"{k:32s} " + json.dumps({x: y for x, y in v.items() if x != "per_seed"}))
            elif k != "per_seed":
                print(f"{k:32s} {v}")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    add_arguments(p)
    sys.exit(main(p.parse_args()))
