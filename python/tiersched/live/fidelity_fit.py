"""The cpu-tiny calibration's fits (benchmark/sim_cpu_tiny_calibrate.py, live/fidelity.py `profile`): step costs,
contention, frontend latency and the new-shape cost from the measurements; docs/simulator.md describes each."""
from __future__ import annotations

import numpy as np


# ---- step costs --------------------------------------------------------------------------------------------------
def _medians(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Median of values per distinct key row: repetitions on a shared machine have heavy-tailed outliers."""
    keys = np.asarray(keys, dtype=float).reshape(len(values), -1)
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    return uniq, np.array([np.median(np.asarray(values)[inverse == i]) for i in range(len(uniq))])


def fit_prefill(lengths: np.ndarray, ttft_s: np.ndarray) -> dict:
    """Fit TTFT of single requests on an idle rank: intercept + per_token * n + per_pair * n(n+1)/2 (>= 0),
    on the median TTFT per length, minimising the relative error (the fidelity goal is relative; an absolute fit
    lets the slow long-prompt points set an intercept that dwarfs short prompts); rel_rmse is over every
    measurement."""
    from scipy.optimize import nnls

    ttft_s = np.asarray(ttft_s, dtype=float)
    design_of = lambda n: np.stack([np.ones_like(n), n, n * (n + 1) / 2], axis=1)
    uniq, med = _medians(lengths, ttft_s)
    coef, _ = nnls(design_of(uniq[:, 0]) / med[:, None], np.ones(len(med)))
    design = design_of(np.asarray(lengths, dtype=float))
    pred = design @ coef
    return {"intercept_s": float(coef[0]), "per_token_s": float(coef[1]), "per_pair_s": float(coef[2]),
            "rel_rmse": float(np.sqrt(np.mean(((pred - ttft_s) / ttft_s) ** 2)))}


def _touched_experts(batch: np.ndarray) -> np.ndarray:
    from tiersched.sim.cost_model import expected_active_experts
    from tiersched.sim.presets.cpu_tiny import MOE_LAYERS, NUM_EXPERTS, TOP_K

    return expected_active_experts(batch, MOE_LAYERS, NUM_EXPERTS, TOP_K)


def fit_decode(batch: np.ndarray, context_sum: np.ndarray, step_s: np.ndarray) -> dict:
    """Fit decode step time: intercept + per_request * B + per_ctx * C + per_active_expert * A(B) (>= 0), A(B) the
    expected (layer, expert) pairs B tokens touch (the torch-native MoE loops over them, so the cost is concave in
    B), on the median per (B, C), minimising the relative error (as fit_prefill); rel_rmse is over every
    measurement."""
    from scipy.optimize import nnls

    b = np.asarray(batch, dtype=float)
    c = np.asarray(context_sum, dtype=float)
    step_s = np.asarray(step_s, dtype=float)
    uniq, med = _medians(np.stack([b, c], axis=1), step_s)
    columns = lambda bb, cc: np.stack([np.ones_like(bb), bb, cc, _touched_experts(bb)], axis=1)
    coef, _ = nnls(columns(uniq[:, 0], uniq[:, 1]) / med[:, None], np.ones(len(med)))
    pred = columns(b, c) @ coef
    return {"intercept_s": float(coef[0]), "per_request_s": float(coef[1]), "per_ctx_s": float(coef[2]),
            "per_active_expert_s": float(coef[3]),
            "rel_rmse": float(np.sqrt(np.mean(((pred - step_s) / step_s) ** 2)))}


def coefficients(prefill_fit: dict, decode_fit: dict, contention: dict | None = None,
                 frontend_latency_s: float = 0.0) -> dict:
    """The cost-model coefficients of the cpu-tiny preset from the two fits (see cpu_tiny.preset)."""
    overhead = decode_fit["intercept_s"]
    per_token = prefill_fit["per_token_s"]
    contention = contention or {}
    return {
        "step_overhead_s": overhead,
        "prefill_overhead_s": max(0.0, prefill_fit["intercept_s"] - overhead),
        "per_token_s": per_token,
        "decode_token_extra_s": max(0.0, decode_fit["per_request_s"] - per_token),
        "per_prefill_pair_s": prefill_fit["per_pair_s"],
        "per_decode_ctx_s": decode_fit["per_ctx_s"],
        "active_expert_s": decode_fit.get("per_active_expert_s", 0.0),
        "contention_prefill": float(contention.get("prefill", 0.0)),
        "contention_decode": float(contention.get("decode", 0.0)),
        "frontend_latency_s": float(frontend_latency_s),
    }


def contention_factor(keys: np.ndarray, mode: np.ndarray, values: np.ndarray) -> dict:
    """Relative slowdown with both ranks busy: per distinct key, median(both) / median(alone) - 1; the median of
    those (clipped at 0) and the per-key ratios."""
    keys = np.asarray(keys, dtype=float).reshape(len(values), -1)
    mode, values = np.asarray(mode), np.asarray(values, dtype=float)
    ratios = []
    for key in np.unique(keys, axis=0):
        at = (keys == key).all(axis=1)
        alone, both = values[at & (mode == "alone")], values[at & (mode == "both")]
        if alone.size and both.size:
            ratios.append(float(np.median(both) / np.median(alone)))
    return {"factor": max(0.0, float(np.median(ratios)) - 1.0) if ratios else 0.0, "ratios": ratios}


def fit_all(m: dict) -> tuple[dict, dict]:
    """Fits and coefficients from the calibration's measurements (both modes; see `profile`).

    Step costs are fitted on the rank-alone measurements, timed by the server where it reported its timestamps
    (`server_*`: scheduler prefill time, server-side time per output token), else by the client; contention is
    both-ranks / alone; the frontend latency is the median client TTFT minus server prefill time of lone prompts."""
    pre, dec = m["prefill"], m["decode"]
    pmode, dmode = np.asarray(pre["mode"]), np.asarray(dec["mode"])
    p_server = np.asarray(pre.get("server_prefill_s", [np.nan] * len(pmode)), dtype=float)
    d_server = np.asarray(dec.get("server_step_s", [np.nan] * len(dmode)), dtype=float)
    timing = "server" if np.isfinite(p_server).all() and np.isfinite(d_server).all() else "client"
    p_time = p_server if timing == "server" else np.asarray(pre["ttft_s"], dtype=float)
    d_time = d_server if timing == "server" else np.asarray(dec["step_s"], dtype=float)
    n, b, c = (np.asarray(x, dtype=float) for x in (pre["input_tokens"], dec["batch"], dec["context_sum"]))
    pa, da = pmode == "alone", dmode == "alone"
    prefill_fit = fit_prefill(n[pa], p_time[pa])
    decode_fit = fit_decode(b[da], c[da], d_time[da])
    contention = {"prefill": contention_factor(n, pmode, p_time), "decode": contention_factor(np.stack([b, c], 1),
                                                                                              dmode, d_time)}
    frontend = 0.0
    lone_streams = (b == 1) & da & np.isfinite(np.asarray(dec.get("server_prefill_s", [np.nan] * len(b)), dtype=float))
    if timing == "server" and lone_streams.any():
        # A streamed multi-token request, as served (the lone prompts above stop at their first token).
        frontend = max(0.0, float(np.median(np.asarray(dec["ttft_s"], dtype=float)[lone_streams]
                                            - np.asarray(dec["server_prefill_s"], dtype=float)[lone_streams])))
    elif timing == "server":
        frontend = max(0.0, float(np.median(np.asarray(pre["ttft_s"], dtype=float)[pa] - p_server[pa])))
    new_shape = fit_new_shape(m.get("new_shape"))
    fits = {"timing": timing, "prefill": prefill_fit, "decode": decode_fit, "contention": contention,
            "frontend_latency_s": frontend, "new_shape": new_shape}
    coef = coefficients(prefill_fit, decode_fit, {k: v["factor"] for k, v in contention.items()}, frontend)
    coef.update(new_shape_s=new_shape["new_shape_s"], new_shape_per_token_s=new_shape["new_shape_per_token_s"],
                first_token_one_step_late=bool(m.get("overlap_schedule", True)))  # upstream's default loop
    return fits, coef


def fit_new_shape(m: dict | None) -> dict:
    """extra = new_shape_s + new_shape_per_token_s x n (>= 0, least squares) over fresh - repeat per length."""
    if not m or not m.get("input_tokens"):
        return {"new_shape_s": 0.0, "new_shape_per_token_s": 0.0, "extra_s": []}
    from scipy.optimize import nnls

    n = np.asarray(m["input_tokens"], dtype=float)
    extra = np.asarray(m["fresh_s"], dtype=float) - np.asarray(m["repeat_s"], dtype=float)
    coef, _ = nnls(np.stack([np.ones_like(n), n], axis=1), np.clip(extra, 0.0, None))
    return {"new_shape_s": float(coef[0]), "new_shape_per_token_s": float(coef[1]), "extra_s": extra.tolist()}
