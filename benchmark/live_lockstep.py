"""Live A/B of the lockstep step plan on a real `--tp 2 --dp 2 --enable-dp-attention` CPU server (tiny MoE).

One DP rank decodes while the other receives long prompts (`routed_dp_rank`); the decoding rank's TPOT from the
server's timestamps under tiersched's step plan, upstream at its best static chunk size (searched over
`--chunks`), and that chunk with `--enable-prefill-delayer`; alternating repeats, significance from
tiersched.live.stats; the plan lines and the prediction check from the tiersched server's log
(tiersched.live.lockstep_ab says what each field is).

    flock /tmp/team/server.lock .venv/bin/python benchmark/live_lockstep.py --json \
        [--chunks 128,256,1024] [--search-repeats 2] [--repeats 5] [--out result.json]
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
from dataclasses import replace

from tiersched.live import lockstep_ab


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", default="128,256,1024", help="upstream --chunked-prefill-size values searched; "
                    "tiersched's arm gets the largest as its budget")
    ap.add_argument("--search-repeats", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--decoders", type=int, default=lockstep_ab.SteerWorkload.decoders)
    ap.add_argument("--long-requests", type=int, default=lockstep_ab.SteerWorkload.long_requests)
    ap.add_argument("--long-prompt", type=int, default=lockstep_ab.SteerWorkload.long_prompt)
    ap.add_argument("--model", default=None, help="model dir (default: a freshly generated tiny MoE)")
    ap.add_argument("--log-dir", default=None, help="where the servers' logs go (default: a temp dir)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--json", action="store_true", help="print the whole result as JSON (default: a summary)")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # so the servers get stopped

    chunks = [int(c) for c in args.chunks.split(",") if c.strip()]
    if not chunks or min(chunks) < 1 or args.repeats < 1 or args.search_repeats < 1:
        ap.error("--chunks needs positive sizes; --repeats and --search-repeats at least 1")
    workload = replace(lockstep_ab.SteerWorkload(), decoders=args.decoders, long_requests=args.long_requests,
                       long_prompt=args.long_prompt)
    model = args.model
    if model is None:
        from tiersched.rig.tiny_model import make_tiny_moe

        model = make_tiny_moe(tempfile.mkdtemp(prefix="tiersched-lockstep-model-"))
    result = lockstep_ab.run_lockstep_ab(model, chunks, args.search_repeats, args.repeats, workload, args.log_dir)
    text = json.dumps(result, indent=1, default=str)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.json:
        print(text)
    else:
        for name, row in result["arms"].items():
            print(f"{name:28s} decode TPOT {row['decode_tpot_s']['mean']} s {row['decode_tpot_s']['ci95']}  "
                  f"long TTFT {row['long_ttft_s']['mean']} s")
        for key in ("vs_upstream_best", "vs_upstream_best_delayer"):
            r = result[key]["decode_tpot_run_ratio"]
            print(f"{key}: decode TPOT ratio (> 1: ours better) {r and r['ratio']} {r and r['ci95']} "
                  f"p={r and r['p_value']}")
        print("plan:", json.dumps({k: v for k, v in result["plan"].items() if k != "example_lines"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
