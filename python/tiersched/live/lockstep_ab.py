"""Live A/B of the lockstep step plan on a real `--tp 2 --dp 2 --enable-dp-attention` CPU server.

Workload (`SteerWorkload`): one DP rank decodes while the other receives long prompts. Every request picks its DP
rank with upstream's `routed_dp_rank` field of /generate (io_struct.GenerateReqInput; the DP controller sends
it to that rank): short-prompt decoders arrive on DP rank 1 at a steady rate, long prompts with a few output
tokens on DP rank 0. Under DP attention every forward step is one lockstep step, so each chunk rank 0 prefills
stretches the step in which rank 1's decoders make their next token.

Metric: the decoding rank's TPOT from the server's own timestamps: with `--enable-metrics` a non-streaming
/generate returns `meta_info.first_token_latency` (the scheduler's prefill-finished time minus the request's
arrival at the tokenizer) and `e2e_latency`; TPOT = (e2e_latency - first_token_latency) / (completion_tokens - 1),
upstream's own definition (observability/req_time_stats.get_time_per_output_token). The long prompts' TTFT
(`first_token_latency`) is reported beside it: a smaller chunk buys decode TPOT with prefill TTFT.

Arms (every one `--schedule-policy` as named, `--enable-metrics`, the same `--max-total-tokens`):
  upstream-c{N}           fcfs, `--chunked-prefill-size N`: upstream's static chunk, searched over `chunks`
  upstream-c{N}-delayer   the best N plus `--enable-prefill-delayer` (upstream's own lockstep remedy)
  tiersched-plan          `--schedule-policy prefix-aging --chunked-prefill-size max(chunks)`, request tier with
                          `[request] step_plan = true`: the plan picks each step's chunk up to that budget
Phase 1 runs the upstream chunk arms alternately (`search_repeats` each) and keeps the chunk with the lowest mean
decode TPOT; phase 2 runs tiersched-plan, upstream best and upstream best + delayer alternately (`repeats` each,
order A B C then C B A, every other server paused with SIGSTOP, a flushed cache per run: live/ab.py). Per-run
means are compared with live/stats.py (paired bootstrap interval and exact sign-flip p-value over repeats;
per-request bootstrap and Mann-Whitney U).

Plan lines: the tiersched server logs one `tiersched step plan:` line per planned step on every DP rank
(sglang/request/step_plan.py); `plan_report` reads them back from the run's part of the log: whether both ranks
logged identical plans, the chunks chosen, and the prediction check (the model's predicted step time against the
measured one, per step; also what the simulator's prior alone would have predicted for the same steps).
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from tiersched.live import ab as live_ab
from tiersched.live import stats
from tiersched.live.driver import flush_cache
from tiersched.live.requests import DEFAULT_VOCAB, FIRST_ORDINARY_TOKEN

DEPLOYMENT = ("--tp", "2", "--dp", "2", "--enable-dp-attention")
PREFILL_RANK, DECODE_RANK = 0, 1
MAX_TOTAL_TOKENS = 16384
TIERSCHED_ARM = "tiersched-plan"
TIERSCHED_ENV = {"TIERSCHED_TIERS": "request", "TIERSCHED_SET": "request.step_plan=true"}


# ---- workload -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SteeredRequest:
    rid: str
    role: str  # "decode" (the decoding rank's requests, whose TPOT is measured) or "long"
    arrival_s: float
    input_ids: tuple[int, ...]
    output_len: int
    dp_rank: int


@dataclass(frozen=True)
class SteerWorkload:
    """Decoders on DP rank 1 every `decode_interval_s` from t = 0; long prompts on DP rank 0 every
    `long_interval_s` from `long_start_s`. Token ids are seeded pseudo-random ordinary tokens (no shared
    prefixes)."""

    decoders: int = 16
    decode_prompt: int = 48
    decode_output: int = 48
    decode_interval_s: float = 0.6
    long_requests: int = 4
    long_prompt: int = 3000
    long_output: int = 4
    long_start_s: float = 1.0
    long_interval_s: float = 2.5
    seed: int = 0

    def requests(self) -> list[SteeredRequest]:
        rng = np.random.default_rng(self.seed)

        def ids(n: int) -> tuple[int, ...]:
            return tuple(int(t) for t in rng.integers(FIRST_ORDINARY_TOKEN, DEFAULT_VOCAB, n))

        out = [SteeredRequest(f"dec{i}", "decode", round(i * self.decode_interval_s, 3), ids(self.decode_prompt),
                              self.decode_output, DECODE_RANK) for i in range(self.decoders)]
        out += [SteeredRequest(f"long{i}", "long", round(self.long_start_s + i * self.long_interval_s, 3),
                               ids(self.long_prompt), self.long_output, PREFILL_RANK)
                for i in range(self.long_requests)]
        return sorted(out, key=lambda r: (r.arrival_s, r.rid))


# ---- driver ---------------------------------------------------------------------------------------------------


@dataclass
class SteeredResult:
    rid: str
    role: str
    dp_rank_sent: int
    dp_rank: int | None = None  # meta_info.dp_rank: the rank that served it
    success: bool = False
    error: str = ""
    completion_tokens: int = 0
    first_token_latency_s: float | None = None  # server side (meta_info, --enable-metrics)
    e2e_latency_s: float | None = None  # server side
    client_latency_s: float = 0.0

    @property
    def server_tpot_s(self) -> float | None:
        """(e2e - first token) / (tokens - 1), from the server's timestamps; None without them."""
        if (self.first_token_latency_s is None or self.e2e_latency_s is None or self.completion_tokens <= 1):
            return None
        return (self.e2e_latency_s - self.first_token_latency_s) / (self.completion_tokens - 1)


