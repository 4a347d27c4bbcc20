"""DP-wide (lockstep) protection of LS requests: core rule and the adapter's MLP-sync column (the simulator's
group signal: test/sim/test_request_lockstep_sim.py)."""
from __future__ import annotations

import dataclasses
from dataclasses import replace

import pytest

from tiersched.core.request import RequestTierConfig
from tiersched.core.request.ordering import AgingPrefixOrdering
from tiersched.core.request.lockstep import LockstepLsSignal, be_admission_budget, chunk_token_limit

CFG = RequestTierConfig(be_chunk_tokens=256, min_chunk_tokens=64, ls_hold_s=1.0)


# ---- core ----------------------------------------------------------------------------------------------------
def test_group_signal_caps_be_chunk_with_no_local_ls():
    # Nothing waits on this rank; another rank of the lockstep group has an LS request waiting.
    assert chunk_token_limit(0, 20_000, [], 8192, 1, CFG, group_ls_waiting=1) == 256
    assert chunk_token_limit(0, 20_000, [], 8192, 1, CFG, group_ls_waiting=0) is None
    # per-rank rule only (the previous behaviour): the group signal is ignored
    assert chunk_token_limit(0, 20_000, [], 8192, 1, replace(CFG, lockstep_chunk_cap=False), group_ls_waiting=3) is None
    # an LS chunk is never capped by the LS rule
    assert chunk_token_limit(5, 20_000, [], 8192, 1, CFG, group_ls_waiting=1) is None


def test_be_admission_budget_bounds_be_tokens_per_step():
    assert be_admission_budget(0, 0, 0, CFG) is None  # no LS anywhere: no cap
    assert be_admission_budget(0, 2, 0, CFG) == 256
    assert be_admission_budget(1, 0, 100, CFG) == 156  # local LS, 100 BE tokens already in the step
    assert be_admission_budget(0, 1, 200, CFG) == 0  # remainder 56 < min_chunk_tokens: admit no BE
    assert be_admission_budget(0, 1, 0, replace(CFG, lockstep_chunk_cap=False)) is None
    assert be_admission_budget(1, 0, 0, replace(CFG, cap_be_admissions=False)) is None


def test_signal_holds_then_expires():
    sig = LockstepLsSignal(CFG)
    assert sig.observe(0, 10.0) == 0
    assert sig.observe(3, 10.0) == 3
    assert sig.observe(0, 10.5) == 1  # within the 1 s hold
    assert sig.expire(10.9) == 1
    assert sig.expire(11.2) == 0  # a stale signal runs out
    assert LockstepLsSignal(replace(CFG, ls_hold_s=0.0)).observe(0, 0.0) == 0


@pytest.mark.parametrize("bad", [-1.0, float("inf"), float("nan")])
def test_bad_hold_is_rejected(bad):
    with pytest.raises(ValueError, match="ls_hold_s"):
        replace(CFG, ls_hold_s=bad).validate()


# ---- adapter: real upstream MLPSyncBatchInfo rows and SchedulePolicy -----------------------------------------
@pytest.fixture()
def adapter():
    pytest.importorskip("sglang.srt.managers.scheduler_components.dp_attn")
    from tiersched.sglang.request import hooks as request_tier
    from tiersched.sglang.request import lockstep

    from tiersched.sglang.request.state import STATE

    saved = STATE.config
    request_tier.configure(replace(CFG, aging_rate=0.0, token_credit_per_s=0.0))
    _enable_lockstep(True)
    yield request_tier, lockstep
    request_tier.configure(saved)


def _enable_lockstep(on: bool):
    """What `--schedule-policy prefix-aging` (on every rank) decides in a server; no server here."""
    from tiersched.sglang.request.state import STATE

    STATE.lockstep.enabled, STATE.lockstep.low_values_first = on, False
    return STATE.lockstep


