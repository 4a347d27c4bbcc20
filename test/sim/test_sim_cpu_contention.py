"""cpu-tiny's host-CPU terms: contention between ranks, frontend latency, the new-shape prefill cost, and their fits.

GPU presets must carry 0 for both (their results are unchanged); the terms act only where a calibration sets them.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from tiersched.sim import PolicySet, simulate

from tiersched.live import fidelity
from tiersched.sim.cost_model import StepCostModel
from tiersched.sim.presets import PRESETS
from tiersched.sim.presets.cpu_tiny import preset as cpu_tiny_preset
from tiersched.sim.moe_routing import make_routing, token_probs

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
        assert hw.new_shape_s == hw.new_shape_per_token_s == hw.active_expert_s == 0.0, name
        assert hw.first_token_one_step_late is False, name


def test_first_prefill_of_a_length_on_a_rank_pays_the_new_shape_cost_once():
    p = replace(tiny(new_shape_s=0.004, new_shape_per_token_s=2e-5), dp=1)
    base = replace(tiny(), dp=1)
    two = fidelity._workload(np.array([0.0, 5.0, 10.0]), np.array([200, 200, 300]), np.array([4, 4, 4]))
    plain = simulate(base, two, PolicySet(), record_timeline=False).records["ttft"]
    got = simulate(p, two, PolicySet(), record_timeline=False).records["ttft"]
    extra = got - plain
    assert extra[0] == pytest.approx(0.004 + 2e-5 * 200)  # first 200-token prefill
    assert extra[1] == pytest.approx(0.0)  # the same length again
    assert extra[2] == pytest.approx(0.004 + 2e-5 * 300)  # a new length
    warmed = simulate(p, two, PolicySet(), record_timeline=False, seen_prefill_shapes=[[300]]).records["ttft"]
    assert warmed - plain == pytest.approx([0.004 + 2e-5 * 200, 0.0, 0.0])


def test_new_shape_fit_recovers_intercept_and_slope():
    n = np.array([40, 140, 240, 340, 440, 540])
    repeat = 0.005 + 3e-5 * n
    fit = fidelity.fit_new_shape({"input_tokens": n.tolist(), "fresh_s": (repeat + 0.003 + 1e-5 * n).tolist(),
                                  "repeat_s": repeat.tolist()})
    assert fit["new_shape_s"] == pytest.approx(0.003) and fit["new_shape_per_token_s"] == pytest.approx(1e-5)
    assert fidelity.fit_new_shape(None)["new_shape_s"] == 0.0
    assert fidelity.fresh_lengths(4, {37, 38, 278}) == [39, 279, 519, 760]


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


def test_first_token_reported_when_the_next_step_ends():
    """Upstream's overlap loop on CPU: a prefill's result is processed after the next batch ran."""
    w = fidelity._workload(np.array([0.0, 5.0]), np.array([200, 200]), np.array([5, 1]))
    plain = simulate(replace(tiny(), dp=1), w, PolicySet(), record_timeline=False).records
    late = simulate(replace(tiny(first_token_one_step_late=True), dp=1), w, PolicySet(), record_timeline=False).records
    decode_step = (plain["e2e"][0] - plain["ttft"][0]) / 4  # lone request: its 4 decode steps differ by ~1 us
    assert late["ttft"][0] == pytest.approx(plain["ttft"][0] + decode_step, rel=1e-4)
    assert late["e2e"][0] == pytest.approx(plain["e2e"][0])  # the last token is not delayed
    assert late["ttft"][1] == pytest.approx(plain["ttft"][1])  # one output token: nothing runs after it


def test_decode_pays_per_touched_expert_and_the_fit_recovers_it():
    from tiersched.sim.cost_model import expected_active_experts

    assert expected_active_experts(1, 2, 8, 2) == pytest.approx(4.0)  # one token: top-2 in each of 2 layers
    assert expected_active_experts(1000, 2, 8, 2) == pytest.approx(16.0)
    p = replace(tiny(active_expert_s=1e-4), dp=1)
    cost = StepCostModel(p, token_probs(make_routing(p, 0), p.dp))
    base = StepCostModel(replace(tiny(), dp=1), token_probs(make_routing(p, 0), 1))
    for b in (1, 4):
        t, _ = cost.step_times(np.array([float(b)]), np.zeros(1), np.array([100.0 * b]))
        t0, _ = base.step_times(np.array([float(b)]), np.zeros(1), np.array([100.0 * b]))
        assert t[0] - t0[0] == pytest.approx(1e-4 * expected_active_experts(b, 2, 8, 2))
    pre, _ = cost.step_times(np.array([100.0]), np.array([5050.0]), np.zeros(1))
    pre0, _ = base.step_times(np.array([100.0]), np.array([5050.0]), np.zeros(1))
    assert pre[0] == pytest.approx(pre0[0])  # prefill: inside the fitted intercept
    b = np.array([1, 1, 4, 4, 8, 8, 16, 16], dtype=float)
    c = b * np.array([80, 500] * 4)
    step = 0.003 + 2e-4 * b + 1e-7 * c + 9e-5 * expected_active_experts(b, 2, 8, 2)
    fit = fidelity.fit_decode(b, c, step)
    assert fit["per_active_expert_s"] == pytest.approx(9e-5, rel=1e-3) and fit["intercept_s"] == pytest.approx(0.003)