def generate_body(req: SteeredRequest) -> dict:
    return {"rid": req.rid, "input_ids": list(req.input_ids), "routed_dp_rank": req.dp_rank,
            "sampling_params": {"max_new_tokens": req.output_len, "temperature": 0.0, "ignore_eos": True}}


def result_from_response(req: SteeredRequest, body: dict, client_latency_s: float) -> SteeredResult:
    meta = body.get("meta_info") or {}
    res = SteeredResult(req.rid, req.role, req.dp_rank, client_latency_s=client_latency_s)
    res.dp_rank = meta.get("dp_rank")
    res.completion_tokens = int(meta.get("completion_tokens") or 0)
    ftl, e2e = meta.get("first_token_latency"), meta.get("e2e_latency")
    res.first_token_latency_s = float(ftl) if ftl is not None else None
    res.e2e_latency_s = float(e2e) if e2e is not None else None
    finish = meta.get("finish_reason") or {}
    if finish.get("type") == "abort":
        res.error = f"aborted: {finish.get('message', '')}"[:300]
    elif res.completion_tokens != req.output_len:
        res.error = f"generated {res.completion_tokens} of {req.output_len} tokens"
    res.success = not res.error
    return res


async def _send(session, url: str, req: SteeredRequest, results: dict, rid: str) -> None:
    import aiohttp

    start = time.perf_counter()
    try:
        async with session.post(url + "/generate", json=generate_body(req)) as resp:
            text = await resp.text()
            if resp.status != 200:
                results[rid] = SteeredResult(req.rid, req.role, req.dp_rank, error=f"HTTP {resp.status}: {text[:300]}")
                return
            import json

            results[rid] = result_from_response(req, json.loads(text), time.perf_counter() - start)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
        results[rid] = SteeredResult(req.rid, req.role, req.dp_rank, error=f"{type(exc).__name__}: {exc}"[:300])


async def _run(url: str, requests: Sequence[SteeredRequest], timeout_s: float, tag: str) -> list[SteeredResult]:
    import aiohttp

    results: dict[str, SteeredResult] = {}
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        start, tasks = time.perf_counter(), []
        for req in requests:
            delay = req.arrival_s - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            tagged = SteeredRequest(f"{tag}-{req.rid}", req.role, req.arrival_s, req.input_ids, req.output_len,
                                    req.dp_rank)
            tasks.append(asyncio.create_task(_send(session, url, tagged, results, req.rid)))
        await asyncio.wait(tasks, timeout=max(1.0, timeout_s - (time.perf_counter() - start)))
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return [results.get(r.rid) or SteeredResult(r.rid, r.role, r.dp_rank, error="lost (timeout)") for r in requests]


