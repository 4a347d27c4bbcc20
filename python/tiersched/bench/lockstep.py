"""`python -m tiersched.bench lockstep [--json]`: the lockstep step plan against upstream at its best.

Grid: presets x synthetic length shapes x loads x seeds. Load = offered rate / the deployment's measured capacity
for that shape (upstream fcfs/round_robin at its default chunk, offered 3x the analytic estimate, requests
finished per second of the whole run). Every arm of a configuration runs on the same requests.

upstream-best: per preset x shape, a pruned search of upstream's flag space (bench/upstream_space.py, the space
`bench compare` searches) at one load and seed (`--search-load`, seed 0): every ordering x every load-balance
method, then coordinate descent per metric (mean TTFT, mean TPOT, throughput) over `--chunked-prefill-size`,
`--enable-mixed-chunk`, `--enable-prefill-delayer` and its knobs (`--search-passes` passes). From each metric's
winner two more descents start, one with the prefill delayer forced on (chunk size and the delayer's knobs
searched) and one with mixed chunking forced on (chunk size searched), so the delayer and mixed chunking are
always candidates. The candidates: each metric's winner at every chunk size (so the chunk size is tuned per
load), and per metric the best combination with the delayer and the best with mixed chunking. Every candidate runs
on every load at the first seed; each metric's best of them there also runs on the other seeds (tuned once per
load, then served). Upstream-best of a configuration is the best candidate it ran, per metric (TTFT and TPOT may
have different winners).
Expert placement is not searched: every arm here (ours and both references) runs upstream's trivial placement.
The JSON's `upstream_space_searched` says what was searched, how it was pruned and what each search ran.

ours: the step plan on (`PolicySet(step_plan="tiersched")`) with the static flags a tiersched user sets as for
upstream, chosen per metric at the search load like upstream's: fcfs / round_robin, the ordering and
load-balance method of an upstream winner, or fcfs or a winner's ordering with tiersched's score dispatch
(`--load-balance-method score`, EngineTierConfig defaults), each without and with mixed chunking (not the prefill
delayer, which the plan replaces), each also with the plan's other profiles (`PLAN_PROFILES`: its [request]
settings, chosen per metric the same way as upstream's delayer knobs are; the hold profiles with mixed chunking
only); the preset's chunk size is
the plan's upper budget (the plan is adaptive, so it gets no chunk tuning). `plan_on_upstream_defaults` reports
the plan on fcfs / round_robin without mixed chunking, default settings, beside it.

References, each given the static freedoms upstream has (the ordering and load-balance method of each metric's
upstream winner x chunk size x mixed chunking; the best per metric at the search load is evaluated everywhere and
the best of those taken per configuration): perfect balance (`ideal_balance`: every max over ranks a mean; also
run on every upstream candidate as it is, prefill delayer included) and the tighter lockstep-free reference (`lockstep_free`: every rank on its own clock, each request's attention on
its own rank, MoE as it is). Neither is a proven lower bound on every plan; where upstream-best is below a
reference on a metric, that configuration has no headroom against it (None, left out of the medians).

Fields: headroom captured = (upstream_best - ours) / (upstream_best - reference) per metric, median over the
configurations at load >= 0.7, against perfect balance (`headroom_captured_tpot`, `headroom_captured_ttft`) and
against lockstep-free (`..._vs_lockstep_free`); `headroom_of_lockstep_free_vs_perfect_balance`: the share of the
perfect-balance headroom the lockstep-free reference itself captures (removing every lockstep stall and nothing
else; below the 50% goal it says that goal is out of reach of step shaping); `saturation_throughput_vs_bound`
(ours / perfect balance at the highest load); `worst_loss`: the largest relative regression of ours against
upstream-best on mean TTFT, mean TPOT or throughput anywhere. Mixed priority (LS/BE at 1.5x capacity, the request
bench's scenario): prefix-aging with the plan and mixed chunking vs fcfs-priority at its best chunk size,
prefill delayer and mixed chunking; `ls_tail_over_floor` (LS P99 with >= 1000 LS samples, else P95, over the LS-alone floor) and
`be_throughput_loss`. Durations are short so the grid fits 10 minutes on 2 cores; the output states them, the
CPU seconds used and the load average.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

from tiersched.bench.stats import headroom, tail_percentile

PRESETS = ("qwen3-dp4ep4", "qwen3-dp2tp2ep4", "deepseek-v3-32")
LOADS = (0.5, 0.7, 0.85, 1.0, 1.2)
CHUNKS = (1024, 2048, 4096, 8192)
METRICS = ("ttft_mean", "tpot_mean", "throughput")
SEARCH_METRICS = {"ttft_mean": "ttft_mean", "tpot_mean": "tpot_mean", "throughput": "neg_throughput"}
DURATION_S = {"qwen3-dp4ep4": 3.0, "qwen3-dp2tp2ep4": 3.0, "deepseek-v3-32": 2.0}  # --duration-s 0: these
SEARCH_LOAD = 1.0
# The plan's [request] settings ours may run with, chosen per metric at the search load like upstream's flags
# (the delayer's knobs, the chunk size): the defaults; "hold" (plan_hold_s: the group holds a lone prefill for a
# step while the predicted lockstep stall saved outweighs the waiting requests' wait, up to 0.5 s;
# plan_decode_weight 10: a running request's second of decode delay counts 10 waiting seconds; no min-chunk
# alignment, which the hold replaces); "hold-tpot" (the same hold with a running request's second counting 100:
# the TPOT end of the trade-off, as upstream's delayer at 60 passes is, at a TTFT cost); "chunk-256" and
# "chunk-1024" (no alignment, and a rank with demand prefills at least 256 / 1024 tokens a step: fewer, fuller
# prefill steps, the TTFT end). The hold profiles are tried with mixed chunking only (without it every decode of
# an aligned step is lost, so holding rarely pays); `PROFILES_MIXED_ONLY`.
PLAN_PROFILES = {"default": (),
                 "hold": (("plan_align_weight", 0.0), ("plan_decode_weight", 10.0), ("plan_hold_s", 0.5)),
                 "hold-tpot": (("plan_align_weight", 0.0), ("plan_decode_weight", 100.0), ("plan_hold_s", 0.5)),
                 "chunk-256": (("plan_align_weight", 0.0), ("min_chunk_tokens", 256)),
                 "chunk-1024": (("plan_align_weight", 0.0), ("min_chunk_tokens", 1024))}
PROFILES_MIXED_ONLY = frozenset({"hold", "hold-tpot"})
SEARCH_SEED = 0
SEARCH_PASSES = 2
NOT_SEARCHED = {
    "--eplb-algorithm, --eplb-rebalance-num-iterations": (
        "expert placement is held at upstream's trivial placement in every arm of this bench (ours and both "
        "references), so the comparison isolates step shaping; `bench compare` searches it"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from tiersched.sim.workloads import SHAPES

    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--loads", default=",".join(map(str, LOADS)))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--duration-s", type=float, default=0.0,
                        help="seconds of arrivals per configuration (0: per preset, " +
                             ", ".join(f"{k} {v:g}" for k, v in DURATION_S.items()) + ")")
    parser.add_argument("--search-load", type=float, default=SEARCH_LOAD,
                        help="load at which upstream's flags are searched (seed 0)")
    parser.add_argument("--search-passes", type=int, default=SEARCH_PASSES,
                        help="coordinate-descent passes per metric over upstream's flags (at most)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--mixed-duration-s", type=float, default=30.0,
                        help="seconds of arrivals of the mixed-priority scenario (0 skips it)")
    parser.add_argument("--mixed-seeds", default="0,1,2")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def _csv(text: str, cast=str) -> list:
    return [cast(x.strip()) for x in text.split(",") if x.strip()]


# ---- one simulation ------------------------------------------------------------------------------------------
# A run is (preset, shape, rate, duration_s, seed, arm, ordering, dispatch, scheduler changes): arm "upstream",
# "ours" (the plan with its default settings), "ours:PROFILE" (the plan with PLAN_PROFILES[PROFILE]), "ideal"
# (perfect balance) or "free" (lockstep-free). Equal tuples are run once.

def _workload(shape: str, rate: float, duration_s: float, seed: int):
    from tiersched.sim import workloads

    return workloads.synthetic(shape, rate=rate, duration_s=duration_s, seed=seed)


def _simulate(run: tuple) -> dict:
    from tiersched.sim import PolicySet, get_preset, simulate

    preset, shape, rate, duration_s, seed, arm, ordering, dispatch, changes = run
    p = get_preset(preset).with_scheduler(**dict(changes))
    kwargs = {"ideal": {"ideal_balance": True}, "free": {"lockstep_free": True}}.get(arm, {})
    plan = "none"
    if arm.startswith("ours"):
        from tiersched.core.request import RequestTierConfig

        plan = RequestTierConfig(**dict(PLAN_PROFILES[arm.partition(":")[2] or "default"]))
    policies = PolicySet(ordering=ordering, dispatch=dispatch, step_plan=plan)
    m = simulate(p, _workload(shape, rate, duration_s, seed), policies, seed=seed, record_timeline=False,
                 **kwargs).metrics
    out = {k: m[k] for k in METRICS + ("finished", "requests")}
    out["neg_throughput"] = -m["throughput"]
    return out


def _capacity(job) -> tuple:
    """(preset, shape) -> requests/s upstream sustains: offered 3x the analytic estimate for 6 s, finished / span."""
    from tiersched.sim import capacity, get_preset, simulate

    preset, shape = job
    p = get_preset(preset)
    probe = _workload(shape, 1.0, 4000.0, 999)
    rate = 3.0 * capacity.nominal_capacity_req_s(p, float(probe.input_tokens.mean()), float(probe.output_tokens.mean()))
    m = simulate(p, _workload(shape, rate, 6.0, 999), record_timeline=False).metrics
    return preset, shape, m["throughput_req_s"]


def _refusal(job) -> tuple:
    """(preset, changes) -> (preset, changes, None or why the simulator refuses these SchedulerSettings)."""
    from tiersched.sim import get_preset, simulate, workloads

    preset, changes = job
    try:
        simulate(get_preset(preset).with_scheduler(**dict(changes)),
                 workloads.synthetic("Random", rate=20.0, duration_s=0.2, seed=0), record_timeline=False)
    except (NotImplementedError, ValueError) as e:
        return preset, changes, f"the simulator refuses it: {e}"
    return preset, changes, None


class Runner:
    """Runs simulations on a process pool, each distinct run once (memo shared by every phase and thread)."""

    def __init__(self, workers: int, progress=None):
        import multiprocessing as mp

        self.pool = ProcessPoolExecutor(max(1, workers), mp_context=mp.get_context("fork"))
        self.memo: dict = {}
        self.lock = threading.Lock()
        self.progress = progress
        self.done = 0

    def submit(self, runs: list[tuple]) -> None:
        """Queue the runs not run or queued yet."""
        with self.lock:
            for r in runs:
                if r not in self.memo:
                    self.memo[r] = self.pool.submit(_simulate, r)
                    self.memo[r].add_done_callback(self._finished)

    def _finished(self, _future) -> None:
        with self.lock:
            self.done += 1
            if self.progress and self.done % 200 == 0:
                self.progress(f"{self.done} simulations")

    def run(self, runs: list[tuple]) -> list[dict]:
        """The metrics of each run, simulating those not run yet."""
        self.submit(runs)
        out = []
        for r in runs:
            v = self.memo[r]
            if not isinstance(v, dict):
                v = v.result()
                with self.lock:
                    self.memo[r] = v
            out.append(v)
        return out

    def close(self) -> None:
        self.pool.shutdown()


# ---- upstream-best: search per preset x shape -----------------------------------------------------------------

def _dimensions(preset: str, probe_results: dict):
    from tiersched.bench import upstream_space as space
    from tiersched.sim import get_preset

    dims = [d for d in space.dimensions(get_preset(preset), has_priorities=False)
            if not d.name.startswith("eplb")]
    return space.usable_dimensions(dims, lambda changes: probe_results[(preset, tuple(sorted(changes.items())))])


def _probe_jobs(presets) -> list[tuple]:
    from tiersched.bench import upstream_space as space
    from tiersched.sim import get_preset

    jobs = []
    for p in presets:
        dims = [d for d in space.dimensions(get_preset(p), has_priorities=False) if d.target == "scheduler"]
        for d in dims:
            for v in d.values:
                if v != d.default:
                    jobs.append((p, tuple(sorted({d.name: v, **space._enablers(d, dims)}.items()))))
    return jobs


def _forced(dims, combo: dict, name: str, free: tuple[str, ...]):
    """`dims` with every dimension fixed at `combo`'s value except `free` ones; `name` forced on (True)."""
    from tiersched.bench import upstream_space as space

    out = []
    for d in dims:
        if d.name == name:
            out.append(dataclasses.replace(d, values=(True,), default=True))
        elif d.name in free:
            out.append(dataclasses.replace(d, default=combo[d.name]))
        else:
            value = combo[d.name] if d.active(combo) else d.default
            out.append(dataclasses.replace(d, values=(value,), default=value))
    return out if any(d.name == name for d in out) else None


