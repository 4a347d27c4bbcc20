"""Lockstep step-time model of a DP-attention + EP forward step.

step time = overhead + max over DP ranks of attention-side work
          + sum over MoE layers of (max over GPUs of expert work for the tokens routed there)
          + sum over MoE layers of all-to-all time (cross-GPU bytes over NVLink, cross-node bytes over IB).

Attention-side work of rank r (tp GPUs, ideal TP split):
  dense: max(2 * tokens * dense_params / flops, dense_params * weight_bytes / hbm)    (compute- vs weight-bound)
  prefill attention: attn_flops_per_ctx_token * sum over chunks of chunk * (prefix + (chunk + 1) / 2) / flops
  decode attention: sum of decode contexts * kv_bytes_per_token / hbm                (KV reads)
  mixed step (enable_mixed_chunk): a prefilling rank's running decodes add one token each to its tokens and their
  contexts to its decode attention (KV reads), priced like the same rows in a decode step
  cpu-tiny only: + prefill_overhead_s on a prefilling rank, + decode_token_extra_s per decoding request; the whole
  step x (1 + contention_prefill or contention_decode) when more than one rank is busy (host-CPU contention)
Expert work of GPU g at layer l: max(2 * expert_params * assignments / flops, active_slots * expert bytes / hbm),
active slots = sum over g's slots of P(slot gets >= 1 token) = 1 - exp(-expected tokens) (Poisson arrivals).
With `ideal_balance` every max over ranks/GPUs becomes a mean: the perfect-balance lower bound.

Shapes: L MoE layers, S = R = DP ranks (token sources), E logical experts, P physical slots, G GPUs.
"""
from __future__ import annotations

import functools

import numpy as np

from tiersched.core.expert import Placement


@functools.lru_cache(maxsize=16)
def trivial_placement(layers: int, experts: int, slots: int) -> Placement:
    """Upstream's `ExpertLocationMetadata.init_trivial`: physical slot p holds logical expert p % E. Memoised with
    read-only arrays (every simulation starts from it; placements are replaced, never edited in place)."""
    phy2log = np.tile(np.arange(slots) % experts, (layers, 1)).astype(np.int64)
    placement = placement_from_phy2log(phy2log, experts)
    for array in (placement.phy2log, placement.log2phy, placement.logcnt):
        array.flags.writeable = False
    return placement


def placement_from_phy2log(phy2log: np.ndarray, experts: int) -> Placement:
    layers, slots = phy2log.shape
    logcnt = np.zeros((layers, experts), dtype=np.int64)
    for layer in range(layers):
        logcnt[layer] = np.bincount(phy2log[layer], minlength=experts)
    max_rep = int(logcnt.max())
    log2phy = -np.ones((layers, experts, max_rep), dtype=np.int64)
    for layer in range(layers):
        fill = np.zeros(experts, dtype=np.int64)
        for p, e in enumerate(phy2log[layer]):
            log2phy[layer, e, fill[e]] = p
            fill[e] += 1
    return Placement(phy2log=phy2log, log2phy=log2phy, logcnt=logcnt)


def expected_active_experts(tokens, layers: int, experts: int, top_k: int):
    """Expected (layer, expert) pairs that receive at least one of `tokens` tokens, each routed to top_k distinct
    experts of `experts` uniformly: layers x experts x (1 - (1 - top_k / experts) ** tokens). Array in, array out."""
    tokens = np.asarray(tokens, dtype=float)
    return layers * experts * -np.expm1(tokens * np.log1p(-top_k / experts))


