"""Upstream SGLang's tunable flag space as the simulator models it, and a pruned search for its best setting.

A combination is one value per `Dimension` (an upstream flag): the waiting-queue ordering (`--schedule-policy`,
with `--enable-priority-scheduling` as the `-priority` orderings), `--load-balance-method`, `--eplb-algorithm`
(incl. none), and the SchedulerSettings fields that play upstream's scheduler flags. A dimension whose
SchedulerSettings field does not exist, or whose non-default values the simulator refuses to run, is left out and
listed with the reason. Adding a dimension is one `Dimension(...)` line in `dimensions()`.

Search (`search`), per metric (each metric gets its own winner):
1. every ordering x every load-balance method, every other flag at upstream's default;
2. coordinate descent from the best of step 1 on that metric: for each dimension in turn, try all of its values with
   the others fixed, keep the best (the current value wins ties); repeat passes until a pass changes nothing (at most
   `max_passes`). Runs are memoised, so the descents of different metrics share what they have both run;
3. the winner of a metric is the best of *every* combination run (never worse than anything searched).
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from tiersched.sim import PolicySet
from tiersched.sim.policies import DISPATCHERS, ORDERINGS
from tiersched.sim.presets import Preset
from tiersched.sim.presets.base import SchedulerSettings
from tiersched.sim.upstream_eplb import UPSTREAM_EPLB_NAMES

CHUNK_SIZES = (1024, 2048, 4096, 8192)  # per DP rank (upstream divides --chunked-prefill-size by the DP size)
TUNED_EPLB_STEPS = 250  # the tuned --eplb-rebalance-num-iterations tried beside upstream's default
OUR_ORDERINGS = ("tiersched",)
OUR_DISPATCH = ("tiersched", "vllm-dp")  # vllm-dp: vLLM's DP balancer, a reference row, not an upstream SGLang flag
# Upstream choices the simulator does not run, and why (reported in the output).
NOT_MODELLED = {
    "--schedule-policy dfs-weight": "allowed with DP attention in 0.5.23 (no launch check ties --schedule-policy to DP "
                                    "attention; it falls back to fcfs only when the radix cache is disabled, and "
                                    "unlike lpm/hrrn it keeps sorting above 128 waiting); not modelled: it orders by "
                                    "subtree weights of upstream's radix tree (tree_cache.dfs_weight_order over each "
                                    "request's req.last_node, children visited heaviest first), and the simulator's "
                                    "prefix cache keeps per-rank block sets, not a radix tree with node weights",
    "--schedule-policy routing-key": "a --schedule-policy value (0.5.23 has no routing-key --load-balance-method), "
                                     "allowed with DP attention; it sorts only when a running request carries a "
                                     "client-set routing_key, and none of these workloads carries one, so it leaves "
                                     "the queue as it is: the same runs as fcfs, which is searched",
    "--schedule-policy priority": "accepted by the argument parser but SchedulePolicy raises 'Unknown "
                                  "schedule_policy' at start-up (no policy of that name); priority scheduling is "
                                  "--enable-priority-scheduling, searched where the workload has priorities",
    "--load-balance-method follow_bootstrap_room": "PD-disaggregation prefill servers only (not this deployment)",
    "--load-balance-method auto": "resolves to round_robin without PD disaggregation (searched)",
}


@dataclass(frozen=True)
class Dimension:
    name: str  # key in a combination; for target "scheduler" also the SchedulerSettings field
    flag: str  # the upstream flag it plays
    values: tuple  # values searched
    default: Any  # upstream's default: where the search starts
    target: str = "scheduler"  # "policy" (a PolicySet field) or "scheduler" (a SchedulerSettings field)
    active: Callable[[dict], bool] = lambda combo: True  # False: the flag does nothing here, keep the default
    to_flag: Callable[[Any, Preset], str] | None = None  # how the value reads as an upstream flag
    short: str = ""  # name in labels (default: name)

    def flag_text(self, value, preset: Preset) -> str:
        if self.to_flag is not None:
            return self.to_flag(value, preset)
        if isinstance(value, bool):
            return self.flag if value else ""
        return "" if value is None else f"{self.flag} {value}"


def upstream_orderings(has_priorities: bool) -> tuple[str, ...]:
    """The registry's upstream orderings; the `-priority` ones (`--enable-priority-scheduling`) only when the
    workload has more than one priority (otherwise they order exactly as their plain version)."""
    names = [n for n in ORDERINGS if n not in OUR_ORDERINGS]
    return tuple(n for n in names if has_priorities or not n.endswith("-priority"))


def upstream_dispatchers() -> tuple[str, ...]:
    return tuple(n for n in DISPATCHERS if n not in OUR_DISPATCH)


def upstream_eplb() -> tuple[str, ...]:
    """"none" and every upstream `--eplb-algorithm` value the simulator's registry exports."""
    return ("none", *UPSTREAM_EPLB_NAMES)


