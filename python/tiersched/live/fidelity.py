"""cpu-tiny calibration and fidelity: drive a real SGLang server over plain HTTP and fit the step-cost model.

Used by `benchmark/sim_cpu_tiny_calibrate.py` (fit) and `benchmark/sim_fidelity.py` (compare). Stdlib HTTP only:
the simulator never imports SGLang. Requests send `input_ids` (exact prompt lengths) with `ignore_eos`, so the
real server and the simulator see the same token counts.

Measured per request (streaming /generate): TTFT = first streamed chunk - send time; TPOT = (last chunk - first
chunk) / (output tokens - 1); throughput = output tokens of finished requests / (last finish - first arrival),
the same definitions as `tiersched.sim.metrics`.

Fit (least squares with non-negative coefficients, scipy.optimize.nnls):
  prefill step of one request of n tokens:  t = overhead + prefill_overhead + per_token * n + per_pair * n(n+1)/2
  decode step of B requests, total context C: t = overhead + (per_token + decode_token_extra) * B + per_ctx * C
"""
from __future__ import annotations

import json
import threading
import time
import urllib.request
from dataclasses import dataclass

import numpy as np

from tiersched.live.fidelity_fit import (  # noqa: F401  (re-exported: the calibration's fits)
    _touched_experts, coefficients, contention_factor, fit_all, fit_decode, fit_new_shape, fit_prefill,
)


@dataclass
class RequestResult:
    arrival_s: float  # actual send time relative to the run start
    input_tokens: int
    output_tokens: int
    ttft_s: float
    tpot_s: float
    finish_s: float  # relative to the run start
    dp_rank: int | None = None
    server: dict | None = None  # server-side timings of the last chunk's meta_info (needs --enable-metrics)


def _prompt_ids(n: int, seed: int, vocab: int = 200) -> list[int]:
    # Distinct random ids (offset past the special tokens) so no two prompts share a radix-cache prefix.
    rng = np.random.default_rng(seed)
    return (rng.integers(10, vocab, size=n)).tolist()


SERVER_TIME_KEYS = ("request_received_ts", "forward_entry_time", "prefill_finished_time", "request_finished_ts",
                    "queue_time", "first_token_latency", "e2e_latency")


def stream_generate(url: str, input_ids: list[int], max_new_tokens: int, routed_dp_rank: int | None = None,
                    timeout_s: float = 600.0) -> tuple[float, float, float, int, int | None, dict]:
    """One streaming /generate; returns (send time, first chunk time, last chunk time, tokens, dp_rank,
    server timings): the last chunk's meta_info fields in SERVER_TIME_KEYS (wall-clock stamps of the scheduler
    and tokenizer processes; present when the server runs with --enable-metrics)."""
    body = {"input_ids": input_ids, "stream": True,
            "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}}
    if routed_dp_rank is not None:
        body["routed_dp_rank"] = routed_dp_rank
    req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    sent = time.perf_counter()
    first = last = None
    tokens, rank, server = 0, None, {}
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        for raw in resp:
            line = raw.decode(errors="replace").strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            first = now if first is None else first
            last = now
            meta = json.loads(line[5:]).get("meta_info", {})
            tokens = int(meta.get("completion_tokens", tokens))
            rank = meta.get("dp_rank", rank)
            server.update({k: meta[k] for k in SERVER_TIME_KEYS if k in meta})
    if first is None:
        raise RuntimeError("server returned no streamed chunk")
    return sent, first, last, tokens, rank, server


def run_request_set(url: str, arrivals: np.ndarray, inputs: np.ndarray, outputs: np.ndarray, seed: int = 0,
                    routed_dp_rank=None) -> list[RequestResult]:
    """Send request i at arrivals[i] (seconds from now) with inputs[i] prompt ids and outputs[i] new tokens;
    routed_dp_rank: None (the server's dispatch), one rank for all, or a rank per request."""
    if routed_dp_rank is None or np.isscalar(routed_dp_rank):
        routed_dp_rank = [routed_dp_rank] * len(arrivals)
    results: list[RequestResult | None] = [None] * len(arrivals)
    errors: list[BaseException] = []
    start = time.perf_counter()

    def worker(i: int) -> None:
        try:
            ids = _prompt_ids(int(inputs[i]), seed * 100_003 + i)
            delay = start + float(arrivals[i]) - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            sent, first, last, tokens, rank, server = stream_generate(url, ids, int(outputs[i]), routed_dp_rank[i])
            tpot = (last - first) / (tokens - 1) if tokens > 1 else float("nan")
            # The actual send time is the arrival (threads may wake late on a loaded machine).
            results[i] = RequestResult(sent - start, int(inputs[i]), tokens, first - sent, tpot, last - start, rank,
                                       server or None)
        except BaseException as exc:  # reported after join
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(arrivals))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed: {errors[0]!r}")
    return [r for r in results if r is not None]


