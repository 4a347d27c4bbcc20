"""Expert tier, online per-source recorder: what upstream's `stat` recorder cannot keep in memory.

Upstream's `_StatAccumulator` (sglang/srt/eplb/expert_distribution.py) keeps a circular buffer of per-pass
global physical counts [buffer, L, P] and all-reduces them at dump: the source rank is lost. This recorder runs
next to it, fed by the same `_SelectExpertsSinglePassGatherer.on_select_experts` call, and keeps:

- source counts: a circular buffer int32 [buffer, L, E] of the logical experts *this rank's own tokens* routed
  to, one row per forward pass, with upstream's buffer semantics (`--expert-distribution-recorder-buffer-size`,
  which defaults to `--eplb-rebalance-num-iterations`; -1 = unbounded, kept as a running sum). At dump every
  rank contributes its [L, E] and an all-gather (next to upstream's all-reduce) gives [S, L, E];
- co-activation: int32 [L-1, E, E] pair counts (e at layer l, e' at layer l+1) for the same tokens, accumulated
  since the last dump (upstream resets its recorder at every dump, so this is the same window when the buffer
  is the rebalance interval) and reduced across ranks at dump; each window is kept top-K per row afterwards.

Everything in the forward path is fixed-shape torch (gather + scatter_add_, no host sync, graph-capturable).

Which tokens are "own": with DP attention and no all-to-all backend the MoE input is the DP-gathered buffer
(sglang/srt/layers/dp_attention.py: SUM_LEN concatenates the ranks' tokens, MAX_LEN pads each to the max); the
rank counts only its own DP segment. Otherwise the rows are this rank's tokens. Under plain TP (attention DP
size 1) every rank holds the same tokens, so there is one source (S == 1, upstream's aggregate).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

logger = logging.getLogger("tiersched.expert_tier")


@dataclass(frozen=True)
class SourceLayout:
    """Where this rank's own tokens sit in the MoE input of one forward pass.

    dp_rank: this rank's attention-DP rank; dp_tokens: tokens per DP rank (None without DP attention);
    max_len_padding: the gathered buffer pads every rank to max(dp_tokens) (upstream DpPaddingMode.MAX_LEN)."""

    dp_rank: int = 0
    dp_tokens: Optional[Sequence[int]] = None
    max_len_padding: bool = False

    def own_rows(self, num_rows: int) -> tuple[int, int]:
        """[start, end) of this rank's tokens among num_rows rows of topk ids."""
        if not self.dp_tokens:
            return 0, num_rows
        tokens = [int(t) for t in self.dp_tokens]
        if self.max_len_padding and num_rows == max(tokens) * len(tokens):
            start = self.dp_rank * max(tokens)
        elif num_rows == sum(tokens):
            start = sum(tokens[: self.dp_rank])
        else:  # not a gathered buffer (e.g. an all-to-all backend): the rows are this rank's own tokens
            return 0, num_rows
        return start, start + tokens[self.dp_rank]


