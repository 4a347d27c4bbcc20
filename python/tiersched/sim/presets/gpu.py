"""GPU presets: Qwen3-30B-A3B and DeepSeek-V3 on H100s, model shapes from the models' public config.json
(Qwen/Qwen3-30B-A3B, deepseek-ai/DeepSeek-V3); hardware and scheduler defaults in presets/base.py."""
from __future__ import annotations

from tiersched.sim.presets.base import Hardware, ModelShape, Preset, SchedulerSettings

QWEN3_30B_A3B = ModelShape(
    name="Qwen3-30B-A3B",
    moe_layers=48,
    num_experts=128,
    top_k=8,
    hidden=2048,
    moe_intermediate=768,
    # 48 x (q 2048x4096 + k,v 2048x512 + o 4096x2048 + router 2048x128) + lm_head 2048x151936
    dense_params=48 * (2048 * 4096 + 2 * 2048 * 512 + 4096 * 2048 + 2048 * 128) + 2048 * 151936,
    weight_bytes=2.0,
    attn_flops_per_ctx_token=48 * 4 * 32 * 128,  # 32 query heads x head_dim 128, QK and PV
    kv_bytes_per_token=48 * 2 * 4 * 128 * 2.0,  # K and V, 4 KV heads x 128, BF16
)

DEEPSEEK_V3 = ModelShape(
    name="DeepSeek-V3",
    moe_layers=58,
    num_experts=256,
    top_k=8,
    hidden=7168,
    moe_intermediate=2048,
    # MLA attention (~0.187B/layer x 61) + 3 dense MLPs (3 x 3 x 7168 x 18432) + 58 shared experts + embed/lm_head
    dense_params=61 * 0.187e9 + 3 * 3 * 7168 * 18432 + 58 * 3 * 7168 * 2048 + 2 * 7168 * 129280,
    weight_bytes=1.0,  # FP8 checkpoint
    attn_flops_per_ctx_token=61 * 2 * 128 * (192 + 128),  # 128 heads, qk dim 192, v dim 128
    kv_bytes_per_token=61 * (512 + 64) * 2.0,  # MLA latent + rope key, BF16
    expert_groups=8,
    node_limit=4,
)


def _qwen3(dp: int, tp: int) -> Preset:
    # KV per rank: 80 GB x 0.85 minus weights (experts / 4 GPUs + dense replicated) minus ~5 GB activations,
    # times tp GPUs, divided by kv_bytes_per_token / tp (KV heads split over TP) -> rounded down.
    return Preset(
        name=f"qwen3-dp{dp}tp{tp}ep{dp * tp}" if tp > 1 else f"qwen3-dp{dp}ep{dp}",
        model=QWEN3_30B_A3B,
        dp=dp,
        tp=tp,
        hardware=Hardware(),
        scheduler=SchedulerSettings(kv_capacity_tokens=400_000 * tp, max_running_requests=256),
        slo_ttft_s=1.0,
        slo_tpot_s=0.05,
        description=f"Qwen3-30B-A3B on {dp * tp}xH100, DP{dp}" + (f"·TP{tp}" if tp > 1 else "") + f"·EP{dp * tp}",
    )


def _deepseek(num_gpus: int = 32) -> Preset:
    return Preset(
        name=f"deepseek-v3-{num_gpus}",
        model=DEEPSEEK_V3,
        dp=num_gpus,
        tp=1,
        hardware=Hardware(dispatch_bytes_per_elem=1.5),  # DeepEP: FP8 dispatch (1 B) + BF16 combine (2 B)
        scheduler=SchedulerSettings(kv_capacity_tokens=200_000, max_running_requests=128),
        redundant_experts=num_gpus,  # one redundant slot per GPU, as in DeepSeek's published EP32 deployment
        slo_ttft_s=2.0,
        slo_tpot_s=0.1,
        description=f"DeepSeek-V3 on {num_gpus}xH100 ({num_gpus // 8} nodes), DP{num_gpus}·EP{num_gpus}",
    )


PRESETS = {
    "qwen3-dp4ep4": lambda: _qwen3(4, 1),
    "qwen3-dp2tp2ep4": lambda: _qwen3(2, 2),
    "deepseek-v3-32": lambda: _deepseek(32),
}
ALIASES = {"qwen3": "qwen3-dp4ep4", "qwen3-gimbal": "qwen3-dp2tp2ep4", "deepseek-v3": "deepseek-v3-32"}