def search_upstream(preset: str, shape: str, rate: float, duration_s: float, dims: list, passes: int,
                    runner: Runner) -> dict:
    """The pruned search of the module docstring for one preset x shape: the candidates and a report."""
    from tiersched.bench import upstream_space as space

    memo: dict = {}  # combination key -> metrics (every descent of this search shares the runs)

    def job(c: dict) -> tuple:
        return (preset, shape, rate, duration_s, SEARCH_SEED, "upstream", c["ordering"], c["dispatch"],
                space.scheduler_changes(c, dims))

    def run(combos: list[dict]) -> list[dict]:
        out = runner.run([job(c) for c in combos])
        for c, m in zip(combos, out):
            memo[space.combination_key(space.normalise(c, dims))] = (space.normalise(c, dims), m)
        return out

    metrics = list(SEARCH_METRICS.values())
    main = space.search(dims, metrics, run, max_passes=passes)
    forced_runs = 0
    for metric in metrics:
        winner = main.combos[main.winners[metric]]
        for name, free in (("enable_prefill_delayer", ("chunked_prefill_size", "prefill_delayer_max_delay_passes",
                                                       "prefill_delayer_token_usage_low_watermark",
                                                       "prefill_delayer_queue_min_ratio")),
                           ("enable_mixed_chunk", ("chunked_prefill_size",))):
            fdims = _forced(dims, winner, name, free)
            if fdims is not None and not winner.get(name):
                before = len(memo)
                space.search(fdims, [metric], lambda cs: run([dict(winner, **c) for c in cs]), max_passes=passes)
                forced_runs += len(memo) - before
    ranked = {m: sorted(memo.values(), key=lambda cm: (cm[1][m], cm[1]["neg_throughput"])) for m in metrics}
    candidates: dict = {}
    for m in metrics:
        best = ranked[m][0][0]
        for chunk in dict.fromkeys((*CHUNKS, best["chunked_prefill_size"])):
            c = dict(best, chunked_prefill_size=chunk)
            candidates[space.combination_key(c)] = c
        for flag in ("enable_prefill_delayer", "enable_mixed_chunk"):
            c = next((c for c, _ in ranked[m] if c.get(flag)), None)
            if c is not None:
                candidates[space.combination_key(c)] = c
    return {
        "candidates": list(candidates.values()),
        "winners": [ranked[m][0][0] for m in metrics],
        "report": {
            "runs": len(memo), "descent_runs": len(main.runs), "forced_variant_runs": forced_runs,
            "winners": {m: space.label(ranked[m][0][0], dims) for m in metrics},
            "winner_flags": {m: space.flags(ranked[m][0][0], dims, _preset(preset)) for m in metrics},
            "descent_paths": main.paths,
            "candidates": [space.label(c, dims) for c in candidates.values()],
        },
    }


