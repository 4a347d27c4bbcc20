"""cpu-tiny's host-CPU terms: contention between ranks, frontend latency, and their calibration fits.

GPU presets must carry 0 for both (their results are unchanged); the terms act only where a calibration sets them.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from tiersched.sim import PolicySet, fidelity, simulate
from tiersched.sim.cost_model import StepCostModel
from tiersched.sim.presets import PRESETS
from tiersched.sim.cpu_tiny import preset as cpu_tiny_preset
from tiersched.sim.routing import make_routing, token_probs

COEF = {"step_overhead_s": 0.02, "prefill_overhead_s": 0.01, "per_token_s": 2e-4, "decode_token_extra_s": 1e-3,
        "per_prefill_pair_s": 0.0, "per_decode_ctx_s": 1e-6}


def tiny(**extra):
    return cpu_tiny_preset(calibration={"coefficients": {**COEF, **extra}, "dp": 2})


def one_request(arrival=0.0, inp=200, out=20):
    return fidelity._workload(np.array([arrival]), np.array([inp]), np.array([out]))


def test_gpu_presets_have_no_host_cpu_terms():
    for name, make in PRESETS.items():
        hw = make().hardware
        assert hw.contention_prefill == hw.contention_decode == hw.frontend_latency_s == 0.0, name


def test_lockstep_step_is_slower_only_when_more_than_one_rank_is_busy():
    p = tiny(contention_decode=0.5, contention_prefill=0.25)
    cost = StepCostModel(p, token_probs(make_routing(p, 0), p.dp))
    one, _ = cost.step_times(np.array([4.0, 0.0]), np.zeros(2), np.array([400.0, 0.0]))
    two, _ = cost.step_times(np.array([4.0, 4.0]), np.zeros(2), np.array([400.0, 400.0]))
    assert two[0] == pytest.approx(1.5 * one[0])
    pre1, _ = cost.step_times(np.array([100.0, 0.0]), np.array([5050.0, 0.0]), np.zeros(2))
    pre2, _ = cost.step_times(np.array([100.0, 4.0]), np.array([5050.0, 0.0]), np.array([0.0, 400.0]))
    assert pre2[0] == pytest.approx(1.25 * pre1[0])


def test_per_rank_replay_scales_steps_inside_the_other_ranks_busy_intervals():
    p = replace(tiny(contention_decode=0.5, contention_prefill=0.5), dp=1)
    w = one_request()
    alone = simulate(p, w, PolicySet(), record_timeline=False, record_busy=True)
    always = simulate(p, w, PolicySet(), record_timeline=False, co_busy=np.array([[0.0, 1e9]]))
    assert always.records["ttft"][0] == pytest.approx(1.5 * alone.records["ttft"][0])
    assert always.records["tpot"][0] == pytest.approx(1.5 * alone.records["tpot"][0])
    # Busy only during the first half of the decode: TPOT strictly between the two.
    first = alone.records["ttft"][0]
    half = first + 0.5 * (alone.records["e2e"][0] - first)
    part = simulate(p, w, PolicySet(), record_timeline=False, co_busy=np.array([[first, half]]))
    assert alone.records["tpot"][0] < part.records["tpot"][0] < always.records["tpot"][0]
    # The busy timeline covers arrival .. finish of the lone request (one merged interval).
    assert alone.busy.shape == (1, 2) and alone.busy[0, 1] == pytest.approx(alone.records["e2e"][0])


def test_replay_couples_ranks_only_when_they_overlap_and_a_factor_is_set():
    arrivals, inputs, outputs = np.array([0.0, 0.05, 30.0]), np.array([300, 300, 300]), np.array([40, 40, 40])
    ranks = [0, 1, 0]
    plain = fidelity.simulate_request_set(arrivals, inputs, outputs, preset=tiny(), ranks=ranks)
    cont = fidelity.simulate_request_set(arrivals, inputs, outputs, preset=tiny(contention_decode=0.6,
                                                                                contention_prefill=0.6), ranks=ranks)
    assert "contention" in cont["model"] and "contention" not in plain["model"]
    assert cont["tpot_mean"] > plain["tpot_mean"] * 1.2  # two of three requests decode side by side
    # A request alone on the machine is unaffected: the lone third one keeps its uncontended TTFT.
    lone = fidelity.simulate_request_set(arrivals[2:], inputs[2:], outputs[2:], preset=tiny(), ranks=[0])
    solo = fidelity.simulate_request_set(arrivals[2:], inputs[2:], outputs[2:],
                                         preset=tiny(contention_decode=0.6, contention_prefill=0.6), ranks=[0])
    assert solo["ttft_mean"] == lone["ttft_mean"] and solo["tpot_mean"] == lone["tpot_mean"]


def test_frontend_latency_shifts_ttft_and_finish_not_tpot():
    w = one_request()
    base = simulate(tiny(), w, PolicySet(), record_timeline=False)
    late = simulate(tiny(frontend_latency_s=0.07), w, PolicySet(), record_timeline=False)
    assert late.records["ttft"][0] == pytest.approx(base.records["ttft"][0] + 0.07)
    assert late.records["e2e"][0] == pytest.approx(base.records["e2e"][0] + 0.07)
    assert late.records["tpot"][0] == pytest.approx(base.records["tpot"][0])


def test_fit_all_recovers_contention_and_frontend_latency_from_server_timings():
    n = np.array([16, 384, 1152, 2048] * 2, dtype=float)
    pmode = ["alone"] * 4 + ["both"] * 4
    server_prefill = (0.01 + 2e-4 * n) * np.where(np.array(pmode) == "both", 1.3, 1.0)
    b = np.array([1, 8, 8, 16] * 2, dtype=float)
    ctx = b * np.array([80, 80, 400, 272] * 2)
    dmode = ["alone"] * 4 + ["both"] * 4
    step = (0.012 + 1.5e-3 * b + 1e-6 * ctx) * np.where(np.array(dmode) == "both", 1.8, 1.0)
    m = {"prefill": {"input_tokens": n.tolist(), "mode": pmode, "ttft_s": (server_prefill + 0.04).tolist(),
                     "server_prefill_s": server_prefill.tolist()},
         "decode": {"batch": b.tolist(), "mode": dmode, "context_sum": ctx.tolist(), "step_s": (step * 2).tolist(),
                    "server_step_s": step.tolist()}}
    fits, coef = fidelity.fit_all(m)
    assert fits["timing"] == "server"
    assert coef["contention_prefill"] == pytest.approx(0.3, rel=1e-6)
    assert coef["contention_decode"] == pytest.approx(0.8, rel=1e-6)
    assert coef["frontend_latency_s"] == pytest.approx(0.04, rel=1e-6)
    assert coef["step_overhead_s"] == pytest.approx(0.012, rel=1e-5)  # fitted on the alone rows only
    assert coef["per_token_s"] == pytest.approx(2e-4, rel=1e-5)


def test_merge_intervals():
    got = fidelity.merge_intervals([np.array([[0, 1], [3, 4]]), np.array([[0.5, 2], [5, 6]])])
    assert got.tolist() == [[0, 2], [3, 4], [5, 6]]
    assert fidelity.merge_intervals([]).shape == (0, 2)


def test_tpot_by_other_rank_splits_requests_by_the_other_ranks_activity():
    R = fidelity.RequestResult
    results = [R(0.0, 100, 11, 0.1, 0.01, 0.2, 0),      # decodes 0.1-0.2 s with rank 1 idle
               R(1.0, 100, 11, 0.1, 0.04, 1.75, 0),     # decodes 1.1-1.75 s, rank 1 busy until 1.7 s (92%)
               R(0.9, 100, 21, 0.1, 0.03, 1.7, 1)]      # rank 1: busy 0.9-1.7 s
    got = fidelity.tpot_by_other_rank(results)
    assert got["other_idle_n"] == 1 and got["other_idle_tpot_mean"] == pytest.approx(0.01)
    assert got["other_busy_n"] == 2 and got["ratio"] == pytest.approx(0.035 / 0.01)
