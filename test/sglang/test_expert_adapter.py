"""Expert-tier adapter, in-process: the per-source recorder against a numpy reference, the algorithm seam against
upstream's real eplb_algorithms functions, bad statistics keep the current placement, pressure feedback."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tiersched.core.expert import placement_from_phy2log, trivial_placement
from tiersched.sglang.expert import hooks as expert_tier
from tiersched.sglang.expert import state as expert_state
from tiersched.sglang.expert.recorder import (SourceLayout, SourceRecorder, densify, sources_from_gathered,
                                                   sparsify_top_k)
from tiersched.sglang.expert.state import STATE, Window


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    monkeypatch.delenv(expert_tier.FAULT_ENV, raising=False)
    saved = (STATE.config, STATE.capture)
    STATE.history = type(STATE.history)(maxlen=expert_state.HISTORY_WINDOWS)
    STATE.pending, STATE.rebalances, STATE.pressure, STATE.last = None, 0, None, None
    yield
    STATE.config, STATE.capture = saved


def reference_counts(passes, phy2log, num_logical, rows_of):
    """numpy reference: per layer, logical experts of each pass's own rows; pairs between consecutive layers."""
    num_layers = phy2log.shape[0]
    counts = np.zeros((num_layers, num_logical), dtype=np.int64)
    coact = np.zeros((num_layers - 1, num_logical, num_logical), dtype=np.int64)
    for layers in passes:
        logical_of = {}
        for layer, ids in layers:
            start, end = rows_of(ids.shape[0])
            own = ids[start:end]
            logical = np.where((own >= 0) & (own < phy2log.shape[1]), phy2log[layer][np.clip(own, 0, phy2log.shape[1] - 1)], -1)
            for e in logical[logical >= 0]:
                counts[layer, e] += 1
            if layer - 1 in logical_of:
                for before, after in zip(logical_of[layer - 1], logical):
                    for a in before[before >= 0]:
                        for b in after[after >= 0]:
                            coact[layer - 1, a, b] += 1
            logical_of[layer] = logical
    return counts, coact


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), tokens=st.integers(1, 12), num_passes=st.integers(1, 4),
       dp=st.sampled_from([None, (0, [3, 5], False), (1, [3, 5], False), (1, [2, 4], True)]))
def test_recorder_matches_numpy_reference(seed, tokens, num_passes, dp):
    rng = np.random.default_rng(seed)
    num_layers, num_logical, num_physical, top_k = 3, 6, 8, 2
    phy2log = np.stack([rng.permutation(np.arange(num_physical) % num_logical) for _ in range(num_layers)])
    layout = SourceLayout() if dp is None else SourceLayout(dp_rank=dp[0], dp_tokens=dp[1], max_len_padding=dp[2])
    num_rows = tokens if dp is None else (max(dp[1]) * len(dp[1]) if dp[2] else sum(dp[1]))
    rec = SourceRecorder(num_layers, num_logical, buffer_size=-1)
    passes = []
    for _ in range(num_passes):
        layers = []
        for layer in range(num_layers):
            ids = rng.integers(-1, num_physical + 1, size=(num_rows, top_k))  # -1 and P: masked like upstream
            rec.on_select_experts(layer, torch.from_numpy(ids), torch.from_numpy(phy2log[layer]),
                                  layout.own_rows(num_rows))
            layers.append((layer, ids))
        rec.end_pass()
        passes.append(layers)
    counts, coact = rec.local_window()
    want_counts, want_coact = reference_counts(passes, phy2log, num_logical, layout.own_rows)
    np.testing.assert_array_equal(counts.numpy(), want_counts)
    np.testing.assert_array_equal(coact.numpy().reshape(want_coact.shape), want_coact)


def test_source_layout_rows():
    assert SourceLayout().own_rows(7) == (0, 7)
    assert SourceLayout(dp_rank=1, dp_tokens=[3, 5]).own_rows(8) == (3, 8)  # SUM_LEN: concatenated
    assert SourceLayout(dp_rank=1, dp_tokens=[3, 5], max_len_padding=True).own_rows(10) == (5, 10)  # MAX_LEN
    assert SourceLayout(dp_rank=1, dp_tokens=[3, 5]).own_rows(5) == (0, 5)  # not gathered: all rows are ours


def test_circular_buffer_keeps_last_passes_like_upstream():
    rec = SourceRecorder(1, 2, buffer_size=2)
    for expert in (0, 1, 1):  # three passes, one token each; a buffer of 2 keeps the last two
        rec.on_select_experts(0, torch.tensor([[expert]]), torch.tensor([0, 1]), (0, 1))
        rec.end_pass()
    assert rec.local_window()[0].tolist() == [[0, 2]]
    rec.reset()
    assert rec.local_window()[0].sum() == 0 and rec.passes == 0