def _ordering_flag(value: str, preset: Preset) -> str:
    if value.endswith("-priority"):
        return f"--schedule-policy {value[:-len('-priority')]} --enable-priority-scheduling"
    return f"--schedule-policy {value}"


def dimensions(preset: Preset, has_priorities: bool) -> list[Dimension]:
    """Every upstream flag the search varies, in coordinate-descent order."""
    sched = preset.scheduler
    eplb_on = lambda c: c.get("eplb", "none") != "none"
    delayer_on = lambda c: bool(c.get("enable_prefill_delayer"))
    dims = [
        Dimension("ordering", "--schedule-policy", upstream_orderings(has_priorities), "fcfs", "policy",
                  to_flag=_ordering_flag),
        Dimension("dispatch", "--load-balance-method", upstream_dispatchers(), "round_robin", "policy"),
        Dimension("chunked_prefill_size", "--chunked-prefill-size",
                  tuple(sorted(set(CHUNK_SIZES) | {sched.chunked_prefill_size})), sched.chunked_prefill_size,
                  to_flag=lambda v, p: f"--chunked-prefill-size {v * p.dp}", short="chunk"),
        Dimension("eplb", "--eplb-algorithm", upstream_eplb(), "none", "policy",
                  to_flag=lambda v, p: "" if v == "none" else f"--enable-eplb --eplb-algorithm {v}"),
        Dimension("eplb_rebalance_steps", "--eplb-rebalance-num-iterations",
                  tuple(sorted({sched.eplb_rebalance_steps, TUNED_EPLB_STEPS})), sched.eplb_rebalance_steps,
                  active=eplb_on, short="eplb-steps"),
        Dimension("enable_mixed_chunk", "--enable-mixed-chunk", (False, True), False, short="mixed"),
        Dimension("enable_prefill_delayer", "--enable-prefill-delayer", (False, True), False, short="delayer"),
        Dimension("prefill_delayer_max_delay_passes", "--prefill-delayer-max-delay-passes", (10, 30, 60), 30,
                  active=delayer_on, short="delay-passes"),
        Dimension("prefill_delayer_token_usage_low_watermark", "--prefill-delayer-token-usage-low-watermark",
                  (None, 0.3, 0.6), None, active=delayer_on, short="low-watermark"),
        Dimension("prefill_delayer_queue_min_ratio", "--prefill-delayer-queue-min-ratio", (None, 0.1, 0.3, 0.5),
                  None, active=delayer_on, short="queue-ratio"),
    ]
    return dims


def usable_dimensions(dims: list[Dimension], probe: Callable[[dict], str | None]) -> tuple[list[Dimension], dict]:
    """Split `dims` into those the simulator runs and {flag: why not} for the rest. `probe(changes)` returns None
    when a preset with these SchedulerSettings changes simulates, else the reason it does not."""
    fields = {f.name for f in dataclasses.fields(SchedulerSettings)}
    kept, dropped = [], {}
    for d in dims:
        if d.target == "scheduler" and d.name not in fields:
            dropped[d.flag] = "no SchedulerSettings field for it in the simulator yet"
            continue
        if d.target == "scheduler":
            reason = next((r for v in d.values if v != d.default
                           for r in [probe({d.name: v, **_enablers(d, dims)})] if r), None)
            if reason:
                dropped[d.flag] = reason
                continue
        kept.append(d)
    return kept, dropped


def _enablers(d: Dimension, dims: list[Dimension]) -> dict:
    """Values that make `d` active (for probing a knob of the prefill delayer, the delayer itself on)."""
    if d.name.startswith("prefill_delayer_"):
        return {"enable_prefill_delayer": True}
    return {}