def drive(url: str, requests: Sequence[SteeredRequest], timeout_s: float = 300.0, tag: str = "r") -> list[SteeredResult]:
    """Send every request at its arrival time (open loop, non-streaming), one result per request in order. Request
    ids are prefixed with `tag` (upstream refuses a rid it is still serving; each run gets its own)."""
    return asyncio.run(_run(url, requests, timeout_s, tag))


def run_summary(results: Sequence[SteeredResult]) -> dict:
    """One run: mean server-side TPOT of the decoding rank's requests, mean TTFT of the long prompts, failures."""
    tpots = [r.server_tpot_s for r in results if r.role == "decode" and r.success and r.server_tpot_s is not None]
    ttfts = [r.first_token_latency_s for r in results if r.role == "long" and r.success
             and r.first_token_latency_s is not None]
    dec_ttft = [r.first_token_latency_s for r in results if r.role == "decode" and r.success
                and r.first_token_latency_s is not None]
    misrouted = sum(1 for r in results if r.success and r.dp_rank is not None and r.dp_rank != r.dp_rank_sent)
    return {"decode_tpot_mean_s": round(float(np.mean(tpots)), 6) if tpots else None,
            "decode_ttft_mean_s": round(float(np.mean(dec_ttft)), 6) if dec_ttft else None,
            "long_ttft_mean_s": round(float(np.mean(ttfts)), 6) if ttfts else None,
            "decode_samples": len(tpots), "errors": sum(1 for r in results if not r.success),
            "misrouted": misrouted}


# ---- arms -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LockstepArm:
    name: str
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    tiers: tuple[str, ...] = ()

    def server_args(self) -> list[str]:
        return [*DEPLOYMENT, *self.args, "--enable-metrics"]


def upstream_arm(chunk: int, delayer: bool = False) -> LockstepArm:
    args = ("--schedule-policy", "fcfs", "--chunked-prefill-size", str(chunk))
    if delayer:
        return LockstepArm(f"upstream-c{chunk}-delayer", (*args, "--enable-prefill-delayer"))
    return LockstepArm(f"upstream-c{chunk}", args)


def tiersched_arm(chunk: int) -> LockstepArm:
    return LockstepArm(TIERSCHED_ARM, ("--schedule-policy", "prefix-aging", "--chunked-prefill-size", str(chunk)),
                       tuple(sorted(TIERSCHED_ENV.items())), ("request",))


# ---- plan lines and the prediction check ----------------------------------------------------------------------

PLAN_LINE = re.compile(
    r"DP(\d)[^\n]*tiersched step plan: seq=(\d+) budgets=(\([^)]*\)|None) chunk=(\S+) predicted_ms=(\S+) "
    r"planned=(\d) model=(\S+) last_ms=(\S+) last_pred_ms=(\S+) last_tokens=\(([^)]*)\) last_decode=\(([^)]*)\)"
    r"(?: last_pairs=\(([^)]*)\) last_context=\(([^)]*)\))?")
PRIOR_LINE = re.compile(r"DP rank 0 publishes model=(\S+) \(prior\) (\{[^}]*\})")
MODEL_LINE = re.compile(r"DP rank 0 publishes model=(\S+) \((\w+)@(\d+)")


def _ints(text: str | None) -> tuple[int, ...]:
    return tuple(int(v) for v in re.findall(r"-?\d+", text or ""))


@dataclass(frozen=True)
class PlanLine:
    dp: int
    seq: int
    budgets: tuple[int, ...]
    chunk: str
    planned: bool
    model: str
    last_ms: float
    last_pred_ms: float
    last_tokens: tuple[int, ...]
    last_decode: tuple[int, ...]
    last_pairs: tuple[int, ...]
    last_context: tuple[int, ...]
    raw: tuple = field(compare=False, repr=False, default=())


def parse_plan_lines(log_text: str) -> list[PlanLine]:
    out = []
    for m in PLAN_LINE.finditer(log_text):
        dp, seq, budgets, chunk, _pred, planned, model, last_ms, last_pred, lt, ld, lp, lx = m.groups()
        out.append(PlanLine(int(dp), int(seq), _ints(budgets), chunk, planned == "1", model, float(last_ms),
                            float(last_pred), _ints(lt), _ints(ld), _ints(lp), _ints(lx), m.groups()[1:]))
    return out


