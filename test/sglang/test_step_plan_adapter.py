"""The step plan's adapter without a server: the all-gather row encoding, the budget cap, the prior."""
from __future__ import annotations

import math
from dataclasses import fields
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiersched.core.request.step_plan import ROOFLINE_PARAMS, RankStepSummary, RooflineStepModel, plan_step
from tiersched.sglang.request import step_plan as sp

MODEL = RooflineStepModel(overhead_s=0.0034, dense_floor_s=0.0034, dense_per_token_s=1e-9, pair_s=3.4e-8,
                          ctx_s=3.3e-7, moe_floor_s=0.0, moe_per_token_s=1.1e-5)


def _summary_values(draw, rank):
    values = {}
    for f in fields(RankStepSummary):
        if f.name == "rank":
            continue
        if f.type in (float, "float"):
            values[f.name] = draw(st.floats(0, 1e6, allow_nan=False))
        else:
            values[f.name] = draw(st.integers(-10_000, 2**40))
    return RankStepSummary(rank=rank, **values)


@st.composite
def groups(draw):
    dp = draw(st.integers(1, 4))
    attn_tp = draw(st.integers(1, 2))
    summaries = [_summary_values(draw, r) for r in range(dp)]
    ls = [draw(st.integers(0, 50)) for _ in range(dp)]
    last = [sp.StepFeatures(draw(st.integers(0, 8192)), float(draw(st.integers(0, 2**40))), draw(st.integers(0, 256)),
                            draw(st.integers(0, 2**30)), draw(st.integers(0, 10**9)) / 1e9) for _ in range(dp)]
    model = draw(st.one_of(st.none(), st.builds(RooflineStepModel, *[st.floats(0, 1.0) for _ in ROOFLINE_PARAMS])))
    return dp, attn_tp, summaries, ls, last, model


@settings(max_examples=200, deadline=None)
@given(groups())
def test_rows_round_trip(group):
    """What every rank decodes from the gathered rows is exactly what each DP rank published (summaries with their
    rank from the row position, last steps, DP rank 0's model bit for bit; other rows' models are ignored)."""
    dp, attn_tp, summaries, ls, last, model = group
    rows = []
    for r in range(dp):
        for t in range(attn_tp):  # attn-tp ranks of one DP rank publish the same state
            rows.append(sp.encode_row(ls[r], summaries[r], last[r], model if r == 0 else MODEL))
    assert all(len(row) == sp.ROW_WIDTH and all(isinstance(v, int) and -2**63 <= v < 2**63 for v in row)
               for row in rows)
    got = sp.decode_rows(rows, dp)
    assert got.summaries == tuple(summaries)
    assert got.ls_counts == tuple(ls)
    assert got.model == model
    for a, b in zip(got.last, last):
        assert (a.prefill_tokens, a.decode_count, a.decode_context) == (b.prefill_tokens, b.decode_count,
                                                                        b.decode_context)
        assert a.prefill_pairs == round(b.prefill_pairs) and a.measured_s == pytest.approx(b.measured_s, abs=1e-9)
    # and so every rank plans the same from them
    if model is not None:
        assert plan_step(got.summaries, got.model) == plan_step(summaries, model)


def test_rows_reject_wrong_shapes():
    row = sp.encode_row(0, RankStepSummary(rank=0, upstream_budget=8), sp.StepFeatures(), None)
    with pytest.raises(ValueError, match="width"):
        sp.decode_rows([row[:-1], row], 2)
    with pytest.raises(ValueError, match="multiple of 2"):
        sp.decode_rows([row, row, row], 2)
    assert sp.decode_rows([row], 1).model is None


def test_last_step_is_the_slowest_forward():
    rows = [sp.encode_row(0, RankStepSummary(rank=0, upstream_budget=8), sp.StepFeatures(128, 8256.0, 0, 0, 0.031),
                          MODEL),
            sp.encode_row(0, RankStepSummary(rank=0, upstream_budget=8), sp.StepFeatures(0, 0.0, 3, 900, 0.029), None)]
    got = sp.decode_rows(rows, 2)
    assert got.last_step_s() == pytest.approx(0.031)
    tok, pairs, count, ctx = got.last_arrays()
    assert tok.tolist() == [128, 0] and count.tolist() == [0, 3] and ctx.tolist() == [0, 900]


def test_budget_cap_applies_only_the_current_plan():
    sched = SimpleNamespace(chunked_prefill_size=512)
    sp.reset()
    try:
        plan = plan_step([RankStepSummary(rank=0, upstream_budget=512, chunk_tokens=3000, kv_room_tokens=10**6,
                                          slot_room=8),
                          RankStepSummary(rank=1, upstream_budget=512, decode_count=40, decode_context=40_000,
                                          kv_room_tokens=10**6, slot_room=8)], MODEL, min_chunk_tokens=16)
        assert plan.planned and plan.budgets[0] < 512 and plan.budgets[1] == 0
        sp.PLAN.plan, sp.PLAN.plan_iteration, sp.PLAN.dp_rank = plan, 7, 0
        assert sp.planned_budget(sched, 8) is None  # a stale plan is never applied
        budget = sp.planned_budget(sched, 7)
        assert budget == plan.budgets[0]
        with sp.BudgetCap(sched, budget):
            assert sched.chunked_prefill_size == budget
        assert sched.chunked_prefill_size == 512 and sp.PLAN.budgets_applied == 1
        sp.PLAN.dp_rank = 1  # no demand on this rank: upstream's budget stands
        assert sp.planned_budget(sched, 7) is None
        with sp.BudgetCap(sched, None):
            assert sched.chunked_prefill_size == 512
        sp.PLAN.dp_rank = 0
        off = SimpleNamespace(chunked_prefill_size=None)  # chunked prefill off: nothing to cap
        assert sp.planned_budget(off, 7) is None
    finally:
        sp.reset()


