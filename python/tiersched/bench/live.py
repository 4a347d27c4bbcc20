"""`python -m tiersched.bench live [--quick] [--json]`: A/B of upstream's best flags vs tiersched on real servers.

For each deployment (dp2, dpattn, ep2; `--quick`: dp2 only) one server per arm is started (tiny MoE on this CPU,
flags from tiersched.live.arms), the upstream-lpm server's capacity is measured (median of `--capacity-bursts`
bursts of 20 requests sent at once: completions per second), and the shared-prefix request set (Mooncake-derived,
LS/BE mix; synthetic without ../shared) is replayed at each of `--loads` × capacity on every arm, alternating runs
(A B C, C B A, ...). Headline JSON fields, all against the upstream arm best on that metric, > 1 = tiersched better:
`ttft_ratio` (mean TTFT over all requests, upstream ÷ ours) and `ls_ttft_ratio` (LS-class TTFT at `ls_ttft_stat`:
P95, P99 from 1,000 LS samples per arm, the project's tail rule), each with
`*_ci95` (95% bootstrap interval, requests resampled within each repeat) and `*_p_value` (one-sided bootstrap)
plus `*_mannwhitney_p` (one-sided Mann-Whitney U over the pooled per-request TTFTs); `cached_tokens_ratio` (ours ÷
upstream cached tokens, geometric mean of paired repeats); `repeats`, `load` (multiple of the measured capacity)
and `errors`, `lost` summed over every run. The headline is the first deployment at the first load; every
(deployment, load, set) has its table under `deployments`. `--record DIR` writes each run as a replay record;
`--replay` simulates the recorded tiersched run (tiersched.live.replay).

Time on the 2-core development machine: `--quick` (dp2, 3 repeats of 60 requests at 1.0x) takes a few minutes;
a full deployment at four loads with 5 repeats takes most of an hour: run one deployment at a time.
"""
from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tiersched.live import ab as live_ab, arms as live_arms
from tiersched.live.report import compare_arms, headline, request_level_ratios, summarize
from tiersched.live.requests import lengths_set, shared_prefix_set

# Both modes use the reduced A/B test's set (test/live/test_live_server.py): Mooncake blocks at 48 tokens (prompts
# long enough that an LS request meets BE prefill steps; at 8 tokens per block nothing queues and LS TTFT differs by
# noise only, docs/live-results.md), at loads where queues form: 1.0x the measured capacity for --quick, 0.5x to
# 1.2x in the full mode.
QUICK = {"deployments": ["dp2"], "repeats": 3, "requests": 60, "sets": ["shared-prefix"],
         "block_tokens": 48, "max_input": 3072, "loads": [1.0]}
FULL = {"deployments": list(live_arms.DEPLOYMENTS), "repeats": 5, "requests": 100, "sets": ["shared-prefix"],
        "block_tokens": 48, "max_input": 3072, "loads": [0.5, 0.8, 1.0, 1.2]}
CAPACITY_BURST = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="dp2 only, 3 repeats of 60 requests at 1.0x capacity")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--deployments", default=None, help=f"comma list of {', '.join(live_arms.DEPLOYMENTS)}")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--requests", type=int, default=None, help="requests per run")
    parser.add_argument("--load", type=float, default=None, help="one load: arrival rate as a multiple of the "
                        "measured capacity (default: 1.0 quick; full mode: --loads)")
    parser.add_argument("--loads", default=None,
                        help="comma list of loads run one after another on the same servers (full default "
                        "0.5,0.8,1.0,1.2)")
    parser.add_argument("--sets", default=None, help="comma list of request sets: shared-prefix, lengths")
    parser.add_argument("--capacity-bursts", type=int, default=3,
                        help="capacity = median completions/s over this many 20-request bursts")
    parser.add_argument("--rate", type=float, default=None, help="fixed arrival rate (req/s); skips measuring")
    parser.add_argument("--block-tokens", type=int, default=None,
                        help="tokens per Mooncake 512-token block (default 48)")
    parser.add_argument("--max-input", type=int, default=None,
                        help="leave out requests with longer scaled prompts (default 3072)")
    parser.add_argument("--record", default=None, help="directory for per-run replay records (JSONL)")
    parser.add_argument("--replay", action="store_true", help="simulate the recorded tiersched run (needs --record)")
    parser.add_argument("--ablate", action="store_true",
                        help="also run one arm per tier alone (over upstream-lpm) to see which tier does what, and "
                        "(DP attention) the tiersched arm with each lockstep setting of live.arms.LOCKSTEP_VARIANTS "
                        "changed")
    parser.add_argument("--variant", action="append", default=[], metavar="[BASE:]NAME=SETTINGS",
                        help="also run arm BASE (default tiersched; or an upstream arm) as BASE-NAME with SETTINGS, "
                        "a comma list of server flags (--flag or --flag=value) and TIERSCHED_SET items "
                        "(tier.key=value), e.g. bigchunk=request.be_chunk_tokens=2048 or "
                        "upstream-lpm:mixed=--enable-mixed-chunk; repeatable")
    parser.add_argument("--arms", default=None,
                        help="comma list: start only these arms (the tiersched arm always runs), e.g. "
                        "upstream-lpm,tiersched-nogroup")
    parser.add_argument("--model", default=None, help="model dir (default: a freshly generated tiny MoE)")
    parser.add_argument("--from-records", default=None, metavar="DIR",
                        help="no server: rebuild the report from the replay records a --record run wrote to DIR")


