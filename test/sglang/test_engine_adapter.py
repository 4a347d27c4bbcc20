"""Engine-tier adapter against REAL upstream objects, in-process on CPU: the real `--load-balance-method`
argparse action, LoadBalanceMethod, LoadSnapshot through upstream's own /dev/shm writer and reader,
TokenizedGenerateReqInput sent over real zmq sockets with upstream's sock_send/sock_recv, and the controller's
own `maybe_external_dp_rank_routing` / `update_active_ranks` methods. The hooks are called the way
HookRegistry's wrappers call them, without patching upstream globally."""
from __future__ import annotations

import argparse
import array
import logging
import math
import types
import uuid

import numpy as np
import pytest

dpc = pytest.importorskip("sglang.srt.managers.data_parallel_controller")

import zmq  # noqa: E402
from sglang.srt.managers.io_struct import (  # noqa: E402
    ActiveRanksOutput, FlushCacheReqInput, TokenizedGenerateReqInput, sock_recv)
from sglang.srt.managers.load_snapshot import (  # noqa: E402
    LoadSnapshot, ShmLoadSnapshotReader, ShmLoadSnapshotWriter)
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: E402
from sglang.srt.server_args import ServerArgs  # noqa: E402

from tiersched.core.engine import EngineTierConfig  # noqa: E402
from tiersched.core.engine.prefix_index import page_keys  # noqa: E402
from tiersched.core.expert import metrics  # noqa: E402
from tiersched.sglang.engine import hooks as engine_tier, loads as engine_tier_loads  # noqa: E402


def gen_req(rid, ids, routed=None, routing_key=None):
    return TokenizedGenerateReqInput(
        rid=rid, input_text=None, input_ids=array.array("i", ids), input_embeds=None, mm_inputs=None,
        token_type_ids=None, sampling_params=SamplingParams(max_new_tokens=1), return_logprob=False,
        logprob_start_len=-1, top_logprobs_num=0, token_ids_logprob=None, stream=False, routed_dp_rank=routed,
        routing_key=routing_key)


@pytest.fixture
def shm_path():
    path = f"/dev/shm/sglang_loads_tiersched_test_{uuid.uuid4().hex[:8]}.shm"
    yield path
    import os
    for p in (path, engine_tier_loads.side_path(path)):
        if os.path.exists(p):
            os.unlink(p)


class FakeController:
    """The attributes ScoreDispatchState reads; the routing/status methods are upstream's own."""

    maybe_external_dp_rank_routing = dpc.DataParallelController.maybe_external_dp_rank_routing
    update_active_ranks = dpc.DataParallelController.update_active_ranks

    def __init__(self, n, reader, ctx):
        self.workers, self.pulls = [], []
        for r in range(n):
            addr = f"inproc://tiersched-{uuid.uuid4().hex}"
            pull = ctx.socket(zmq.PULL)
            pull.bind(addr)
            push = ctx.socket(zmq.PUSH)
            push.connect(addr)
            self.workers.append(push)
            self.pulls.append(pull)
        self.status = [True] * n
        self.dp_active = [True] * n
        self.max_dp_size = n
        self._active_workers = list(range(n))
        self.load_snapshot_reader = reader
        self.server_args = types.SimpleNamespace(enable_dp_attention=False)

    def received(self, rank):
        out = []
        while self.pulls[rank].poll(50):
            out.append(sock_recv(self.pulls[rank]))
        return out


@pytest.fixture
def controller(shm_path, monkeypatch):
    # update_active_ranks reads the published exec namespace: a non-elastic deployment
    monkeypatch.setattr(dpc, "get_exec", lambda: types.SimpleNamespace(moe=types.SimpleNamespace(elastic_ep_backend=None)))
    writers = [ShmLoadSnapshotWriter(shm_path, 2, r) for r in range(2)]
    ctx = zmq.Context()
    c = FakeController(2, ShmLoadSnapshotReader(shm_path, 2), ctx)
    c.snapshot_writers = writers
    yield c
    for s in c.workers + c.pulls:
        s.close(linger=0)
    ctx.term()


