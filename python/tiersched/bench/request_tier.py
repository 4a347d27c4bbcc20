"""`python -m tiersched.bench request-tier [--json]`: request-tier ordering overhead and mixed-priority scenario.

Ordering overhead (one scheduling step, median ms): ours = the adapter's prefix-aging `calc_priority` hook over
real upstream `Req` objects (above upstream's WAITING_QUEUE_PREFIX_MATCH_MAX=128 waiting it skips the radix
match, as upstream does); upstream = its real `SchedulePolicy._sort_by_hrrn` over the same `Req` objects. (Upstream's
`calc_priority` itself turns hrrn into fcfs above 128 waiting and needs a published server runtime context, so
the hrrn sort is what we time.) `core_order_ms_*`: the pure core over snapshots.
Mixed-priority scenario (simulator, 20% LS, Poisson, 1.5x overload): upstream fcfs-with-priority vs tiersched.
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
    parser.add_argument("--duration-s", type=float, default=60.0, help="simulated seconds of the mixed scenario")
    parser.add_argument("--preset", default="qwen3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-sim", action="store_true", help="only the ordering microbenchmark")


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
        r.time_stats.set_wait_queue_entry_time(now - rng.uniform(0.0, 10.0))
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

    from tiersched.core.request_order import AgingPrefixOrdering, RequestTierConfig, WaitingRequest
    from tiersched.sglang import request_tier

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


def mixed_priority(duration_s: float, preset: str, seed: int) -> dict:
    from tiersched.core.request_order import RequestTierConfig
    from tiersched.sim import PolicySet, simulate, workloads

    work = workloads.mixed_priority(ls_fraction=0.2, overload=1.5, preset=preset, duration_s=duration_s, seed=seed)
    runs = {name: simulate(preset, work, PolicySet(ordering=name), seed).metrics for name in ("fcfs-priority", "tiersched")}

    def cls(metrics, which):
        per = metrics["per_class"]
        return per.get(which) or per.get({"ls": "LS", "be": "BE"}[which]) or {}

    base_ls, ours_ls = cls(runs["fcfs-priority"], "ls"), cls(runs["tiersched"], "ls")
    base_be, ours_be = cls(runs["fcfs-priority"], "be"), cls(runs["tiersched"], "be")
    # BE throughput: finished BE requests per simulated second (the sim reports no per-class token throughput).
    def be_tput(name):
        return cls(runs[name], "be")["finished"] / runs[name]["sim_time_s"]

    return {
        "ls_p99_ttft_s_fcfs_priority": base_ls.get("ttft_p99"),
        "ls_p99_ttft_s_tiersched": ours_ls.get("ttft_p99"),
        "ls_p99_ttft_ratio": base_ls["ttft_p99"] / ours_ls["ttft_p99"],
        "be_throughput_loss": 1.0 - be_tput("tiersched") / be_tput("fcfs-priority"),
        "max_be_wait_s": ours_be["max_wait_s"],
        "max_be_wait_s_fcfs_priority": base_be["max_wait_s"],
        "sim_requests": int(len(work.input_tokens)),
        "sim_duration_s": duration_s,
    }


def main(args) -> int:
    from tiersched.core.request_order import RequestTierConfig

    t0 = time.perf_counter()
    result: dict = {"aging_cap_s": RequestTierConfig().aging_cap_s}
    result.update(ordering_overhead(args.reps, args.seed))
    keys = ("ls_p99_ttft_ratio", "be_throughput_loss", "max_be_wait_s")
    if args.skip_sim:
        result.update({k: None for k in keys}, sim_status="skipped (--skip-sim)")
    else:
        try:
            result.update(mixed_priority(args.duration_s, args.preset, args.seed), sim_status="ok")
        except Exception as exc:  # the simulator is a separate component; report why instead of a number
            result.update({k: None for k in keys}, sim_status=f"unavailable: {type(exc).__name__}: {exc}")
    result["wall_s"] = time.perf_counter() - t0
    if args.json:
        print(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in result.items()}))
    else:
        for k, v in result.items():
            print(f"{k:32s} {v}")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    add_arguments(p)
    sys.exit(main(p.parse_args()))
