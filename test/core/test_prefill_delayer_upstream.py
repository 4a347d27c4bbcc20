"""Differential test: our copy of upstream's prefill delayer decision vs upstream's own
`PrefillDelayer._negotiate_should_allow_prefill_pure` (SGLang 0.5.23), side by side on random passes.

Upstream's object is built by its real __init__ with the runtime context (get_schedule / get_parallel) stubbed, its
all-gather replaced by a stub that checks the rank's packed row against ours and fills in every rank's row, its
clock replaced by a controllable one (time.perf_counter and `_State`'s start time), so both sides see the same
gathered infos and the same time.
"""
from __future__ import annotations

import dataclasses
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiersched.core.request.prefill_delayer import (
    DelayerState, DelayWait, PrefillDelayer, PrefillDelayerConfig, RankDelayInfo, RankPrefillDelayer,
    estimate_attempted_prefill_bs,
)

torch = pytest.importorskip("torch")
upstream = pytest.importorskip("sglang.srt.managers.prefill_delayer")


class Clock:
    now = 0.0


@pytest.fixture(scope="module")
def harness():
    """Patches upstream's module for the test's duration; yields a factory of upstream delayers."""
    mp = pytest.MonkeyPatch()
    clock = Clock()
    gathered: dict = {}

    @dataclasses.dataclass(frozen=True)
    class ClockedState(upstream._State):
        start_time: float = dataclasses.field(default_factory=lambda: clock.now)

    def fake_all_gather(output, local, group=None):
        rows = gathered["rows"]
        mine = gathered["rank"]
        assert local.tolist() == list(rows[mine]), (local.tolist(), rows[mine])  # our packing = upstream's
        full = [list(r) for r in rows]
        full[mine] = local.tolist()
        output.copy_(torch.tensor(full, dtype=torch.int64).reshape(output.shape))

    mp.setattr(upstream, "all_gather_single", fake_all_gather)
    mp.setattr(upstream, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))
    mp.setattr(upstream, "_State", ClockedState)

    def make(cfg: PrefillDelayerConfig):
        schedule = types.SimpleNamespace(
            prefill_delayer_queue_min_ratio=cfg.queue_min_ratio, prefill_delayer_max_delay_ms=cfg.max_delay_ms,
            prefill_max_requests=cfg.prefill_max_requests, disable_overlap_schedule=False)
        tp_group = types.SimpleNamespace(cpu_group=None, device_group=None, device="cpu")
        parallel = types.SimpleNamespace(num_dp_ranks=cfg.num_dp_ranks, attn_dp_enabled=cfg.attn_dp_enabled,
                                         tp_group=tp_group, attn_cp_size=1, attn_tp_size=1)
        mp.setattr(upstream, "get_schedule", lambda: schedule)
        mp.setattr(upstream, "get_parallel", lambda: parallel)
        return upstream.PrefillDelayer(cfg.max_delay_passes, cfg.token_usage_low_watermark, debug_log_enabled=False)

    yield make, clock, gathered, ClockedState
    mp.undo()


# Small ranges so that the boundaries (free slots == max prefill batch, queue == queue target) are hit often.
# The watermark flag short-circuits everything else, so it is drawn rarely (1 in 6 rows).
rare = st.integers(0, 5).map(lambda x: x == 0)
row = st.tuples(st.booleans(), rare, st.integers(0, 24), st.integers(0, 12), st.integers(0, 16), st.booleans())
config = st.builds(
    PrefillDelayerConfig,
    max_delay_passes=st.integers(0, 6),
    token_usage_low_watermark=st.one_of(st.none(), st.floats(0.0, 1.0)),
    queue_min_ratio=st.one_of(st.none(), st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0, 2.0])),
    max_delay_ms=st.one_of(st.none(), st.sampled_from([1.0, 50.0, 1000.0])),
    prefill_max_requests=st.one_of(st.none(), st.integers(0, 40)),
    num_dp_ranks=st.integers(1, 8),
    attn_dp_enabled=st.booleans(),
)