def default_combination(dims: list[Dimension]) -> dict:
    return {d.name: d.default for d in dims}


def combination_key(combo: dict) -> tuple:
    return tuple(sorted(combo.items(), key=lambda kv: kv[0]))


def label(combo: dict, dims: list[Dimension]) -> str:
    """ordering/dispatch/eplb, then the chunk size and every other scheduler value that is not upstream's default."""
    parts = [str(combo["ordering"]), str(combo["dispatch"]), str(combo.get("eplb", "none"))]
    return "/".join(parts) + scheduler_label(scheduler_changes(combo, dims), dims)


def scheduler_label(changes: tuple, dims: list[Dimension]) -> str:
    """' chunk=1024 mixed=True ...': the chunk size and every SchedulerSettings change off upstream's default."""
    by_name = {d.name: d for d in dims}
    extra = [f"{by_name[k].short or k}={v}" for k, v in changes
             if k in by_name and (k == "chunked_prefill_size" or v != by_name[k].default)]
    return "" if not extra else " " + " ".join(extra)


def flags(combo: dict, dims: list[Dimension], preset: Preset) -> str:
    """The combination as upstream launch flags (`--chunked-prefill-size` as the user passes it: the per-rank size
    times the DP size, which upstream divides back under DP attention)."""
    out = []
    for d in dims:
        if not d.active(combo) or (d.target == "scheduler" and combo[d.name] == d.default
                                   and d.name != "chunked_prefill_size"):
            continue
        text = d.flag_text(combo[d.name], preset)
        if text:
            out.append(text)
    return " ".join(out)


def scheduler_flags(changes: tuple, dims: list[Dimension], preset: Preset) -> str:
    """SchedulerSettings changes (as `scheduler_changes` gives them) as the upstream flags they play: the chunk size
    always, every other one only off upstream's default (e.g. what one of our rows runs with)."""
    by_name = {d.name: d for d in dims}
    out = []
    for k, v in changes:
        d = by_name.get(k)
        if d is None or (v == d.default and k != "chunked_prefill_size"):
            continue
        text = d.flag_text(v, preset)
        if text:
            out.append(text)
    return " ".join(out)


def policy_set(combo: dict) -> PolicySet:
    return PolicySet(ordering=combo["ordering"], dispatch=combo["dispatch"], eplb=combo.get("eplb", "none"))


def scheduler_changes(combo: dict, dims: list[Dimension]) -> tuple:
    """The combination's SchedulerSettings values as (field, value) pairs (inactive ones at their default)."""
    return tuple((d.name, combo[d.name] if d.active(combo) else d.default) for d in dims if d.target == "scheduler")


def normalise(combo: dict, dims: list[Dimension]) -> dict:
    """Inactive dimensions back to their default, so equal runs share one memo entry."""
    return {d.name: (combo[d.name] if d.active(combo) else d.default) for d in dims}


@dataclass
class SearchResult:
    dims: list[Dimension]
    runs: dict = field(default_factory=dict)  # combination key -> metrics dict
    combos: dict = field(default_factory=dict)  # combination key -> combination
    winners: dict = field(default_factory=dict)  # metric -> combination key
    paths: dict = field(default_factory=dict)  # metric -> [labels of the descent's successive positions]
    passes: dict = field(default_factory=dict)  # metric -> passes the descent made

    def value(self, key, metric: str) -> float:
        v = self.runs[key].get(metric)
        return float("inf") if v is None else float(v)


def _rank(result: SearchResult, key, metric: str):
    m = result.runs[key]
    return (result.value(key, metric), -(m.get("throughput") or 0.0))