def _preset(name: str):
    from tiersched.sim import get_preset

    return get_preset(name)


def _variant_label(variant: tuple, dims: list) -> str:
    from tiersched.bench import upstream_space as space

    if len(variant) == 4:  # ours: (arm, ordering, dispatch, changes)
        arm, *variant = variant
        profile = arm.partition(":")[2]
        return _variant_label(tuple(variant), dims) + " +plan" + (f" ({profile})" if profile else "")
    ordering, dispatch, changes = variant
    combo = {**space.default_combination(dims), "ordering": ordering, "dispatch": dispatch, **dict(changes)}
    return space.label(combo, dims)


def _reference_variants(winners: list[dict]) -> list[tuple]:
    """Reference runs searched at the search load: (ordering, dispatch, scheduler changes) for the ordering and
    load-balance method of each metric's upstream winner x chunk size x mixed chunking (the static freedoms
    upstream has; the prefill delayer has no meaning without a lockstep group)."""
    pairs = dict.fromkeys((w["ordering"], w["dispatch"]) for w in winners)
    return [(o, d, (("chunked_prefill_size", c), ("enable_mixed_chunk", mixed)))
            for o, d in pairs for c in CHUNKS for mixed in (False, True)]


# ---- the grid -------------------------------------------------------------------------------------------------

