"""tiersched.live.lockstep_ab without a server: the steered workload, server-side TPOT from meta_info, reading the
plan lines back and the prediction check."""
from __future__ import annotations

import pytest

from tiersched.live import lockstep_ab as la

LINE = ("[2026-12-03 10:43:41 DP{dp} TP0] tiersched step plan: seq={seq} budgets=(256, 0) chunk=256 "
        "predicted_ms=20.0 planned=1 model=abcd last_ms={ms} last_pred_ms={pred} last_tokens=(256, 0) "
        "last_decode=(0, 4) last_pairs=(33000, 0) last_context=(0, 300)\n")
PRIOR = "[x DP0 TP0] tiersched step plan: DP rank 0 publishes model=ffff (prior) {'overhead_s': 0.01, 'pair_s': 1e-07}\n"


def test_workload_steers_decoders_and_long_prompts_to_their_ranks():
    w = la.SteerWorkload(decoders=5, long_requests=2, long_prompt=100, seed=4)
    reqs = w.requests()
    assert reqs == w.requests()  # deterministic
    assert [r.arrival_s for r in reqs] == sorted(r.arrival_s for r in reqs)
    assert {r.dp_rank for r in reqs if r.role == "decode"} == {la.DECODE_RANK}
    assert {r.dp_rank for r in reqs if r.role == "long"} == {la.PREFILL_RANK}
    assert all(len(r.input_ids) == 100 for r in reqs if r.role == "long")
    assert la.generate_body(reqs[0])["routed_dp_rank"] == reqs[0].dp_rank


def test_server_tpot_from_meta_info():
    req = la.SteeredRequest("a", "decode", 0.0, (5, 6), 11, 1)
    ok = la.result_from_response(req, {"meta_info": {"completion_tokens": 11, "first_token_latency": 0.5,
                                                     "e2e_latency": 1.5, "dp_rank": 1}}, 1.6)
    assert ok.success and ok.server_tpot_s == pytest.approx(0.1)
    short = la.result_from_response(req, {"meta_info": {"completion_tokens": 3, "e2e_latency": 1.0}}, 1.0)
    assert not short.success and short.server_tpot_s is None
    misrouted = la.result_from_response(req, {"meta_info": {"completion_tokens": 11, "dp_rank": 0}}, 1.0)
    s = la.run_summary([ok, misrouted])
    assert s["misrouted"] == 1 and s["decode_samples"] == 1 and s["decode_tpot_mean_s"] == pytest.approx(0.1)


def test_plan_report_checks_identity_and_prices_steps_with_the_prior():
    log = LINE.format(dp=0, seq=7, ms=40.0, pred=30.0) + LINE.format(dp=1, seq=7, ms=40.0, pred=30.0)
    rep = la.plan_report(log, PRIOR + log)
    assert rep["identical_on_both_ranks"] and rep["planned_steps"] == 1 and rep["chunks_chosen"] == {"256": 1}
    assert rep["prediction_error_model_in_use"]["median"] == pytest.approx(-0.25)
    # prior alone: 10 ms + 33000 pairs * 1e-7 s = 13.3 ms against 40 ms
    assert rep["prediction_error_prior_alone"]["median"] == pytest.approx(13.3 / 40 - 1, abs=1e-3)
    assert rep["prefill_steps_with_decode_on_other_rank"] == 1
    differing = LINE.format(dp=0, seq=7, ms=40.0, pred=30.0) + LINE.format(dp=1, seq=7, ms=41.0, pred=30.0)
    assert not la.plan_report(differing, differing)["identical_on_both_ranks"]
    one_rank = LINE.format(dp=0, seq=8, ms=40.0, pred=30.0)
    assert not la.plan_report(one_rank, one_rank)["identical_on_both_ranks"]
