"""Expert tier: hooks that feed the per-source recorder from upstream's expert-distribution recorder.

Seams (sglang/srt/eplb/expert_distribution.py), all pass-through unless `--eplb-algorithm` is ours:
- `_SelectExpertsSinglePassGatherer.on_select_experts` (AFTER): the router's physical top-k ids of one MoE layer,
  exactly what upstream's `stat` gatherer counts; we map them to logical ids and count this rank's own tokens.
- `_ExpertDistributionRecorderReal._on_forward_pass_end` (AFTER): advance the circular buffer one pass.
- `_ExpertDistributionRecorderReal._reset` (AFTER): upstream resets after every dump and at start_record.
- `_StatAccumulator.dump` (AROUND): where upstream all-reduces its counts (every rank, in lockstep), we
  all-gather the per-rank own-token counts and all-reduce the co-activation, then hand the window to the
  planner (`state.STATE.pending`).
Only `_SelectExpertsSinglePassGatherer` is fed (no all-to-all, DeepEP normal, flashinfer/nixl/mooncake); with the
DeepEP low-latency or mori gatherers no per-source window exists and the planner uses upstream's aggregate.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from tiersched.sglang.expert.recorder import SourceLayout, SourceRecorder, sources_from_gathered, sparsify_top_k
from tiersched.sglang.expert.state import STATE, CaptureState, Window, is_ours

logger = logging.getLogger("tiersched.expert_tier")

COACTIVATION_TOP_K = 8  # successors kept per (layer, expert) in each stored window
_ED = "sglang.srt.eplb.expert_distribution"
HOOKS = (
    (f"{_ED}._SelectExpertsSinglePassGatherer.on_select_experts", "AFTER", "after_select_experts"),
    (f"{_ED}._ExpertDistributionRecorderReal._on_forward_pass_end", "AFTER", "after_forward_pass"),
    (f"{_ED}._ExpertDistributionRecorderReal._reset", "AFTER", "after_reset"),
    (f"{_ED}._StatAccumulator.dump", "AROUND", "dump"),
)


def _capture() -> CaptureState:
    return STATE.capture


def activate(recorder: Optional[SourceRecorder]) -> None:
    """Set (or clear, with None) the recorder explicitly: in-process tests, or a caller that knows the config."""
    STATE.capture = CaptureState(decided=recorder is not None, recorder=recorder)


def recorder() -> Optional[SourceRecorder]:
    return _capture().recorder


def _recorder_for(gatherer) -> Optional[SourceRecorder]:
    capture = _capture()
    if capture.decided is None:
        from sglang.srt.runtime_context import get_exec  # deferred: the runtime context imports torch

        moe = get_exec().moe
        capture.decided = is_ours(moe.eplb_algorithm)
        if capture.decided:
            metadata = gatherer._expert_location_metadata
            capture.recorder = SourceRecorder(
                metadata.num_layers, metadata.num_logical_experts, moe.expert_distribution_recorder_buffer_size,
                device=metadata.physical_to_logical_map.device)
            logger.info("tiersched expert tier: per-source recorder on (%d layers, %d experts, buffer %s)",
                        metadata.num_layers, metadata.num_logical_experts, moe.expert_distribution_recorder_buffer_size)
    return capture.recorder


def current_layout() -> SourceLayout:
    """This rank's own-token rows for the current pass (cached per pass)."""
    capture = _capture()
    layout = capture.layout
    if layout is None:
        layout = SourceLayout()
        try:
            from sglang.srt.runtime_context import get_parallel

            parallel = get_parallel()
            if parallel.attn_dp_size > 1:
                from sglang.srt.layers import dp_attention

                layout = SourceLayout(dp_rank=parallel.attn_dp_rank,
                                      dp_tokens=list(dp_attention.get_dp_global_num_tokens() or []),
                                      max_len_padding=bool(dp_attention.is_dp_max_padding()))
        except Exception:  # no runtime context (in-process use): every row is this rank's
            pass
        capture.layout = layout
    return layout


def after_select_experts(result, gatherer, layer_idx=None, topk_ids=None, *args, **kwargs):
    rec = _recorder_for(gatherer)
    if rec is None or topk_ids is None:
        return None
    phy2log = gatherer._expert_location_metadata.physical_to_logical_map
    if layer_idx is None or not 0 <= layer_idx < phy2log.shape[0]:
        return None
    rec.on_select_experts(layer_idx, topk_ids, phy2log[layer_idx], current_layout().own_rows(topk_ids.shape[0]))
    return None


def after_forward_pass(result, *args, **kwargs):
    capture = _capture()
    rec = capture.recorder
    capture.layout = None
    if rec is not None:
        rec.end_pass()
    return None


def after_reset(result, *args, **kwargs):
    rec = _capture().recorder
    if rec is not None:
        rec.reset()
    return None


def dump(original_fn, accumulator, *args, **kwargs):
    rec = _capture().recorder
    if rec is not None:
        try:
            publish_window(rec)
        except Exception as exc:  # a failed gather must not stop serving: the planner falls back to the aggregate
            logger.warning("tiersched expert tier: per-source window not gathered (%s: %s); planning on upstream's "
                           "aggregate counts.", type(exc).__name__, exc)
    return original_fn(accumulator, *args, **kwargs)


def publish_window(rec: SourceRecorder) -> None:
    """Gather this window's statistics over all ranks and leave them for the next rebalance."""
    counts, coact = rec.local_window()
    dp_rank, dp_size = _attn_dp()
    per_rank, dp_ranks, coact = _gather(counts, coact, dp_rank)
    members = max(len(dp_ranks) // max(dp_size, 1), 1)  # ranks holding the same tokens (attention TP)
    sources = sources_from_gathered(per_rank, dp_ranks, dp_size)  # [S, L, E]
    coact = coact.reshape(max(rec.num_layers - 1, 0), rec.num_logical, rec.num_logical) / members
    index, value = sparsify_top_k(coact, COACTIVATION_TOP_K) if coact.size else (None, None)
    STATE.pending = Window(np.transpose(sources, (1, 0, 2)), index, value)


def _attn_dp() -> tuple[int, int]:
    try:
        from sglang.srt.runtime_context import get_parallel

        parallel = get_parallel()
        return int(parallel.attn_dp_rank), int(parallel.attn_dp_size)
    except Exception:
        return 0, 1


def _gather(counts, coact, dp_rank: int):
    """(per-rank counts float [world, L, E], attention-DP rank of each world rank, summed co-activation)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return counts.cpu().numpy()[None], [dp_rank], coact.cpu().numpy()
    world = dist.get_world_size()
    gathered = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(gathered, counts.contiguous())
    mine = torch.tensor([dp_rank], dtype=torch.int64, device=counts.device)
    ranks = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(ranks, mine)
    coact = coact.clone()
    dist.all_reduce(coact, op=dist.ReduceOp.SUM)
    return (torch.stack(gathered).cpu().numpy(), [int(r.item()) for r in ranks], coact.cpu().numpy())