def relative_error_summary(pred: np.ndarray, measured: np.ndarray) -> dict | None:
    """predicted / measured - 1 per step: median (signed), median |err|, P90 |err|, steps."""
    ok = np.isfinite(pred) & (measured > 0)
    if not ok.any():
        return None
    err = pred[ok] / measured[ok] - 1.0
    return {"steps": int(ok.sum()), "median": round(float(np.median(err)), 4),
            "median_abs": round(float(np.median(np.abs(err))), 4),
            "p90_abs": round(float(np.quantile(np.abs(err), 0.9)), 4)}


def plan_report(log_slice: str, whole_log: str) -> dict:
    """What the tiersched server's log says about the steps of one run (`log_slice`; `whole_log` for the prior
    published at start-up): plan lines per DP rank, whether both ranks logged the same plan for every sequence
    number, planned steps and their chunks, and the prediction check over the steps with a measured time."""
    from tiersched.core.request.step_plan import RooflineStepModel

    lines = parse_plan_lines(log_slice)
    by_rank: dict[int, dict[int, tuple]] = {}
    for ln in lines:
        by_rank.setdefault(ln.dp, {})[ln.seq] = ln.raw
    ranks = sorted(by_rank)
    identical = (len(ranks) == 2 and by_rank[0].keys() == by_rank[1].keys()
                 and all(by_rank[0][s] == by_rank[1][s] for s in by_rank[0]))
    rank0 = [ln for ln in lines if ln.dp == 0]
    planned = [ln for ln in rank0 if ln.planned]
    chunks: dict[str, int] = {}
    for ln in planned:
        chunks[ln.chunk] = chunks.get(ln.chunk, 0) + 1
    steps = [ln for ln in rank0 if ln.last_ms > 0 and len(ln.last_pairs) == len(ln.last_tokens)]
    measured = np.array([ln.last_ms for ln in steps])
    in_use = relative_error_summary(np.array([ln.last_pred_ms for ln in steps]), measured)
    prior = None
    m = PRIOR_LINE.search(whole_log)
    if m and steps:
        import ast

        model = RooflineStepModel(**ast.literal_eval(m.group(2)))
        pt = np.array([ln.last_tokens for ln in steps], dtype=float)
        pred = model.batch_seconds(pt, np.array([ln.last_pairs for ln in steps], dtype=float),
                                   np.where(pt > 0, 0.0, np.array([ln.last_decode for ln in steps], dtype=float)),
                                   np.where(pt > 0, 0.0, np.array([ln.last_context for ln in steps], dtype=float)))
        prior = relative_error_summary(pred * 1e3, measured)
    fitted_tags = {tag for tag, kind, _ in MODEL_LINE.findall(whole_log) if kind == "fit"}
    fitted = [ln for ln in steps if ln.model in fitted_tags]
    return {"plan_lines": {f"DP{r}": len(by_rank[r]) for r in ranks}, "identical_on_both_ranks": identical,
            "planned_steps": len(planned), "chunks_chosen": dict(sorted(chunks.items(), key=lambda kv: kv[0])),
            "prefill_steps_with_decode_on_other_rank": sum(
                1 for ln in steps if len(ln.last_tokens) == 2 and ln.last_tokens[PREFILL_RANK] > 0
                and ln.last_decode[DECODE_RANK] > 0),
            "prediction_error_model_in_use": in_use,
            "prediction_error_fitted_model": relative_error_summary(
                np.array([ln.last_pred_ms for ln in fitted]), np.array([ln.last_ms for ln in fitted])),
            "prediction_error_prior_alone": prior,
            "example_lines": [ln for ln in log_slice.splitlines() if "tiersched step plan: seq=" in ln
                              and "planned=1" in ln and "DP0" in ln][:3]}


# ---- the A/B --------------------------------------------------------------------------------------------------


def _server_cm(model_dir: str, arm: LockstepArm, log_dir: str | None, timeout_s: float | None):
    from tiersched.rig.server import launch_server

    return launch_server(model_dir, extra_args=arm.server_args(), env=dict(arm.env), timeout_s=timeout_s,
                         max_total_tokens=MAX_TOTAL_TOKENS, log_dir=log_dir)


