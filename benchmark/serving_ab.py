"""Run the bench_serving A/B recipe on this CPU: one `sglang.launch_server` per arm, `sglang.bench_serving` against each.

Starts the arms' servers (tiny MoE of tiersched.rig, flags of tiersched.live.arms for `--deployment`), prints each
server's full `python -m sglang.launch_server` command line, then runs every arm `--repeats` times, alternating,
each run being a best-effort and a latency-sensitive `python -m sglang.bench_serving --backend sglang
--dataset-name generated-shared-prefix` process started together (tiersched.live.serving says why two), and
finally prints `python -m tiersched.bench serving-ab` over the results in `--out`. Stops every server it started.

    flock /tmp/team/server.lock .venv/bin/python benchmark/serving_ab.py --out out/serving-ab \
        [--deployment dp2] [--arms upstream-lpm,upstream-priority,tiersched] [--repeats 3] [--rate 2] \
        [--requests 32] [--ls-fraction 0.25] [--json]
"""
from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import tempfile
from pathlib import Path

from tiersched.bench import serving_ab
from tiersched.live import ab as live_ab, arms as live_arms, serving


def arm_objects(deployment: str, names: list[str]) -> list[live_arms.Arm]:
    known = {a.name: a for a in live_arms.arms_for(deployment)}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; choose from {list(known)}")
    return [known[n] for n in names]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for the bench_serving results (ARM-CLASS.jsonl) and logs")
    ap.add_argument("--deployment", default="dp2", choices=list(live_arms.DEPLOYMENTS))
    ap.add_argument("--arms", default="upstream-lpm,upstream-priority,tiersched")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rate", type=float, default=2.0, help="total request rate (req/s) over both classes")
    ap.add_argument("--requests", type=int, default=32, help="requests per run over both classes")
    ap.add_argument("--ls-fraction", type=float, default=0.25, help="share of requests in the LS stream (0: none)")
    ap.add_argument("--groups", type=int, default=4, help="shared system prompts per stream")
    ap.add_argument("--system-len", type=int, default=256, help="tokens per shared system prompt")
    ap.add_argument("--question-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--model", default=None, help="model dir (default: a freshly generated tiny MoE)")
    ap.add_argument("--json", action="store_true", help="print serving-ab's JSON instead of its table")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # so the servers get stopped

    arms = arm_objects(args.deployment, [a.strip() for a in args.arms.split(",") if a.strip()])
    streams = serving.default_streams(args.rate, args.ls_fraction, args.requests, args.groups, args.system_len,
                                      args.question_len, args.output_len)
    model = args.model
    if model is None:
        from tiersched.rig.tiny_model import make_tiny_moe

        model = make_tiny_moe(tempfile.mkdtemp(prefix="tiersched-serving-ab-model-"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stale = sorted(out.glob("*.jsonl"))
    if stale:  # bench_serving appends: old runs would be read as more repeats
        raise SystemExit(f"{out} already holds results ({', '.join(p.name for p in stale)}); use an empty --out")
    with live_ab.servers_for(model, args.deployment, arms) as servers:
        for arm in arms:
            print(f"[serving-ab] {arm.name}: {shlex.join(servers[arm.name].args)}", file=sys.stderr)
        for s in streams:
            print(f"[serving-ab] stream {s.cls}: " + shlex.join(
                serving.bench_serving_command("URL", s, f"ARM:{s.cls}", f"{out}/ARM-{s.cls}.jsonl",
                                              python="python")), file=sys.stderr)
        files = serving.run_recipe(servers, [a.name for a in arms], streams, out, args.repeats)
    result = serving_ab.serving_ab(files)
    print(json.dumps(result) if args.json else serving_ab.format_table(result, result["ours"]))
    print(f"[serving-ab] reread with: python -m tiersched.bench serving-ab {shlex.join(map(str, files))}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
