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


@dataclass
class RequestResult:
    arrival_s: float  # actual send time relative to the run start
    input_tokens: int
    output_tokens: int
    ttft_s: float
    tpot_s: float
    finish_s: float  # relative to the run start
    dp_rank: int | None = None


def _prompt_ids(n: int, seed: int, vocab: int = 200) -> list[int]:
    # Distinct random ids (offset past the special tokens) so no two prompts share a radix-cache prefix.
    rng = np.random.default_rng(seed)
    return (rng.integers(10, vocab, size=n)).tolist()


def stream_generate(url: str, input_ids: list[int], max_new_tokens: int, routed_dp_rank: int | None = None,
                    timeout_s: float = 600.0) -> tuple[float, float, float, int, int | None]:
    """One streaming /generate; returns (send time, first chunk time, last chunk time, tokens, dp_rank)."""
    body = {"input_ids": input_ids, "stream": True,
            "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}}
    if routed_dp_rank is not None:
        body["routed_dp_rank"] = routed_dp_rank
    req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    sent = time.perf_counter()
    first = last = None
    tokens, rank = 0, None
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
    if first is None:
        raise RuntimeError("server returned no streamed chunk")
    return sent, first, last, tokens, rank


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
            sent, first, last, tokens, rank = stream_generate(url, ids, int(outputs[i]), routed_dp_rank[i])
            tpot = (last - first) / (tokens - 1) if tokens > 1 else float("nan")
            # The actual send time is the arrival (threads may wake late on a loaded machine).
            results[i] = RequestResult(sent - start, int(inputs[i]), tokens, first - sent, tpot, last - start, rank)
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


def summarize(results: list[RequestResult]) -> dict:
    """Mean TTFT / TPOT and output throughput of a finished request set (metrics.py's definitions)."""
    ttft = np.array([r.ttft_s for r in results])
    tpot = np.array([r.tpot_s for r in results])
    span = max(r.finish_s for r in results) - min(r.arrival_s for r in results)
    return {"requests": len(results), "ttft_mean": float(ttft.mean()), "tpot_mean": float(np.nanmean(tpot)),
            "throughput": float(sum(r.output_tokens for r in results) / span)}


# ---- fitting --------------------------------------------------------------------------------------------------
def _medians(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Median of values per distinct key row: repetitions on a shared machine have heavy-tailed outliers."""
    keys = np.asarray(keys, dtype=float).reshape(len(values), -1)
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    return uniq, np.array([np.median(np.asarray(values)[inverse == i]) for i in range(len(uniq))])


def fit_prefill(lengths: np.ndarray, ttft_s: np.ndarray) -> dict:
    """Fit TTFT of single requests on an idle rank: intercept + per_token * n + per_pair * n(n+1)/2 (>= 0),
    on the median TTFT per length; rel_rmse is over every measurement."""
    from scipy.optimize import nnls

    ttft_s = np.asarray(ttft_s, dtype=float)
    design_of = lambda n: np.stack([np.ones_like(n), n, n * (n + 1) / 2], axis=1)
    uniq, med = _medians(lengths, ttft_s)
    coef, _ = nnls(design_of(uniq[:, 0]), med)
    design = design_of(np.asarray(lengths, dtype=float))
    pred = design @ coef
    return {"intercept_s": float(coef[0]), "per_token_s": float(coef[1]), "per_pair_s": float(coef[2]),
            "rel_rmse": float(np.sqrt(np.mean(((pred - ttft_s) / ttft_s) ** 2)))}


def fit_decode(batch: np.ndarray, context_sum: np.ndarray, step_s: np.ndarray) -> dict:
    """Fit decode step time: intercept + per_request * B + per_ctx * C (>= 0), on the median per (B, C);
    rel_rmse is over every measurement."""
    from scipy.optimize import nnls

    b = np.asarray(batch, dtype=float)
    c = np.asarray(context_sum, dtype=float)
    step_s = np.asarray(step_s, dtype=float)
    uniq, med = _medians(np.stack([b, c], axis=1), step_s)
    coef, _ = nnls(np.stack([np.ones(len(uniq)), uniq[:, 0], uniq[:, 1]], axis=1), med)
    design = np.stack([np.ones_like(b), b, c], axis=1)
    pred = design @ coef
    return {"intercept_s": float(coef[0]), "per_request_s": float(coef[1]), "per_ctx_s": float(coef[2]),
            "rel_rmse": float(np.sqrt(np.mean(((pred - step_s) / step_s) ** 2)))}


def coefficients(prefill_fit: dict, decode_fit: dict) -> dict:
    """The cost-model coefficients of the cpu-tiny preset from the two fits (see cpu_tiny.preset)."""
    overhead = decode_fit["intercept_s"]
    per_token = prefill_fit["per_token_s"]
    return {
        "step_overhead_s": overhead,
        "prefill_overhead_s": max(0.0, prefill_fit["intercept_s"] - overhead),
        "per_token_s": per_token,
        "decode_token_extra_s": max(0.0, decode_fit["per_request_s"] - per_token),
        "per_prefill_pair_s": prefill_fit["per_pair_s"],
        "per_decode_ctx_s": decode_fit["per_ctx_s"],
    }


# ---- profiling (calibration) --------------------------------------------------------------------------------
PREFILL_LENGTHS = (16, 128, 384, 768, 1152, 1536, 2048)
DECODE_SETS = ((1, 64), (4, 64), (8, 64), (16, 64), (4, 512), (8, 384), (16, 256))  # (batch per rank, prompt)
DECODE_OUTPUT = 32


def profile(url: str, reps: int, chunk: int, prefill_lengths=PREFILL_LENGTHS, decode_sets=DECODE_SETS) -> dict:
    """Measure a dp2 server with mirrored requests on both ranks (`routed_dp_rank`), fit, return
    {"measurements", "fits", "coefficients"} (the calibration file's sections)."""
    lengths, ttfts = [], []
    for rep in range(reps):
        for n in prefill_lengths:
            if n > chunk:
                continue
            for r in run_request_set(url, np.zeros(2), np.full(2, n), np.ones(2, dtype=int), seed=7919 * rep + n,
                                     routed_dp_rank=[0, 1]):
                lengths.append(n)
                ttfts.append(r.ttft_s)
    batches, ctx, steps = [], [], []
    for rep in range(reps):
        for b, p in decode_sets:
            res = run_request_set(url, np.zeros(2 * b), np.full(2 * b, p), np.full(2 * b, DECODE_OUTPUT),
                                  seed=1000 + 17 * rep + b + p, routed_dp_rank=[0] * b + [1] * b)
            for rank in (0, 1):
                batches.append(b)
                ctx.append(float(b * (p + DECODE_OUTPUT / 2)))
                steps.append(float(np.median([r.tpot_s for r in res[rank * b:(rank + 1) * b]])))
    prefill_fit = fit_prefill(np.array(lengths), np.array(ttfts))
    decode_fit = fit_decode(np.array(batches), np.array(ctx), np.array(steps))
    return {"measurements": {"prefill": {"input_tokens": lengths, "ttft_s": ttfts},
                             "decode": {"batch": batches, "context_sum": ctx, "step_s": steps,
                                        "output_tokens": DECODE_OUTPUT}},
            "fits": {"prefill": prefill_fit, "decode": decode_fit},
            "coefficients": coefficients(prefill_fit, decode_fit)}


# ---- the simulator side of the fidelity check -----------------------------------------------------------------
def _workload(arrivals, inputs, outputs):
    from tiersched.sim.workloads import Workload

    n = len(arrivals)
    return Workload(name="fidelity", arrival_s=np.asarray(arrivals, dtype=float),
                    input_tokens=np.asarray(inputs, dtype=np.int64),
                    output_tokens=np.asarray(outputs, dtype=np.int64),
                    priority=np.zeros(n, dtype=np.int64), class_of=np.zeros(n, dtype=np.int64))


def simulate_request_set(arrivals, inputs, outputs, dispatch: str = "round_robin", ordering: str = "fcfs",
                         preset=None, ranks=None) -> dict:
    """Mean TTFT / TPOT / throughput of the same request set in the simulator on the cpu-tiny preset.

    With `ranks` (the DP rank the real server gave each request), each rank is simulated on its own as a 1-rank
    deployment: the real dp2 server without DP attention runs its ranks independently, not in lockstep.
    Without it, the whole set runs on the lockstep multi-rank model with `dispatch`."""
    from dataclasses import replace

    from tiersched.sim import PolicySet, get_preset, simulate

    preset = preset or get_preset("cpu-tiny")
    arrivals, inputs, outputs = (np.asarray(a) for a in (arrivals, inputs, outputs))
    policies = PolicySet(ordering=ordering, dispatch=dispatch)
    if ranks is None:
        m = simulate(preset, _workload(arrivals, inputs, outputs), policies, record_timeline=False).metrics
        return {"requests": m["finished"], "ttft_mean": m["ttft_mean"], "tpot_mean": m["tpot_mean"],
                "throughput": m["throughput"], "model": "lockstep"}
    ranks = np.asarray(ranks)
    single = replace(preset, dp=1)
    ttft, tpot, finish, out = [], [], [], []
    for r in np.unique(ranks):
        sel = np.flatnonzero(ranks == r)
        rec = simulate(single, _workload(arrivals[sel], inputs[sel], outputs[sel]), policies,
                       record_timeline=False).records
        ttft.append(rec["ttft"])
        tpot.append(rec["tpot"])
        finish.append(rec["arrival"] + rec["e2e"])
        out.append(outputs[sel])
    ttft, tpot, finish, out = (np.concatenate(x) for x in (ttft, tpot, finish, out))
    done = np.isfinite(finish)
    span = float(finish[done].max() - arrivals.min())
    return {"requests": int(done.sum()), "ttft_mean": float(np.nanmean(ttft[done])),
            "tpot_mean": float(np.nanmean(tpot[done])), "throughput": float(out[done].sum() / span),
            "model": "independent ranks"}


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
