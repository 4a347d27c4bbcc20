"""prefix-aging under DP attention: the "LS work waiting" signal of the lockstep group.

With `--enable-dp-attention` every rank's forward step is one lockstep step, so a BE chunk on rank B delays an
LS request on rank A. Two channels carry each rank's LS count to the others:

1. Same step (default, `same_step_signal`): at the start of `Scheduler.get_next_batch_to_run`, BEFORE batch
   formation, every scheduler all-reduces (MAX) its LS count (LS requests waiting + an LS chunked prefill) over
   the attention-DP CPU group (the tp group's gloo group, the one upstream's MLP sync uses with the overlap
   scheduler). The chunk cap (`chunk_token_limit(..., group_ls_waiting)`) and the BE admission cap
   (`be_admission_budget`) of THIS step read it. No deadlock: the collective runs exactly where upstream runs
   its own per-iteration collective. Every call of `get_next_batch_to_run` with `scheduler.require_mlp_sync`
   set reaches `prepare_mlp_sync_batch_raw` at least once on every code path (its last line calls
   `maybe_prepare_mlp_sync_batch`, idle ranks included: they gather a fallback row and get an idle batch),
   and that gathers over the same ranks unless `num_dp_ranks == 1` or `should_skip_scheduler_all_gather`. We
   run ours under exactly that condition (decided once per process from global config, so identical on every
   rank), before upstream's, so every rank issues the same sequence of collectives. The count itself never
   raises (a failure counts 0), so no rank can skip its turn.
2. One step late (always on; the only channel with `same_step_signal = false`, under elastic-EP WORLD gathers,
   or in loops that do not call `get_next_batch_to_run`, e.g. PD disaggregation): one column appended to
   upstream's per-step MLP-sync row (`MLPSyncBatchInfo._get_local_tensor` / `_get_fallback_tensor`, read after
   `all_gather`): LS requests waiting + LS requests in the prefill batch just formed. The row is gathered after
   batch formation, so it reaches the other ranks' NEXT step (simulator: `lockstep_signal_lag_steps = 1`).

Where the same-step reduce ran, it subsumes the gathered count (an LS request in the batch just formed was
counted by the same step's reduce; one still waiting is counted by the next), so the gathered value is then
ignored, as the simulator's lag 0 does. The value used feeds `tiersched.core.request.preemption.
LockstepLsSignal` (the `ls_hold_s` hold). Stale reads: a count is used only in the iteration it was reduced in /
right after its gather; otherwise only the hold remains, and it runs out. Without DP attention ranks are not in lockstep and only the per-rank rule applies.
"""
from __future__ import annotations

import logging
import time
import weakref

from tiersched.core.request.ordering import RequestTierConfig
from tiersched.core.request.preemption import LockstepLsSignal, be_admission_budget

logger = logging.getLogger("tiersched.request_tier")

DP_ATTN = "sglang.srt.managers.scheduler_components.dp_attn"
HOOKS = (
    ("sglang.srt.managers.scheduler.Scheduler.get_next_batch_to_run", "AROUND", "track_iteration"),
    (f"{DP_ATTN}.prepare_mlp_sync_batch_raw", "AROUND", "count_local_ls"),
    (f"{DP_ATTN}.MLPSyncBatchInfo._get_local_tensor", "AROUND", "append_local_ls"),
    (f"{DP_ATTN}.MLPSyncBatchInfo._get_fallback_tensor", "AROUND", "append_zero_ls"),
    (f"{DP_ATTN}.MLPSyncBatchInfo.all_gather", "AROUND", "read_group_ls"),
)
UPSTREAM_SYNC_COLUMNS = 11  # width of MLPSyncBatchInfo._get_local_tensor in sglang 0.5.23; ours is column 11

# One scheduler per process. `counters` is read by tests and the log line.
_state: dict = {"scheduler": None, "iteration": 0, "local_ls": 0, "group_ls": 0, "gathered_at": -1,
                "signal": None, "same_step_group": None, "same_step_ls": 0, "reduced_at": -1}
_UNDECIDED = object()  # same_step_group before the first iteration decided it
counters = {"gathers": 0, "gathers_with_ls": 0, "same_step_reduces": 0, "same_step_reduces_with_ls": 0,
            "be_chunks_capped": 0, "be_chunks_capped_by_group": 0, "be_admissions_capped": 0}