def test_cli_accepts_score_only_through_the_hook():
    plain = argparse.ArgumentParser()
    ServerArgs.add_cli_args(plain)
    with pytest.raises(SystemExit):
        plain.parse_args(["--model-path", "m", "--load-balance-method", "score"])
    hooked = argparse.ArgumentParser()
    engine_tier.accept_method_choice(ServerArgs.add_cli_args(hooked), hooked)
    assert hooked.parse_args(["--model-path", "m", "--load-balance-method", "score"]).load_balance_method == "score"
    assert hooked.parse_args(["--model-path", "m", "--load-balance-method", "total_tokens"]).load_balance_method \
        == "total_tokens"


def test_method_from_str_maps_score_and_passes_others_through():
    original = dpc.LoadBalanceMethod.__dict__["from_str"].__func__
    LBM = dpc.LoadBalanceMethod
    assert engine_tier.method_from_str(original, LBM, "score") is LBM.TOTAL_TOKENS
    assert engine_tier.method_from_str(original, LBM, "round_robin") is LBM.ROUND_ROBIN
    with pytest.raises(ValueError):
        engine_tier.method_from_str(original, LBM, "nonsense")


def test_snapshot_and_side_channel_translate_to_rank_loads(shm_path):
    writers = [ShmLoadSnapshotWriter(shm_path, 2, r) for r in range(2)]
    writers[0].write(LoadSnapshot(dp_rank=0, timestamp=10.0, num_running_reqs=3, num_waiting_reqs=2,
                                  num_waiting_uncached_tokens=700, num_used_tokens=1200, num_total_tokens=1500,
                                  max_total_num_tokens=4096, total_prefill_uncached_tokens=1000))
    writers[1].write(LoadSnapshot(dp_rank=1, timestamp=10.0, max_total_num_tokens=4096,
                                  total_prefill_uncached_tokens=0))
    side = engine_tier_loads.SideChannel(engine_tier_loads.side_path(shm_path), 2, writable=True)
    side.write(0, 10.0, 900, math.nan)
    side.write(1, 10.0, 0, 1.7)  # an expert-tier provider's value for rank 1
    reader = ShmLoadSnapshotReader(shm_path, 2)
    share = engine_tier_loads.RoutedTokenShare(2, moe_shared=False)
    loads = engine_tier_loads.to_rank_loads(reader.read_all(), [True, False],
                                            engine_tier_loads.SideChannel(side.path, 2, writable=False), share)
    r0, r1 = loads
    assert (r0.kv_capacity_tokens, r0.kv_used_tokens, r0.remaining_prefill_tokens, r0.queue_len, r0.running_reqs,
            r0.running_decode_tokens, r0.waiting_tokens, r0.timestamp_s) == (4096, 1200, 700, 2, 3, 900, 300, 10.0)
    assert r0.active and not r1.active
    assert r1.expert_pressure == 1.7
    assert r0.expert_pressure == 1.0  # no provider, no rate history yet: neutral
    # a later snapshot: rank 0 prefilled 2,000 tokens in 1 s, rank 1 nothing -> routed-token share 2.0 / 0.0
    writers[0].write(LoadSnapshot(dp_rank=0, timestamp=11.0, total_prefill_uncached_tokens=3000, max_total_num_tokens=4096))
    writers[1].write(LoadSnapshot(dp_rank=1, timestamp=11.0, total_prefill_uncached_tokens=0, max_total_num_tokens=4096))
    loads = engine_tier_loads.to_rank_loads(reader.read_all(), [True, True], None, share)
    assert loads[0].expert_pressure == pytest.approx(2.0) and loads[1].expert_pressure == pytest.approx(0.0)


