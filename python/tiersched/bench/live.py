"""`python -m tiersched.bench live [--quick] [--json]`: A/B of upstream's best flags vs tiersched on real servers.

For each deployment (dp2, dpattn, ep2; `--quick`: dp2 only) one server per arm is started (tiny MoE on this CPU,
flags from tiersched.live.arms), the server's sustainable rate is measured with a burst, and the
shared-prefix request set (Mooncake-derived, LS/BE mix; synthetic without ../shared) is replayed at
`--load × capacity` on every arm, alternating runs. The JSON has the headline ratios (> 1 = tiersched better):
`cached_tokens_ratio` = ours ÷ upstream cached tokens, `ls_ttft_ratio` = upstream ÷ ours LS-class mean TTFT,
both against the upstream arm that is best on that metric, plus per-arm ratios with min/max over repeats,
`errors` and `lost` summed over every run. `--record DIR` writes each run as a replay record; `--replay`
simulates the recorded tiersched run (tiersched.live.replay).

Time on the 2-core development machine: the full mode is 18 runs of 150 requests per deployment (15-30 min each)
and about an hour in all; run it one deployment at a time (`--deployments dpattn --requests 40`: 634 s).
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

from tiersched.live import ab as live_ab, arms as live_arms
from tiersched.live.report import compare_arms, headline
from tiersched.live.requests import lengths_set, shared_prefix_set

# --quick uses the reduced A/B test's set (test/live/test_live_server.py): Mooncake blocks at 48 tokens (prompts long enough
# that an LS request meets BE prefill steps) at 0.5x capacity; at 8 tokens per block nothing queues and LS TTFT
# differs by noise only (docs/live-results.md). The full mode keeps the set its documented tables were run with.
QUICK = {"deployments": ["dp2"], "repeats": 2, "requests": 30, "sets": ["shared-prefix"],
         "block_tokens": 48, "max_input": 3072, "load": 0.5}
FULL = {"deployments": list(live_arms.DEPLOYMENTS), "repeats": 3, "requests": 150,
        "sets": ["shared-prefix", "lengths"], "block_tokens": 8, "max_input": 1024, "load": 1.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="dp2 only, 2 repeats, 30 requests (< 10 min)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--deployments", default=None, help=f"comma list of {', '.join(live_arms.DEPLOYMENTS)}")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--requests", type=int, default=None, help="requests per run")
    parser.add_argument("--load", type=float, default=None,
                        help="arrival rate as a multiple of the measured capacity (default: 0.5 quick, 1.0 full)")
    parser.add_argument("--rate", type=float, default=None, help="fixed arrival rate (req/s); skips measuring")
    parser.add_argument("--block-tokens", type=int, default=None,
                        help="tokens per Mooncake 512-token block (default: 48 quick, 8 full)")
    parser.add_argument("--max-input", type=int, default=None,
                        help="leave out requests with longer scaled prompts (default: 3072 quick, 1024 full)")
    parser.add_argument("--record", default=None, help="directory for per-run replay records (JSONL)")
    parser.add_argument("--replay", action="store_true", help="simulate the recorded tiersched run (needs --record)")
    parser.add_argument("--ablate", action="store_true",
                        help="also run one arm per tier alone (over upstream-lpm) to see which tier does what")
    parser.add_argument("--model", default=None, help="model dir (default: a freshly generated tiny MoE)")


def _request_sets(names, n: int, rate: float, block_tokens: int, max_input: int):
    sets = []
    for name in names:
        s = (shared_prefix_set(n, rate, block_tokens, max_input=max_input) if name == "shared-prefix"
             else lengths_set(n, rate))
        if s is not None:
            sets.append(s)
    return sets


def run_deployment(model_dir: str, deployment: str, args, plan: dict, record_dir: str | None) -> dict:
    from tiersched.live.replay import write_record

    arms = live_arms.arms_for(deployment, ablate=args.ablate)
    out: dict = {"missing_tiers": arms[-1].skipped_tiers, "tiersched_tiers": list(arms[-1].tiers),
                 "arms": {a.name: " ".join(live_arms.server_args(deployment, a)) for a in arms}, "sets": {}}
    for tier, why in arms[-1].skipped_tiers.items():
        print(f"[live] WARNING {deployment}: tier {tier!r} not in the tiersched arm: {why}", file=sys.stderr)
    with live_ab.servers_for(model_dir, deployment, arms) as servers:
        probe = shared_prefix_set(plan["requests"], 1.0, plan["block_tokens"], max_input=plan["max_input"])
        if args.rate is None:
            with live_ab.only_running(servers, arms[0].name) as srv:
                capacity = live_ab.measure_capacity(srv.url, probe, n=min(20, plan["requests"]))
            rate = max(0.2, plan["load"] * capacity)
            out["capacity_req_s"] = round(capacity, 3)
        else:
            rate = args.rate
        out["rate_req_s"] = round(rate, 3)
        for request_set in _request_sets(plan["sets"], plan["requests"], rate, plan["block_tokens"], plan["max_input"]):
            def record(arm, repeat, results, request_set=request_set):
                path = live_ab.record_path(record_dir, deployment, request_set.name, arm, repeat)
                if path is not None:
                    write_record(path, {"deployment": deployment, "arm": arm, "repeat": repeat, "dp": 2,
                                        "server_args": out["arms"][arm], "rate_req_s": rate}, request_set, results)

            runs = live_ab.run_ab(servers, arms, request_set, plan["repeats"], record=record)
            summaries = {name: r.summaries for name, r in runs.items()}
            out["sets"][request_set.name] = {
                "source": request_set.source, "requests": len(request_set),
                "reusable_block_fraction": round(request_set.reusable_block_fraction(), 4),
                "ratios": compare_arms(summaries, live_arms.TIERSCHED), "runs": summaries,
            }
            ablation = {name: compare_arms({k: v for k, v in summaries.items() if not k.startswith(live_arms.TIERSCHED)
                                            or k == name}, name)
                        for name in summaries if name.startswith(live_arms.TIERSCHED + "-")}
            if ablation:
                out["sets"][request_set.name]["ablation_ratios"] = ablation
    return out


def _exit_on_sigterm() -> None:
    """A plain SIGTERM (e.g. `timeout`) would skip the finally blocks that stop our servers; exit cleanly instead."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def main(args) -> int:
    _exit_on_sigterm()
    plan = dict(QUICK if args.quick else FULL)
    if args.deployments:
        plan["deployments"] = [d.strip() for d in args.deployments.split(",") if d.strip()]
        unknown = [d for d in plan["deployments"] if d not in live_arms.DEPLOYMENTS]
        if unknown:
            print(f"unknown deployment(s) {unknown}; choose from {list(live_arms.DEPLOYMENTS)}", file=sys.stderr)
            return 2
    plan["repeats"] = args.repeats or plan["repeats"]
    plan["requests"] = args.requests or plan["requests"]
    for key in ("block_tokens", "max_input", "load"):
        if getattr(args, key) is not None:
            plan[key] = getattr(args, key)
    if args.replay and not args.record:
        args.record = tempfile.mkdtemp(prefix="tiersched-live-records-")
    t0 = time.monotonic()
    model_dir = args.model
    if model_dir is None:
        from tiersched.rig.tiny_model import make_tiny_moe

        model_dir = make_tiny_moe(tempfile.mkdtemp(prefix="tiersched-live-model-"))
    report: dict = {"plan": plan, "load": plan["load"], "deployments": {}}
    for deployment in plan["deployments"]:
        try:
            report["deployments"][deployment] = run_deployment(model_dir, deployment, args, plan, args.record)
        except Exception as exc:  # one deployment failing (e.g. a tier refused) must not hide the others
            report["deployments"][deployment] = {"failed": f"{type(exc).__name__}: {exc}"[:2000]}
    _headlines(report)
    if args.replay:
        report["replay"] = _replay_tiersched(args.record, plan["deployments"][0])
    report["wall_s"] = round(time.monotonic() - t0, 1)
    if args.json:
        print(json.dumps(report))
    else:
        print(json.dumps(report, indent=1))
    failed = any("failed" in d for d in report["deployments"].values())
    return 1 if failed or report["errors"] or report["lost"] else 0


