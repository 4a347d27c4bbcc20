"""Calibrate the simulator's `cpu-tiny` preset from a profiling run of the real CPU server.

    .venv/bin/python benchmark/sim_cpu_tiny_calibrate.py [--out python/tiersched/sim/presets/cpu_tiny.json]

Starts the tiny Qwen3-MoE (tiersched.rig) with `--dp-size 2 --enable-metrics` (tp1) and measures every point twice
(`routed_dp_rank`): with rank 0 alone busy ("alone") and mirrored on both ranks at once ("both"):
  prefill: one request of n prompt tokens per rank (n <= chunked_prefill_size, one output token): client TTFT and
           the scheduler's own prefill time (meta_info prefill_finished_time - forward_entry_time);
  decode:  B simultaneous requests per rank with prompt length P and 32 output tokens (one prefill batch, then
           B-request decode steps; mean context per request P + 16): client TPOT and the server-side time per
           output token ((request_finished_ts - prefill_finished_time) / (tokens - 1)).
then fits (tiersched.live.fidelity_fit.fit_all) the step costs on the rank-alone server timings, the contention factors
(both / alone) and the frontend latency (client TTFT - server prefill of lone prompts), and writes the JSON with the
raw measurements, the server's scheduler settings (/get_server_info), the command, date and load average.
The machine is shared: the load average before and after is recorded; calibrate when it is lowest.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
import urllib.request

import numpy as np

from tiersched.rig.server import launch_server
from tiersched.rig.tiny_model import make_tiny_moe
from tiersched.live import fidelity
from tiersched.sim.presets.cpu_tiny import calibration_path

def server_info(url: str) -> dict:
    with urllib.request.urlopen(url + "/get_server_info", timeout=60) as r:
        return json.loads(r.read())


def refit(path: str) -> int:
    with open(path) as f:
        cal = json.load(f)
    m = cal["measurements"]
    for part in m.values():  # calibrations before the alone/both split measured both ranks only
        part.setdefault("mode", ["both"] * len(part.get("input_tokens", part.get("batch", []))))
        if "alone" not in part["mode"]:
            part["mode"] = ["alone"] * len(part["mode"])
    cal["fits"], cal["coefficients"] = fidelity.fit_all(m)
    cal["refit"] = {"command": "benchmark/sim_cpu_tiny_calibrate.py --refit",
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    with open(path, "w") as f:
        json.dump(cal, f, indent=1)
        f.write("\n")
    print(json.dumps({"out": path, "coefficients": cal["coefficients"], "fits": cal["fits"]}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--out", default=str(calibration_path()))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-total-tokens", type=int, default=16384)
    ap.add_argument("--refit", action="store_true",
                    help="recompute fits and coefficients from the measurements already in --out (no server)")
    args = ap.parse_args()
    if args.refit:
        return refit(args.out)
    load_before = fidelity.load_average()
    model = make_tiny_moe(tempfile.mkdtemp(prefix="tiny-moe-cal-"))
    started = time.time()
    with launch_server(model, extra_args=list(fidelity.SERVER_ARGS), timeout_s=480,
                       max_total_tokens=args.max_total_tokens) as srv:
        info = server_info(srv.url)
        chunk = int(info.get("chunked_prefill_size") or 8192)
        seen = fidelity.warm_up(srv.url, args.max_total_tokens)
        prof = fidelity.profile(srv.url, args.reps, chunk, seen_lengths=seen.get(0, []))
    if info.get("disable_overlap_schedule"):  # results then come back in the step that computed them
        prof["measurements"]["overlap_schedule"] = False
        prof["fits"], prof["coefficients"] = fidelity.fit_all(prof["measurements"])
    settings = {k: info.get(k) for k in ("chunked_prefill_size", "max_prefill_tokens", "max_running_requests",
                                         "schedule_policy", "load_balance_method", "max_total_tokens",
                                         "schedule_conservativeness", "page_size")}
    internal = (info.get("internal_states") or [{}])[0]
    cal = {
        "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]) or sys.argv[0],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_before": load_before,
        "load_average_after": fidelity.load_average(),
        "cpu_count": os.cpu_count(),
        "profiling_wall_s": round(time.time() - started, 1),
        "server": {"args": " ".join(fidelity.SERVER_ARGS) + " (tp1) " + " ".join(a for a in srv.args if a.startswith("--")),
                   "settings": settings, "max_total_num_tokens": internal.get("max_total_num_tokens")},
        "measurements": prof["measurements"],
        "fits": prof["fits"],
        "coefficients": prof["coefficients"],
        "dp": 2,
        "scheduler": {
            "chunked_prefill_size": chunk,
            "max_prefill_tokens": int(info.get("max_prefill_tokens") or 16384),
            "max_running_requests": int(internal.get("max_running_requests") or info.get("max_running_requests")
                                        or 256),
            "kv_capacity_tokens": int(internal.get("max_total_num_tokens") or args.max_total_tokens),
        },
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(cal, f, indent=1)
        f.write("\n")
    print(json.dumps({"out": args.out, "coefficients": cal["coefficients"], "fits": cal["fits"],
                      "load_average": [load_before, cal["load_average_after"]], "scheduler": cal["scheduler"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