@pytest.mark.parametrize("moe_shared", [False, True])
def test_fallback_expert_pressure_is_the_core_definition(moe_shared):
    """Without a provider the pressure is core.expert.metrics.expert_pressure over the controller's knowledge: each
    rank's MoE token rate, served on its own rank (independent replicas) or spread over the DP group (DP attention,
    routing unknown). Spread evenly, the ranks' rates cannot make any rank hot: 1.0 everywhere."""
    share = engine_tier_loads.RoutedTokenShare(3, moe_shared=moe_shared)
    np.testing.assert_array_equal(share.pressures(), [1.0, 1.0, 1.0])  # no rate yet: neutral
    for rank, tokens in enumerate([3000, 1000, 0]):
        share.observe(rank, 1.0, 0, 0.0)
        share.observe(rank, 2.0, tokens, 100.0)  # tokens prefilled in 1 s + 100 generated tokens/s
    rates = np.array([0.5 * 3100, 0.5 * 1100, 0.5 * 100])  # smoothed 0.5
    np.testing.assert_allclose(share.rates, rates)
    dest = np.full((1, 3, 3), 1 / 3) if moe_shared else np.eye(3)[None]
    expect = metrics.expert_pressure(dest, np.einsum("lsg,s->lg", dest, rates))
    np.testing.assert_allclose(share.pressures(), expect)
    if moe_shared:
        np.testing.assert_allclose(share.pressures(), [1.0, 1.0, 1.0])
    else:
        np.testing.assert_allclose(share.pressures(), rates / rates.mean())  # the routed-token share


def test_expert_pressure_provider_interface():
    assert math.isnan(engine_tier_loads.expert_pressure_of(object()))
    engine_tier_loads.set_expert_pressure_provider(lambda scheduler: 1.25)
    try:
        assert engine_tier_loads.expert_pressure_of(object()) == 1.25
    finally:
        engine_tier_loads.set_expert_pressure_provider(None)


def test_publish_extras_writes_side_slot_from_a_scheduler(shm_path, monkeypatch):
    import sglang.srt.runtime_context as rc

    monkeypatch.setattr(rc, "get_parallel", lambda: types.SimpleNamespace(num_dp_ranks=2, load_balance_method="score"))
    writer = ShmLoadSnapshotWriter(shm_path, 2, 1)
    scheduler = types.SimpleNamespace(
        load_snapshot_writer=writer,
        running_batch=types.SimpleNamespace(reqs=[types.SimpleNamespace(seqlen=100), types.SimpleNamespace(seqlen=28)]))
    snap = LoadSnapshot(dp_rank=1, timestamp=5.0)
    assert engine_tier.publish_extras(snap, scheduler) is None  # AFTER hook keeps upstream's return value
    ts, decode, pressure = engine_tier_loads.SideChannel(engine_tier_loads.side_path(shm_path), 2, False).read(1)
    assert (ts, decode) == (5.0, 128) and math.isnan(pressure)
    assert engine_tier.publish_extras(None, scheduler) is None  # throttled publish: nothing to add
    # the side file belongs to this scheduler; another scheduler of another method publishes nothing
    assert getattr(scheduler, engine_tier_loads.PUBLISHER_ATTR).side.dp_size == 2
    monkeypatch.setattr(rc, "get_parallel", lambda: types.SimpleNamespace(num_dp_ranks=2,
                                                                           load_balance_method="total_tokens"))
    other = types.SimpleNamespace(load_snapshot_writer=writer, running_batch=scheduler.running_batch)
    engine_tier.publish_extras(LoadSnapshot(dp_rank=1, timestamp=6.0), other)
    assert not hasattr(other, engine_tier_loads.PUBLISHER_ATTR)


