"""Which part of the request tier moves live LS TTFT on dp2? Arms differ by flags and TIERSCHED_SET only.

Same request set, rate and alternation as test_live_server's reduced A/B (shared-prefix set, 0.8x the measured
capacity of upstream-lpm), more repeats, one server per arm. Prints one JSON line per arm (medians over repeats)
and the per-run LS TTFTs, so a difference can be told from noise.

    .venv/bin/python benchmark/live_ls_ablation.py --repeats 6 [--arms upstream-lpm,request,request-nocap]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile

from tiersched.live import ab as live_ab, arms as live_arms
from tiersched.live.requests import shared_prefix_set
from tiersched.rig.server import launch_server
from tiersched.rig.tiny_model import make_tiny_moe

LPM = live_arms.UPSTREAM_ARMS["upstream-lpm"]
REQUEST = live_arms._merge(LPM, live_arms.TIERSCHED_TIER_FLAGS["request"])
ENGINE = live_arms._merge(LPM, live_arms.TIERSCHED_TIER_FLAGS["engine"])
ALL = live_arms._merge(REQUEST, live_arms.TIERSCHED_TIER_FLAGS["engine"])
# name -> (server flags over the dp2 deployment, TIERSCHED_SET)
ARMS = {
    "upstream-lpm": (LPM, ""),
    "upstream-priority": (live_arms.UPSTREAM_ARMS["upstream-priority"], ""),
    "request": (REQUEST, ""),
    "request-nocap": (REQUEST, "request.lockstep_chunk_cap=false,request.cap_be_admissions=false,request.be_chunk_tokens=100000"),
    "request-nopreempt": (REQUEST, "request.enable_preemption=false,request.preempt_on_kv_shortage=false"),
    "request-plain": (REQUEST, "request.lockstep_chunk_cap=false,request.cap_be_admissions=false,"
                               "request.be_chunk_tokens=100000,request.enable_preemption=false,"
                               "request.preempt_on_kv_shortage=false"),
    "engine": (ENGINE, ""),
    "tiersched": (ALL, ""),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", default="upstream-lpm,request,request-plain")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--block-tokens", type=int, default=8, help="prompt tokens per Mooncake 512-token block")
    ap.add_argument("--max-input", type=int, default=1024, help="leave out requests with longer scaled prompts")
    ap.add_argument("--load", type=float, default=0.8, help="fraction of upstream-lpm's measured capacity")
    args = ap.parse_args(argv)
    names = [n for n in args.arms.split(",") if n]
    unknown = [n for n in names if n not in ARMS]
    if unknown:
        ap.error(f"unknown arm(s) {unknown}; choose from {sorted(ARMS)}")
    model = make_tiny_moe(tempfile.mkdtemp(prefix="tiny-moe-"))
    request_set = shared_prefix_set(args.requests, 1.0, block_tokens=args.block_tokens, max_input=args.max_input)
    arms = [live_arms.Arm(n, ARMS[n][0]) for n in names]
    with contextlib.ExitStack() as stack:
        servers = {}
        for n in names:
            flags, overrides = ARMS[n]
            env = {"TIERSCHED_SET": overrides} if overrides else {}
            servers[n] = stack.enter_context(launch_server(
                model, extra_args=[*live_arms.DEPLOYMENTS["dp2"], *flags], env=env,
                max_total_tokens=live_ab.MAX_TOTAL_TOKENS))
            # its DP controller busy-polls (~60% of a core): keep it stopped while the next one starts
            os.killpg(servers[n].process.pid, signal.SIGSTOP)
        for srv in servers.values():
            os.killpg(srv.process.pid, signal.SIGCONT)
        with live_ab.only_running(servers, names[0]) as srv:
            capacity = live_ab.measure_capacity(srv.url, request_set, n=15)
        rate = max(0.5, args.load * capacity)
        runs = live_ab.run_ab(servers, arms, request_set.with_rate(rate), repeats=args.repeats)
    for n in names:
        s = runs[n].summaries
        print(json.dumps({
            "arm": n, "rate_req_s": round(rate, 3), "repeats": len(s),
            "ls_ttft_median_s": round(statistics.median(x["ls_ttft_mean_s"] for x in s), 4),
            "ttft_median_s": round(statistics.median(x["ttft_mean_s"] for x in s), 4),
            "be_ttft_median_s": round(statistics.median(x["be_ttft_mean_s"] for x in s), 4),
            "tpot_median_s": round(statistics.median(x["tpot_mean_s"] for x in s), 4),
            "cached_tokens": sum(x["cached_tokens"] for x in s),
            "ls_ttft_per_run": [round(x["ls_ttft_mean_s"], 3) for x in s],
            "errors": sum(x["errors"] + x["lost"] for x in s),
        }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