def grid(presets, shapes, loads, seeds, duration_s: float, workers: int, search_load: float = SEARCH_LOAD,
         search_passes: int = SEARCH_PASSES, progress=None) -> dict:
    from tiersched.bench import upstream_space as space

    say = progress or (lambda msg: None)
    runner = Runner(workers, progress)
    try:
        pool = runner.pool
        caps = {(p, s): c for p, s, c in pool.map(_capacity, [(p, s) for p in presets for s in shapes])}
        refusals = {(p, ch): why for p, ch, why in pool.map(_refusal, _probe_jobs(presets))}
        dims, dropped = {}, {}
        for p in presets:
            dims[p], dropped[p] = _dimensions(p, refusals)
        dur = {p: duration_s or DURATION_S.get(p, 4.0) for p in presets}
        say("capacities measured; searching upstream's flags")

        def one_search(ps):
            p, s = ps
            rate = search_load * caps[(p, s)]
            res = search_upstream(p, s, rate, dur[p], dims[p], search_passes, runner)
            variants = _reference_variants(res["winners"])
            # Perfect balance also of every upstream candidate as it is (the prefill delayer included): the bound
            # must sit below upstream-best's own combination, as in `bench compare`.
            own = [(c["ordering"], c["dispatch"], space.scheduler_changes(c, dims[p])) for c in res["candidates"]]
            for arm, vs in (("ideal", list(dict.fromkeys(variants + own))), ("free", variants)):
                runs = [(p, s, rate, dur[p], SEARCH_SEED, arm) + v for v in vs]
                ms = runner.run(runs)
                chosen = {m: min(zip(vs, ms), key=lambda vm: (vm[1][SEARCH_METRICS[m]],
                                                             vm[1]["neg_throughput"]))[0] for m in METRICS}
                res[f"{arm}_variants"] = list(dict.fromkeys(chosen.values()))
                name = {"ideal": "perfect_balance", "free": "lockstep_free"}[arm]
                res["report"][f"{name}_reference"] = {m: _variant_label(v, dims[p]) for m, v in chosen.items()}
                res["report"][f"{name}_reference_runs"] = len(vs)
            # ours: the plan on the static flags a tiersched user sets as upstream's (the prefill delayer aside,
            # which the plan replaces), chosen per metric at the search load like upstream's
            mixed_on = (("enable_mixed_chunk", True),)
            mixes = ((), mixed_on)
            orderings = dict.fromkeys(["fcfs"] + [w["ordering"] for w in res["winners"]])
            static = list(dict.fromkeys(
                [("fcfs", "round_robin", ())] + [(w["ordering"], w["dispatch"], mixed) for w in res["winners"]
                                                 for mixed in mixes]
                + [(o, "tiersched", mixed) for o in orderings for mixed in mixes]))
            variants = [("ours",) + v for v in static] + [
                (f"ours:{name}",) + v for name in PLAN_PROFILES if name != "default" for v in static
                if v[2] == mixed_on or name not in PROFILES_MIXED_ONLY]
            ms = runner.run([(p, s, rate, dur[p], SEARCH_SEED) + v for v in variants])
            res["ours"] = {m: min(zip(variants, ms), key=lambda vm: (vm[1][SEARCH_METRICS[m]],
                                                                    vm[1]["neg_throughput"]))[0] for m in METRICS}
            res["report"]["ours"] = {m: _variant_label(v, dims[p]) for m, v in res["ours"].items()}
            res["report"]["ours_variants_at_search_load"] = {
                _variant_label(v, dims[p]): {m: x[m] for m in METRICS} for v, x in zip(variants, ms)}
            say(f"searched {p}/{s}: {res['report']['runs']} upstream runs")
            return ps, res

        with ThreadPoolExecutor(len(presets) * len(shapes)) as threads:
            searches = dict(threads.map(one_search, [(p, s) for p in presets for s in shapes]))
        say("evaluating candidates on every load and seed")

        def upstream_runs(p, s, load, seed, combos):
            base = (p, s, load * caps[(p, s)], dur[p], seed)
            return [base + ("upstream", c["ordering"], c["dispatch"], space.scheduler_changes(c, dims[p]))
                    for c in combos]

        def other_runs(p, s, load, seed):
            base = (p, s, load * caps[(p, s)], dur[p], seed)
            ours = {m: base + v for m, v in searches[(p, s)]["ours"].items()}
            plain = base + ("ours", "fcfs", "round_robin", ())
            ideal = [base + ("ideal",) + v for v in searches[(p, s)]["ideal_variants"]]
            free = [base + ("free",) + v for v in searches[(p, s)]["free_variants"]]
            return ours, plain, ideal, free

        def shortlist(key):
            """Every candidate on the first seed; each metric's best of those on the other seeds."""
            p, s, load = key
            cands = searches[(p, s)]["candidates"]
            ms = runner.run(upstream_runs(p, s, load, seeds[0], cands))
            best = {min(range(len(cands)), key=lambda j: (ms[j][SEARCH_METRICS[m]], ms[j]["neg_throughput"]))
                    for m in METRICS}
            chosen = [i for i in range(len(cands)) if i in best]
            runner.run([r for seed in seeds[1:] for r in upstream_runs(p, s, load, seed, [cands[i] for i in chosen])])
            return key, chosen

        keys = [(p, s, load, seed) for p in presets for s in shapes for load in loads for seed in seeds]
        for k in keys:  # queued first; the shortlists' runs follow as each is decided
            ours_run, plain_run, ideal_run, free = other_runs(*k)
            runner.submit([*ours_run.values(), plain_run, *ideal_run, *free])
        psl = [(p, s, load) for p in presets for s in shapes for load in loads]
        with ThreadPoolExecutor(len(psl)) as threads:
            short = dict(threads.map(shortlist, psl))
        configs = []
        for (p, s, load, seed) in keys:
            all_cands = searches[(p, s)]["candidates"]
            idx = list(range(len(all_cands))) if seed == seeds[0] else short[(p, s, load)]
            up_m = runner.run(upstream_runs(p, s, load, seed, [all_cands[i] for i in idx]))
            ours_run, plain_run, ideal_run, free = other_runs(p, s, load, seed)
            ours = {m: runner.run([r])[0] for m, r in ours_run.items()}
            plain, = runner.run([plain_run])
            ideal_m = runner.run(ideal_run)
            free_m = runner.run(free)
            labels = [searches[(p, s)]["report"]["candidates"][i] for i in idx]
            row = {"preset": p, "shape": s, "load": load, "seed": seed, "rate": round(load * caps[(p, s)], 3),
                   "duration_s": dur[p], "requests": plain["requests"]}
            for metric in METRICS:
                key = SEARCH_METRICS[metric]
                i = min(range(len(up_m)), key=lambda j: (up_m[j][key], up_m[j]["neg_throughput"]))
                pick = max if metric == "throughput" else min
                up = up_m[i][metric]
                row[f"upstream_best_{metric}"] = up
                row[f"upstream_best_{metric}_label"] = labels[i]
                row[f"ours_{metric}"] = ours[metric][metric]
                row[f"ideal_{metric}"] = pick(m[metric] for m in ideal_m)
                row[f"free_{metric}"] = pick(m[metric] for m in free_m)
                row[f"loss_{metric}"] = _loss(metric, up, ours[metric][metric])
                row[f"plain_{metric}"] = plain[metric]
                row[f"plain_loss_{metric}"] = _loss(metric, up, plain[metric])
            for metric in ("ttft_mean", "tpot_mean"):
                up = row[f"upstream_best_{metric}"]
                row[f"headroom_{metric}_ideal"] = headroom(up, ours[metric][metric], row[f"ideal_{metric}"])
                row[f"headroom_{metric}_free"] = headroom(up, ours[metric][metric], row[f"free_{metric}"])
                row[f"plain_headroom_{metric}_ideal"] = headroom(up, plain[metric], row[f"ideal_{metric}"])
                row[f"free_share_{metric}"] = headroom(up, row[f"free_{metric}"], row[f"ideal_{metric}"])
            row["unfinished_ours"] = max(o["requests"] - o["finished"] for o in ours.values())
            configs.append(row)
        simulations = sum(1 for v in runner.memo.values() if isinstance(v, dict))
    finally:
        runner.close()
    return {"configs": configs, "capacity_req_s": {f"{p}/{s}": c for (p, s), c in caps.items()},
            "searches": {f"{p}/{s}": v["report"] for (p, s), v in searches.items()},
            "dims": dims, "dropped": dropped, "simulations": simulations}