def test_score_dispatch_sends_prefix_to_its_rank_respects_status_and_logs(controller, caplog):
    for r in range(2):
        controller.snapshot_writers[r].write(LoadSnapshot(dp_rank=r, timestamp=1.0, max_total_num_tokens=100_000))
    dispatch = engine_tier.ScoreDispatchState(controller, EngineTierConfig(block_tokens=4, snapshot_refresh_s=0.0))
    shared = list(range(1, 201))
    caplog.set_level(logging.DEBUG, logger="tiersched.engine_tier")
    dispatch.dispatch(gen_req("a", shared + [7, 7, 7]))
    first = next(r for r in range(2) if controller.received(r))
    assert "tiersched dispatch rid=a" in caplog.text and "r0: total=" in caplog.text
    # the index insert that follows the send is applied before dispatch returns (the next request sees it)
    assert dispatch.dispatcher.settled and dispatch.dispatcher.index.match(page_keys(shared, 4))[first] == 50
    # same 200-token prefix -> same rank, although it now carries more optimistic work
    dispatch.dispatch(gen_req("b", shared + [9, 9]))
    got = controller.received(first)
    assert [g.rid for g in got] == ["b"]
    # explicit routed_dp_rank: upstream routes it, we only account for it
    other = 1 - first
    dispatch.dispatch(gen_req("c", [5] * 40, routed=other))
    assert [g.rid for g in controller.received(other)] == ["c"]
    # a flush empties every cache: the index forgets, so nothing is expected cached any more
    engine_tier.forget_flushed_cache(controller_with(dispatch), FlushCacheReqInput())
    assert len(dispatch.dispatcher.index) == 0
    # a rank taken out through upstream's status path receives nothing
    controller.update_active_ranks(ActiveRanksOutput(status=[True, False]))
    for i in range(6):
        dispatch.dispatch(gen_req(f"d{i}", [i] * 30))
    assert len(controller.received(0)) == 6 and controller.received(1) == []


def test_score_dispatch_is_installed_per_controller_from_the_method_it_was_built_with(controller, monkeypatch):
    """Each DataParallelController reads the load-balance method when it is built: a score controller and then a
    total_tokens one in the same process get the score dispatch and upstream's own dispatch respectively."""
    import sglang.srt.runtime_context as rc

    def build(method):
        monkeypatch.setattr(rc, "get_parallel", lambda: types.SimpleNamespace(load_balance_method=method))
        c = dpc.DataParallelController.__new__(dpc.DataParallelController)
        c.__dict__.update(vars(controller))  # workers, status, snapshot reader of a 2-rank controller
        c.dispatching = upstream_dispatch = object()
        assert engine_tier.install_on_controller(None, c) is None
        return c, upstream_dispatch

    (score, _), (plain, plain_dispatch) = build("score"), build("total_tokens")
    state = engine_tier.dispatch_state(score)
    assert isinstance(state, engine_tier.ScoreDispatchState) and score.dispatching == state.dispatch
    assert engine_tier.dispatch_state(plain) is None and plain.dispatching is plain_dispatch


def controller_with(dispatch):
    c = dispatch.controller
    setattr(c, engine_tier.DISPATCH_ATTR, dispatch)
    return c


def test_drain_ranks_config_marks_ranks_inactive_through_upstream_status(controller):
    dispatch = engine_tier.ScoreDispatchState(controller, EngineTierConfig(drain_ranks="0", snapshot_refresh_s=0.0))
    assert controller.status == [False, True]
    for i in range(5):
        dispatch.dispatch(gen_req(f"x{i}", [1, 2, 3]))
    assert controller.received(0) == [] and len(controller.received(1)) == 5


def drain_req(**server_args):
    from sglang.srt.managers.io_struct import SetInternalStateReq

    return SetInternalStateReq(server_args=server_args)


def test_runtime_drain_through_set_internal_state_and_back(controller, caplog):
    """Upstream's /set_internal_state request object, as the controller's fallback forwards it: our keys change the
    status and are removed (the schedulers see only upstream's keys); undrain restores dispatch to the rank."""
    from tiersched.sglang.engine.drain import drain_key

    dispatch = engine_tier.ScoreDispatchState(controller, EngineTierConfig(snapshot_refresh_s=0.0))
    c = controller_with(dispatch)
    for i in range(6):
        dispatch.dispatch(gen_req(f"a{i}", [i + 1] * 30))
    assert len(controller.received(0)) + len(controller.received(1)) == 6
    caplog.set_level(logging.INFO, logger="tiersched.engine_tier")
    req = drain_req(**{drain_key(1): 1, "pp_max_micro_batch_size": 4})
    assert engine_tier.on_control_message(c, req) is None
    assert req.server_args == {"pp_max_micro_batch_size": 4}  # ours applied and removed, upstream's kept
    assert controller.status == [True, False] and controller._active_workers == [0, 1]  # control/health still reach 1
    assert "DP ranks drained now: [1]" in caplog.text
    for i in range(8):
        dispatch.dispatch(gen_req(f"b{i}", [i + 50] * 30))
    assert len(controller.received(0)) == 8 and controller.received(1) == []
    # undrain: rank 1 is a candidate again and, being idle, gets work
    engine_tier.on_control_message(c, drain_req(**{drain_key(1): 0}))
    assert controller.status == [True, True]
    for i in range(8):
        dispatch.dispatch(gen_req(f"c{i}", [i + 100] * 30))
    assert len(controller.received(1)) >= 1