def _log_size(server) -> int:
    import os

    return os.path.getsize(server.log_path)


def _read_from(server, start: int) -> str:
    with open(server.log_path, errors="replace") as f:
        f.seek(start)
        return f.read()


def _alternate_runs(servers: dict, arms: Sequence[LockstepArm], requests, repeats: int, phase: str,
                    runs: dict, plan_slices: dict, timeout_s: float) -> None:
    for repeat in range(repeats):
        for name in live_ab.alternate([a.name for a in arms], repeat):
            with live_ab.only_running(servers, name) as srv:
                flush_cache(srv.url)
                start = _log_size(srv)
                t0 = time.perf_counter()
                results = drive(srv.url, requests, timeout_s=timeout_s, tag=f"{phase}{repeat}")
                wall = time.perf_counter() - t0
                if name == TIERSCHED_ARM:
                    plan_slices.setdefault(name, []).append(_read_from(srv, start))
            summary = {**run_summary(results), "wall_s": round(wall, 2), "load_avg": _loadavg()}
            runs.setdefault(name, []).append({"summary": summary, "results": results})
            print(f"[lockstep-ab] {phase} repeat {repeat} {name}: decode TPOT {summary['decode_tpot_mean_s']} s, "
                  f"long TTFT {summary['long_ttft_mean_s']} s, errors {summary['errors']} ({summary['wall_s']} s, "
                  f"load {summary['load_avg']})", file=sys.stderr)


def _loadavg() -> list[float]:
    import os

    return [round(v, 2) for v in os.getloadavg()]


def _mean_ci(values: Sequence[float], seed: int = 0) -> dict:
    a = np.asarray([v for v in values if v is not None], dtype=float)
    if not a.size:
        return {"mean": None, "ci95": None, "n": 0}
    rng = np.random.default_rng(seed)
    reps = [float(a[rng.integers(0, a.size, a.size)].mean()) for _ in range(stats.BOOTSTRAP_REPLICATES)]
    lo, hi = np.percentile(reps, [2.5, 97.5])
    return {"mean": round(float(a.mean()), 6), "ci95": [round(float(lo), 6), round(float(hi), 6)], "n": int(a.size)}


def arm_table(runs: dict) -> dict:
    out = {}
    for name, rs in runs.items():
        s = [r["summary"] for r in rs]
        out[name] = {"decode_tpot_s": _mean_ci([x["decode_tpot_mean_s"] for x in s]),
                     "long_ttft_s": _mean_ci([x["long_ttft_mean_s"] for x in s]),
                     "decode_ttft_s": _mean_ci([x["decode_ttft_mean_s"] for x in s]),
                     "errors": sum(x["errors"] for x in s), "misrouted": sum(x["misrouted"] for x in s),
                     "per_repeat_decode_tpot_s": [x["decode_tpot_mean_s"] for x in s]}
    return out


def compare(runs: dict, ours: str, base: str) -> dict:
    """ours vs base: per-run decode TPOT and long TTFT ratios (base / ours: > 1 = ours better) with paired
    bootstrap interval and sign-flip p-value; per-request decode TPOT ratio (bootstrap, Mann-Whitney)."""
    o, b = runs[ours], runs[base]
    per_req = lambda rs: [[r.server_tpot_s for r in x["results"] if r.role == "decode" and r.success]  # noqa: E731
                          for x in rs]
    run = stats.run_ratio([x["summary"]["decode_tpot_mean_s"] for x in o],
                          [x["summary"]["decode_tpot_mean_s"] for x in b], True)
    per_repeat = (run or {}).get("per_repeat") or []
    return {"decode_tpot_run_ratio": run,
            # the other side of the same exact sign-flip test: p that ours is worse
            "decode_tpot_p_ours_worse": stats.sign_flip_p([1.0 / r if r else None for r in per_repeat])
            if per_repeat else None,
            "decode_tpot_request_ratio": stats.request_ratio(per_req(o), per_req(b)),
            "long_ttft_run_ratio": stats.run_ratio([x["summary"]["long_ttft_mean_s"] for x in o],
                                                   [x["summary"]["long_ttft_mean_s"] for x in b], True)}


