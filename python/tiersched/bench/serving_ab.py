"""`python -m tiersched.bench serving-ab [--json] [--ours ARM] RESULTS...`: the A/B table of `sglang.bench_serving` runs.

Reads the JSONL files that `python -m sglang.bench_serving ... --output-file FILE` appends to (one JSON object per
benchmark run: `tag`, `completed`, `mean_ttft_ms`, `p95_ttft_ms`, `mean_tpot_ms`, `output_throughput`, ...; with
`--cache-report` a `cache_report` object with `total_cached_tokens`; with `--output-details` the per-request arrays
`ttfts` (seconds), `itls`, `input_lens`, `output_lens`, `errors` and, with `--cache-report`, `cached_tokens`).

Grouping is by bench_serving's own `--tag`: `--tag ARM` or `--tag ARM:CLASS` (e.g. `tiersched:ls`,
`upstream-lpm:be`, when two bench_serving processes send one request class each, with their priority in
`--extra-request-body`). The n-th run of an arm (and class), counting lines in the order the files are given, is
its repeat n; run the arms alternately so that repeat n of every arm saw the same machine. A run without a tag
is an error (the tag is what says which server it measured).

For every class (and `all`, the classes of one repeat merged), every baseline arm and the best baseline on each
metric: ratios oriented > 1 = ours better with 95% bootstrap intervals (tiersched.live.stats) over repeats
(per-run values) and, when `--output-details` arrays are present, over requests (mean TTFT, the TTFT tail allowed
by the sample size, mean TPOT), with a one-sided p-value.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tiersched.live import stats

ALL = "all"
# per-run metric -> (where it is read from, lower is better)
RUN_METRICS: dict[str, bool] = {
    "mean_ttft_ms": True,
    "p95_ttft_ms": True,
    "mean_tpot_ms": True,
    "mean_e2e_latency_ms": True,
    "output_throughput": False,
    "cached_tokens": False,
}
REQUIRED_FIELDS = ("completed", "mean_ttft_ms", "mean_tpot_ms", "output_throughput")


class ResultsError(ValueError):
    """A results file cannot be read as bench_serving output; the message names the file and line."""


@dataclass
class Run:
    """One bench_serving benchmark run (one JSONL line)."""
    arm: str
    cls: str
    source: str  # FILE:LINE
    summary: dict
    ttfts_s: list[float] | None = None  # successful requests only
    tpots_s: list[float] | None = None
    requests: int | None = None
    errors: int | None = None
    cached_tokens: int | None = None

    @property
    def completed(self) -> int:
        return int(self.summary["completed"])


@dataclass
class Group:
    arm: str
    cls: str
    runs: list[Run] = field(default_factory=list)


def parse_tag(tag, source: str) -> tuple[str, str]:
    if not isinstance(tag, str) or not tag.strip():
        raise ResultsError(f"{source}: the run has no tag; run bench_serving with --tag ARM (or --tag ARM:CLASS) so "
                           "that its arm is known")
    arm, _, cls = tag.strip().partition(":")
    if not arm or (_ and not cls) or ":" in cls:
        raise ResultsError(f"{source}: tag {tag!r} is not ARM or ARM:CLASS")
    if cls == ALL:
        raise ResultsError(f"{source}: class name {ALL!r} is reserved for the merged classes")
    return arm, cls or ALL


def _run_from(obj: dict, source: str) -> Run:
    missing = [k for k in REQUIRED_FIELDS if k not in obj]
    if missing:
        raise ResultsError(f"{source}: not a bench_serving result (missing {', '.join(missing)})")
    arm, cls = parse_tag(obj.get("tag"), source)
    run = Run(arm, cls, source, obj)
    report = obj.get("cache_report")
    if isinstance(report, dict) and report.get("total_cached_tokens") is not None:
        run.cached_tokens = int(report["total_cached_tokens"])
    if "ttfts" in obj:  # --output-details
        ttfts, errors = obj["ttfts"], obj.get("errors") or [""] * len(obj["ttfts"])
        out_lens, itls = obj.get("output_lens") or [], obj.get("itls") or []
        if not isinstance(ttfts, list) or len(errors) != len(ttfts):
            raise ResultsError(f"{source}: per-request arrays ttfts/errors differ in length")
        ok = [i for i, e in enumerate(errors) if not e]
        run.requests, run.errors = len(ttfts), len(ttfts) - len(ok)
        run.ttfts_s = [float(ttfts[i]) for i in ok]
        if len(itls) == len(ttfts) and len(out_lens) == len(ttfts):
            # upstream's TPOT: (latency - ttft) / (output tokens - 1), latency = ttft + sum of the ITLs
            run.tpots_s = [sum(itls[i]) / (out_lens[i] - 1) for i in ok if out_lens[i] and out_lens[i] > 1]
    return run


def read_results(paths) -> list[Run]:
    """Every run in `paths`, in order. Raises ResultsError for a file that is missing, not JSONL, or holds a
    line that is not a tagged bench_serving result."""
    runs: list[Run] = []
    for path in paths:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as exc:
            raise ResultsError(f"{path}: cannot read ({exc.strerror or exc})") from None
        lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        if not lines:
            raise ResultsError(f"{path}: empty; bench_serving writes one line per finished run (did it fail?)")
        for n, line in lines:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ResultsError(f"{path}:{n}: not JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise ResultsError(f"{path}:{n}: not a JSON object")
            runs.append(_run_from(obj, f"{path}:{n}"))
    return runs


def group_runs(runs: list[Run]) -> dict[str, dict[str, Group]]:
    """class -> arm -> Group, in the order runs came; the `all` class merges the classes of each repeat."""
    groups: dict[str, dict[str, Group]] = defaultdict(dict)
    for run in runs:
        groups[run.cls].setdefault(run.arm, Group(run.arm, run.cls)).runs.append(run)
    per_class = [c for c in groups if c != ALL]
    if per_class and ALL not in groups:
        arms = {arm for c in per_class for arm in groups[c]}
        for arm in sorted(arms):
            parts = [groups[c][arm].runs for c in per_class if arm in groups[c]]
            n = min(len(p) for p in parts)
            merged = [_merge([p[i] for p in parts], arm) for i in range(n)]
            groups[ALL][arm] = Group(arm, ALL, merged)
    return dict(groups)


def _merge(parts: list[Run], arm: str) -> Run:
    """The classes of one repeat as one run: counts summed, means weighted by completed requests."""
    done = sum(p.completed for p in parts)
    summary: dict = {"completed": done}
    for key in ("mean_ttft_ms", "mean_tpot_ms", "mean_e2e_latency_ms"):
        vals = [(p.summary.get(key), p.completed) for p in parts]
        summary[key] = (sum(v * w for v, w in vals) / done) if done and all(v is not None for v, _ in vals) else None
    summary["output_throughput"] = sum(p.summary.get("output_throughput") or 0.0 for p in parts)
    run = Run(arm, ALL, "+".join(p.source for p in parts), summary)
    if all(p.cached_tokens is not None for p in parts):
        run.cached_tokens = sum(p.cached_tokens for p in parts)
    if all(p.ttfts_s is not None for p in parts):
        run.ttfts_s = [t for p in parts for t in p.ttfts_s]
        run.requests = sum(p.requests for p in parts)
        run.errors = sum(p.errors for p in parts)
        if all(p.tpots_s is not None for p in parts):
            run.tpots_s = [t for p in parts for t in p.tpots_s]
    return run


def _run_value(run: Run, metric: str):
    if metric == "cached_tokens":
        return run.cached_tokens
    value = run.summary.get(metric)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _arm_summary(group: Group) -> dict:
    out: dict = {"repeats": len(group.runs), "completed": sum(r.completed for r in group.runs)}
    for metric in RUN_METRICS:
        vals = [v for r in group.runs if (v := _run_value(r, metric)) is not None]
        out[metric] = round(sum(vals) / len(vals), 3) if vals else None
    if all(r.errors is not None for r in group.runs):
        out["errors"] = sum(r.errors for r in group.runs)
        out["requests"] = sum(r.requests for r in group.runs)
    if all(r.ttfts_s is not None for r in group.runs):
        n = sum(len(r.ttfts_s) for r in group.runs)
        q = stats.tail_quantile(n)
        out["request_samples"] = n
        if q is not None:
            pooled = [t for r in group.runs for t in r.ttfts_s]
            out[f"ttft_{stats.stat_name(q)}_ms"] = round(stats.statistic(q)(pooled) * 1000, 3)
    return out


def _request_samples(group: Group, attr: str):
    if not all(getattr(r, attr) is not None for r in group.runs):
        return None
    return [getattr(r, attr) for r in group.runs]


def compare(groups: dict[str, dict[str, Group]], ours: str) -> dict:
    """class -> {'arms': per-arm means, 'ratios': metric -> baseline -> ratio dict, plus 'best_baseline' and
    'vs_best' (against the baseline arm best on that metric: the lowest ratio)}."""
    out: dict = {}
    for cls, arms in groups.items():
        if ours not in arms:
            continue
        baselines = [a for a in arms if a != ours]
        entry: dict = {"arms": {a: _arm_summary(g) for a, g in arms.items()}, "ratios": {}}
        metrics: dict[str, dict] = {}
        for metric, lower in RUN_METRICS.items():
            per = {}
            for b in baselines:
                r = stats.run_ratio([_run_value(x, metric) for x in arms[ours].runs],
                                    [_run_value(x, metric) for x in arms[b].runs], lower)
                if r is not None:
                    per[b] = r
            if per:
                metrics[f"run:{metric}"] = per
        for name, attr, tail in (("request:ttft_mean", "ttfts_s", False), ("request:ttft_tail", "ttfts_s", True),
                                 ("request:tpot_mean", "tpots_s", False)):
            a = _request_samples(arms[ours], attr)
            per = {}
            for b in baselines if a is not None else ():
                s = _request_samples(arms[b], attr)
                if s is None:
                    continue
                q = stats.tail_quantile(min(sum(map(len, a)), sum(map(len, s)))) if tail else None
                if tail and q is None:
                    continue
                r = stats.request_ratio(a, s, q=q, lower_is_better=True)
                if r is not None:
                    per[b] = r
            if per:
                metrics[name] = per
        for metric, per in metrics.items():
            best = min(per, key=lambda k: per[k]["ratio"])
            entry["ratios"][metric] = {**per, "best_baseline": best, "vs_best": per[best]}
        out[cls] = entry
    return out


def _fmt_ratio(r: dict | None) -> str:
    if r is None:
        return "-"
    ci = r.get("ci95")
    s = f"{r['ratio']:.3f}"
    if ci:
        s += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    if r.get("p_value") is not None:
        s += f" p={r['p_value']:.3g}"
    return s


def format_table(result: dict, ours: str) -> str:
    lines = [f"A/B of sglang.bench_serving runs: ratio > 1 = {ours} better "
             "(latency: baseline ÷ ours; throughput, cached tokens: ours ÷ baseline); "
             "[95% bootstrap CI] p = one-sided bootstrap p-value"]
    for cls, entry in result["classes"].items():
        lines.append("")
        lines.append(f"class {cls}:")
        for arm, s in entry["arms"].items():
            extra = f", errors {s['errors']}/{s['requests']}" if "errors" in s else ""
            tail = next((f", {k} {v}" for k, v in s.items() if k.startswith("ttft_p") or k == "ttft_median_ms"), "")
            lines.append(f"  {arm}: {s['repeats']} runs, {s['completed']} completed, mean TTFT {s['mean_ttft_ms']} ms"
                         f"{tail}, mean TPOT {s['mean_tpot_ms']} ms, cached tokens {s['cached_tokens']}{extra}")
        baselines = [a for a in entry["arms"] if a != ours]
        header = ["metric", *baselines, "vs best baseline"]
        lines.append("  | " + " | ".join(header) + " |")
        lines.append("  |" + "---|" * len(header))
        for metric, per in entry["ratios"].items():
            label = metric
            if metric == "request:ttft_tail":
                label = f"request:ttft_{per['vs_best'].get('stat')}"
            cells = [_fmt_ratio(per.get(b)) for b in baselines]
            cells.append(f"{_fmt_ratio(per['vs_best'])} ({per['best_baseline']})")
            lines.append("  | " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines)


def serving_ab(paths, ours: str = "tiersched") -> dict:
    runs = read_results(paths)
    groups = group_runs(runs)
    arms = sorted({r.arm for r in runs})
    if ours not in arms:
        raise ResultsError(f"no run tagged {ours!r} (arms found: {', '.join(arms)}); pass --ours ARM")
    if len(arms) < 2:
        raise ResultsError(f"only arm {ours!r} found; an A/B needs runs of at least one baseline arm too")
    result = {"ours": ours, "arms": arms, "files": [str(p) for p in paths], "runs": len(runs),
              "classes": compare(groups, ours)}
    headline = result["classes"].get(ALL, {}).get("ratios", {})
    for key, metric in (("ttft_ratio", "run:mean_ttft_ms"), ("cached_tokens_ratio", "run:cached_tokens"),
                        ("tpot_ratio", "run:mean_tpot_ms"), ("output_throughput_ratio", "run:output_throughput")):
        entry = headline.get(metric)
        result[key] = entry["vs_best"]["ratio"] if entry else None
        result[key + "_ci95"] = entry["vs_best"].get("ci95") if entry else None
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", nargs="+", metavar="RESULTS",
                        help="bench_serving --output-file JSONL files (runs tagged --tag ARM or --tag ARM:CLASS)")
    parser.add_argument("--ours", default="tiersched", help="the arm whose ratios are reported (default tiersched)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def main(args) -> int:
    try:
        result = serving_ab(args.results, args.ours)
    except ResultsError as exc:
        print(f"serving-ab: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else format_table(result, args.ours))
    return 0