def _loss(metric: str, upstream: float, ours: float) -> float:
    """Relative regression of ours against upstream (> 0: worse)."""
    return (upstream - ours) / upstream if metric == "throughput" else (ours - upstream) / upstream


def _median(values) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


# ---- mixed priority -------------------------------------------------------------------------------------------

OURS_MIXED_PRIORITY_FLAGS = {"enable_mixed_chunk": True}


def _mixed_seed(job) -> dict:
    """One seed of the mixed-priority scenario (see `mixed`)."""
    import numpy as np

    from tiersched.bench.request import UPSTREAM_DEFAULT_MAX_RUNNING, _class_tokens_s, ls_alone_ttft_s
    from tiersched.core.request import RequestTierConfig
    from tiersched.core.request.ordering import AgingPrefixOrdering
    from tiersched.core.request.preemption import LatencySensitivePreemption
    from tiersched.sim import PolicySet, capacity, get_preset, simulate

    duration_s, seed = job
    cfg = RequestTierConfig()
    p = get_preset("qwen3-dp4ep4").with_scheduler(max_running_requests=UPSTREAM_DEFAULT_MAX_RUNNING)
    work = capacity.mixed_priority_at_overload(ls_fraction=0.2, overload=1.5, preset=p, duration_s=duration_s,
                                               seed=seed)
    window = float(work.arrival_s[-1])
    floor_all = ls_alone_ttft_s(p, work, seed)
    up = {}
    for c in CHUNKS:
        for extra in ({}, {"enable_mixed_chunk": True}, {"enable_prefill_delayer": True}):
            res = simulate(p.with_scheduler(chunked_prefill_size=c, **extra), work, PolicySet(ordering="fcfs-priority"),
                           seed, record_timeline=False)
            label = f"chunk={c}" + "".join(f" {k}" for k in extra)
            up[label] = _class_tokens_s(res, 1, window)["total_tok_s"]
    best = max(up, key=up.get)  # fcfs-priority at its best BE throughput
    # Ours runs with the one static upstream flag that composes with the plan (mixed chunking), fixed rather than
    # tuned per seed; the delayer is upstream's alternative to the plan, so it is not combined with it.
    ours = simulate(p.with_scheduler(**OURS_MIXED_PRIORITY_FLAGS), work,
                    PolicySet(ordering=AgingPrefixOrdering(cfg), preemption=LatencySensitivePreemption(cfg),
                              step_plan="tiersched"), seed, record_timeline=False)
    ls_ttft = ours.records["ttft"][(ours.records["class_of"] == 0) & np.isfinite(ours.records["ttft"])]
    q = tail_percentile(int(ls_ttft.size))
    tail, floor = float(np.percentile(ls_ttft, q)), float(np.percentile(floor_all, q))
    be = _class_tokens_s(ours, 1, window)["total_tok_s"]
    return {"seed": seed, "ls_samples": int(ls_ttft.size), "percentile": q, "ls_tail_s": tail, "ls_floor_s": floor,
            "be_tok_s_ours": be, "ours_static_flags": dict(OURS_MIXED_PRIORITY_FLAGS), "be_tok_s_upstream": up[best], "upstream_best": best,
            "ls_tail_over_floor": tail / floor, "be_throughput_loss": 1.0 - be / up[best]}