def _sync_info(num_tokens):
    from sglang.srt.managers.scheduler_components.dp_attn import MLPSyncBatchInfo

    return MLPSyncBatchInfo(num_dp_ranks=2, tp_size=1, cp_size=1, num_tokens=num_tokens,
                            num_tokens_for_logprob=num_tokens, can_run_decode_cuda_graph=False,
                            can_run_draft_cuda_graph=False, can_run_prefill_cuda_graph=False,
                            is_extend_in_batch=True, local_can_run_tbo=False, local_forward_mode=1)


def _req(rid, n, priority):
    import array

    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    r = Req(rid, "", array.array("q", range(1000, 1000 + n)), SamplingParams(max_new_tokens=4), priority=priority)
    r.time_stats.set_wait_queue_entry_time(0.0)
    return r


def test_adapter_gathers_group_ls_and_caps_be_chunk_on_other_rank(adapter):
    import torch
    from sglang.srt.managers.schedule_policy import SchedulePolicy
    from sglang.srt.managers.scheduler_components.dp_attn import MLPSyncBatchInfo
    from sglang.srt.mem_cache.radix_cache import RadixCache

    request_tier, lockstep = adapter
    original_local, original_fallback = MLPSyncBatchInfo._get_local_tensor, MLPSyncBatchInfo._get_fallback_tensor

    class FakeScheduler:  # only the attribute the count reads
        def __init__(self, queue):
            self.waiting_queue = queue

    # Rank 0 has an LS request waiting; rank 1 (this process, below) has none.
    rank0_ls = lockstep.local_ls_count(FakeScheduler([_req("ls", 100, 5), _req("be", 100, 0)]), None)
    assert rank0_ls == 1
    state = _enable_lockstep(True)
    state.local_ls = rank0_ls
    row0 = lockstep.append_local_ls(original_local, _sync_info(8), device="cpu")
    state.local_ls = 0
    row1 = lockstep.append_local_ls(original_local, _sync_info(8192), device="cpu")
    fallback = lockstep.append_zero_ls(original_fallback, _sync_info(0), device="cpu")
    assert row0.shape == row1.shape == fallback.shape == (lockstep.UPSTREAM_SYNC_COLUMNS + 1,)
    assert int(row0[-1]) == 1 and int(row1[-1]) == 0 and int(fallback[-1]) == 0
    # upstream's own columns are untouched
    assert torch.equal(row1[:-1], original_local(_sync_info(8192), device="cpu"))

    def fake_gather(info, *a, **k):  # what all_gather leaves behind: one row per rank
        info.tp0_info_cpu = torch.stack([row0, row1])

    info = _sync_info(8192)
    state.iteration = 7
    lockstep.read_group_ls(fake_gather, info)
    assert state.group_ls == 1 and state.counters.gathers_with_ls == 1
    state.iteration = 8  # the next scheduling pass
    assert lockstep.group_ls_signal() == 1

    pol = SchedulePolicy.__new__(SchedulePolicy)
    request_tier.init_schedule_policy(SchedulePolicy.__init__, pol, "prefix-aging", RadixCache.create_simulated(),
                                      False, True, False)
    chunked = _req("be-long", 20_000, 0)
    chunked.full_untruncated_fill_ids = chunked.origin_input_ids
    chunked.prefix_len = 4096
    limit = request_tier.chunk_limit(SchedulePolicy.shortest_prefill_chunk_limit, pol, chunked, [], 8192, 1)
    assert limit == CFG.be_chunk_tokens  # capped although nothing waits on this rank
    assert state.counters.be_chunks_capped_by_group == 1

    # Stale: no gather for many iterations and the hold has run out -> no cap.
    state.iteration = 50
    state.signal.last_seen_s -= 10 * CFG.ls_hold_s
    assert lockstep.group_ls_signal() == 0
    assert request_tier.chunk_limit(SchedulePolicy.shortest_prefill_chunk_limit, pol, chunked, [], 8192, 1) is None