def reset(config: RequestTierConfig) -> None:
    _state.update(scheduler=None, iteration=0, local_ls=0, group_ls=0, gathered_at=-1,
                  signal=LockstepLsSignal(config), same_step_group=_UNDECIDED, same_step_ls=0, reduced_at=-1)
    for k in counters:
        counters[k] = 0


def _config() -> RequestTierConfig:
    from tiersched.sglang.request.hooks import _state as tier_state

    return tier_state["config"]


def _is_ls(req) -> bool:
    from tiersched.sglang.request.hooks import normalised_priority

    return _config().is_latency_sensitive(normalised_priority(req))


def _tier_active() -> bool:
    from tiersched.sglang.request.hooks import _state as tier_state

    return bool(tier_state["active"]) and _config().lockstep_chunk_cap


# ---- publish ------------------------------------------------------------------------------------------------


def track_iteration(original_fn, self, *args, **kwargs):
    """Remember this process's scheduler (its waiting queue), count loop iterations (signal freshness), and
    run the same-step all-reduce before upstream forms the batch (module docstring: why it cannot deadlock)."""
    if _state["signal"] is None:
        reset(_config())
    sched = _state["scheduler"]
    if sched is None or sched() is not self:
        _state["scheduler"] = weakref.ref(self)
    _state["iteration"] += 1
    if _state["same_step_group"] is _UNDECIDED:
        _state["same_step_group"] = same_step_group(self)
    if _state["same_step_group"] is not None:
        reduce_same_step(self, _state["same_step_group"])
    return original_fn(self, *args, **kwargs)


def same_step_group(scheduler):
    """The process group of the same-step all-reduce, or None when it must not run. Mirrors when upstream's
    MLP sync collects over ranks (`Scheduler.get_next_batch_to_run` -> `maybe_prepare_mlp_sync_batch` if
    `require_mlp_sync`; `prepare_mlp_sync_batch_raw` gathers unless num_dp_ranks == 1 or
    `should_skip_scheduler_all_gather`); only global config is read, so every rank decides the same."""
    cfg = _config()
    if not (_tier_active() and cfg.same_step_signal and getattr(scheduler, "require_mlp_sync", False)):
        return None
    from sglang.srt.layers.dp_attention import world_dp_gather_enabled
    from sglang.srt.managers.scheduler_components.dp_attn import should_skip_scheduler_all_gather
    from sglang.srt.runtime_context import get_parallel

    parallel = get_parallel()
    if not parallel.attn_dp_enabled or parallel.num_dp_ranks <= 1:
        return None  # only DP attention puts ranks in lockstep
    if should_skip_scheduler_all_gather(parallel.num_dp_ranks) or world_dp_gather_enabled():
        return None  # no per-iteration gather to mirror (elastic WORLD gathers resize: keep the lag-1 column)
    logger.info("tiersched lockstep: same-step LS all-reduce over the attention-DP CPU group (%d DP ranks)",
                parallel.num_dp_ranks)
    return parallel.tp_group.cpu_group


def safe_local_ls_count(scheduler) -> int:
    """LS requests waiting + an LS chunked prefill on this rank; never raises (every rank must reduce)."""
    try:
        n = sum(1 for r in scheduler.waiting_queue if _is_ls(r))
        chunked = getattr(scheduler, "chunked_req", None)
        return n + (1 if chunked is not None and _is_ls(chunked) else 0)
    except Exception:  # noqa: BLE001 -- a count of 0 only loses protection for one step; a skipped collective hangs
        logger.exception("tiersched lockstep: LS count failed; publishing 0")
        return 0