def _request_sets(names, n: int, rate: float, block_tokens: int, max_input: int):
    sets = []
    for name in names:
        s = (shared_prefix_set(n, rate, block_tokens, max_input=max_input) if name == "shared-prefix"
             else lengths_set(n, rate))
        if s is not None:
            sets.append(s)
    return sets


def measure_capacity(servers, arm_name: str, plan: dict, bursts: int) -> tuple[float, list[float]]:
    """Median completions/s over `bursts` bursts of CAPACITY_BURST requests on `arm_name`'s server (others paused)."""
    probe = shared_prefix_set(max(plan["requests"], CAPACITY_BURST), 1.0, plan["block_tokens"],
                              max_input=plan["max_input"])
    values = []
    with live_ab.only_running(servers, arm_name) as srv:
        for _ in range(max(1, bursts)):
            values.append(live_ab.measure_capacity(srv.url, probe, n=CAPACITY_BURST))
    return float(statistics.median(values)), [round(v, 3) for v in values]


def run_deployment(model_dir: str, deployment: str, args, plan: dict, record_dir: str | None) -> dict:
    from tiersched.live.replay import write_record

    only = tuple(a.strip() for a in args.arms.split(",") if a.strip()) if args.arms else None
    arms = live_arms.arms_for(deployment, ablate=args.ablate, variants=_variants(args.variant), only=only)
    out: dict = {"missing_tiers": arms[-1].skipped_tiers, "tiersched_tiers": list(arms[-1].tiers),
                 "arms": {a.name: " ".join(live_arms.server_args(deployment, a)) for a in arms}, "loads": []}
    for tier, why in arms[-1].skipped_tiers.items():
        print(f"[live] WARNING {deployment}: tier {tier!r} not in the tiersched arm: {why}", file=sys.stderr)
    with live_ab.servers_for(model_dir, deployment, arms) as servers:
        if args.rate is None:
            capacity, bursts = measure_capacity(servers, arms[0].name, plan, args.capacity_bursts)
            out["capacity_req_s"], out["capacity_bursts_req_s"] = round(capacity, 3), bursts
            out["capacity_arm"] = arms[0].name
            print(f"[live] {deployment}: capacity {capacity:.3f} req/s (bursts {bursts})", file=sys.stderr)
        for load in plan["loads"]:
            rate = args.rate if args.rate is not None else max(0.2, load * capacity)
            block: dict = {"load": load if args.rate is None else None, "rate_req_s": round(rate, 3), "sets": {}}
            for request_set in _request_sets(plan["sets"], plan["requests"], rate, plan["block_tokens"],
                                             plan["max_input"]):
                def record(arm, repeat, results, request_set=request_set, load=load):
                    name = request_set.name if len(plan["loads"]) == 1 else f"{request_set.name}-x{load:g}"
                    path = live_ab.record_path(record_dir, deployment, name, arm, repeat)
                    if path is not None:
                        write_record(path, {"deployment": deployment, "arm": arm, "repeat": repeat, "dp": 2,
                                            "server_args": out["arms"][arm], "rate_req_s": rate, "load": load},
                                     request_set, results)

                print(f"[live] {deployment} {request_set.name} at {load:g}x = {rate:.3f} req/s", file=sys.stderr)
                runs = live_ab.run_ab(servers, arms, request_set, plan["repeats"], record=record)
                entry = ab_entry({n: r.summaries for n, r in runs.items()}, {n: r.results for n, r in runs.items()})
                entry.update({"source": request_set.source, "requests": len(request_set),
                              "reusable_block_fraction": round(request_set.reusable_block_fraction(), 4)})
                died = [n for n, r in runs.items() if r.died]
                if died:
                    entry["servers_died"] = died
                block["sets"][request_set.name] = entry
            out["loads"].append(block)
            if any("servers_died" in e for e in block["sets"].values()):
                out["stopped"] = "a server died; later loads not run (see servers_died)"
                break
    out["sets"] = out["loads"][0]["sets"] if out["loads"] else {}
    return out


