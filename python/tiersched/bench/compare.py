"""`python -m tiersched.bench compare`: one scenario, tiersched's tiers against upstream SGLang at its best.

1. Upstream-best, per metric (mean TTFT, mean TPOT, tail TTFT): a pruned search of upstream's flag space the
   simulator models (bench/upstream_space.py: every ordering incl. priority scheduling where the workload has
   priorities, every load-balance method, chunk size, every EPLB algorithm incl. none and its interval, the
   prefill delayer and its knobs, mixed chunking), on the first seed. The JSON's
   `upstream_best_space` says what was searched, how, and how many runs it took; `upstream_best_ttft`,
   `upstream_best_tpot`, `upstream_best_p99` name each metric's winner (its label and upstream flags).
2. Ablation from the mean-TTFT winner: tiersched dispatch only, tiersched ordering (+ its preemption) only,
   tiersched expert placement only, all three, all three + expert-pressure feedback; vLLM's DP balancer as a
   reference row. Rows that keep an upstream ordering keep the winner's scheduler flags (chunk size included); rows
   with tiersched's ordering, which caps chunks adaptively, run at the preset's chunk size (their adaptive
   behaviour is theirs to claim), with the winner's EPLB interval; `tiersched@upstream-chunk` (all three tiers at
   the winner's chunk size) is reported beside them, not as the headline, and so are `tiersched+mixed` (with upstream's
   static `--enable-mixed-chunk`) and `tiersched@upstream-tpot-flags` (every static scheduler flag of the mean-TPOT
   winner: chunk size, mixed chunk, prefill delayer). Each row's `static_flags` lists the upstream flags it runs with.
3. Lower bounds: perfect balance (each winner with every max over ranks replaced by the mean) and the idle
   cluster (each request alone), per seed.
4. Every row and winner is run on `--seeds` seeds; per row, the ratio ours / upstream-best per metric (against
   that metric's winner) with a seeded bootstrap 95% CI over seeds, and the headroom captured,
   (upstream_best - ours) / (upstream_best - bound), against the idle-cluster bound (and, as
   `headroom_captured_vs_perfect_balance`, against the perfect-balance bound). Tail metrics are P99 only where every
   run of every arm finished >= 1,000 requests, else P95 (`tail_percentile`).
Default scenario: Qwen3-30B-A3B DP4·EP4, the Mooncake trace's first 60 s when ../shared/data is present, else a
built-in synthetic workload.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import replace

import numpy as np

from tiersched.bench import upstream_space as space
from tiersched.bench.runner import (HEADLINE, Scenario, _WORKLOAD_CACHE, _workload_key, build_preset,
                                    idle_cluster_bound, prepare_workloads, run_many, simulator_refuses, worker_pool)
from tiersched.bench.stats import TAIL_MIN_SAMPLES, bootstrap_ci, headroom, tail_percentile
from tiersched.sim import PolicySet

WINNERS = ("ttft", "tpot", "p99")  # upstream_best_<name>
OUR_ROWS_RULE = ("rows with tiersched's ordering run at the preset's chunk size with upstream's other scheduler defaults "
                 "(no --enable-mixed-chunk, no --enable-prefill-delayer): the ordering caps chunks adaptively, so it "
                 "does not take upstream's chunk choice. Beside them, not headline: +mixed rows add --enable-mixed-chunk; "
                 "@upstream-chunk rows take the mean-TTFT winner's chunk size; @upstream-tpot-flags rows take every "
                 "static scheduler flag of the mean-TPOT winner (chunk size, mixed chunk, prefill delayer and its "
                 "knobs). Each row's static_flags lists the upstream flags it runs with.")
DEFAULT_ARMS = ("dispatch-only", "ordering-only", "expert-only", "tiersched", "tiersched+feedback", "vllm-dp",
                "tiersched@upstream-chunk", "tiersched+mixed", "tiersched@upstream-tpot-flags")


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--preset", default="qwen3", help="qwen3 (DP4·EP4), qwen3-gimbal (DP2·TP2·EP4), deepseek-v3")
    parser.add_argument("--workload", default="auto",
                        help="auto (Mooncake if ../shared/data exists, else synthetic), mooncake, azure, sharegpt, "
                             "servegen, mixed-priority, synthetic:<Random|Central|Descending|Two-end|Average>")
    parser.add_argument("--trace", default=None, metavar="PATH|NAME",
                        help="a trace file (Mooncake JSONL, Azure CSV, BurstGPT CSV; format detected) or a shared "
                             "trace name (as --workload)")
    parser.add_argument("--rate", type=float, default=None, help="arrival rate (req/s); traces: rescaled")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals")
    parser.add_argument("--seed", type=int, default=0, help="first seed (the upstream search runs on it)")
    parser.add_argument("--seeds", type=int, default=5,
                        help="seeds per row: --seed, --seed+1, ...; > 1 adds bootstrap 95%% CIs (*_ci95)")
    parser.add_argument("--search-passes", type=int, default=3,
                        help="at most this many coordinate-descent passes per metric over upstream's flags")
    parser.add_argument("--eplb-steps", type=int, default=None, help="EPLB rebalance interval in forward steps")
    parser.add_argument("--drift-steps", type=int, default=0,
                        help="routing drifts to a fresh window every N forward steps (0 = fixed routing)")
    parser.add_argument("--eplb-history", type=int, default=1, help="windows the EPLB planners see")
    parser.add_argument("--workers", type=int, default=None, help="parallel simulations (default: CPU count)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def tail_metrics(tail: int) -> tuple[str, ...]:
    """The metrics headroom and ratios are reported for, and the winner each is measured against."""
    return ("ttft_mean", "tpot_mean", f"ttft_p{tail}", f"tpot_p{tail}")


def winner_of(metric: str) -> str:
    return {"ttft_mean": "ttft", "tpot_mean": "tpot"}.get(metric, "p99" if metric.startswith("ttft_p") else "tpot")


def _ratio(o, b):
    return o / b


def _headroom_arr(b, o, lb):
    return np.where(b - lb > 0, (b - o) / (b - lb), np.nan)


def _log(quiet: bool, msg: str) -> None:
    if not quiet:
        print(f"[compare] {msg}", file=sys.stderr, flush=True)


def compare(sc: Scenario, workers: int | None = None, seeds: int = 1, search_passes: int = 3,
            quiet: bool = True, arms: tuple[str, ...] = DEFAULT_ARMS) -> dict:
    """The report described in the module docstring; `arms`: which of `_rows`' rows to run beside upstream-best."""
    start = time.perf_counter()
    seed_list = [sc.seed + i for i in range(max(1, seeds))]
    scs = [replace(sc, seed=s) for s in seed_list]
    prepare_workloads(scs)
    work = [_WORKLOAD_CACHE[_workload_key(s)] for s in scs]
    preset = build_preset(sc)
    has_priorities = any(len(np.unique(w.priority)) > 1 for w in work)
    dims, dropped = space.usable_dimensions(space.dimensions(preset, has_priorities),
                                            lambda changes: simulator_refuses(sc, changes))
    tail = tail_percentile(min(len(w) for w in work))
    search_metrics = {"ttft": "ttft_mean", "tpot": "tpot_mean", "p99": f"ttft_p{tail}"}
    pool = worker_pool(workers)
    try:
        def run(combos: list[dict]) -> list[dict]:
            jobs = [(replace(sc, scheduler=space.scheduler_changes(c, dims)), space.label(c, dims),
                     space.policy_set(c), False) for c in combos]
            out = run_many(jobs, workers, pool)
            _log(quiet, f"upstream search: {len(combos)} more runs ({time.perf_counter() - start:.0f} s)")
            return [r["metrics"] for r in out]

        res = space.search(dims, list(dict.fromkeys(search_metrics.values())), run, max_passes=search_passes)
        win = {name: res.combos[res.winners[m]] for name, m in search_metrics.items()}
        rows = {name: row for name, row in _rows(win["ttft"], dims, win["tpot"]).items() if name in arms}
        jobs, where, same = [], [], {}
        distinct = list({space.combination_key(c): c for c in win.values()}.values())
        for i, s in enumerate(scs):
            for c in distinct:
                key = space.combination_key(c)
                scc = replace(s, scheduler=space.scheduler_changes(c, dims))
                if i > 0:  # the search seed's winner runs are in res already
                    jobs.append((scc, space.label(c, dims), space.policy_set(c), False)); where.append((key, i))
                jobs.append((scc, space.label(c, dims), space.policy_set(c), True)); where.append(("balance", key, i))
            first_of: dict = {}  # rows that run the same policies and flags run once (e.g. @upstream-chunk at 8192)
            for name, (pol, sched) in rows.items():
                if (pol, sched) in first_of:
                    same[name] = first_of[(pol, sched)]
                    continue
                first_of[(pol, sched)] = name
                jobs.append((replace(s, scheduler=sched), name, pol, False)); where.append((name, i))
        _log(quiet, f"{len(res.runs)} search runs done; {len(jobs)} evaluation runs on {len(scs)} seed(s)")
        results = run_many(jobs, workers, pool)
        biggest_chunk = max(max(space.CHUNK_SIZES), preset.scheduler.chunked_prefill_size)
        idle = (list(pool.map(idle_cluster_bound, scs, [biggest_chunk] * len(scs))) if pool is not None
                else [idle_cluster_bound(s, biggest_chunk) for s in scs])
    finally:
        if pool is not None:
            pool.shutdown()
    per_seed: dict = {}  # row key -> [metrics per seed]
    for c in distinct:
        per_seed[space.combination_key(c)] = [res.runs[space.combination_key(c)]] + [None] * (len(scs) - 1)
        per_seed[("balance", space.combination_key(c))] = [None] * len(scs)
    for w, r in zip(where, results):
        if w[0] == "balance":
            per_seed[("balance", w[1])][w[2]] = r["metrics"]
        else:
            per_seed.setdefault(w[0], [None] * len(scs))[w[1]] = r["metrics"]
    for name, twin in same.items():
        per_seed[name] = per_seed[twin]
    per_seed["bound:idle-cluster"] = idle
    finished_min = min(int(m.get("finished") or 0) for k, ms in per_seed.items() if k != "bound:idle-cluster"
                       for m in ms)
    notes = sorted({n for r in results for n in r.get("notes", [])})
    if tail == 99 and tail_percentile(finished_min) == 95:
        tail = 95
        notes.append(f"a run finished only {finished_min} requests: tails reported as P95; the tail winner was "
                     "searched on P99")
    metrics = tail_metrics(tail)
    key_of = {name: space.combination_key(c) for name, c in win.items()}
    report_rows: dict[str, dict] = {}
    for name in WINNERS:
        entry = {"label": space.label(win[name], dims), "flags": space.flags(win[name], dims, preset),
                 **_mean_entry(per_seed[key_of[name]])}
        report_rows["upstream-best" if name == "ttft" else f"upstream-best-{name}"] = entry
    for name, (pol, sched) in rows.items():
        entry = {"label": pol.label() + space.scheduler_label(sched, dims),
                 "static_flags": space.scheduler_flags(sched, dims, preset), **_mean_entry(per_seed[name])}
        report_rows[name] = entry
    balance_key = ("balance", key_of["ttft"])
    report_rows["bound:perfect-balance"] = {"label": "upstream-best with mean instead of max over ranks",
                                            **_mean_entry(per_seed[balance_key])}
    report_rows["bound:idle-cluster"] = {"label": "each request alone", **_mean_entry(idle)}
    for name, entry in report_rows.items():
        if name.startswith("bound:"):
            continue
        arrays = lambda key, m: np.array([np.nan if x.get(m) is None else x[m] for x in per_seed[key]], dtype=float)
        ours_key = key_of[{"upstream-best": "ttft", "upstream-best-tpot": "tpot",
                           "upstream-best-p99": "p99"}[name]] if name.startswith("upstream-best") else name
        ratio, ratio_ci, head, head_ci, head_bal = {}, {}, {}, {}, {}
        for m in metrics:
            best = arrays(key_of[winner_of(m)], m)
            ours = arrays(ours_key, m)
            lower = arrays("bound:idle-cluster", m)
            bal = arrays(("balance", key_of[winner_of(m)]), m)
            b, o, lb, pb = (float(np.mean(x)) for x in (best, ours, lower, bal))
            ratio[m] = round(o / b, 4) if b else None
            ratio_ci[m] = bootstrap_ci(_ratio, [ours, best])
            h = headroom(b, o, lb)
            head[m] = None if h is None else round(h, 4)
            head_ci[m] = None if h is None else bootstrap_ci(_headroom_arr, [best, ours, lower])
            hb = headroom(b, o, pb)
            head_bal[m] = None if hb is None else round(hb, 4)
        entry["ratio_vs_upstream_best"] = ratio
        entry["headroom_captured"] = head
        entry["headroom_captured_vs_perfect_balance"] = head_bal
        if len(scs) > 1:
            entry["ratio_vs_upstream_best_ci95"] = ratio_ci
            entry["headroom_captured_ci95"] = head_ci
        base = report_rows["upstream-best"]
        entry["change_vs_upstream_best"] = {k: _change(entry.get(k), base.get(k))
                                            for k in ("ttft_mean", f"ttft_p{tail}", "tpot_mean", "throughput")}
    out = {
        "scenario": {"preset": sc.preset, "workload": sc.resolved_workload(), "rate": sc.rate,
                     "duration_s": sc.duration_s, "seeds": seed_list, "requests": len(work[0]),
                     "seeds_vary": seeds_vary(work)},
        "tail_percentile": tail,
        "tail_rule": (f"P99 only where every run of every arm finished >= {TAIL_MIN_SAMPLES} requests, else P95; "
                      f"fewest finished in a run here: {finished_min}"),
        "upstream_best_space": space.space_report(res, dropped, preset, search_metrics, [sc.seed], search_passes),
        "upstream_best": report_rows["upstream-best"]["label"],
        "ablation_base": "upstream_best_ttft",
        "headroom_bound": "bound:idle-cluster",
        "policies": report_rows,
        "our_rows_static_flags": OUR_ROWS_RULE,
        "notes": notes,
        "wall_s": round(time.perf_counter() - start, 2),
    }
    for name in WINNERS:
        row = report_rows["upstream-best" if name == "ttft" else f"upstream-best-{name}"]
        metric = search_metrics[name]
        out[f"upstream_best_{name}"] = {
            "label": row["label"], "flags": row["flags"], "combination": win[name], "metric": metric,
            "search_value": res.runs[key_of[name]].get(metric),
            **{m: row.get(m) for m in ("ttft_mean", "tpot_mean", f"ttft_p{tail}", f"tpot_p{tail}", "throughput")}}
    out["runs"] = len(res.runs) + len(jobs) + len(idle)
    return out