@settings(max_examples=1000, deadline=None, derandomize=True)
@given(cfg=config, data=st.data())
def test_negotiation_equals_upstream(harness, cfg, data):
    make, clock, gathered, ClockedState = harness
    up = make(cfg)
    ours = PrefillDelayer(cfg)
    rows = data.draw(st.lists(row, min_size=cfg.num_dp_ranks if cfg.attn_dp_enabled else 1,
                              max_size=cfg.num_dp_ranks if cfg.attn_dp_enabled else 1))
    if data.draw(st.booleans()):  # half the cases: every rank prefillable (the "all" branch and its triggers)
        rows = [(True,) + tuple(r[1:]) for r in rows]
    boundary = data.draw(st.sampled_from(["none", "slot", "queue"]))
    if boundary == "queue" and cfg.queue_min_ratio is not None:  # the longest queue exactly at the queue target
        cap = cfg.prefill_max_requests if cfg.prefill_max_requests is not None else max(r[3] for r in rows)
        target = min(int(max(r[2] for r in rows) * cfg.queue_min_ratio), cap)
        rows = [r[:4] + (min(r[4], target),) + r[5:] for r in rows]
        at = data.draw(st.integers(0, len(rows) - 1))
        rows[at] = rows[at][:4] + (target,) + rows[at][5:]
    rank = data.draw(st.integers(0, len(rows) - 1))
    skip_first = data.draw(st.booleans())
    wait = data.draw(st.one_of(st.none(), st.builds(DelayWait, st.integers(0, 8), st.floats(0.0, 10.0))))
    clock.now = data.draw(st.floats(0.0, 12.0))
    prefillable = bool(rows[rank][0]) if data.draw(rare.map(lambda x: not x)) else data.draw(st.booleans())
    token_usage = data.draw(st.floats(0.0, 1.0))
    running, max_bs, queue = rows[rank][2], rows[rank][3], rows[rank][4]
    max_running = data.draw(st.integers(0, 40))
    if not prefillable:  # a rank that did not try to prefill reports zeros (upstream's finalize)
        running = max_bs = queue = 0
    state = DelayerState(wait, skip_first)
    local = ours.local_info(state, prefillable=prefillable, token_usage=token_usage, running_batch=running,
                            max_prefill_bs=max_bs, waiting_queue_len=queue, now_s=clock.now)
    rows = list(rows)
    rows[rank] = local.as_row()
    if boundary == "slot":  # free slots of the fullest rank exactly equal to the largest recent prefill batch
        max_running = max(r[2] for r in rows) + max(r[3] for r in rows)
    gathered.update(rows=rows, rank=rank)
    infos = [RankDelayInfo(bool(r[0]), bool(r[1]), r[2], r[3], r[4], bool(r[5])) for r in rows]
    got = ours.negotiate(state, infos, max_running, clock.now)

    up.skip_first_delayer = skip_first
    prev = None if wait is None else ClockedState(delayed_count=wait.delayed_count, start_time=wait.start_s)
    want = up._negotiate_should_allow_prefill_pure(prev, prefillable, token_usage, running, max_bs, max_running,
                                                   queue)
    assert (got.allow, got.reason, got.estimation) == (want.output_allow, want.output_reason, want.input_estimation)
    assert (got.num_prefillable, got.num_token_watermark_force_allow) == \
        (want.num_prefillable, want.num_token_watermark_force_allow)
    assert (got.wait_passes, got.wait_s) == (want.wait_forward_passes, want.wait_seconds)
    assert got.state.skip_first == up.skip_first_delayer
    if want.next_state is None:
        assert got.state.wait is None
    else:
        assert got.state.wait == DelayWait(want.next_state.delayed_count, want.next_state.start_time)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(running=st.integers(0, 500), max_running=st.integers(0, 500), queue=st.integers(0, 500),
       dp=st.integers(1, 8), attn_dp=st.booleans())
def test_attempted_batch_estimate_equals_upstream(harness, running, max_running, queue, dp, attn_dp):
    make = harness[0]
    up = make(PrefillDelayerConfig(num_dp_ranks=dp, attn_dp_enabled=attn_dp))
    executor = upstream.PrefillDelayerSinglePassExecutor(up, token_usage=0.5)
    want = executor._estimate_attempted_prefill_bs(running_batch=running, max_running_requests=max_running,
                                                   waiting_queue_len=queue)
    assert estimate_attempted_prefill_bs(running, max_running, queue, dp, attn_dp) == want


@settings(max_examples=200, deadline=None, derandomize=True)
@given(sizes=st.lists(st.integers(0, 50), max_size=60), window=st.integers(1, 20))
def test_recent_batch_size_tracker_equals_upstream(sizes, window):
    tracker = upstream.RecentPrefillBatchSizeTracker(window_size=window)
    ours = RankPrefillDelayer(PrefillDelayer(PrefillDelayerConfig()), window=window)
    for s in sizes:
        ours.observe_pass(s)
        if s > 0:
            tracker.observe_attempt(s)
        assert ours.max_prefill_bs == tracker.max_prefill_bs


def test_mixed_ranks_delay_then_release_after_max_passes():
    """Two ranks, one can prefill and one cannot: the prefillable one waits max_delay_passes - 1 passes."""
    d = PrefillDelayer(PrefillDelayerConfig(max_delay_passes=4, num_dp_ranks=2))
    state, verdicts = DelayerState(), []
    for step in range(6):
        infos = [d.local_info(state, prefillable=True, token_usage=0.9, running_batch=1, waiting_queue_len=1,
                              now_s=step), d.local_info(state, prefillable=False, token_usage=0.9, now_s=step)]
        dec = d.negotiate(state, infos, 256, float(step))
        verdicts.append(dec.reason)
        state = dec.state
    assert verdicts == ["delay", "delay", "delay", "wait_timeout", "delay", "delay"]
