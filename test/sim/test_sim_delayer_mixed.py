"""The simulator's model of upstream's --enable-prefill-delayer and --enable-mixed-chunk on hand-built cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
from test_sim_mechanics import TINY, UniformRouting, preset, run, workload

from tiersched.core.request.upstream import FcfsOrdering
from tiersched.sim import simulate
from tiersched.sim.cost_model import StepCostModel
from tiersched.sim.moe_routing import token_probs
from tiersched.sim.presets import get_preset
from tiersched.sim.rank import RankState, RequestTable
from tiersched.sim.workloads import synthetic


def first_token_s(result) -> np.ndarray:
    return result.records["arrival"] + result.records["ttft"]


# Two ranks (round robin): requests 0 and 1 start decoding on ranks 0 and 1; request 2 then arrives on rank 0 while
# rank 1 has nothing to prefill, so the group's passes are "mixed" and rank 0 is told to wait.
LONE = dict(arrivals=[0.0, 0.0, 0.05], inputs=[100, 100, 100], outputs=[400, 400, 2])
SHORT = synthetic("Two-end", rate=60, duration_s=5, seed=1)  # 300 requests on qwen3 (DP4)


@pytest.mark.parametrize("passes", [2, 5, 10])
def test_lone_prefill_waits_max_delay_passes_minus_one_then_runs(passes):
    r = run(preset(enable_prefill_delayer=True, prefill_delayer_max_delay_passes=passes), workload(**LONE))
    assert r.metrics["prefill_delayed_passes"] == passes - 1
    assert np.isfinite(r.records["e2e"]).all()


def test_each_delayed_pass_is_one_decode_step_of_the_group():
    ttft = [run(preset(enable_prefill_delayer=True, prefill_delayer_max_delay_passes=p), workload(**LONE))
            .records["ttft"][2] for p in (1, 2, 5, 10)]
    assert ttft[0] < ttft[1] < ttft[2] < ttft[3]
    # decode steps of two one-request ranks barely change over 9 steps: the wait grows about linearly in passes
    per_pass = (ttft[3] - ttft[1]) / 8
    assert ttft[2] - ttft[1] == pytest.approx(3 * per_pass, rel=0.05)


def test_delay_ends_when_the_other_rank_can_prefill_too():
    """A request for rank 1 during rank 0's wait: both ranks prefillable, released together in one step."""
    # the first prefill step ends at 0.335 s; request 2 is waiting then, request 3 arrives a step or two later
    w = workload([0.0, 0.0, 0.05, 0.345], [100, 100, 100, 100], [400, 400, 2, 2])
    r = run(preset(enable_prefill_delayer=True, prefill_delayer_max_delay_passes=30), w)
    first = first_token_s(r)
    assert first[2] == first[3]  # aligned: the same prefill step
    assert 0 < r.metrics["prefill_delayed_passes"] < 29
    off = first_token_s(run(preset(), w))
    assert off[2] < off[3]  # without the delayer rank 0 prefills alone first


def test_low_watermark_releases_a_prefill_on_an_underused_rank():
    p = preset(enable_prefill_delayer=True, prefill_delayer_token_usage_low_watermark=0.5)
    r = run(p, workload(**LONE))
    assert r.metrics["prefill_delayed_passes"] == 0
    assert r.records["ttft"][2] == run(preset(), workload(**LONE)).records["ttft"][2]


def test_delayer_that_never_delays_is_the_plain_scheduler():
    """max_delay_passes = 1 never delays (upstream: delay while passes < max - 1): identical records."""
    p = get_preset("qwen3")
    plain = simulate(p, SHORT)
    negotiated = simulate(p.with_scheduler(enable_prefill_delayer=True, prefill_delayer_max_delay_passes=1), SHORT)
    assert negotiated.metrics["prefill_delayed_passes"] == 0
    for key in ("ttft", "e2e", "rank"):
        np.testing.assert_array_equal(negotiated.records[key], plain.records[key])