def seeds_vary(work: list) -> str:
    """What the seeds change, so a reader knows what the CIs over seeds measure: a trace (shared or a user's file)
    is the same requests on every seed, and then only the simulator's draws differ."""
    sim = "the simulator's MoE routing draw (and routing drift, when set)"
    if len(work) < 2:
        return "one seed: no spread measured"
    same = all(len(w) == len(work[0]) and np.array_equal(w.arrival_s, work[0].arrival_s)
               and np.array_equal(w.input_tokens, work[0].input_tokens)
               and np.array_equal(w.output_tokens, work[0].output_tokens) for w in work[1:])
    return f"only {sim}: every seed has the same requests (a trace)" if same else f"the requests and {sim}"


def _rows(best: dict, dims, tpot_best: dict | None = None) -> dict:
    """The ablation rows built from the mean-TTFT winner `best`: name -> (PolicySet, SchedulerSettings changes).
    `tpot_best`: the mean-TPOT winner, whose static scheduler flags the `@upstream-tpot-flags` rows take."""
    o, d, e = best["ordering"], best["dispatch"], best.get("eplb", "none")
    upstream_sched = space.scheduler_changes(best, dims)
    # Our ordering caps chunks itself: the preset's chunk size and upstream's defaults, the winner's EPLB interval.
    ours = dict(space.default_combination(dims), ordering="tiersched", dispatch="tiersched", eplb="source_aware")
    if "eplb_rebalance_steps" in best and e != "none":
        ours["eplb_rebalance_steps"] = best["eplb_rebalance_steps"]
    ours_sched = space.scheduler_changes(ours, dims)
    keep_sched = dict(upstream_sched)
    if "eplb_rebalance_steps" in ours:  # the expert tier alone: the winner's flags, the winner's EPLB interval
        keep_sched["eplb_rebalance_steps"] = ours["eplb_rebalance_steps"]
    names = {dim.name for dim in dims}
    # Static upstream flags our rows can run with (not the headline: each trades TTFT for TPOT, docs/results.md).
    mixed = space.scheduler_changes(dict(ours, enable_mixed_chunk=True), dims) if "enable_mixed_chunk" in names \
        else None
    at_chunk = space.scheduler_changes(dict(ours, chunked_prefill_size=best.get(
        "chunked_prefill_size", ours.get("chunked_prefill_size"))), dims)
    tpot_flags = None
    if tpot_best is not None:
        tpot_flags = space.scheduler_changes(dict(ours, **{dim.name: tpot_best[dim.name] for dim in dims
                                                           if dim.target == "scheduler"
                                                           and dim.name != "eplb_rebalance_steps"}), dims)
    ord_disp = PolicySet(ordering="tiersched", dispatch="tiersched", eplb=e)
    all_three = PolicySet(ordering="tiersched", dispatch="tiersched", eplb="source_aware")
    rows = {
        # The request and engine tiers on top of the winner's EPLB (sweep's arm without --with-eplb).
        "ordering+dispatch": (ord_disp, ours_sched),
        "dispatch-only": (PolicySet(ordering=o, dispatch="tiersched", eplb=e), upstream_sched),
        "ordering-only": (PolicySet(ordering="tiersched", dispatch=d, eplb=e), ours_sched),
        "expert-only": (PolicySet(ordering=o, dispatch=d, eplb="source_aware"), tuple(keep_sched.items())),
        "tiersched": (all_three, ours_sched),
        "tiersched+feedback": (PolicySet(ordering="tiersched", dispatch="tiersched", eplb="source_aware",
                                         expert_feedback=True), ours_sched),
        "vllm-dp": (PolicySet(ordering=o, dispatch="vllm-dp", eplb=e), upstream_sched),
        # Not headline rows: all three tiers at the winner's chunk size, to show what the chunk choice is worth.
        "ordering+dispatch@upstream-chunk": (ord_disp, at_chunk),
        "tiersched@upstream-chunk": (all_three, at_chunk),
    }
    if mixed is not None:  # upstream's --enable-mixed-chunk at the preset's chunk size
        rows["ordering+dispatch+mixed"] = (ord_disp, mixed)
        rows["tiersched+mixed"] = (all_three, mixed)
    if tpot_flags is not None:  # every static scheduler flag of the mean-TPOT winner (chunk, mixed, delayer)
        rows["ordering+dispatch@upstream-tpot-flags"] = (ord_disp, tpot_flags)
        rows["tiersched@upstream-tpot-flags"] = (all_three, tpot_flags)
    return rows