def reduce_same_step(scheduler, group) -> int:
    """All-reduce (MAX) this rank's LS count over `group`; the result is this iteration's group signal."""
    import torch
    import torch.distributed as dist

    value = torch.tensor([safe_local_ls_count(scheduler)], dtype=torch.int64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    group_ls = int(value.item())
    _state.update(same_step_ls=group_ls, reduced_at=_state["iteration"])
    counters["same_step_reduces"] += 1
    counters["same_step_reduces_with_ls"] += group_ls > 0
    _state["signal"].observe(group_ls, time.perf_counter())
    return group_ls


def local_ls_count(scheduler, local_batch) -> int:
    """LS requests waiting on this rank + LS requests in the batch this rank is about to run as a prefill."""
    n = sum(1 for r in getattr(scheduler, "waiting_queue", ()) if _is_ls(r)) if scheduler is not None else 0
    mode = getattr(local_batch, "forward_mode", None)
    if mode is not None and mode.is_extend():
        n += sum(1 for r in local_batch.reqs if _is_ls(r))
    return n


def count_local_ls(original_fn, local_batch, *args, **kwargs):
    if _tier_active():
        sched = _state["scheduler"]() if _state["scheduler"] is not None else None
        _state["local_ls"] = local_ls_count(sched, local_batch)
    return original_fn(local_batch, *args, **kwargs)


def append_local_ls(original_fn, self, device, dtype=None, *args, **kwargs):
    return _append(original_fn(self, device, *args, **_dtype(dtype, kwargs)), _state["local_ls"] if _tier_active() else 0)


def append_zero_ls(original_fn, self, device, dtype=None, *args, **kwargs):
    return _append(original_fn(self, device, *args, **_dtype(dtype, kwargs)), 0)


def _dtype(dtype, kwargs):
    return dict(kwargs, dtype=dtype) if dtype is not None else kwargs


def _append(row, value: int):
    """Upstream's row plus our column (every rank runs the plugin, so all rows have the same width)."""
    import torch

    if row.numel() != UPSTREAM_SYNC_COLUMNS:  # an upstream change of the row: leave it alone (patch check flags it)
        return row
    return torch.cat([row, torch.tensor([value], device=row.device, dtype=row.dtype)])


def read_group_ls(original_fn, self, *args, **kwargs):
    result = original_fn(self, *args, **kwargs)
    info = self.tp0_info_cpu
    if info is not None and info.shape[-1] == UPSTREAM_SYNC_COLUMNS + 1:
        group = int(info[:, UPSTREAM_SYNC_COLUMNS].max())
        _state.update(group_ls=group, gathered_at=_state["iteration"])
        counters["gathers"] += 1
        counters["gathers_with_ls"] += group > 0
        if _state["signal"] is None:
            reset(_config())
        if _state["reduced_at"] != _state["iteration"]:  # with the same-step reduce on, the hold follows it only
            _state["signal"].observe(group, time.perf_counter())
    return result


# ---- read -------------------------------------------------------------------------------------------------


def group_ls_signal() -> int:
    """The signal this scheduling pass uses: this iteration's same-step count, else the count gathered in the
    previous iteration, else 1 within the hold after the last nonzero count; 0 when nothing fresh was seen
    (stale values expire through the hold)."""
    signal = _state["signal"]
    if signal is None or not _tier_active():
        return 0
    if _state["reduced_at"] == _state["iteration"]:  # subsumes the gathered count (module docstring)
        if _state["same_step_ls"] > 0:
            _state["source"] = "same-step"
            return _state["same_step_ls"]
    elif _state["gathered_at"] == _state["iteration"] - 1 and _state["group_ls"] > 0:
        _state["source"] = "gathered"
        return _state["group_ls"]
    _state["source"] = "hold"
    return signal.expire(time.perf_counter())


def signal_source() -> str:
    """Where the last `group_ls_signal()` value came from: same-step, gathered (one step old) or hold."""
    return _state.get("source", "hold")


def capped_be_add(original_fn, adder, req, *args, **kwargs):
    """add_one_req for a BE request while LS work waits in the group: its chunk this step is at most what is left
    of `be_chunk_tokens` after the BE tokens already in the batch (core `be_admission_budget`)."""
    from sglang.srt.managers.schedule_policy import AddReqResult

    if adder.rem_chunk_tokens is None or _is_ls(req):
        return original_fn(adder, req, *args, **kwargs)
    sched = _state["scheduler"]() if _state["scheduler"] is not None else None
    local = sum(1 for r in getattr(sched, "waiting_queue", ()) if _is_ls(r)) if sched is not None else 0
    used = sum(_extend_len(r) for r in adder.can_run_list if not _is_ls(r))
    left = be_admission_budget(local, group_ls_signal(), used, _config())
    if left is None or left >= adder.rem_chunk_tokens:
        return original_fn(adder, req, *args, **kwargs)
    if left <= 0:
        return AddReqResult.OTHER
    saved = adder.rem_chunk_tokens
    adder.rem_chunk_tokens = left
    try:
        return original_fn(adder, req, *args, **kwargs)
    finally:
        adder.rem_chunk_tokens = saved - (left - adder.rem_chunk_tokens)
        counters["be_admissions_capped"] += 1


def _extend_len(req) -> int:
    end = getattr(req, "extend_end", None)
    return max(0, end - req.prefix_len) if end is not None else 0