def warm_up(url: str, pool_tokens: int, ranks: int = 2, prompt_tokens: int = 2048, mixed_requests: int = 60,
            seed: int = 424242) -> dict[int, list[int]]:
    """Bring a fresh server to its steady state before anything is timed. A fresh server's prefills stay 2-5x
    slower for its first few dozen requests (docs/results.md, "What changed to get there": the first nine
    prefills 67-154 ms, later ones of similar lengths 18-66 ms, identically on a second fresh server; writing the
    whole KV pool once did not remove it), which the simulator does not model; upstream's own warm-up (skipped on CPU, `--skip-server-warmup`) is one
    short request. So: on every rank, distinct prompts until the KV pool has been written once, then
    `mixed_requests` requests of the fidelity set's kind (another seed) at 4 req/s.
    Returns the prompt lengths each rank prefilled (the new-shape cost depends on them)."""
    seen: dict[int, list[int]] = {r: [] for r in range(ranks)}
    for i in range(-(-pool_tokens // prompt_tokens)):
        run_request_set(url, np.zeros(ranks), np.full(ranks, prompt_tokens), np.ones(ranks, dtype=int),
                        seed=seed + i, routed_dp_rank=list(range(ranks)))
        for r in range(ranks):
            seen[r].append(prompt_tokens)
    if mixed_requests:
        arrivals, inputs, outputs = request_set(mixed_requests, 4.0, seed)
        for res in run_request_set(url, arrivals, inputs, outputs, seed=seed):
            seen.setdefault(int(res.dp_rank or 0), []).append(res.input_tokens)
    return seen


def summarize(results: list[RequestResult]) -> dict:
    """Mean TTFT / TPOT and output throughput of a finished request set (metrics.py's definitions)."""
    ttft = np.array([r.ttft_s for r in results])
    tpot = np.array([r.tpot_s for r in results])
    span = max(r.finish_s for r in results) - min(r.arrival_s for r in results)
    return {"requests": len(results), "ttft_mean": float(ttft.mean()), "tpot_mean": float(np.nanmean(tpot)),
            "throughput": float(sum(r.output_tokens for r in results) / span)}


def tpot_by_other_rank(results: list[RequestResult], idle_below: float = 0.2, busy_above: float = 0.8) -> dict:
    """Real TPOT of requests whose decode ran while another DP rank had a request in flight for less than
    idle_below / more than busy_above of the time (sampled at 40 points): the contention seen under traffic."""
    groups: dict[str, list[float]] = {"other_idle": [], "other_busy": []}
    for x in results:
        first = x.arrival_s + x.ttft_s
        if x.dp_rank is None or not np.isfinite(x.tpot_s) or x.finish_s <= first:
            continue
        others = [(y.arrival_s, y.finish_s) for y in results if y.dp_rank is not None and y.dp_rank != x.dp_rank]
        ts = np.linspace(first, x.finish_s, 40)
        share = float(np.mean([any(a <= t <= b for a, b in others) for t in ts]))
        if share < idle_below:
            groups["other_idle"].append(x.tpot_s)
        elif share > busy_above:
            groups["other_busy"].append(x.tpot_s)
    out = {f"{k}_n": len(v) for k, v in groups.items()}
    out.update({f"{k}_tpot_mean": float(np.mean(v)) if v else None for k, v in groups.items()})
    if groups["other_idle"] and groups["other_busy"]:
        out["ratio"] = out["other_busy_tpot_mean"] / out["other_idle_tpot_mean"]
    return out


# ---- profiling (calibration) --------------------------------------------------------------------------------
PREFILL_LENGTHS = (16, 128, 384, 768, 1152, 1536, 2048)
DECODE_SETS = ((1, 64), (4, 64), (8, 64), (16, 64), (4, 512), (8, 384), (16, 256))  # (batch per rank, prompt)
DECODE_OUTPUT = 32
SERVER_ARGS = ("--dp-size", "2", "--enable-metrics")  # metrics: per-request server timestamps in meta_info


def _server_prefill_s(r: RequestResult) -> float:
    s = r.server or {}
    if "prefill_finished_time" in s and "forward_entry_time" in s:
        return float(s["prefill_finished_time"] - s["forward_entry_time"])
    return float("nan")


def _server_step_s(r: RequestResult) -> float:
    s = r.server or {}
    if "request_finished_ts" in s and "prefill_finished_time" in s and r.output_tokens > 1:
        return float(s["request_finished_ts"] - s["prefill_finished_time"]) / (r.output_tokens - 1)
    return float("nan")


def fresh_lengths(count: int, exclude, low: int = 37, high: int = 760) -> list[int]:
    """`count` prompt lengths spread over [low, high] that are not in `exclude` (lengths a rank already ran)."""
    taken = set(exclude)
    out = []
    for n in np.linspace(low, high, count).astype(int):
        n = int(n)
        while n in taken:
            n += 1
        taken.add(n)
        out.append(n)
    return out


def measure_new_shape(url: str, lengths) -> dict:
    """Rank 0 alone: each length prefilled for the first time ("fresh"), then twice more with other prompts of the
    same length ("repeat", the smaller kept). The difference is the new-shape cost (fit_new_shape)."""
    out = {"input_tokens": [], "fresh_s": [], "repeat_s": []}
    for n in lengths:
        times = [_server_prefill_s(run_request_set(url, np.zeros(1), np.full(1, n), np.ones(1, dtype=int),
                                                   seed=5003 * k + n, routed_dp_rank=[0])[0]) for k in range(3)]
        out["input_tokens"].append(int(n))
        out["fresh_s"].append(times[0])
        out["repeat_s"].append(min(times[1:]))
    return out


def profile_lengths(measurements: dict) -> dict[int, list[int]]:
    """Prefill token counts a profile ran on each rank (they are no longer new shapes afterwards)."""
    both = list(measurements["prefill"]["input_tokens"])
    dec = measurements["decode"]
    both += [int(b * (c / b - DECODE_OUTPUT / 2)) for b, c in zip(dec["batch"], dec["context_sum"])]  # B x P
    return {0: both + list(measurements.get("new_shape", {}).get("input_tokens", [])), 1: both}


def profile(url: str, reps: int, chunk: int, prefill_lengths=PREFILL_LENGTHS, decode_sets=DECODE_SETS,
            seen_lengths=(), new_shape_points: int = 8) -> dict:
    """Measure a dp2 server, each point with rank 0 alone busy and mirrored on both ranks (`routed_dp_rank`),
    fit, return {"measurements", "fits", "coefficients"} (the calibration file's sections). Every prefill length
    is run once on both ranks first (unmeasured), so the step fit sees lengths the ranks ran before; the new-shape
    cost is measured on `new_shape_points` lengths neither in `prefill_lengths` nor in `seen_lengths`."""
    for n in prefill_lengths:
        if n <= chunk:
            run_request_set(url, np.zeros(2), np.full(2, n), np.ones(2, dtype=int), seed=77 + n, routed_dp_rank=[0, 1])
    new_shape = measure_new_shape(url, fresh_lengths(new_shape_points, set(prefill_lengths) | set(seen_lengths)))
    pre = {k: [] for k in ("input_tokens", "mode", "ttft_s", "server_prefill_s")}
    for rep in range(reps):
        for n in prefill_lengths:
            if n > chunk:
                continue
            for mode, ranks in (("alone", [0]), ("both", [0, 1])):
                k = len(ranks)
                for r in run_request_set(url, np.zeros(k), np.full(k, n), np.ones(k, dtype=int),
                                         seed=7919 * rep + n + 31 * k, routed_dp_rank=ranks):
                    pre["input_tokens"].append(n)
                    pre["mode"].append(mode)
                    pre["ttft_s"].append(r.ttft_s)
                    pre["server_prefill_s"].append(_server_prefill_s(r))
    dec = {k: [] for k in ("batch", "mode", "context_sum", "step_s", "server_step_s", "ttft_s", "server_prefill_s")}
    for rep in range(reps):
        for b, p in decode_sets:
            for mode, ranks in (("alone", [0] * b), ("both", [0] * b + [1] * b)):
                k = len(ranks)
                res = run_request_set(url, np.zeros(k), np.full(k, p), np.full(k, DECODE_OUTPUT),
                                      seed=1000 + 17 * rep + b + p + k, routed_dp_rank=ranks)
                for rank in sorted(set(ranks)):
                    mine = res[rank * b:(rank + 1) * b]
                    dec["batch"].append(b)
                    dec["mode"].append(mode)
                    dec["context_sum"].append(float(b * (p + DECODE_OUTPUT / 2)))
                    dec["step_s"].append(float(np.median([r.tpot_s for r in mine])))
                    dec["server_step_s"].append(float(np.median([_server_step_s(r) for r in mine])))
                    dec["ttft_s"].append(float(np.median([r.ttft_s for r in mine])))
                    dec["server_prefill_s"].append(float(np.median([_server_prefill_s(r) for r in mine])))
    dec["output_tokens"] = DECODE_OUTPUT
    measurements = {"prefill": pre, "decode": dec, "new_shape": new_shape}
    fits, coef = fit_all(measurements)
    return {"measurements": measurements, "fits": fits, "coefficients": coef}


# ---- the simulator side of the fidelity check -----------------------------------------------------------------
def _workload(arrivals, inputs, outputs):
    from tiersched.sim.workloads import Workload

    n = len(arrivals)
    return Workload(name="fidelity", arrival_s=np.asarray(arrivals, dtype=float),
                    input_tokens=np.asarray(inputs, dtype=np.int64),
                    output_tokens=np.asarray(outputs, dtype=np.int64),
                    priority=np.zeros(n, dtype=np.int64), class_of=np.zeros(n, dtype=np.int64),
                    ignore_eos=np.ones(n, dtype=bool))  # the fidelity requests are sent with ignore_eos


def merge_intervals(intervals: list[np.ndarray]) -> np.ndarray:
    """Union of [K, 2] (start, end) interval arrays as sorted disjoint intervals."""
    iv = np.concatenate([np.asarray(x, dtype=float).reshape(-1, 2) for x in intervals]) if intervals else np.zeros((0, 2))
    if iv.size == 0:
        return np.zeros((0, 2))
    iv = iv[np.argsort(iv[:, 0], kind="stable")]
    out = [iv[0].copy()]
    for a, b in iv[1:]:
        if a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append(np.array([a, b]))
    return np.array(out)


CONTENTION_PASSES = 4


def simulate_request_set(arrivals, inputs, outputs, dispatch: str = "round_robin", ordering: str = "fcfs",
                         preset=None, ranks=None, passes: int = CONTENTION_PASSES, seen_lengths=None) -> dict:
    """Mean TTFT / TPOT / throughput of the same request set in the simulator on the cpu-tiny preset.

    With `ranks` (the DP rank the real server gave each request), each rank is simulated on its own as a 1-rank
    deployment: the real dp2 server without DP attention runs its ranks independently, not in lockstep. Host-CPU
    contention couples them: pass 0 replays every rank alone, each later pass replays every rank with the other
    ranks' busy intervals of the previous pass (`co_busy`: steps that start inside are slower by the preset's
    contention factors), `passes` times or until the busy timelines stop changing.
    Without `ranks`, the whole set runs on the lockstep multi-rank model with `dispatch`.
    `seen_lengths` {rank: prompt lengths the rank prefilled before the set (warm_up)} seeds the new-shape cost."""
    from dataclasses import replace

    from tiersched.sim import PolicySet, get_preset, simulate

    seen_lengths = {int(k): v for k, v in (seen_lengths or {}).items()}  # JSON keeps the ranks as strings
    preset = preset or get_preset("cpu-tiny")
    arrivals, inputs, outputs = (np.asarray(a) for a in (arrivals, inputs, outputs))
    policies = PolicySet(ordering=ordering, dispatch=dispatch)
    if ranks is None:
        seen = [(seen_lengths or {}).get(r, ()) for r in range(preset.dp)]
        m = simulate(preset, _workload(arrivals, inputs, outputs), policies, record_timeline=False,
                     seen_prefill_shapes=seen).metrics
        return {"requests": m["finished"], "ttft_mean": m["ttft_mean"], "tpot_mean": m["tpot_mean"],
                "throughput": m["throughput"], "model": "lockstep"}
    ranks = np.asarray(ranks)
    single = replace(preset, dp=1)
    hw = preset.hardware
    uniq = np.unique(ranks)
    contended = bool(hw.contention_prefill or hw.contention_decode) and uniq.size > 1
    busy: dict = {}
    done_passes = 0
    for it in range(max(1, passes) if contended else 1):
        recs, new_busy = {}, {}
        for r in uniq:
            sel = np.flatnonzero(ranks == r)
            co = merge_intervals([busy[o] for o in uniq if o != r]) if it > 0 else None
            res = simulate(single, _workload(arrivals[sel], inputs[sel], outputs[sel]), policies,
                           record_timeline=False, co_busy=co, record_busy=True,
                           seen_prefill_shapes=[(seen_lengths or {}).get(int(r), ())])
            recs[r], new_busy[r] = res.records, res.busy
        done_passes = it + 1
        stable = it > 0 and all(new_busy[r].shape == busy[r].shape and np.allclose(new_busy[r], busy[r])
                                for r in uniq)
        busy = new_busy
        if stable:
            break
    ttft, tpot, finish, out = [], [], [], []
    for r in uniq:
        sel = np.flatnonzero(ranks == r)
        rec = recs[r]
        ttft.append(rec["ttft"])
        tpot.append(rec["tpot"])
        finish.append(rec["arrival"] + rec["e2e"])
        out.append(outputs[sel])
    ttft, tpot, finish, out = (np.concatenate(x) for x in (ttft, tpot, finish, out))
    done = np.isfinite(finish)
    span = float(finish[done].max() - arrivals.min())
    both = merge_intervals([busy[r] for r in uniq])
    return {"requests": int(done.sum()), "ttft_mean": float(np.nanmean(ttft[done])),
            "tpot_mean": float(np.nanmean(tpot[done])), "throughput": float(out[done].sum() / span),
            "model": "independent ranks" + (f", contention passes {done_passes}" if contended else ""),
            "busy_s": float((both[:, 1] - both[:, 0]).sum()) if both.size else 0.0}


def request_set(n: int, rate: float, seed: int, input_range=(32, 768), output_range=(8, 48)):
    """The fidelity request set: Poisson arrivals, uniform prompt and output lengths (arrays)."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=n))
    arrivals -= arrivals[0]
    inputs = rng.integers(input_range[0], input_range[1] + 1, size=n)
    outputs = rng.integers(output_range[0], output_range[1] + 1, size=n)
    return arrivals, inputs, outputs


def load_average() -> list[float]:
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return []