def _mean_entry(runs: list[dict]) -> dict:
    """Headline metrics averaged over seeds (None where any seed has none), with the seed count."""
    out = {}
    for k in HEADLINE:
        vals = [r.get(k) for r in runs]
        out[k] = None if any(v is None for v in vals) else float(np.mean(vals))
    for k in ("throughput_req_s", "slo_attainment", "preemptions"):
        vals = [r.get(k) for r in runs]
        out[k] = None if any(v is None for v in vals) else float(np.mean(vals))
    out["seeds"] = len(runs)
    out["per_class"] = runs[0].get("per_class")
    out["requests_per_rank"] = runs[0].get("requests_per_rank")
    return out


def _change(value, base):
    if value is None or base in (None, 0):
        return None
    return round((value - base) / base, 4)


def format_table(report: dict) -> str:
    tail = report["tail_percentile"]
    cols = ("ttft_mean", f"ttft_p{tail}", "tpot_mean", "throughput", "balancedness")
    head = (f"{'row':<25}{'combination':<64}" + "".join(f"{c:>13}" for c in cols)
            + f"{'TTFT ratio [95% CI]':>24}{'headroom TTFT/TPOT':>20}")
    sc = report["scenario"]
    lines = [f"scenario: {sc['preset']}, {sc['workload']}, {sc['requests']} requests, {sc['duration_s']:g} s, "
             f"seeds {sc['seeds']} (they vary {sc['seeds_vary']}); tails are P{tail}"]
    for name in WINNERS:
        w = report[f"upstream_best_{name}"]
        lines.append(f"upstream best on {w['metric']}: {w['label']}   [{w['flags']}]")
    sp = report["upstream_best_space"]
    lines.append(f"upstream search: {sp['runs']} runs of a {sp['full_grid_size']}-combination space "
                 f"(coordinate descent per metric; --json: upstream_best_space)")
    lines += [head, "-" * len(head)]
    for name, e in report["policies"].items():
        vals = "".join(f"{'-' if e.get(c) is None else format(e[c], '.4g'):>13}" for c in cols)
        r = e.get("ratio_vs_upstream_best", {}).get("ttft_mean")
        ci = (e.get("ratio_vs_upstream_best_ci95") or {}).get("ttft_mean")
        rtxt = "" if r is None else f"{r:.3f}" + ("" if not ci else f" [{ci[0]:.3f}, {ci[1]:.3f}]")
        h = e.get("headroom_captured", {})
        htxt = "" if not h else "/".join("-" if h.get(m) is None else f"{h[m]:+.2f}" for m in ("ttft_mean", "tpot_mean"))
        lines.append(f"{name[:24]:<25}{e['label'][:63]:<64}{vals}{rtxt:>24}{htxt:>20}")
    lines.append("ratio = ours / upstream-best on that metric (mean over seeds); headroom = (upstream-best - ours) / "
                 "(upstream-best - idle-cluster bound)")
    lines.append(f"wall: {report['wall_s']} s, {report['runs']} simulations; " + "; ".join(report["notes"]))
    return "\n".join(lines)


def main(args) -> int:
    workload = args.trace or args.workload
    sc = Scenario(preset=args.preset, workload=workload, rate=args.rate, duration_s=args.duration, seed=args.seed,
                  eplb_rebalance_steps=args.eplb_steps, routing_drift_steps=args.drift_steps,
                  eplb_history_windows=args.eplb_history)
    report = compare(sc, args.workers, seeds=args.seeds, search_passes=args.search_passes, quiet=args.quiet)
    if args.json:
        json.dump(report, sys.stdout, default=_json_default)
        sys.stdout.write("\n")
    else:
        print(format_table(report))
    return 0


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(type(x).__name__)