def test_queue_trigger_holds_prefills_until_queues_fill_and_max_delay_ms_bounds_it():
    p = get_preset("qwen3").with_scheduler(enable_prefill_delayer=True)
    slot_only = simulate(p, SHORT).metrics
    queue = simulate(p.with_scheduler(prefill_delayer_queue_min_ratio=1.0), SHORT).metrics
    capped = simulate(p.with_scheduler(prefill_delayer_queue_min_ratio=1.0, prefill_delayer_max_delay_ms=1.0),
                      SHORT).metrics
    assert queue["prefill_delayed_passes"] > slot_only["prefill_delayed_passes"]
    assert capped["prefill_delayed_passes"] < queue["prefill_delayed_passes"]
    assert queue["ttft_mean"] > slot_only["ttft_mean"]


# ---- mixed chunk ----------------------------------------------------------------------------------------------

def test_mixed_step_decodes_the_running_request_during_the_prefill():
    """dp=1: request 0 decodes; request 1's prefill step carries request 0's decode token when mixing is on."""
    w = workload([0.0, 0.05], [100, 3000], [50, 2])
    p = preset(dp=1)
    off, on = run(p, w), run(p.with_scheduler(enable_mixed_chunk=True), w)
    assert off.metrics["mixed_steps"] == 0 and on.metrics["mixed_steps"] == 1
    # request 0 loses no step to request 1's prefill, so it finishes earlier; request 1's step carries one more row
    assert on.records["e2e"][0] < off.records["e2e"][0]
    assert on.records["ttft"][1] > off.records["ttft"][1]


def test_running_decodes_take_their_tokens_off_the_chunk_budget():
    """chunked_prefill_size 1000 with one running request: chunks of 999 tokens (upstream: rem_chunk_tokens -
    running_bs), so a 5000-token prompt takes ceil(5000 / 999) = 6 mixed steps instead of 5."""
    w = workload([0.0, 0.05], [100, 5000], [400, 2])
    r = run(preset(dp=1, chunked_prefill_size=1000, max_prefill_tokens=1000, enable_mixed_chunk=True), w)
    assert r.metrics["mixed_steps"] == math.ceil(5000 / 999)


def test_no_mixing_without_a_prefill_or_without_kv_for_the_decodes():
    p = preset(dp=1, kv_capacity_tokens=1000, enable_mixed_chunk=True)
    table = RequestTable(workload([0.0, 0.0], [100, 100], [10, 10]))
    rs = RankState(0, p, table, FcfsOrdering(), None)
    rs.running = [0, 1]
    batch = [(2, 10, 0)]
    assert rs.mixes_running(batch)
    assert not rs.mixes_running([])
    rs.private_kv = 999  # one free token for two decode rows: they sit out this step (upstream check_decode_mem)
    assert not rs.mixes_running(batch)
    rs.private_kv = 998
    assert rs.mixes_running(batch)
    plain = RankState(0, preset(dp=1), table, FcfsOrdering(), None)
    plain.running = [0, 1]
    assert not plain.mixes_running(batch)


def test_mixed_step_costs_the_decode_rows():
    sim_tokens = np.array([500.0, 0.0])
    p = preset(dp=2)
    cost = StepCostModel(p, token_probs(UniformRouting(TINY.moe_layers, 2, TINY.num_experts, TINY.top_k), 2))
    pairs = np.array([500 * 250.5, 0.0])
    prefill, _ = cost.step_times(sim_tokens, pairs, np.zeros(2))
    mixed, _ = cost.step_times(sim_tokens + [8, 0], pairs, np.array([4000.0, 0.0]), decode_reqs=np.array([8, 0]))
    decode_only = cost.attention_time(np.array([8.0, 0]), np.zeros(2), np.array([4000.0, 0.0]))[0]
    assert mixed[0] > prefill[0]
    # the KV reads of the decode rows are added in full; the dense/expert work of 8 more tokens on top of 500
    assert mixed[0] - prefill[0] >= 4000 * cost.decode_ctx_time
    assert mixed[0] - prefill[0] < decode_only + cost.moe_time(np.array([508.0, 0]))[0]


def test_both_flags_run_a_trace_to_completion():
    p = get_preset("qwen3").with_scheduler(enable_prefill_delayer=True, enable_mixed_chunk=True)
    r = simulate(p, SHORT)
    assert np.isfinite(r.records["e2e"]).all()
    assert r.metrics["mixed_steps"] > 0 and r.metrics["prefill_delayed_passes"] > 0