def search(dims: list[Dimension], metrics: list[str], run: Callable[[list[dict]], list[dict]],
           max_passes: int = 3) -> SearchResult:
    """Coordinate descent per metric over `dims` (module docstring). `run(combos)` simulates each combination
    (in parallel as it likes) and returns their metrics dicts in order; lower is better for every metric.
    max_passes 0: only the ordering x load-balance grid at upstream's other defaults."""
    res = SearchResult(dims)

    def ensure(combos: list[dict]) -> list[tuple]:
        keys, todo = [], {}
        for c in combos:
            c = normalise(c, dims)
            k = combination_key(c)
            keys.append(k)
            if k not in res.runs and k not in todo:
                todo[k] = c
        if todo:
            for k, m in zip(todo, run(list(todo.values()))):
                res.runs[k], res.combos[k] = m, todo[k]
        return keys

    by_name = {d.name: d for d in dims}
    start = default_combination(dims)
    grid = [dict(start, ordering=o, dispatch=d) for o, d in itertools.product(by_name["ordering"].values,
                                                                                by_name["dispatch"].values)]
    grid_keys = ensure(grid)
    state = {}
    for metric in metrics:
        best = min(grid_keys, key=lambda k: _rank(res, k, metric))
        state[metric] = {"cur": best, "dim": 0, "pass": 0, "changed": False, "done": max_passes < 1}
        res.paths[metric] = [label(res.combos[best], dims)]
    while not all(s["done"] for s in state.values()):
        wanted = {}
        for metric, s in state.items():
            if s["done"]:
                continue
            d = dims[s["dim"]]
            cur = res.combos[s["cur"]]
            wanted[metric] = [] if not d.active(cur) else [dict(cur, **{d.name: v}) for v in d.values]
        flat = [c for cs in wanted.values() for c in cs]
        keys = iter(ensure(flat))
        for metric, cands in wanted.items():
            s = state[metric]
            cand_keys = [next(keys) for _ in cands]
            if cand_keys:
                best = min(cand_keys, key=lambda k: (_rank(res, k, metric), k != s["cur"]))
                if _rank(res, best, metric) < _rank(res, s["cur"], metric):
                    s["cur"], s["changed"] = best, True
                    res.paths[metric].append(label(res.combos[best], dims))
            s["dim"] += 1
            if s["dim"] == len(dims):
                s["pass"] += 1
                if not s["changed"] or s["pass"] >= max_passes:
                    s["done"] = True
                s["dim"], s["changed"] = 0, False
    for metric in metrics:
        res.winners[metric] = min(res.runs, key=lambda k: _rank(res, k, metric))
        res.passes[metric] = state[metric]["pass"]
    return res


def space_report(res: SearchResult, dropped: dict, preset: Preset, metrics: dict, seeds: list[int],
                 max_passes: int) -> dict:
    """`upstream_best_space`: what was searched, how, and how many runs it took."""
    dims = res.dims
    full = int(np.prod([len(d.values) for d in dims]))
    return {
        "dimensions": {d.flag: {"field": d.name, "values": list(d.values), "default": d.default,
                                **({"only_with": "an EPLB algorithm"} if d.name == "eplb_rebalance_steps" else {}),
                                **({"only_with": "--enable-prefill-delayer"}
                                   if d.name.startswith("prefill_delayer_") else {})}
                       for d in dims},
        "chunked_prefill_size_unit": (f"tokens per DP rank; the upstream flag value is this x dp = {preset.dp} "
                                      "(upstream divides --chunked-prefill-size by the DP size under DP attention)"),
        "max_prefill_tokens": (f"{preset.scheduler.max_prefill_tokens} at every chunk size: upstream's default, which "
                               "upstream does not scale with --chunked-prefill-size (the chunk budget binds first)"),
        "method": ("every ordering x every load-balance method at upstream's other defaults; then, per metric, "
                   "coordinate descent from the best of those on that metric: each dimension in turn tried at all "
                   "its values with the others fixed, the best kept (ties keep the current value), passes repeated "
                   f"until one changes nothing (at most {max_passes}); a dimension that does nothing in a combination "
                   "(EPLB interval without EPLB, delayer knobs without the delayer) stays at its default. Each "
                   "metric's winner is the best of every combination run on it.")
        if max_passes > 0 else ("every ordering x every load-balance method at upstream's other defaults only "
                                "(no coordinate descent: 0 passes); each metric's winner is the best of those"),
        "search_seeds": seeds,
        "metrics": metrics,
        "runs": len(res.runs),
        "full_grid_size": full,
        "passes": res.passes,
        "descent_paths": res.paths,
        "not_searched": {**dropped, **NOT_MODELLED},
        "results": [{"label": label(res.combos[k], dims),
                     **{m: res.runs[k].get(m) for m in ("ttft_mean", "tpot_mean", "ttft_p95", "ttft_p99",
                                                        "throughput", "finished")}}
                    for k in res.runs],
    }