def test_sparsify_and_gather_helpers():
    coact = np.arange(2 * 4 * 4, dtype=float).reshape(2, 4, 4)
    index, value = sparsify_top_k(coact, 2)
    dense = densify(index, value, 4)
    assert (dense[..., 2:] == coact[..., 2:]).all() and (dense[..., :2] == 0).all()
    per_rank = np.array([[[1, 2]], [[3, 4]], [[1, 2]], [[3, 4]]])
    assert sources_from_gathered(per_rank, [0, 1, 0, 1], 2).tolist() == [[[1, 2]], [[3, 4]]]
    assert sources_from_gathered(per_rank[:2], [0, 0], 1).tolist() == [[[2, 3]]]  # plain TP: one source


# ---- the algorithm seam, against upstream's real functions ---------------------------------------------------


def test_compute_algorithm_marker_and_passthrough():
    from sglang.srt.eplb import eplb_algorithms as upstream

    marker = expert_tier.compute_algorithm(upstream.compute_algorithm, "source_aware_hierarchical", None, 1)
    assert marker == expert_tier.SourceAwareAlgorithm("source_aware_hierarchical", True)
    assert expert_tier.compute_algorithm(upstream.compute_algorithm, "auto", None, 1) is upstream.EplbAlgorithm.deepseek
    counts = torch.rand(2, 3, 8)
    want = upstream.rebalance_experts(counts, 10, 5, None, 1, upstream.EplbAlgorithm.deepseek)
    got = expert_tier.rebalance_experts(upstream.rebalance_experts, counts, 10, 5, None, 1,
                                        upstream.EplbAlgorithm.deepseek)
    for a, b in zip(want, got):
        assert torch.equal(a, b)


def check_upstream_tuple(result, num_layers, num_logical, num_physical, reference):
    phy2log, log2phy, logcnt = result
    for ours, theirs in zip(result, reference):  # same types, dtypes and ranks as deepseek.rebalance_experts
        assert isinstance(ours, torch.Tensor) and ours.dtype == theirs.dtype and ours.dim() == theirs.dim()
    assert phy2log.shape == (num_layers, num_physical) and logcnt.shape == (num_layers, num_logical)
    assert log2phy.shape == (num_layers, num_logical, int(logcnt.max()))
    assert (logcnt >= 1).all() and (logcnt.sum(-1) == num_physical).all()
    for layer in range(num_layers):
        for expert in range(num_logical):
            slots = log2phy[layer, expert][: logcnt[layer, expert]]
            assert (phy2log[layer, slots] == expert).all() and (log2phy[layer, expert][logcnt[layer, expert]:] == -1).all()


def test_ours_returns_upstream_tuple_and_uses_per_source_window():
    from sglang.srt.eplb import eplb_algorithms as upstream

    rng = np.random.default_rng(0)
    num_layers, num_logical, num_physical, ranks = 3, 8, 12, 2
    per_source = rng.gamma(0.5, 100.0, size=(num_layers, ranks, num_logical))
    per_source[:, 0, :4] *= 6  # rank 0 prefers experts 0-3, rank 1 the others
    per_source[:, 1, 4:] *= 6
    aggregate = torch.from_numpy(per_source.sum(1))[None]
    reference = upstream.rebalance_experts(aggregate, num_physical, num_physical // ranks, None, 1,
                                           upstream.EplbAlgorithm.deepseek)
    STATE.pending = Window(per_source)
    marker = expert_tier.SourceAwareAlgorithm("source_aware", False)
    result = expert_tier.rebalance_experts(upstream.rebalance_experts, aggregate, num_physical, num_physical // ranks,
                                           None, 1, marker)
    check_upstream_tuple(result, num_layers, num_logical, num_physical, reference)
    assert STATE.last["source"] == "per-source" and STATE.last["sources"] == ranks
    # no pending window: upstream's aggregate counts are the statistics, and history grows by one window
    result2 = expert_tier.rebalance_experts(upstream.rebalance_experts, aggregate, num_physical, num_physical // ranks,
                                            None, 1, marker)
    check_upstream_tuple(result2, num_layers, num_logical, num_physical, reference)
    assert STATE.last["source"] == "aggregate"
    pressure = [expert_tier.expert_pressure_for_rank(r) for r in range(ranks)]
    # aggregate statistics do not say which rank sent which token: every rank meets the same pressure
    assert all(p is not None and p > 0 for p in pressure) and max(pressure) - min(pressure) < 1e-12
    assert expert_tier.expert_pressure_for_rank(ranks) is None


