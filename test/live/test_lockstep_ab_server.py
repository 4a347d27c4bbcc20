"""The live lockstep A/B's measurement on a REAL `--tp 2 --dp 2 --enable-dp-attention` CPU server with the step plan.

A short steered workload (tiersched.live.lockstep_ab: decoders on DP rank 1, long prompts on DP rank 0 via
`routed_dp_rank`) on the step-plan server the identical-plans test also uses. Asserted: every request completes on
the rank it asked for, the decoders' TPOT comes from the server's own timestamps, the server log of the run holds
plan lines that both DP ranks logged identically, some with rank 0 prefilling while rank 1 decoded, and the step
model in use predicts the measured step times better than the simulator's prior alone would have (the live fit's
rescale and refit), within a loose bound. The A/B itself (arms, repeats, significance) is
`benchmark/live_lockstep.py`; it is too long for CI.
"""
from __future__ import annotations

import os

import pytest
from rig_servers import STEP_PLAN_DPATTN as SERVER

from tiersched.live import lockstep_ab as la

pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.timeout(400), pytest.mark.rig_servers(SERVER)]

WORKLOAD = la.SteerWorkload(decoders=6, decode_output=32, decode_interval_s=0.5, long_requests=2, long_prompt=2000,
                            long_start_s=0.5, long_interval_s=1.5, seed=5)


def test_steered_run_measures_server_tpot_and_logs_identical_plans(rig_pool):
    srv = rig_pool.get(SERVER)
    # One pass first, so that the server has the steps its step-time fit needs (FIT_MIN_SAMPLES) before the measured
    # pass: on a fresh server one pass alone ends with or without a fit depending on how many decode steps the
    # machine's speed gave it, and the prediction check below then compared the rescaled prior, not the fit.
    warm = la.drive(srv.url, WORKLOAD.requests(), timeout_s=300, tag="lsab-warm")
    assert all(r.success for r in warm), [(r.rid, r.error) for r in warm if not r.success]
    start = os.path.getsize(srv.log_path)
    results = la.drive(srv.url, WORKLOAD.requests(), timeout_s=300, tag="lsab")
    assert all(r.success for r in results), [(r.rid, r.error) for r in results if not r.success]
    assert all(r.dp_rank == r.dp_rank_sent for r in results)
    summary = la.run_summary(results)
    assert summary["decode_samples"] == WORKLOAD.decoders and summary["decode_tpot_mean_s"] > 0
    assert summary["long_ttft_mean_s"] > 0
    with open(srv.log_path, errors="replace") as f:
        whole = f.read()
    plan = la.plan_report(whole[start:], whole)
    print(f"\nsteered run: {summary}\nplan: {plan}")
    assert plan["identical_on_both_ranks"] and plan["planned_steps"] > 0
    assert plan["prefill_steps_with_decode_on_other_rank"] > 0
    in_use, prior = plan["prediction_error_model_in_use"], plan["prediction_error_prior_alone"]
    assert in_use["steps"] >= 10
    assert (plan["prediction_error_fitted_model"] or {}).get("steps") == in_use["steps"], plan  # the fit, throughout
    assert in_use["median_abs"] < prior["median_abs"]
    assert abs(in_use["median"]) < 0.5  # no longer biased by a factor of several (sanity, not precision)