def mixed(duration_s: float, seeds, workers: int = 1) -> dict:
    """LS tail vs the LS-alone floor and BE throughput: prefix-aging + preemption + plan with mixed chunking vs
    fcfs-priority at its best chunk size, mixed chunking and prefill delayer (best BE throughput), per seed."""
    import multiprocessing as mp

    with ProcessPoolExecutor(max(1, min(workers, len(seeds))), mp_context=mp.get_context("fork")) as pool:
        per_seed = list(pool.map(_mixed_seed, [(duration_s, s) for s in seeds]))
    return {"per_seed": per_seed, "duration_s": duration_s,
            "ls_tail_over_floor": _median(r["ls_tail_over_floor"] for r in per_seed),
            "be_throughput_loss": _median(r["be_throughput_loss"] for r in per_seed)}


# ---- summary --------------------------------------------------------------------------------------------------

def summarise(result: dict) -> dict:
    rows = result["configs"]
    out = _summary(rows)
    out["per_preset"] = {p: _summary([r for r in rows if r["preset"] == p])
                         for p in sorted({r["preset"] for r in rows})}
    return out


def _reachability(share: float | None) -> str:
    if share is None:
        return "no lockstep-free headroom to compare (the reference is not below upstream-best)"
    if share < 0.5:
        return (f"out of reach for step shaping: removing every lockstep stall captures {share:.3f} < 0.5 of the "
                "perfect-balance headroom")
    return f"not ruled out: removing every lockstep stall captures {share:.3f} >= 0.5 of the perfect-balance headroom"