def run_lockstep_ab(model_dir: str, chunks: Sequence[int] = (128, 256, 1024), search_repeats: int = 2,
                    repeats: int = 5, workload: SteerWorkload = SteerWorkload(), log_dir: str | None = None,
                    start_timeout_s: float | None = None, run_timeout_s: float = 300.0) -> dict:
    """Phase 1: upstream chunk search; phase 2: tiersched-plan vs upstream best vs upstream best + delayer."""
    requests = workload.requests()
    t_start = time.perf_counter()
    load_start = _loadavg()
    search_arms = [upstream_arm(c) for c in chunks]
    search_runs: dict = {}
    with contextlib.ExitStack() as stack:
        managers = {a.name: _server_cm(model_dir, a, log_dir, start_timeout_s) for a in search_arms}
        servers = _start_all(stack, managers)
        _alternate_runs(servers, search_arms, requests, search_repeats, "search", search_runs, {}, run_timeout_s)
        table = arm_table(search_runs)
        best = min(search_arms, key=lambda a: table[a.name]["decode_tpot_s"]["mean"] or math.inf)
        best_chunk = int(best.args[best.args.index("--chunked-prefill-size") + 1])
        # keep the best arm's server up for phase 2, stop the others now
        keep_stack = contextlib.ExitStack()
        for a in search_arms:
            if a.name != best.name:
                managers[a.name].__exit__(None, None, None)
        keep = {best.name: servers[best.name]}
        stack.pop_all()
        keep_stack.push(managers[best.name].__exit__)
        with keep_stack:
            ours, delayer = tiersched_arm(max(chunks)), upstream_arm(best_chunk, delayer=True)
            with contextlib.ExitStack() as stack2:
                more = _start_all(stack2, {a.name: _server_cm(model_dir, a, log_dir, start_timeout_s)
                                           for a in (ours, delayer)})
                _check_tiersched_active(more[ours.name])
                servers2 = {**keep, **more}
                main_arms = [ours, best, delayer]
                main_runs: dict = {}
                plan_slices: dict = {}
                _alternate_runs(servers2, main_arms, requests, repeats, "ab", main_runs, plan_slices, run_timeout_s)
                whole = _read_from(more[ours.name], 0)
                plan = plan_report("".join(plan_slices.get(ours.name, [])), whole)
                server_args = {a.name: servers2[a.name].args for a in main_arms}
                server_args.update({a.name: servers[a.name].args for a in search_arms})
                log_paths = {a.name: servers2[a.name].log_path for a in main_arms}
    return {
        "deployment": " ".join(DEPLOYMENT),
        "workload": asdict(workload),
        "search": {"chunks": list(chunks), "repeats": search_repeats, "arms": arm_table(search_runs),
                   "best_chunk": best_chunk},
        "repeats": repeats,
        "arms": arm_table(main_runs),
        "vs_upstream_best": compare(main_runs, ours.name, best.name),
        "vs_upstream_best_delayer": compare(main_runs, ours.name, delayer.name),
        "plan": plan,
        "load_avg_start": load_start, "load_avg_end": _loadavg(),
        "wall_s": round(time.perf_counter() - t_start, 1),
        "server_args": {k: [a for a in v if not a.startswith("/")] for k, v in server_args.items()},
        "log_paths": log_paths,
    }


def _start_all(stack: contextlib.ExitStack, managers: dict) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(managers)) as pool:
        futures = {name: pool.submit(cm.__enter__) for name, cm in managers.items()}
    servers, failure = {}, None
    for name, fut in futures.items():
        try:
            servers[name] = fut.result()
            stack.push(managers[name].__exit__)
        except Exception as exc:  # the rig already stopped it
            failure = failure or exc
    if failure is not None:
        raise failure
    return servers


def _check_tiersched_active(server) -> None:
    from tiersched.live import arms as live_arms

    with open(server.log_path, errors="replace") as f:
        text = f.read()
    if "request" not in live_arms.active_tiers_in_log(text):
        raise live_ab.TierNotActive(f"the request tier is not active in {server.log_path}; refusing to report "
                                    "upstream as tiersched")
