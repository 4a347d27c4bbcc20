"""Summaries of live runs and A/B ratios with spread.

A run's summary is plain numbers over its RequestResults. Ratios pair run i of one arm with run i of the other
(runs alternate A B A B, so pairs share the machine's state); we report the geometric mean of the per-pair
ratios and their min/max. Orientation: every ratio is > 1 when tiersched is better (`higher` metrics: ours ÷
upstream; `lower` metrics such as latency: upstream ÷ ours).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from tiersched.live.driver import RequestResult

# metric -> True if higher is better
METRICS = {
    "cached_tokens": True,
    "cached_fraction": True,
    "throughput_tok_s": True,
    "ttft_mean_s": False,
    "ttft_p90_s": False,
    "tpot_mean_s": False,
    "ls_ttft_mean_s": False,
    "be_ttft_mean_s": False,
    "ls_latency_mean_s": False,
    "be_latency_mean_s": False,
}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else None


def summarize(results: Sequence[RequestResult], wall_s: float | None = None) -> dict:
    ok = [r for r in results if r.success]
    end = max((r.sent_s + r.latency for r in ok), default=0.0)
    span = wall_s if wall_s is not None else end
    out = {
        "requests": len(results),
        "completed": len(ok),
        "errors": sum(1 for r in results if r.finished and not r.success),
        "lost": sum(1 for r in results if not r.finished),
        "ttft_mean_s": _mean(r.ttft for r in ok),
        "ttft_p90_s": float(np.percentile([r.ttft for r in ok], 90)) if ok else None,
        "tpot_mean_s": _mean(r.tpot for r in ok),
        "throughput_tok_s": sum(r.completion_tokens for r in ok) / span if span > 0 else None,
        "cached_tokens": int(sum(r.cached_tokens for r in ok)),
        "prompt_tokens": int(sum(r.prompt_len for r in ok)),
        "duration_s": span,
        # requests in the server on average (Little's law); > 1 per rank means requests waited for each other
        "concurrency_mean": sum(r.latency for r in ok) / span if span > 0 else None,
    }
    out["cached_fraction"] = out["cached_tokens"] / out["prompt_tokens"] if out["prompt_tokens"] else 0.0
    for cls in ("ls", "be"):
        sub = [r for r in ok if r.cls == cls]
        out[f"{cls}_requests"] = len(sub)
        out[f"{cls}_ttft_mean_s"] = _mean(r.ttft for r in sub)
        out[f"{cls}_latency_mean_s"] = _mean(r.latency for r in sub)
    ranks = [r.dp_rank for r in results if r.dp_rank is not None]
    out["requests_per_rank"] = np.bincount(ranks).tolist() if ranks else []
    first_error = next((r.error for r in results if r.error), "")
    if first_error:
        out["first_error"] = first_error
    return out


def pair_ratios(ours: Sequence[dict], upstream: Sequence[dict], metric: str) -> dict | None:
    """{'ratio': geometric mean, 'min', 'max', 'per_repeat'} of per-pair ratios oriented so > 1 favours ours."""
    higher = METRICS[metric]
    ratios = []
    for a, b in zip(ours, upstream):
        x, y = a.get(metric), b.get(metric)
        if x is None or y is None:
            continue
        num, den = (x, y) if higher else (y, x)
        if den == 0:
            if num == 0:
                ratios.append(1.0)  # both zero: no difference
            continue
        ratios.append(num / den)
    if not ratios:
        return None
    positive = [r for r in ratios if r > 0]
    geo = float(np.exp(np.mean(np.log(positive)))) if len(positive) == len(ratios) else float(np.mean(ratios))
    return {"ratio": round(geo, 4), "min": round(min(ratios), 4), "max": round(max(ratios), 4),
            "per_repeat": [round(r, 4) for r in ratios]}


def compare_arms(runs: dict[str, list[dict]], ours: str) -> dict:
    """metric -> upstream arm -> ratio dict; plus 'best' = against the upstream arm best on that metric."""
    out: dict = {}
    upstream = [name for name in runs if name != ours and not name.startswith(ours)]  # ablation arms are ours too
    for metric in METRICS:
        per_arm = {name: pair_ratios(runs[ours], runs[name], metric) for name in upstream}
        per_arm = {k: v for k, v in per_arm.items() if v is not None}
        if not per_arm:
            continue
        best = min(per_arm, key=lambda k: per_arm[k]["ratio"])  # the strongest upstream arm gives the lowest ratio
        out[metric] = {**per_arm, "best_upstream": best, "vs_best": per_arm[best]}
    return out


def headline(comparison: dict, metric: str) -> float | None:
    entry = comparison.get(metric)
    return None if entry is None else entry["vs_best"]["ratio"]


def _samples(runs: Sequence[Sequence[RequestResult]], cls: str | None, field: str) -> list[list[float]]:
    """Per repeat, one value per successful request (of class `cls`, or all): its TTFT or TPOT."""
    out = []
    for results in runs:
        vals = []
        for r in results:
            if not r.success or (cls is not None and r.cls != cls):
                continue
            v = r.ttft if field == "ttft" else r.tpot
            if v is not None:
                vals.append(v)
        out.append(vals)
    return out


def request_level_ratios(results: dict[str, Sequence[Sequence[RequestResult]]], ours: str) -> dict:
    """Per-request A/B statistics over every repeat pooled (tiersched.live.stats.request_ratio: ratio > 1 = ours
    better, 95% bootstrap interval resampling requests within each repeat, one-sided p-values).

    Keys: `ttft_mean` (all requests), `ls_ttft_mean`, `ls_ttft_tail` (the LS class at the quantile the
    project's tail rule allows for the smaller arm: P99 from 1,000 samples, else P95), `tpot_mean`. Each:
    upstream arm -> ratio dict, plus `best_upstream` / `vs_best` (the upstream arm with the lowest ratio)."""
    from tiersched.live import stats

    upstream = [name for name in results if name != ours and not name.startswith(ours)]
    specs = {"ttft_mean": (None, "ttft", False), "ls_ttft_mean": ("ls", "ttft", False),
             "ls_ttft_tail": ("ls", "ttft", True), "tpot_mean": (None, "tpot", False)}
    out: dict = {}
    for key, (cls, field, tail) in specs.items():
        mine = _samples(results[ours], cls, field)
        per_arm = {}
        for name in upstream:
            theirs = _samples(results[name], cls, field)
            q = None
            if tail:
                q = stats.tail_quantile(min(sum(map(len, mine)), sum(map(len, theirs))))
                if q is None:
                    continue
            r = stats.request_ratio(mine, theirs, q=q)
            if r is not None:
                per_arm[name] = r
        if per_arm:
            best = min(per_arm, key=lambda k: per_arm[k]["ratio"])
            out[key] = {**per_arm, "best_upstream": best, "vs_best": per_arm[best]}
    return out