def _summary(rows: list[dict]) -> dict:
    loaded = [r for r in rows if r["load"] >= 0.7]
    sat = [r for r in rows if r["load"] == max(x["load"] for x in rows)]
    worst = max(rows, key=lambda r: max(r[f"loss_{m}"] for m in METRICS))
    worst_metric = max(METRICS, key=lambda m: worst[f"loss_{m}"])
    share = {m: _median(r[f"free_share_{m}_mean"] for r in loaded) for m in ("tpot", "ttft")}
    return {
        "headroom_captured_tpot": _median(r["headroom_tpot_mean_ideal"] for r in loaded),
        "headroom_captured_ttft": _median(r["headroom_ttft_mean_ideal"] for r in loaded),
        "headroom_captured_tpot_vs_lockstep_free": _median(r["headroom_tpot_mean_free"] for r in loaded),
        "headroom_captured_ttft_vs_lockstep_free": _median(r["headroom_ttft_mean_free"] for r in loaded),
        # What the lockstep-free reference itself captures of the perfect-balance headroom: the most a plan of a
        # lockstep group can approach by removing every lockstep stall and nothing else.
        "configs_with_headroom": {  # configurations at load >= 0.7 where upstream-best is above the reference
            f"{m}_vs_{ref}": sum(r[f"headroom_{m}_mean_{arm}"] is not None for r in loaded)
            for m in ("tpot", "ttft") for ref, arm in (("perfect_balance", "ideal"), ("lockstep_free", "free"))},
        "configs_at_load_0.7_or_more": len(loaded),
        "headroom_of_lockstep_free_vs_perfect_balance": share,
        "reachability_of_50pct_vs_perfect_balance": {m: _reachability(v) for m, v in share.items()},
        "saturation_throughput_vs_bound": _median(r["ours_throughput"] / r["ideal_throughput"] for r in sat),
        "saturation_throughput_vs_lockstep_free": _median(r["ours_throughput"] / r["free_throughput"] for r in sat),
        "upstream_best_saturation_throughput_vs_bound": _median(
            r["upstream_best_throughput"] / r["ideal_throughput"] for r in sat),
        "worst_loss": worst[f"loss_{worst_metric}"],
        "worst_loss_where": {k: worst[k] for k in ("preset", "shape", "load", "seed")} | {"metric": worst_metric},
        "share_of_configs_never_worse_2pct": sum(all(r[f"loss_{m}"] <= 0.02 for m in METRICS) for r in rows) / len(rows),
        "plan_on_upstream_defaults": {  # the plan with fcfs / round_robin / no mixed chunking instead
            "headroom_captured_tpot": _median(r["plain_headroom_tpot_mean_ideal"] for r in loaded),
            "headroom_captured_ttft": _median(r["plain_headroom_ttft_mean_ideal"] for r in loaded),
            "worst_loss": max(r[f"plain_loss_{m}"] for r in rows for m in METRICS),
            "share_of_configs_never_worse_2pct": sum(all(r[f"plain_loss_{m}"] <= 0.02 for m in METRICS)
                                                     for r in rows) / len(rows)},
        "upstream_best_uses_prefill_delayer": sum("delayer=True" in r[f"upstream_best_{m}_label"]
                                                  for r in rows for m in METRICS) / (len(rows) * len(METRICS)),
        "upstream_best_uses_mixed_chunk": sum("mixed=True" in r[f"upstream_best_{m}_label"]
                                              for r in rows for m in METRICS) / (len(rows) * len(METRICS)),
    }