def test_adapter_row_unchanged_when_tier_inactive(adapter):
    import torch
    from sglang.srt.managers.scheduler_components.dp_attn import MLPSyncBatchInfo

    request_tier, lockstep = adapter
    state = _enable_lockstep(False)
    state.local_ls = 4
    for hook, upstream in ((lockstep.append_local_ls, MLPSyncBatchInfo._get_local_tensor),
                           (lockstep.append_zero_ls, MLPSyncBatchInfo._get_fallback_tensor)):
        row = hook(upstream, _sync_info(8), device="cpu")
        assert torch.equal(row, upstream(_sync_info(8), device="cpu"))  # upstream's own row: no extra column
    assert lockstep.group_ls_signal() == 0


def test_adapter_row_is_upstreams_without_prefix_aging_in_the_server_config(adapter, monkeypatch):
    """With the plugin loaded but another --schedule-policy in the resolved server config (published as upstream's
    tests do), every rank's MLP-sync rows keep upstream's width; with prefix-aging they gain the LS column."""
    import torch
    from sglang.srt.managers.scheduler_components.dp_attn import MLPSyncBatchInfo
    from sglang.srt.runtime_context import SpawnRanks, publish, reset_context
    from sglang.srt.server_args import ServerArgs

    request_tier, lockstep = adapter
    state = lockstep._lockstep()
    state.enabled = state.low_values_first = None  # follow the server config, as in a server
    try:
        for policy, width in (("fcfs", lockstep.UPSTREAM_SYNC_COLUMNS), ("prefix-aging", lockstep.UPSTREAM_SYNC_COLUMNS + 1)):
            reset_context()
            publish(ServerArgs(model_path="dummy", schedule_policy=policy), role="test", ranks=SpawnRanks(world_rank=0))
            local = lockstep.append_local_ls(MLPSyncBatchInfo._get_local_tensor, _sync_info(8), device="cpu")
            fallback = lockstep.append_zero_ls(MLPSyncBatchInfo._get_fallback_tensor, _sync_info(0), device="cpu")
            assert local.shape == fallback.shape == (width,), policy
            assert torch.equal(local[:lockstep.UPSTREAM_SYNC_COLUMNS], MLPSyncBatchInfo._get_local_tensor(_sync_info(8), device="cpu"))
    finally:
        reset_context()


# ---- same-step signal: config, simulator lag, adapter all-reduce -----------------------------------------------
def test_same_step_switch_sets_simulator_lag_and_validates():
    assert RequestTierConfig().same_step_signal is True
    assert AgingPrefixOrdering(CFG).lockstep_signal_lag_steps == 0
    assert AgingPrefixOrdering(replace(CFG, same_step_signal=False)).lockstep_signal_lag_steps == 1
    with pytest.raises(ValueError, match="same_step_signal"):
        replace(CFG, same_step_signal="yes").validate()
    from tiersched.config import load_config

    cfg = load_config({"TIERSCHED_SET": "request.same_step_signal=false"}).tier("request")
    assert cfg.same_step_signal is False


def test_same_step_group_mirrors_upstream_mlp_sync_condition(adapter, monkeypatch):
    from types import SimpleNamespace

    import sglang.srt.layers.dp_attention as dp_attention
    import sglang.srt.runtime_context as runtime_context

    request_tier, lockstep = adapter
    sentinel = object()
    parallel = SimpleNamespace(attn_dp_enabled=True, num_dp_ranks=2, tp_group=SimpleNamespace(cpu_group=sentinel))
    monkeypatch.setattr(runtime_context, "get_parallel", lambda: parallel)
    monkeypatch.setattr(dp_attention, "world_dp_gather_enabled", lambda: False)
    monkeypatch.delenv("SGLANG_SCHEDULER_SKIP_ALL_GATHER", raising=False)
    sched = SimpleNamespace(require_mlp_sync=True)
    assert lockstep.same_step_group(sched) is sentinel
    assert lockstep.same_step_group(SimpleNamespace(require_mlp_sync=False)) is None  # no MLP sync: no reduce
    parallel.num_dp_ranks = 1  # upstream finalises locally, no collective
    assert lockstep.same_step_group(sched) is None
    parallel.num_dp_ranks, parallel.attn_dp_enabled = 2, False
    assert lockstep.same_step_group(sched) is None
    parallel.attn_dp_enabled = True
    monkeypatch.setattr(dp_attention, "world_dp_gather_enabled", lambda: True)  # elastic WORLD gather
    assert lockstep.same_step_group(sched) is None
    monkeypatch.setattr(dp_attention, "world_dp_gather_enabled", lambda: False)
    request_tier.configure(replace(CFG, same_step_signal=False))
    _enable_lockstep(True)
    assert lockstep.same_step_group(sched) is None
    request_tier.configure(CFG)
    _enable_lockstep(False)  # another policy: no rank reduces
    assert lockstep.same_step_group(sched) is None


