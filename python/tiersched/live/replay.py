"""Record a live run (arrivals + dispatch decisions + outcomes) to JSONL and replay it in the simulator.

Record format (one JSON object per line):
  line 1  {"type": "meta", "deployment", "arm", "server_args", "set", "source", "block_tokens", "dp", "repeat"}
  then    {"type": "request", "rid", "arrival_s" (when it was actually sent), "input_tokens", "output_tokens",
           "priority", "cls", "prefix_blocks" (the prompt's full blocks, chained ids), "dp_rank" (from
           meta_info.dp_rank), "success", "ttft_s", "latency_s", "tpot_s", "cached_tokens"}

Replay turns the rows into a simulator Workload (same arrivals, lengths, priorities, prefix blocks) and simulates
it on the `cpu-tiny` preset (the tiny model on this CPU, calibrated by the simulator's profiling run) under:
the policy set that actually ran (its error against the live metrics is the simulator's error), the recorded
dispatch itself (`RecordedDispatch`: each request goes to the rank it really went to, so only the rank model
is tested), and counterfactual policy sets.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from tiersched.live.driver import RequestResult
from tiersched.live.requests import RequestSet
from tiersched.core.engine import Decision, Dispatcher, DispatchRequest, RankLoad

# Which simulator policies mirror each live arm (names from tiersched.sim.policies).
ARM_POLICIES = {
    "upstream-lpm": {"ordering": "lpm", "dispatch": "total_tokens"},
    "upstream-priority": {"ordering": "fcfs-priority", "dispatch": "total_tokens"},
    "tiersched": {"ordering": "tiersched", "dispatch": "tiersched"},
}
CLASS_NAMES = ("be", "ls")
COMPARED = ("ttft_mean_s", "ls_ttft_mean_s", "be_ttft_mean_s", "tpot_mean_s", "cached_fraction")


def write_record(path: str | Path, meta: dict, request_set: RequestSet, results: Sequence[RequestResult]) -> None:
    with open(path, "w") as f:
        f.write(json.dumps({"type": "meta", "set": request_set.name, "source": request_set.source,
                            "block_tokens": request_set.block_tokens, **meta}) + "\n")
        for req, res in zip(request_set.requests, results):
            f.write(json.dumps({
                "type": "request", "rid": req.rid, "arrival_s": round(res.sent_s, 6),
                "input_tokens": len(req.input_ids), "output_tokens": req.output_len, "priority": req.priority,
                "cls": req.cls, "prefix_blocks": list(req.prefix_blocks), "dp_rank": res.dp_rank,
                "success": res.success, "ttft_s": res.ttft, "latency_s": res.latency, "tpot_s": res.tpot,
                "cached_tokens": res.cached_tokens, "finished": res.finished, "error": res.error,
                "completion_tokens": res.completion_tokens,
            }) + "\n")


def read_record(path: str | Path) -> tuple[dict, list[dict]]:
    meta, rows = {}, []
    with open(path) as f:
        for line in f:
            obj = json.loads(line)
            if obj.get("type") == "meta":
                meta = obj
            else:
                rows.append(obj)
    if not meta:
        raise ValueError(f"{path} has no meta line; it is not a live-run record.")
    return meta, rows


def results_from_rows(rows: Sequence[dict]) -> list[RequestResult]:
    """The driver's results back from a record's request rows. Records written before `finished` was kept count
    a failed request as lost (never answered)."""
    out = []
    for r in rows:
        ok = bool(r["success"])
        out.append(RequestResult(
            r["rid"], r["cls"], int(r["priority"]), int(r["input_tokens"]), int(r["output_tokens"]),
            sent_s=float(r["arrival_s"]), success=ok, finished=bool(r.get("finished", ok)), error=r.get("error") or "",
            ttft=float(r["ttft_s"] or 0.0), latency=float(r["latency_s"] or 0.0),
            completion_tokens=int(r.get("completion_tokens", r["output_tokens"] if ok else 0)),
            cached_tokens=int(r["cached_tokens"] or 0), dp_rank=r["dp_rank"]))
    return out


def live_metrics(rows: Sequence[dict]) -> dict:
    ok = [r for r in rows if r["success"]]

    def mean(values):
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    prompt = sum(r["input_tokens"] for r in ok)
    out = {"ttft_mean_s": mean(r["ttft_s"] for r in ok), "tpot_mean_s": mean(r["tpot_s"] for r in ok),
           "cached_fraction": sum(r["cached_tokens"] for r in ok) / prompt if prompt else None}
    for cls in CLASS_NAMES:
        out[f"{cls}_ttft_mean_s"] = mean(r["ttft_s"] for r in ok if r["cls"] == cls)
    ranks = [r["dp_rank"] for r in rows if r["dp_rank"] is not None]
    out["requests_per_rank"] = np.bincount(ranks).tolist() if ranks else []
    return out


def to_workload(meta: dict, rows: Sequence[dict]):
    from tiersched.sim.workloads import Workload

    arrival = np.array([r["arrival_s"] for r in rows], dtype=float)
    order = np.argsort(arrival, kind="stable")
    rows = [rows[i] for i in order]
    return Workload(
        name=f"live:{meta.get('deployment')}/{meta.get('arm')}",
        arrival_s=arrival[order] - arrival[order][0],
        input_tokens=np.array([r["input_tokens"] for r in rows], dtype=np.int64),
        output_tokens=np.array([max(1, r["output_tokens"]) for r in rows], dtype=np.int64),
        priority=np.array([r["priority"] for r in rows], dtype=np.int64),
        class_of=np.array([CLASS_NAMES.index(r["cls"]) for r in rows], dtype=np.int64),
        class_names=CLASS_NAMES,
        prefix_blocks=tuple(tuple(r["prefix_blocks"]) for r in rows),
        block_tokens=int(meta.get("block_tokens") or 1),
        ignore_eos=np.ones(len(rows), dtype=bool),  # the live driver sends every request with ignore_eos
        meta={"recorded_ranks": [r["dp_rank"] for r in rows]},
    ), rows


class RecordedDispatch(Dispatcher):
    """Dispatcher that sends simulator request i where the live controller sent it (simulator rids are indices)."""

    name = "recorded"

    def __init__(self, ranks: Sequence[int | None], dp: int) -> None:
        self.ranks = [0 if r is None else int(r) % dp for r in ranks]

    def update_loads(self, loads: Sequence[RankLoad], now_s: float) -> None:
        pass

    def pick(self, req: DispatchRequest, now_s: float) -> Decision:
        return Decision(rank=self.ranks[int(req.rid)])


def sim_metrics(result) -> dict:
    m = result.metrics
    per_class = m.get("per_class", {})
    out = {"ttft_mean_s": m.get("ttft_mean"), "tpot_mean_s": m.get("tpot_mean"),
           "cached_fraction": m.get("cache_hit_rate"), "requests_per_rank": m.get("requests_per_rank")}
    for cls in CLASS_NAMES:
        out[f"{cls}_ttft_mean_s"] = per_class.get(cls, {}).get("ttft_mean")
    return out


def relative_errors(sim: dict, live: dict) -> dict:
    out = {}
    for key in COMPARED:
        a, b = sim.get(key), live.get(key)
        out[key] = None if a is None or b is None or b == 0 else round(a / b - 1.0, 4)
    return out


def replay(record_path: str | Path, counterfactuals: Sequence[str] = tuple(ARM_POLICIES), preset_name="cpu-tiny",
           seed: int = 0) -> dict:
    """Simulate a recorded run: error on the policy that ran, the recorded dispatch, and counterfactual arms.

    Returns {"status": "pending", "reason"} when the preset is not available (e.g. cpu-tiny not calibrated yet).
    """
    from tiersched.sim import PolicySet, get_preset, simulate

    meta, rows = read_record(record_path)
    try:
        preset = get_preset(preset_name)
    except ValueError as exc:
        return {"status": "pending", "reason": str(exc)}
    preset = dataclasses.replace(preset, dp=int(meta.get("dp") or preset.dp))
    workload, rows = to_workload(meta, rows)
    live = live_metrics(rows)
    ran = meta["arm"]
    out = {"status": "ok", "record": str(record_path), "ran": ran, "preset": preset.name, "live": live,
           "simulated": {}}

    def run(label, policies):
        metrics = sim_metrics(simulate(preset, workload, policies, seed=seed))
        out["simulated"][label] = metrics
        return metrics

    run("recorded-dispatch", PolicySet(ordering=ARM_POLICIES[ran]["ordering"], preemption="auto",
                                       dispatch=RecordedDispatch(workload.meta["recorded_ranks"], preset.dp)))
    for arm in dict.fromkeys([ran, *counterfactuals]):
        run(arm, PolicySet(**ARM_POLICIES[arm]))
    out["error_on_ran_policy"] = relative_errors(out["simulated"][ran], live)
    out["error_with_recorded_dispatch"] = relative_errors(out["simulated"]["recorded-dispatch"], live)
    return out
