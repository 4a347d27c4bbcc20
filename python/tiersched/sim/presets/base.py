"""The data types a deployment preset is made of: model shape, hardware, SGLang scheduler settings.

Hardware defaults are an H100 SXM node: NVIDIA datasheet (989 TFLOP/s dense BF16, 3.35 TB/s HBM3, 900 GB/s NVLink
bidirectional = 450 GB/s per direction) derated by the efficiency factors below (assumptions, stated as such);
inter-node: 400 Gb/s InfiniBand NDR per GPU = 50 GB/s. Scheduler defaults: SGLang 0.5.23 server_args
(max_prefill_tokens 16384, priority preemption threshold 10, eplb_rebalance_num_iterations 1000, init new-token
ratio 0.7). Derivations: docs/simulator.md.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

H100_BF16_FLOPS = 989e12
H100_HBM_BYTES_S = 3.35e12
H100_NVLINK_BYTES_S = 450e9
IB_NDR_BYTES_S = 50e9
# Assumed achievable fractions of peak (typical large-GEMM MFU and streaming-bandwidth utilisation on H100).
GEMM_EFFICIENCY = 0.55
HBM_EFFICIENCY = 0.75
LINK_EFFICIENCY = 0.6


@dataclass(frozen=True)
class ModelShape:
    name: str
    moe_layers: int
    num_experts: int
    top_k: int
    hidden: int
    moe_intermediate: int
    dense_params: float  # parameters every token uses (attention projections, dense MLPs, shared experts, lm_head)
    weight_bytes: float  # bytes per parameter (2 = BF16, 1 = FP8)
    attn_flops_per_ctx_token: float  # FLOPs per (query token, context token) pair, all layers (QK^T + PV)
    kv_bytes_per_token: float  # KV bytes one context token occupies, all layers, per DP rank
    expert_groups: int = 1  # routing groups (DeepSeek-V3 n_group = 8), used by hierarchical EPLB
    node_limit: int = 0  # max nodes a token is sent to (DeepSeek-V3 topk_group = 4 groups ~ nodes); 0 = none


@dataclass(frozen=True)
class Hardware:
    flops: float = H100_BF16_FLOPS * GEMM_EFFICIENCY
    hbm_bytes_s: float = H100_HBM_BYTES_S * HBM_EFFICIENCY
    intra_node_bytes_s: float = H100_NVLINK_BYTES_S * LINK_EFFICIENCY
    inter_node_bytes_s: float = IB_NDR_BYTES_S * LINK_EFFICIENCY
    gpus_per_node: int = 8
    a2a_latency_s: float = 20e-6  # per MoE layer, dispatch + combine launch/sync latency (assumed)
    step_overhead_s: float = 1.5e-3  # scheduler + launch per forward step (CUDA graphs for decode; assumed)
    dispatch_bytes_per_elem: float = 2.0  # BF16 activations cross the all-to-all (both directions)
    prefill_overhead_s: float = 0.0  # extra per rank running a prefill (cpu-tiny calibration; 0 on GPU presets)
    decode_token_extra_s: float = 0.0  # extra per decoding request (cpu-tiny calibration; 0 on GPU presets)
    # Host-CPU contention between DP ranks (cpu-tiny calibration; 0 on GPU presets): a rank's prefill / decode step
    # is this much slower (relative) while another rank of the host is busy (ranks and the frontend processes share
    # the host's cores).
    contention_prefill: float = 0.0
    contention_decode: float = 0.0
    # Fixed latency a request spends outside the ranks (HTTP, tokenizer, DP controller, detokenizer), added to its
    # first token and finish times (cpu-tiny calibration; 0 on GPU presets, whose step model starts at the rank).
    frontend_latency_s: float = 0.0
    # First prefill step of a token count a rank has not run before: + new_shape_s + new_shape_per_token_s x tokens
    # (cpu-tiny calibration; 0 on GPU presets). The real CPU server pays it once per distinct prefill length.
    new_shape_s: float = 0.0
    new_shape_per_token_s: float = 0.0
    # Upstream's overlap loop processes a batch's results after launching the next batch; on CPU launching is
    # computing, so a request's first token is reported at the end of the step after its prefill (cpu-tiny: True).
    first_token_one_step_late: bool = False
    # Fixed time per (MoE layer, expert) a decode step touches (cpu-tiny: upstream's torch-native MoE loops over the
    # experts that received tokens; 0 on GPU presets). Expected count: cost_model.expected_active_experts.
    active_expert_s: float = 0.0


@dataclass(frozen=True)
class SchedulerSettings:
    max_running_requests: int = 256
    chunked_prefill_size: int = 8192
    max_prefill_tokens: int = 16384
    kv_capacity_tokens: int = 400_000
    # Share of each running request's remaining output reserved at admission (upstream's NewTokenRatioTracker:
    # SGLANG_INIT_NEW_TOKEN_RATIO x --schedule-conservativeness at start, decays per decode step to
    # init x SGLANG_MIN_NEW_TOKEN_RATIO_FACTOR over SGLANG_NEW_TOKEN_RATIO_DECAY_STEPS, set after a retraction
    # from the kept batch with SGLANG_RETRACT_DECODE_STEPS, reset when idle; 1.0 for ignore_eos requests).
    new_token_ratio: float = 0.7
    min_new_token_ratio_factor: float = 0.14
    new_token_ratio_decay_steps: int = 600
    retract_decode_steps: int = 20
    priority_preemption_threshold: int = 10
    load_refresh_interval_s: float = 0.02  # DP controller refreshes rank loads at most every 20 ms
    eplb_rebalance_steps: int = 1000
    eplb_window_steps: int = 1000
    eplb_history_windows: int = 1  # windows handed to the EPLB planner (deepseek sums them, ours weighs them)
    routing_drift_steps: int = 0  # 0 = routing fixed; else a fresh drifted routing every this many steps
    routing_drift_strength: float = 1.0  # 1 = the measured window-to-window spread of the DeepSeek-V3 counts
    # Upstream's DP-attention prefill alignment (--enable-prefill-delayer and its knobs; names and defaults as in
    # SGLang 0.5.23 server_args; policy: core/request/prefill_delayer.py). None = upstream's "unset".
    enable_prefill_delayer: bool = False
    prefill_delayer_max_delay_passes: int = 30
    prefill_delayer_token_usage_low_watermark: float | None = None
    prefill_delayer_queue_min_ratio: float | None = None
    prefill_delayer_max_delay_ms: float | None = None  # upstream falls back to 5000 ms when unset
    # Upstream's --enable-mixed-chunk: a prefill step also carries the rank's running decodes.
    enable_mixed_chunk: bool = False

    def __post_init__(self) -> None:
        if self.prefill_delayer_max_delay_passes < 0:
            raise ValueError("prefill_delayer_max_delay_passes must be >= 0, "
                             f"got {self.prefill_delayer_max_delay_passes}")
        wm = self.prefill_delayer_token_usage_low_watermark
        if wm is not None and not 0.0 <= wm <= 1.0:
            raise ValueError(f"prefill_delayer_token_usage_low_watermark must be in [0, 1] or None, got {wm}")
        ratio = self.prefill_delayer_queue_min_ratio
        if ratio is not None and ratio < 0:
            raise ValueError(f"prefill_delayer_queue_min_ratio must be >= 0 or None, got {ratio}")
        ms = self.prefill_delayer_max_delay_ms
        if ms is not None and ms <= 0:
            raise ValueError(f"prefill_delayer_max_delay_ms must be > 0 or None, got {ms}")
        if self.enable_mixed_chunk and self.chunked_prefill_size <= 0:
            raise ValueError("enable_mixed_chunk needs chunked prefill (chunked_prefill_size > 0), as upstream")


@dataclass(frozen=True)
class Preset:
    name: str
    model: ModelShape
    dp: int
    tp: int
    hardware: Hardware
    scheduler: SchedulerSettings
    redundant_experts: int = 0
    slo_ttft_s: float = 2.0
    slo_tpot_s: float = 0.1
    description: str = ""

    @property
    def num_gpus(self) -> int:
        return self.dp * self.tp

    @property
    def num_slots(self) -> int:
        return self.model.num_experts + self.redundant_experts

    @property
    def expert_params(self) -> float:
        return 3.0 * self.model.hidden * self.model.moe_intermediate  # gate, up, down projections

    def with_scheduler(self, **changes) -> "Preset":
        return replace(self, scheduler=replace(self.scheduler, **changes))