def _headlines(report: dict) -> None:
    errors = lost = 0
    first = None
    for name, dep in report["deployments"].items():
        for s in dep.get("sets", {}).values():
            for runs in s["runs"].values():
                errors += sum(r["errors"] for r in runs)
                lost += sum(r["lost"] for r in runs)
        if first is None and "shared-prefix" in dep.get("sets", {}):
            first = (name, dep["sets"]["shared-prefix"]["ratios"])
    report["errors"], report["lost"] = errors, lost
    report["cached_tokens_ratio"] = headline(first[1], "cached_tokens") if first else None
    report["ls_ttft_ratio"] = headline(first[1], "ls_ttft_mean_s") if first else None
    report["headline_deployment"] = first[0] if first else None
    if first:
        ratios = first[1]
        report["spread"] = {k: ratios[k]["vs_best"] | {"vs": ratios[k]["best_upstream"]}
                            for k in ("cached_tokens", "ls_ttft_mean_s", "ttft_mean_s", "tpot_mean_s",
                                      "throughput_tok_s") if k in ratios}


def _replay_tiersched(record_dir: str, deployment: str) -> dict:
    from tiersched.live.replay import replay

    paths = sorted(Path(record_dir).glob(f"{deployment}-shared-prefix-{live_arms.TIERSCHED}-r*.jsonl"))
    if not paths:
        return {"status": "missing", "reason": f"no tiersched record in {record_dir}"}
    try:
        return replay(paths[0])
    except Exception as exc:  # the simulator is still being built: report, do not hide the live numbers
        return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:1000]}