class SourceRecorder:
    """Per-rank online recorder. Shapes: L layers, E logical experts, K = top-k of the router."""

    def __init__(self, num_layers: int, num_logical: int, buffer_size: int, device="cpu",
                 coactivation_tokens: int = 64) -> None:
        self.num_layers, self.num_logical = num_layers, num_logical
        # co-activation is a sample: pairs of the first coactivation_tokens own tokens of each pass (K*K pairs per
        # token make it the recorder's dominant cost; balance counts always use every token)
        self.coactivation_tokens = coactivation_tokens
        self.unbounded = buffer_size is None or buffer_size < 0
        rows = 1 if self.unbounded else max(int(buffer_size), 1)
        self.counts = torch.zeros((rows, num_layers, num_logical), dtype=torch.int32, device=device)
        self.coactivation = torch.zeros((max(num_layers - 1, 0), num_logical * num_logical),
                                        dtype=torch.int32, device=device)
        self._slot = 0
        self._pass_has_data = False
        self._prev: Optional[tuple[int, torch.Tensor]] = None  # (layer, logical ids [T, K]) of the last layer
        self.passes = 0  # forward passes recorded since the last reset

    def reset(self) -> None:
        self.counts.zero_()
        self.coactivation.zero_()
        self._slot, self._pass_has_data, self._prev, self.passes = 0, False, None, 0

    def on_select_experts(self, layer_idx: int, physical_topk: torch.Tensor, phy2log_of_layer: torch.Tensor,
                          rows: tuple[int, int]) -> None:
        """physical_topk int [T, K] (upstream's recorder ids: physical slots, -1 or out of range = none);
        phy2log_of_layer int [P]; rows = [start, end) of this rank's own tokens."""
        if layer_idx is None or not 0 <= layer_idx < self.num_layers:
            return
        ids = physical_topk[rows[0]: rows[1]]
        valid = (ids >= 0) & (ids < phy2log_of_layer.shape[0])
        # index_select: advanced indexing (table[ids]) is ~1000x slower for this on CPU (measured, torch 2.x)
        safe = ids.masked_fill(~valid, 0).long()
        logical = phy2log_of_layer.to(ids.device).index_select(0, safe.flatten()).view(safe.shape)
        logical = logical.masked_fill(~valid, -1)
        flat = logical.flatten()
        ok = flat >= 0
        if not self._pass_has_data and not self.unbounded:  # this pass overwrites the oldest row
            self.counts[self._slot].zero_()
        self.counts[self._slot, layer_idx].scatter_add_(0, flat.masked_fill(~ok, 0).long(), ok.int())
        self._pass_has_data = True
        prev = self._prev
        if prev is not None and prev[0] == layer_idx - 1 and prev[1].shape[0] == logical.shape[0]:
            self._add_pairs(layer_idx - 1, prev[1], logical)
        self._prev = (layer_idx, logical)

    def _add_pairs(self, layer: int, before: torch.Tensor, after: torch.Tensor) -> None:
        """before, after int [T, K] logical ids (-1 = none) of the same tokens at layers l and l+1."""
        before, after = before[: self.coactivation_tokens], after[: self.coactivation_tokens]
        pair_ok = (before[:, :, None] >= 0) & (after[:, None, :] >= 0)  # [T, K, K]
        index = before[:, :, None].long() * self.num_logical + after[:, None, :].long()
        self.coactivation[layer].scatter_add_(0, index.masked_fill(~pair_ok, 0).flatten(), pair_ok.int().flatten())

    def end_pass(self) -> None:
        """A forward pass ended: the next pass writes the next circular-buffer row (upstream `_CircularBuffer`)."""
        self._prev = None
        if not self._pass_has_data:
            return
        self._pass_has_data = False
        self.passes += 1
        if not self.unbounded:
            self._slot = (self._slot + 1) % self.counts.shape[0]

    def local_window(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(int64 [L, E] this rank's own-token counts over the buffer, int64 [L-1, E*E] co-activation)."""
        return self.counts.sum(0, dtype=torch.int64), self.coactivation.to(torch.int64)


def sparsify_top_k(coactivation: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the top_k successors of each (layer, expert) row of float/int [L-1, E, E]:
    returns (index int64 [L-1, E, k], value float64 [L-1, E, k]) with k = min(top_k, E)."""
    coactivation = np.asarray(coactivation, dtype=np.float64)
    k = min(max(int(top_k), 1), coactivation.shape[-1])
    index = np.argsort(-coactivation, axis=-1, kind="stable")[..., :k]
    return index.astype(np.int64), np.take_along_axis(coactivation, index, axis=-1)


def densify(index: np.ndarray, value: np.ndarray, num_logical: int) -> np.ndarray:
    """float64 [L-1, E, E] from a top-K (index, value) pair of [L-1, E, k]."""
    dense = np.zeros(index.shape[:-1] + (num_logical,), dtype=np.float64)
    np.put_along_axis(dense, index, value, axis=-1)
    return dense


def sources_from_gathered(per_rank: np.ndarray, attn_dp_rank_of: Sequence[int], attn_dp_size: int) -> np.ndarray:
    """float64 [S, L, E] source counts from the all-gathered per-rank own-token counts int [world, L, E].

    Ranks of one attention-DP group (attention TP) hold the same tokens: their rows are averaged, one source per
    DP rank (S = attn_dp_size; S = 1 under plain TP)."""
    per_rank = np.asarray(per_rank, dtype=np.float64)
    out = np.zeros((attn_dp_size,) + per_rank.shape[1:], dtype=np.float64)
    members = np.zeros(attn_dp_size)
    for rank, dp in enumerate(attn_dp_rank_of):
        out[dp] += per_rank[rank]
        members[dp] += 1
    return out / np.maximum(members, 1)[:, None, None]