class _Scheduler:
    pass


def _lockstep_rank(rank, port, results):
    """One DP rank: scheduler iterations through the real hook, each followed (inside get_next_batch_to_run, as
    upstream) by an MLP-sync-like all-gather on the same group. Rank 0 chunk-prefills a BE request and never has LS
    work; rank 1 is idle except in iterations 3 and 5, when an LS request waits."""
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    from tiersched.sglang.request import hooks as request_tier
    from tiersched.sglang.request import lockstep

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    request_tier.configure(replace(CFG, ls_hold_s=0.0))
    from tiersched.sglang.request.state import POLICY_ATTR, STATE, PolicyState

    state = _enable_lockstep(True)
    state.same_step_group = dist.new_group([0, 1], backend="gloo")  # as same_step_group() decides
    state.same_step_decided = True
    # what init_schedule_policy attaches to a prefix-aging SchedulePolicy (upstream's import is too slow here)
    policy = SimpleNamespace(**{POLICY_ATTR: PolicyState.build(STATE.config, low_values_first=False)})
    chunked = SimpleNamespace(rid="be", priority=0, full_untruncated_fill_ids=list(range(20_000)), prefix_len=0)
    ls_req = SimpleNamespace(rid="ls", priority=5)
    sched = _Scheduler()  # the hook keeps a weak reference: a plain object, as upstream's Scheduler
    sched.waiting_queue, sched.chunked_req = [], chunked if rank == 0 else None
    limits = []

    def get_next_batch_to_run(self):
        row = torch.tensor([rank, state.same_step_ls], dtype=torch.int64)
        rows = torch.empty(4, dtype=torch.int64)
        dist.all_gather_into_tensor(rows, row)  # upstream's MLP sync, after ours, on every rank
        if rank == 0:
            return request_tier.chunk_limit(None, policy, chunked, [], 8192, 1)
        return None

    for it in range(1, 8):
        if rank == 1:
            sched.waiting_queue = [ls_req] if it in (3, 5) else []
        limits.append(lockstep.track_iteration(get_next_batch_to_run, sched))
    results[rank] = (limits, dataclasses.asdict(state.counters))
    dist.destroy_process_group()


def test_same_step_all_reduce_caps_other_rank_in_the_same_iteration():
    import multiprocessing as mp
    import socket

    pytest.importorskip("torch.distributed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        procs = [ctx.Process(target=_lockstep_rank, args=(r, port, results)) for r in (0, 1)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]  # no hang, no crash
        limits0, counters0 = results[0]
        _, counters1 = results[1]
    # rank 0 has no LS work; its BE chunk is capped exactly in the iterations where rank 1 has LS waiting
    # (ls_hold_s = 0), i.e. the same step, not one later
    assert [lim is not None for lim in limits0] == [False, False, True, False, True, False, False], limits0
    assert limits0[2] == CFG.be_chunk_tokens and limits0[4] == CFG.be_chunk_tokens
    assert counters0["same_step_reduces"] == counters1["same_step_reduces"] == 7
    assert counters0["same_step_reduces_with_ls"] == 2 and counters0["be_chunks_capped_by_group"] == 2