def _space_report(result: dict, search_load: float, passes: int) -> dict:
    from tiersched.bench import upstream_space as space

    first = next(iter(result["dims"].values()))
    return {
        "dimensions": {d.flag: list(d.values) for d in first},
        "chunked_prefill_size_unit": "tokens per DP rank (the upstream flag is this x the DP size)",
        "not_searched": {**NOT_SEARCHED, **space.NOT_MODELLED,
                         **{flag: why for dropped in result["dropped"].values() for flag, why in dropped.items()}},
        "method": (f"per preset x shape at load {search_load:g}, seed {SEARCH_SEED}: every ordering x every "
                   "load-balance method at upstream's other defaults, then coordinate descent per metric (mean "
                   "TTFT, mean TPOT, throughput) over the other dimensions, at most "
                   f"{passes} passes (upstream_space.search); from each metric's winner a descent with the prefill "
                   "delayer forced on (chunk size and its knobs searched) and one with mixed chunking forced on "
                   "(chunk size searched)"),
        "pruning": ("candidates: each metric's winner at every chunk size, and per metric the best combination "
                    "with the prefill delayer and the best with mixed chunking; every candidate runs on every load "
                    "at the first seed, each metric's best of them there also on the other seeds; upstream-best "
                    "per configuration and metric is the best candidate run there"),
        "full_grid_size": int(__import__("math").prod(len(d.values) for d in first)),
        "per_preset_shape": result["searches"],
    }


def main(args) -> int:
    from tiersched.sim.presets import preset_names
    from tiersched.sim.workloads import SHAPES

    presets, shapes = _csv(args.presets), _csv(args.shapes)
    for p in presets:
        if p not in preset_names():
            print(f"unknown preset {p!r}; choose from {', '.join(preset_names())}.", file=sys.stderr)
            return 2
    for s in shapes:
        if s not in SHAPES:
            print(f"unknown shape {s!r}; choose from {', '.join(SHAPES)}.", file=sys.stderr)
            return 2
    loads, seeds = _csv(args.loads, float), _csv(args.seeds, int)
    if not loads or not seeds or args.search_passes < 1:
        print("need at least one load and seed, and --search-passes >= 1.", file=sys.stderr)
        return 2
    start = time.perf_counter()
    load_start = os.getloadavg()
    say = ((lambda msg: None) if args.quiet else
           (lambda msg: print(f"[lockstep {time.perf_counter() - start:.0f}s] {msg}", file=sys.stderr, flush=True)))
    result = grid(presets, shapes, loads, seeds, args.duration_s, args.workers, args.search_load,
                  args.search_passes, say)
    out = summarise(result)
    if args.mixed_duration_s > 0:
        say("mixed-priority scenario")
        mix = mixed(args.mixed_duration_s, _csv(args.mixed_seeds, int), args.workers)
        out.update(ls_tail_over_floor=mix["ls_tail_over_floor"], be_throughput_loss=mix["be_throughput_loss"],
                   mixed_priority=mix)
    else:
        out.update(ls_tail_over_floor=None, be_throughput_loss=None)
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    out.update({
        "upstream_space_searched": _space_report(result, args.search_load, args.search_passes),
        "durations_s": {p: args.duration_s or DURATION_S.get(p, 4.0) for p in presets},
        "note": "durations shortened so the grid fits 10 minutes on 2 cores; load = rate / measured capacity",
        "capacity_req_s": result["capacity_req_s"],
        "simulations": result["simulations"],
        "configurations": [f"{r['preset']}/{r['shape']}/load={r['load']:g}/seed={r['seed']}"
                           for r in result["configs"]],
        "configs": result["configs"],
        "wall_s": round(time.perf_counter() - start, 1),
        "cpu_s": round(sum(u.ru_utime + u.ru_stime for u in usage), 1),
        "workers": args.workers,
        "load_average": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]},
    })
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            if k not in ("configs", "configurations", "mixed_priority", "capacity_req_s", "upstream_space_searched"):
                print(f"{k}: {v}")
        print(f"configurations: {len(out['configs'])} (see --json)")
    return 0