def test_batch_features():
    mode = lambda ext, dec: SimpleNamespace(is_extend=lambda: ext, is_decode=lambda: dec)  # noqa: E731
    req = lambda n_in, n_out: SimpleNamespace(origin_input_ids=[0] * n_in, output_ids=[0] * n_out)  # noqa: E731
    ext = SimpleNamespace(forward_mode=mode(True, False), extend_lens=[100, 28], prefix_lens=[0, 256])
    f = sp.batch_features(ext)
    assert f.prefill_tokens == 128 and f.prefill_pairs == 100 * 50.5 + 28 * (256 + 14.5)
    dec = SimpleNamespace(forward_mode=mode(False, True), reqs=[req(10, 3), req(20, 1)])
    f = sp.batch_features(dec)
    assert (f.prefill_tokens, f.decode_count, f.decode_context) == (0, 2, 34)
    assert sp.batch_features(SimpleNamespace(forward_mode=mode(False, False))) == sp.StepFeatures()


def test_simulator_prior_prices_a_prefill_above_a_decode():
    pytest.importorskip("tiersched.sim.presets")
    prior = sp.simulator_prior(2, samples=200)
    if prior is None:
        pytest.skip("cpu-tiny preset not calibrated in this checkout")
    z = np.zeros(2)
    decode = prior.step_seconds(z, z, np.array([4.0, 4.0]), np.array([800.0, 800.0]))
    prefill = prior.step_seconds(np.array([1024.0, 0.0]), np.array([1024 * 512.5, 0.0]), np.array([0.0, 4.0]),
                                 np.array([0.0, 800.0]))
    assert 0 < decode < prefill and math.isfinite(prefill)


def _fake_scheduler(rank):
    req = lambda n: SimpleNamespace(origin_input_ids=[1] * n, output_ids=[], num_matched_prefix_tokens=0,  # noqa: E731
                                    priority=None, time_stats=SimpleNamespace(wait_queue_entry_time=1.0))
    running = SimpleNamespace(reqs=[SimpleNamespace(origin_input_ids=[1] * 40, output_ids=[2] * 9)] * 6)
    return SimpleNamespace(
        chunked_prefill_size=512, max_prefill_tokens=16384, chunked_req=None, page_size=1, device="cpu",
        is_mixed_chunk=False,
        waiting_queue=[req(3000)] if rank == 0 else [], max_running_requests=32,
        token_to_kv_pool_allocator=SimpleNamespace(available_size=lambda: 12000),
        tree_cache=SimpleNamespace(evictable_size=lambda: 0),
        req_to_token_pool=SimpleNamespace(available_size=lambda: 32)), (None if rank == 0 else running)


def _gather_worker(rank, path, out):
    import torch.distributed as dist

    from tiersched.core.request import RequestTierConfig

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    try:
        sched, running = _fake_scheduler(rank)
        sp.PLAN.last = sp.StepFeatures(128 if rank == 0 else 0, 8256.0, 0 if rank == 0 else 6, 0 if rank == 0 else 300,
                                       0.02 + rank * 0.001)
        ls = sp.gather_and_plan(sched, dist.group.WORLD, running, None, lambda r: False, 2, 1, RequestTierConfig())
        out.put((rank, ls, sp.PLAN.plan, sp.PLAN.dp_rank, sp.planned_budget(sched, 1), sp.PLAN.model_in_use,
                 sp.PLAN.last))
    finally:
        dist.destroy_process_group()


def test_two_ranks_gather_and_compute_the_same_plan(tmp_path):
    """The real collective (gloo, two processes): both ranks get the same plan, priced by DP rank 0's model; the
    prefilling rank gets a budget, the decoding rank none."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_gather_worker, args=(r, str(tmp_path / "store"), out)) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    (r0, ls0, plan0, dp0, b0, m0, last0), (r1, ls1, plan1, dp1, b1, m1, last1) = got
    # each forward is published once: after the gather the rank's last step is cleared until its next forward
    assert last0 == last1 == sp.StepFeatures()
    assert (dp0, dp1) == (0, 1) and ls0 == ls1 == 0
    assert plan0 == plan1 and plan0.planned and m0 == m1 is not None
    assert b0 == plan0.budgets[0] and 0 < b0 <= 512 and b1 is None


def test_arrival_rate_counts_each_queued_request_once_within_the_window():
    state = sp.StepPlanState()
    req = lambda t: SimpleNamespace(time_stats=SimpleNamespace(wait_queue_entry_time=t))  # noqa: E731
    a, b = req(100.5), req(101.0)
    assert sp.note_arrivals(state, [a], now=100.6) == pytest.approx(1 / sp.ARRIVAL_WINDOW_S)
    # still waiting at the next gather: not counted again; a new one is
    assert sp.note_arrivals(state, [a, b], now=101.2) == pytest.approx(2 / sp.ARRIVAL_WINDOW_S)
    assert sp.note_arrivals(state, [], now=101.3) == pytest.approx(2 / sp.ARRIVAL_WINDOW_S)
    # both fall out of the window
    assert sp.note_arrivals(state, [], now=101.0 + sp.ARRIVAL_WINDOW_S + 0.1) == 0.0


def test_batch_features_count_whole_sequence_pairs_for_a_full_sequence_backend():
    mode = SimpleNamespace(is_extend=lambda: True, is_decode=lambda: False)
    ext = SimpleNamespace(forward_mode=mode, extend_lens=[64], prefix_lens=[1000])
    assert sp.batch_features(ext).prefill_pairs == 64 * (1000 + 65 / 2)
    assert sp.batch_features(ext, full_sequence=True).prefill_pairs == 1064 * 1065 / 2
