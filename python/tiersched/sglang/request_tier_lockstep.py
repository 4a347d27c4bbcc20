"""prefix-aging under DP attention: the "LS work waiting" signal of the lockstep group, piggybacked on upstream's
per-step MLP-sync all-gather.

With `--enable-dp-attention` every scheduler calls `prepare_mlp_sync_batch_raw`
(sglang/srt/managers/scheduler_components/dp_attn.py) once per loop iteration, and `MLPSyncBatchInfo.all_gather`
exchanges one small int64 row per rank (token counts, forward mode, ...) so the ranks agree on the lockstep step.
We append one column to that row: this rank's LS count (LS requests waiting + LS requests in the batch just
formed, incl. a chunked one). After the gather every rank holds the same per-rank counts, exactly, at no extra
collective; their max feeds `tiersched.core.request_preemption.LockstepLsSignal`, and the next step's chunk cap
(`chunk_token_limit(..., group_ls_waiting)`) and BE admission cap (`be_admission_budget`) read it.

Lag: the row is gathered after the batch is formed, so the signal reaches the other ranks' NEXT step (the
simulator models exactly this, `lockstep_signal_lag_steps = 1`). Stale reads: a count is used only in the
iteration right after its gather; otherwise only the time-bounded hold (`ls_hold_s`) remains, and it runs out.
Without DP attention (no gather) ranks are not in lockstep and only the per-rank rule applies.
"""
from __future__ import annotations

import logging
import time
import weakref

from tiersched.core.request_order import RequestTierConfig
from tiersched.core.request_preemption import LockstepLsSignal, be_admission_budget

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
                "signal": None}
counters = {"gathers": 0, "gathers_with_ls": 0, "be_chunks_capped": 0, "be_chunks_capped_by_group": 0,
            "be_admissions_capped": 0}


def reset(config: RequestTierConfig) -> None:
    _state.update(scheduler=None, iteration=0, local_ls=0, group_ls=0, gathered_at=-1,
                  signal=LockstepLsSignal(config))
    for k in counters:
        counters[k] = 0


def _config() -> RequestTierConfig:
    from tiersched.sglang.request_tier import _state as tier_state

    return tier_state["config"]


def _is_ls(req) -> bool:
    from tiersched.sglang.request_tier import normalised_priority

    return _config().is_latency_sensitive(normalised_priority(req))


def _tier_active() -> bool:
    from tiersched.sglang.request_tier import _state as tier_state

    return bool(tier_state["active"]) and _config().lockstep_chunk_cap


# ---- publish ------------------------------------------------------------------------------------------------


def track_iteration(original_fn, self, *args, **kwargs):
    """Remember this process's scheduler (its waiting queue) and count loop iterations (signal freshness)."""
    if _state["signal"] is None:
        reset(_config())
    sched = _state["scheduler"]
    if sched is None or sched() is not self:
        _state["scheduler"] = weakref.ref(self)
    _state["iteration"] += 1
    return original_fn(self, *args, **kwargs)


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
        _state["signal"].observe(group, time.perf_counter())
    return result


# ---- read -------------------------------------------------------------------------------------------------


def group_ls_signal() -> int:
    """The signal this scheduling pass uses: the count gathered in the previous iteration (or 1 within the hold
    after the last nonzero count); 0 when no gather ran recently (stale values expire through the hold)."""
    signal = _state["signal"]
    if signal is None or not _tier_active():
        return 0
    now = time.perf_counter()
    if _state["gathered_at"] == _state["iteration"] - 1 and _state["group_ls"] > 0:
        return _state["group_ls"]
    return signal.expire(now)


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
