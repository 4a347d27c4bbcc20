"""`python -m tiersched.bench compare`: one scenario, every policy combination, ablation against upstream-best.

1. Upstream grid: ordering {fcfs, lpm, hrrn, shortest-prefill-first} x dispatch {round_robin, total_requests,
   total_tokens}, no EPLB; then the best of those with DeepSeek EPLB (global, hierarchical).
   `upstream-best` = the lowest mean TTFT of all of them (ties: higher throughput), measured in this run.
2. Ablation from upstream-best: tiersched dispatch only, tiersched ordering (+ its preemption) only, tiersched
   expert placement only, all three, all three + expert-pressure feedback; vLLM's DP balancer as a reference.
3. Lower bounds: perfect balance (upstream-best with every max over ranks replaced by the mean) and the idle
   cluster (each request alone).
Default scenario: Qwen3-30B-A3B DP4·EP4, the Mooncake trace's first 60 s when ../shared/data is present, else a
built-in synthetic workload.
"""
from __future__ import annotations

import json
import sys
import time

from tiersched.bench.runner import (HEADLINE, UPSTREAM_DISPATCH, UPSTREAM_EPLB, UPSTREAM_ORDERINGS, Scenario,
                                    idle_cluster_bound, pick_best, run_many)
from tiersched.sim import PolicySet


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--preset", default="qwen3", help="qwen3 (DP4·EP4), qwen3-gimbal (DP2·TP2·EP4), deepseek-v3")
    parser.add_argument("--workload", default="auto",
                        help="auto (Mooncake if ../shared/data exists, else synthetic), mooncake, azure, sharegpt, "
                             "servegen, mixed-priority, synthetic:<Random|Central|Descending|Two-end|Average>")
    parser.add_argument("--trace", default=None, help="alias of --workload for a shared trace name")
    parser.add_argument("--rate", type=float, default=None, help="arrival rate (req/s); traces: rescaled")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eplb-steps", type=int, default=None, help="EPLB rebalance interval in forward steps")
    parser.add_argument("--drift-steps", type=int, default=0,
                        help="routing drifts to a fresh window every N forward steps (0 = fixed routing)")
    parser.add_argument("--eplb-history", type=int, default=1, help="windows the EPLB planners see")
    parser.add_argument("--workers", type=int, default=None, help="parallel simulations (default: CPU count)")


def compare(sc: Scenario, workers: int | None = None) -> dict:
    start = time.perf_counter()
    grid = [(sc, f"upstream:{o}/{d}", PolicySet(ordering=o, dispatch=d), False)
            for o in UPSTREAM_ORDERINGS for d in UPSTREAM_DISPATCH]
    upstream = run_many(grid, workers)
    best_base = pick_best(upstream)
    o, d = best_base["label"].split("/")[:2]
    upstream += run_many([(sc, f"upstream:{o}/{d}/{e}", PolicySet(ordering=o, dispatch=d, eplb=e), False)
                          for e in UPSTREAM_EPLB], workers)
    best = pick_best(upstream)
    o, d, e = best["label"].split("/")[:3]
    rows = {
        "dispatch-only": PolicySet(ordering=o, dispatch="tiersched", eplb=e),
        "ordering-only": PolicySet(ordering="tiersched", dispatch=d, eplb=e),
        "expert-only": PolicySet(ordering=o, dispatch=d, eplb="source_aware"),
        "tiersched": PolicySet(ordering="tiersched", dispatch="tiersched", eplb="source_aware"),
        "tiersched+feedback": PolicySet(ordering="tiersched", dispatch="tiersched", eplb="source_aware",
                                        expert_feedback=True),
        "vllm-dp": PolicySet(ordering=o, dispatch="vllm-dp", eplb=e),
    }
    jobs = [(sc, name, pol, False) for name, pol in rows.items()]
    jobs.append((sc, "bound:perfect-balance", PolicySet(ordering=o, dispatch=d, eplb=e), True))
    ablation = run_many(jobs, workers)
    policies: dict[str, dict] = {"upstream-best": _entry(best)}
    for r in ablation:
        policies[r["name"]] = _entry(r)
    policies["bound:idle-cluster"] = {"label": "each request alone", **idle_cluster_bound(sc)}
    for r in upstream:
        policies[r["name"]] = _entry(r)
    base = best["metrics"]
    for entry in policies.values():
        if "ttft_mean" in entry and entry is not policies["upstream-best"]:
            entry["change_vs_upstream_best"] = {
                k: _change(entry.get(k), base.get(k)) for k in ("ttft_mean", "ttft_p99", "tpot_mean", "throughput")
            }
    notes = sorted({n for r in upstream + ablation for n in r.get("notes", [])})
    return {
        "scenario": {"preset": sc.preset, "workload": sc.resolved_workload(), "rate": sc.rate,
                     "duration_s": sc.duration_s, "seed": sc.seed,
                     "requests": best["metrics"]["requests"]},
        "upstream_best": best["label"],
        "policies": policies,
        "notes": notes,
        "wall_s": round(time.perf_counter() - start, 2),
    }


def _entry(r: dict) -> dict:
    m = r["metrics"]
    out = {"label": r["label"]}
    out.update({k: m.get(k) for k in HEADLINE})
    out.update({"throughput_req_s": m.get("throughput_req_s"), "slo_attainment": m.get("slo_attainment"),
                "preemptions": m.get("preemptions"), "per_class": m.get("per_class"),
                "requests_per_rank": m.get("requests_per_rank")})
    return out


def _change(value, base):
    if value is None or base in (None, 0):
        return None
    return round((value - base) / base, 4)


def format_table(report: dict) -> str:
    cols = ("ttft_mean", "ttft_p99", "tpot_mean", "throughput", "goodput", "cache_hit_rate", "balancedness")
    head = f"{'policy':<40}{'combination':<56}" + "".join(f"{c:>15}" for c in cols) + f"{'dTTFT':>9}"
    lines = [f"scenario: {json.dumps(report['scenario'])}", f"upstream-best: {report['upstream_best']}", head,
             "-" * len(head)]
    for name, e in report["policies"].items():
        vals = "".join(f"{'-' if e.get(c) is None else format(e[c], '.4g'):>15}" for c in cols)
        ch = e.get("change_vs_upstream_best", {}).get("ttft_mean")
        lines.append(f"{name[:39]:<40}{e['label'][:55]:<56}{vals}{'' if ch is None else format(ch, '+.1%'):>9}")
    lines.append(f"wall: {report['wall_s']} s; " + "; ".join(report["notes"]))
    return "\n".join(lines)


def main(args) -> int:
    workload = args.trace or args.workload
    sc = Scenario(preset=args.preset, workload=workload, rate=args.rate, duration_s=args.duration, seed=args.seed,
                  eplb_rebalance_steps=args.eplb_steps, routing_drift_steps=args.drift_steps,
                  eplb_history_windows=args.eplb_history)
    report = compare(sc, args.workers)
    if args.json:
        json.dump(report, sys.stdout, default=_json_default)
        sys.stdout.write("\n")
    else:
        print(format_table(report))
    return 0


def _json_default(x):
    import numpy as np

    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(type(x).__name__)