def test_runtime_drain_rejects_bad_keys_and_draining_every_rank(controller):
    from tiersched.sglang.engine.drain import drain_key

    dispatch = engine_tier.ScoreDispatchState(controller, EngineTierConfig(snapshot_refresh_s=0.0))
    c = controller_with(dispatch)
    for bad in ({drain_key(2): 1}, {drain_key(0): 3}, {drain_key(0): 1, drain_key(1): 1}):
        req = drain_req(**bad)
        engine_tier.on_control_message(c, req)
        assert req.server_args == bad  # left in: the schedulers reject it, so the endpoint answers false
        assert controller.status == [True, True]
    # not the score method (no score dispatch installed): passes straight through
    plain = drain_req(**{drain_key(1): 1})
    engine_tier.on_control_message(types.SimpleNamespace(status=[True, True]), plain)
    assert plain.server_args == {drain_key(1): 1}


def test_parse_drain_request_and_new_status():
    from tiersched.sglang.engine.drain import new_status, parse_drain_request

    wanted, ok, bad = parse_drain_request({"tiersched_drain_dp_rank_1": 1, "tiersched_drain_dp_rank_0": 0,
                                           "tiersched_drain_dp_rank_9": 1, "other": 5}, 2)
    assert wanted == {1: True, 0: False} and sorted(ok) == ["tiersched_drain_dp_rank_0", "tiersched_drain_dp_rank_1"]
    assert bad == ["tiersched_drain_dp_rank_9"]
    assert new_status([False, True, True], {0: False, 2: True}) == [True, True, False]


def test_lockstep_group_only_under_dp_attention_on_a_cpu_server():
    args = dict(enable_dp_attention=True, device="cpu", chunked_prefill_size=1024, max_prefill_tokens=16384,
                enable_mixed_chunk=True)
    group = engine_tier.lockstep_group(types.SimpleNamespace(**args), 2)
    assert group is not None and group.chunk_tokens == 1024 and group.mixed_chunk
    unchunked = engine_tier.lockstep_group(types.SimpleNamespace(**{**args, "chunked_prefill_size": -1}), 2)
    assert unchunked.chunk_tokens == 16384
    assert engine_tier.lockstep_group(types.SimpleNamespace(**{**args, "enable_dp_attention": False}), 2) is None
    assert engine_tier.lockstep_group(types.SimpleNamespace(**args), 1) is None
    assert engine_tier.lockstep_group(types.SimpleNamespace(**{**args, "device": "cuda"}), 2) is None


def test_score_dispatch_under_dp_attention_prices_lockstep_stall(controller):
    controller.server_args = types.SimpleNamespace(enable_dp_attention=True, device="cpu", chunked_prefill_size=512,
                                                   max_prefill_tokens=16384, enable_mixed_chunk=False)
    on = engine_tier.ScoreDispatchState(controller, EngineTierConfig(weight_stall=1.0, snapshot_refresh_s=0.0))
    assert on.dispatcher.lockstep is not None and on.dispatcher.lockstep.chunk_tokens == 512
    off = engine_tier.ScoreDispatchState(controller, EngineTierConfig(weight_stall=0.0, snapshot_refresh_s=0.0))
    assert off.dispatcher.lockstep is None