class StepCostModel:
    def __init__(self, preset, token_probs: np.ndarray, ideal_balance: bool = False):
        self.preset = preset
        self.hw = preset.hardware
        self.model = preset.model
        self.ideal_balance = ideal_balance
        self.probs = token_probs  # [L, S, E]
        tp = preset.tp
        m, hw = self.model, self.hw
        self.dense_flops_per_token = 2.0 * m.dense_params / (tp * hw.flops)
        self.dense_weight_time = m.dense_params * m.weight_bytes / (tp * hw.hbm_bytes_s)
        self.prefill_pair_time = m.attn_flops_per_ctx_token / (tp * hw.flops)
        self.decode_ctx_time = m.kv_bytes_per_token / (tp * hw.hbm_bytes_s)
        self.assign_time = 2.0 * preset.expert_params / hw.flops
        self.slot_weight_time = preset.expert_params * m.weight_bytes / hw.hbm_bytes_s
        self.a2a_bytes_per_assign = 2.0 * m.hidden * hw.dispatch_bytes_per_elem  # dispatch + combine
        gpus = preset.num_gpus
        gpu_node = np.arange(gpus) // hw.gpus_per_node
        source_gpus = np.arange(preset.dp)[:, None] * tp + np.arange(tp)[None, :]
        self.local = np.zeros((preset.dp, gpus), dtype=bool)
        self.local[np.arange(preset.dp)[:, None], source_gpus] = True
        source_node = gpu_node[source_gpus[:, 0]]
        self.inter = gpu_node[None, :] != source_node[:, None]  # [S, G]
        self.intra = ~self.local & ~self.inter
        self.set_placement(trivial_placement(self.model.moe_layers, self.model.num_experts, preset.num_slots))

    def set_placement(self, placement: Placement) -> None:
        """Precompute per-token [L, S, G] GPU loads and [L, S, P] slot loads for this placement."""
        self.placement = placement
        phy2log = placement.phy2log
        layers, slots = phy2log.shape
        gpus = self.preset.num_gpus
        logcnt = np.take_along_axis(placement.logcnt, phy2log, axis=1)  # [L, P] replicas of the slot's expert
        slot_probs = np.take_along_axis(self.probs, phy2log[:, None, :].repeat(self.probs.shape[1], 1), axis=2)
        self.slot_probs = slot_probs / logcnt[:, None, :]  # [L, S, P]: replicas share their expert's tokens evenly
        self.gpu_probs = self.slot_probs.reshape(layers, -1, gpus, slots // gpus).sum(-1)  # [L, S, G]
        self.intra_per_token = (self.gpu_probs * self.intra[None]).sum(-1)  # [L, S]
        self.inter_per_token = (self.gpu_probs * self.inter[None]).sum(-1)
        if self.model.node_limit:
            # Cross-node copies are deduplicated per destination node (DeepEP sends a token once per node and
            # forwards over NVLink) and a token reaches at most node_limit nodes.
            self.inter_per_token = np.minimum(self.inter_per_token, self.model.node_limit)
        self._moe_memo: dict[bytes, tuple[float, dict]] = {}  # decode batches repeat: memoise per token vector

    def _reduce(self, x: np.ndarray, axis: int) -> np.ndarray:
        return x.mean(axis=axis) if self.ideal_balance else x.max(axis=axis)

    def moe_time(self, tokens_per_source: np.ndarray) -> tuple[float, dict]:
        """MoE + all-to-all time of one step whose ranks carry `tokens_per_source` [S] tokens, plus stats."""
        tokens = np.asarray(tokens_per_source, dtype=float)
        key = tokens.tobytes()
        hit = self._moe_memo.get(key)
        if hit is not None:
            return hit
        if tokens.sum() <= 0:
            return 0.0, {"gpu_load": None}
        if len(self._moe_memo) > 50_000:
            self._moe_memo.clear()
        layers, _, slots = self.slot_probs.shape
        gpus = self.preset.num_gpus
        slot_tokens = np.einsum("s,lsp->lp", tokens, self.slot_probs)
        gpu_load = slot_tokens.reshape(layers, gpus, slots // gpus).sum(-1)  # [L, G]
        active = (-np.expm1(-slot_tokens)).reshape(layers, gpus, slots // gpus).sum(-1)
        per_gpu = np.maximum(gpu_load * self.assign_time, active * self.slot_weight_time)
        expert_time = float(self._reduce(per_gpu, 1).sum())
        hw = self.hw
        intra = tokens[None, :] * self.intra_per_token * self.a2a_bytes_per_assign / (self.preset.tp * hw.intra_node_bytes_s)
        inter = tokens[None, :] * self.inter_per_token * self.a2a_bytes_per_assign / (self.preset.tp * hw.inter_node_bytes_s)
        a2a_time = float(self._reduce(intra + inter, 1).sum()) + layers * hw.a2a_latency_s
        stats = {
            "gpu_load": gpu_load,
            "cross_assign": float((tokens[None, :] * (self.intra_per_token + self.inter_per_token)).sum()),
            "total_assign": float(tokens.sum() * layers * self.model.top_k),
            "bal_mean_sum": float(gpu_load.mean(axis=1).sum()),
            "bal_max_sum": float(gpu_load.max(axis=1).sum()),
        }
        self._moe_memo[key] = (expert_time + a2a_time, stats)
        return expert_time + a2a_time, stats

    def attention_time(self, tokens: np.ndarray, prefill_pairs: np.ndarray, decode_ctx: np.ndarray,
                       decode_reqs: np.ndarray | None = None) -> np.ndarray:
        """Per-rank attention-side time [..., R] from tokens, prefill (query, context) pairs and decode contexts.
        decode_reqs [R]: decode rows a prefilling rank carries in a mixed step (None: none)."""
        tokens = np.asarray(tokens, dtype=float)
        dense = np.where(tokens > 0, np.maximum(tokens * self.dense_flops_per_token, self.dense_weight_time), 0.0)
        attn = dense + prefill_pairs * self.prefill_pair_time + decode_ctx * self.decode_ctx_time
        if self.hw.prefill_overhead_s or self.hw.decode_token_extra_s:  # calibrated CPU preset only
            prefill = prefill_pairs > 0
            attn = attn + np.where(prefill, self.hw.prefill_overhead_s, tokens * self.hw.decode_token_extra_s)
            if decode_reqs is not None:  # a mixed step's decode rows cost what they cost in a decode step
                attn = attn + np.where(prefill, np.asarray(decode_reqs) * self.hw.decode_token_extra_s, 0.0)
        if self.hw.active_expert_s:  # cpu-tiny decode: per expert touched (a prefill's intercept includes all)
            m = self.model
            touched = expected_active_experts(tokens, m.moe_layers, m.num_experts, m.top_k)
            attn = attn + np.where(prefill_pairs > 0, 0.0, touched * self.hw.active_expert_s)
        return attn

    def step_times(self, tokens: np.ndarray, prefill_pairs: np.ndarray, decode_ctx: np.ndarray,
                   ctx_growth: np.ndarray | None = None, steps: int = 1,
                   horizon_s: float | None = None, decode_reqs: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
        """Times [<= steps] of consecutive steps with the same batch; decode contexts grow by ctx_growth [R] per
        step (one token per running request). With horizon_s, only the steps that can start before horizon_s
        are priced (step times never shrink within a run, so at most horizon_s / first step + 2 of them).
        Returns (times, moe stats of one step)."""
        moe, stats = self.moe_time(tokens)
        attn0 = self.attention_time(tokens, prefill_pairs, decode_ctx, decode_reqs)  # [R]
        scale = self.contention_scale(np.asarray(tokens) > 0, bool(np.any(np.asarray(prefill_pairs) > 0)))
        first = (self.hw.step_overhead_s + float(self._reduce(attn0, 0)) + moe) * scale
        if horizon_s is not None and steps > 1:
            steps = max(1, min(steps, int(horizon_s / max(first, 1e-12)) + 2))
        if steps == 1 or ctx_growth is None:
            return np.full(steps, first), stats
        # Only the KV-read term grows with the context (tokens, hence dense and expert work, are constant).
        i = np.arange(steps, dtype=float)[:, None]
        attn = attn0[None, :] + i * (ctx_growth * self.decode_ctx_time)[None, :]
        return (self.hw.step_overhead_s + self._reduce(attn, 1) + moe) * scale, stats

    def contention_scale(self, busy: np.ndarray, prefill: bool, other_busy: bool = False) -> float:
        """Step-time factor for host-CPU contention: 1 + contention_prefill / contention_decode when more than one
        rank is busy (busy [R]) or, in a per-rank replay, when another rank is (other_busy); 1 on GPU presets."""
        c = self.hw.contention_prefill if prefill else self.hw.contention_decode
        if not c:
            return 1.0
        return 1.0 + c if other_busy or int(np.count_nonzero(busy)) > 1 else 1.0