def _variants(items) -> list[tuple[str, str, str]]:
    """--variant [BASE:]NAME=SETTINGS items -> [(BASE, NAME, SETTINGS)] (live_arms.variant_arm)."""
    out = []
    for item in items:
        head, sep, setting = item.partition("=")
        base, _, name = head.rpartition(":")
        if not sep or not re.fullmatch(r"[a-z0-9]+", name) or not setting:
            raise SystemExit(f"--variant {item!r}: expected [BASE:]NAME=SETTINGS with NAME in [a-z0-9]+")
        out.append((base or live_arms.TIERSCHED, name, setting))
    return out


def ab_entry(summaries: dict[str, list[dict]], results: dict[str, list[list]]) -> dict:
    """One (deployment, load, set) table: per-run ratios, per-request ratios, per-arm run summaries."""
    ours = live_arms.TIERSCHED
    entry = {"ratios": compare_arms(summaries, ours),
             "request_ratios": request_level_ratios({n: r for n, r in results.items()
                                                     if not n.startswith(ours + "-")}, ours),
             "runs": summaries}
    ablation = {name: compare_arms({k: v for k, v in summaries.items() if not k.startswith(ours) or k == name}, name)
                for name in summaries if name.startswith(ours + "-")}
    if ablation:
        entry["ablation_ratios"] = ablation
    return entry


RECORD_NAME = re.compile(r"^(?P<dep>[^-]+)-(?P<set>.+?)(?:-x(?P<load>[0-9.]+))?-(?P<arm>upstream-[a-z]+(?:-[a-z0-9]+)?|tiersched(?:-[a-z0-9]+(?:-only)?)?)"
                         r"-r(?P<rep>\d+)\.jsonl$")


def from_records(record_dir: str, deployments) -> dict:
    """The report rebuilt from `--record` files (no server): same tables and headline fields, e.g. for a run whose
    process ended early. Records carry every request's outcome; run wall times are not recorded."""
    from tiersched.live.replay import read_record, results_from_rows

    found: dict = {}
    for path in sorted(Path(record_dir).glob("*.jsonl")):
        m = RECORD_NAME.match(path.name)
        if not m or (deployments and m["dep"] not in deployments):
            continue
        meta, rows = read_record(path)
        load = meta.get("load", float(m["load"]) if m["load"] else None)
        key = (m["dep"], load, m["set"])
        found.setdefault(key, {}).setdefault(m["arm"], {})[int(m["rep"])] = (meta, results_from_rows(rows))
    if not found:
        raise SystemExit(f"no records in {record_dir}" + (f" for {', '.join(deployments)}" if deployments else ""))
    report: dict = {"from_records": record_dir, "deployments": {}}
    repeats = set()
    incomplete = []
    for (dep, load, set_name), arms in sorted(found.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0, kv[0][2])):
        if live_arms.TIERSCHED not in arms:  # e.g. a run stopped before the tiersched arm's first repeat
            incomplete.append(f"{dep} {set_name} at {load}: no {live_arms.TIERSCHED} record")
            continue
        results = {arm: [reps[i][1] for i in sorted(reps)] for arm, reps in arms.items()}
        repeats.update(len(r) for r in results.values())
        summaries = {arm: [summarize(r) for r in runs] for arm, runs in results.items()}
        meta = next(iter(next(iter(arms.values())).values()))[0]
        entry = ab_entry(summaries, results)
        entry.update({"source": meta.get("source"), "requests": len(next(iter(results.values()))[0])})
        dep_out = report["deployments"].setdefault(dep, {"loads": []})
        block = next((b for b in dep_out["loads"] if b["load"] == load), None)
        if block is None:
            block = {"load": load, "rate_req_s": meta.get("rate_req_s"), "sets": {}}
            dep_out["loads"].append(block)
        block["sets"][set_name] = entry
    for dep_out in report["deployments"].values():
        dep_out["sets"] = dep_out["loads"][0]["sets"]
    if incomplete:
        report["incomplete"] = incomplete
    report["repeats"] = max(repeats) if repeats else 0
    report["load"] = None
    return report