@pytest.mark.parametrize("fault", ["nan", "negative", "shape", "empty"])
def test_bad_statistics_keep_the_current_placement(fault, monkeypatch, caplog):
    rng = np.random.default_rng(1)
    num_layers, num_logical, num_physical = 2, 6, 8
    current = np.stack([rng.permutation(np.arange(num_physical) % num_logical) for _ in range(num_layers)])
    monkeypatch.setattr(expert_tier, "_current_phy2log", lambda: current)
    monkeypatch.setenv(expert_tier.FAULT_ENV, f"ok,{fault}")
    counts = torch.from_numpy(rng.gamma(1.0, 50.0, size=(1, num_layers, num_logical)))
    marker = expert_tier.SourceAwareAlgorithm("source_aware", False)
    expert_tier.rebalance_experts(None, counts, num_physical, 4, None, 1, marker)  # first rebalance: ok
    assert not STATE.last["kept"]
    with caplog.at_level(logging.WARNING):
        phy2log, log2phy, logcnt = expert_tier.rebalance_experts(None, counts, num_physical, 4, None, 1, marker)
    assert STATE.last["kept"] and STATE.last["problem"]
    kept = placement_from_phy2log(current, num_logical)
    assert np.array_equal(phy2log.numpy(), current) and np.array_equal(log2phy.numpy(), kept.log2phy)
    assert np.array_equal(logcnt.numpy(), kept.logcnt)
    assert any("keeping the current placement" in r.getMessage() for r in caplog.records)
    assert len(STATE.history) == 1  # the bad window was not stored


def test_nan_in_upstream_counts_without_recorder_keeps_placement(monkeypatch):
    current = trivial_placement(2, 4, 8).phy2log
    monkeypatch.setattr(expert_tier, "_current_phy2log", lambda: current)
    counts = torch.ones(1, 2, 4)
    counts[0, 1, 2] = float("nan")
    phy2log, _, _ = expert_tier.rebalance_experts(None, counts, 8, 4, None, 1,
                                                  expert_tier.SourceAwareAlgorithm("source_aware", False))
    assert np.array_equal(phy2log.numpy(), current)


def test_stationary_traffic_migrates_little(monkeypatch):
    rng = np.random.default_rng(2)
    num_layers, num_logical, num_physical, ranks = 4, 16, 20, 4
    base = rng.gamma(0.7, 100.0, size=(num_layers, ranks, num_logical))
    marker = expert_tier.SourceAwareAlgorithm("source_aware", False)
    current = {"phy2log": trivial_placement(num_layers, num_logical, num_physical).phy2log}
    monkeypatch.setattr(expert_tier, "_current_phy2log", lambda: current["phy2log"])
    moved = []
    for _ in range(4):
        window = base * rng.uniform(0.95, 1.05, size=base.shape)
        STATE.pending = Window(window)
        phy2log, _, _ = expert_tier.rebalance_experts(None, torch.from_numpy(window.sum(1))[None], num_physical,
                                                      num_physical // ranks, None, 1, marker)
        moved.append(STATE.last["migrated_fraction"])
        current["phy2log"] = phy2log.numpy()
    assert max(moved[1:]) <= 0.10, moved  # after the first move away from the trivial layout


def test_startup_validation_checks_our_algorithms_only():
    """On upstream's real ServerArgs: our names get their preconditions checked at start-up; every other name,
    `source...` ones included (a future upstream algorithm, another plugin's), is left to upstream."""
    from sglang.srt.server_args import ServerArgs

    args = ServerArgs(model_path="m", eplb_algorithm="source_aware", enable_eplb=True, eplb_rebalance_num_iterations=10)
    assert expert_tier.validate_server_args(args) is None
    args.eplb_rebalance_num_iterations = 0
    with pytest.raises(ValueError, match="eplb-rebalance-num-iterations"):
        expert_tier.validate_server_args(args)
    args.eplb_algorithm, args.eplb_rebalance_num_iterations = "source_aware_hierarchical", 10
    args.ep_num_redundant_experts = -1
    with pytest.raises(ValueError, match="ep-num-redundant-experts"):
        expert_tier.validate_server_args(args)
    for other in ("deepseek", "source_balanced", "sourcery"):
        args.eplb_algorithm = other
        assert expert_tier.validate_server_args(args) is None


def test_pressure_provider_is_plugged_into_engine_tier(monkeypatch):
    import types

    import sglang.srt.runtime_context as rc

    from tiersched.config import load_config
    from tiersched.sglang.engine import loads

    expert_tier.configure(load_config({}).tier("expert"))
    STATE.pressure = np.array([1.25, 0.75])
    monkeypatch.setattr(rc, "get_parallel", lambda: types.SimpleNamespace(moe_ep_rank=1))
    try:
        assert loads.expert_pressure_of(object()) == 0.75
    finally:
        loads.set_expert_pressure_provider(None)
