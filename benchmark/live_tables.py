"""Markdown tables of a `python -m tiersched.bench live --json` report (or `--from-records` report), one row per
(deployment, load): the issue's goal per row (at >= 0.8x capacity: mean TTFT and LS-class TTFT tail better than the
best upstream arm with p < 0.01, cached tokens >= the best upstream arm, 0 errors, 0 lost) and the numbers behind it.

    .venv/bin/python benchmark/live_tables.py REPORT.json [REPORT.json ...]

Ratios > 1 favour tiersched (latency: upstream / ours; cached tokens: ours / upstream). "p" is the one-sided
bootstrap p-value of the ratio, "MW" the one-sided Mann-Whitney U p-value over the pooled per-request TTFTs; a
latency goal is met only when both are < 0.01 (docs/live-results.md, Statistics).
"""
from __future__ import annotations

import argparse
import json
import statistics

ALPHA = 0.01
GOAL_LOAD = 0.8


def _fmt_ratio(r: dict | None, with_mw: bool = True) -> str:
    if not r:
        return "n/a"
    lo, hi = r["ci95"]
    text = f"{r['ratio']:.3f} [{lo:.3f}, {hi:.3f}] p {r['p_value']:.4f}"
    if with_mw and r.get("mannwhitney_p") is not None:
        text += f", MW {r['mannwhitney_p']:.2g}"
    return text


def _significant(r: dict | None) -> bool:
    return bool(r) and r["ratio"] > 1 and r["p_value"] < ALPHA and (r.get("mannwhitney_p") or 0.0) < ALPHA


def _mean(runs: list[dict], key: str) -> float | None:
    values = [x[key] for x in runs if x.get(key) is not None]
    return statistics.fmean(values) if values else None


def rows(report: dict) -> list[dict]:
    out = []
    for dep, dep_out in report["deployments"].items():
        if "failed" in dep_out:
            out.append({"deployment": dep, "failed": dep_out["failed"]})
            continue
        for block in dep_out.get("loads", []):
            entry = block["sets"].get("shared-prefix")
            if entry is None:
                continue
            req, ratios, runs = entry["request_ratios"], entry["ratios"], entry["runs"]
            ttft, ls_tail = req["ttft_mean"]["vs_best"], req["ls_ttft_tail"]["vs_best"]
            cached = ratios["cached_tokens"]["vs_best"]
            errors = sum(x["errors"] for arm in runs.values() for x in arm)
            lost = sum(x["lost"] for arm in runs.values() for x in arm)
            load = block["load"]
            goal = {"ttft": _significant(ttft), "ls_ttft_tail": _significant(ls_tail),
                    "cached": cached["ratio"] >= 1.0, "errors": errors == 0, "lost": lost == 0}
            steps = {arm: _mean([x.get("server_steps", {}) for x in arm_runs], "prefill_batches")
                     for arm, arm_runs in runs.items()}
            priced = {arm: (_mean([x.get("server_steps", {}) for x in arm_runs], "priced_caps_kept"),
                            _mean([x.get("server_steps", {}) for x in arm_runs], "priced_caps_dropped"))
                      for arm, arm_runs in runs.items()}
            out.append({
                "deployment": dep, "load": load, "rate_req_s": block["rate_req_s"],
                "repeats": min(len(v) for v in runs.values()),
                "ttft": ttft, "ttft_vs": req["ttft_mean"]["best_upstream"],
                "ls_ttft_tail": ls_tail, "ls_ttft_vs": req["ls_ttft_tail"]["best_upstream"],
                "ls_ttft_mean": req["ls_ttft_mean"]["vs_best"], "tpot": req["tpot_mean"]["vs_best"],
                "tpot_vs": req["tpot_mean"]["best_upstream"],
                "cached": cached, "cached_vs": ratios["cached_tokens"]["best_upstream"], "errors": errors, "lost": lost,
                "abs": {arm: {k: _mean(arm_runs, k) for k in ("ttft_mean_s", "ls_ttft_mean_s", "tpot_mean_s",
                                                             "cached_tokens", "concurrency_mean")}
                        for arm, arm_runs in runs.items()},
                "prefill_batches_per_run": steps,
                "priced_caps_per_run": {arm: v for arm, v in priced.items() if any(v)},  # (kept, dropped)
                "goal": goal if load is not None and load >= GOAL_LOAD else None,
            })
    return out


def markdown(report: dict) -> str:
    lines = ["| deployment, load (req/s) | mean TTFT ratio vs best | LS-class TTFT tail ratio vs best | "
             "mean TPOT ratio vs best | cached tokens vs best (min-max) | errors / lost | goal |",
             "|---|---|---|---|---|---|---|"]
    details = []
    for row in rows(report):
        if "failed" in row:
            lines.append(f"| {row['deployment']} | failed: {row['failed'][:200]} | | | | | |")
            continue
        goal = row["goal"]
        verdict = ("n/a (< 0.8x)" if goal is None else "met" if all(goal.values())
                   else "missed: " + ", ".join(k for k, ok in goal.items() if not ok))
        c = row["cached"]
        stat = row["ls_ttft_tail"]["stat"] if row["ls_ttft_tail"] else "tail"
        lines.append(
            f"| {row['deployment']} {row['load']}x ({row['rate_req_s']}) | {_fmt_ratio(row['ttft'])} "
            f"(vs {row['ttft_vs']}) | {stat}: {_fmt_ratio(row['ls_ttft_tail'])} (vs {row['ls_ttft_vs']}) | "
            f"{_fmt_ratio(row['tpot'], False)} (vs {row['tpot_vs']}) | {c['ratio']:.3f} ({c['min']:.3f}-{c['max']:.3f}) | "
            f"{row['errors']} / {row['lost']} | {verdict} |")
        per_arm = "; ".join(
            f"{arm} {v['ttft_mean_s']:.3f} / {v['ls_ttft_mean_s']:.3f} / {v['tpot_mean_s']:.3f} / "
            f"{v['cached_tokens']:.0f} / {v['concurrency_mean']:.1f} / "
            f"{row['prefill_batches_per_run'][arm] if row['prefill_batches_per_run'][arm] is not None else 'n/a'}"
            for arm, v in row["abs"].items() if v["ttft_mean_s"] is not None)
        priced = "; ".join(f"{arm} {k:.1f} / {d:.1f}" for arm, (k, d) in row["priced_caps_per_run"].items())
        details.append(f"* {row['deployment']} {row['load']}x, {row['repeats']} repeats, means per run (mean TTFT s / "
                       f"LS mean TTFT s / mean TPOT s / cached tokens / requests in flight / prefill batches): "
                       f"{per_arm}" + (f"; priced LS caps kept / dropped per run: {priced}" if priced else ""))
    return "\n".join(lines) + "\n\n" + "\n".join(details)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+")
    parser.add_argument("--json", action="store_true", help="the rows as JSON instead of markdown")
    args = parser.parse_args(argv)
    for path in args.reports:
        with open(path) as f:
            report = json.load(f)
        print(json.dumps(rows(report)) if args.json else markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