def _exit_on_sigterm() -> None:
    """A plain SIGTERM (e.g. `timeout`) would skip the finally blocks that stop our servers; exit cleanly instead."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


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
    for key in ("block_tokens", "max_input"):
        if getattr(args, key) is not None:
            plan[key] = getattr(args, key)
    if args.loads:
        plan["loads"] = _floats(args.loads)
    if args.load is not None:
        plan["loads"] = [args.load]
    if args.sets:
        plan["sets"] = [x.strip() for x in args.sets.split(",") if x.strip()]
    if args.from_records:
        report = from_records(args.from_records, plan["deployments"] if args.deployments else None)
        _headlines(report)
        print(json.dumps(report) if args.json else json.dumps(report, indent=1))
        return 1 if report["errors"] or report["lost"] else 0
    if args.replay and not args.record:
        args.record = tempfile.mkdtemp(prefix="tiersched-live-records-")
    t0 = time.monotonic()
    model_dir = args.model
    if model_dir is None:
        from tiersched.rig.tiny_model import make_tiny_moe

        model_dir = make_tiny_moe(tempfile.mkdtemp(prefix="tiersched-live-model-"))
    report: dict = {"plan": plan, "load": plan["loads"][0] if args.rate is None else None,
                    "repeats": plan["repeats"], "deployments": {}}
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
        for block in dep.get("loads", []):
            for s in block["sets"].values():
                for runs in s["runs"].values():
                    errors += sum(r["errors"] for r in runs)
                    lost += sum(r["lost"] for r in runs)
            if first is None and "shared-prefix" in block["sets"]:
                first = (name, dep, block)
    report["errors"], report["lost"] = errors, lost
    for key in ("cached_tokens_ratio", "ttft_ratio", "ttft_ratio_ci95", "ttft_p_value", "ttft_mannwhitney_p",
                "ls_ttft_ratio", "ls_ttft_ratio_ci95", "ls_ttft_p_value", "ls_ttft_mannwhitney_p", "ls_ttft_stat"):
        report[key] = None
    report["headline_deployment"] = first[0] if first else None
    if first is None:
        return
    name, dep, block = first
    entry = block["sets"]["shared-prefix"]
    ratios, req = entry["ratios"], entry["request_ratios"]
    report["load"] = block["load"]
    report["rate_req_s"] = block["rate_req_s"]
    report["capacity_req_s"] = dep.get("capacity_req_s")
    report["cached_tokens_ratio"] = headline(ratios, "cached_tokens")
    for prefix, key in (("ttft", "ttft_mean"), ("ls_ttft", "ls_ttft_tail")):
        best = req.get(key, {}).get("vs_best")
        if best is None:
            continue
        report[f"{prefix}_ratio"] = best["ratio"]
        report[f"{prefix}_ratio_ci95"] = best["ci95"]
        report[f"{prefix}_p_value"] = best["p_value"]
        report[f"{prefix}_mannwhitney_p"] = best["mannwhitney_p"]
        report[f"{prefix}_vs"] = req[key]["best_upstream"]
    if "ls_ttft_tail" in req:
        best = req["ls_ttft_tail"]["vs_best"]
        report["ls_ttft_stat"] = best["stat"]
        report["ls_samples_per_arm"] = min(best["n_ours"], best["n_base"])
    report["spread"] = {k: ratios[k]["vs_best"] | {"vs": ratios[k]["best_upstream"]}
                        for k in ("cached_tokens", "ls_ttft_mean_s", "ttft_mean_s", "tpot_mean_s",
                                  "throughput_tok_s") if k in ratios}


def _replay_tiersched(record_dir: str, deployment: str) -> dict:
    from tiersched.live.replay import replay

    paths = sorted(Path(record_dir).glob(f"{deployment}-shared-prefix*-{live_arms.TIERSCHED}-r*.jsonl"))
    if not paths:
        return {"status": "missing", "reason": f"no tiersched record in {record_dir}"}
    try:
        return replay(paths[0])
    except Exception as exc:  # the simulator is still being built: report, do not hide the live numbers
        return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:1000]}
