"""Load and fault evidence on the real dp2 server, all tiers on; prints one JSON object.

    .venv/bin/python benchmark/live_load.py [--duration 300] [--factor 2.0 | --rate R] [--arm upstream-lpm]
                                            [--skip-drain]

1. capacity: a 20-request burst on the tiersched dp2 server (completions per second);
2. load: `factor x capacity` req/s for `duration` seconds (shared-prefix set, tiled): errors, lost, peak RSS of the
   whole server process group and of each process in it, quarter means, growth from the 3rd to the 4th quarter
   (the plateau measure; `--arm upstream-lpm` runs the same load on upstream's flags, to see whose memory grows);
3. drain: rank 1 marked inactive through the engine tier's drain_ranks (upstream's status path): requests per rank;
4. EPLB fault: ep2 with source_aware rebalancing every 16 passes, bad statistics injected into rebalances 2 and 3.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time

from tiersched.live.arms import UPSTREAM_ARMS
from tiersched.live.load import drain_run, eplb_fault_run, load_run
from tiersched.rig.tiny_model import make_tiny_moe


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=300.0)
    parser.add_argument("--factor", type=float, default=2.0)
    parser.add_argument("--rate", type=float, default=None, help="fixed req/s (default: factor x measured capacity)")
    parser.add_argument("--arm", default="tiersched", choices=["tiersched", *UPSTREAM_ARMS])
    parser.add_argument("--sample-s", type=float, default=1.0, help="RSS sampling period")
    parser.add_argument("--skip-drain", action="store_true")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # so servers get stopped
    t0 = time.monotonic()
    model = make_tiny_moe(tempfile.mkdtemp(prefix="tiersched-live-load-"))
    out = {"factor": args.factor, "load": load_run(model, duration_s=args.duration, rate=args.rate, factor=args.factor,
                                                         sample_s=args.sample_s, arm_name=args.arm)}
    if not args.skip_drain:
        out["drain"] = drain_run(model, drained_rank=1, n=24, rate=3.0)
        out["eplb_fault"] = eplb_fault_run(model)
    out["wall_s"] = round(time.monotonic() - t0, 1)
    print(json.dumps(out))
    load = out["load"]
    for name, p in load.get("rss_per_process", {}).items():  # human-readable memory table on stderr
        print(f"{name:32s} start {p['start_mib']:8.1f}  peak {p['peak_mib']:8.1f}  quarters {p['quarter_means_mib']}"
              f"  q3->q4 {p['growth_q3_to_q4_mib']:+.1f} MiB", file=sys.stderr)
    ok = load["errors"] == 0 and load["lost"] == 0 and load["server_alive"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
