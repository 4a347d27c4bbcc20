"""Generate a tiny Qwen3-MoE checkpoint offline (no downloads): config, byte-level BPE tokenizer, float32 weights.

2 layers, hidden 64, 8 experts, top-2 by default. Weights are seeded Gaussians, so greedy outputs are
reproducible across runs and servers.

Router skew. Random gates route tokens almost uniformly, which never exercises expert balancing. With
`router_skew > 0` we give the router a constant input it can bias on: hidden channel 0 is set to a constant in
every token embedding and no layer writes to it (column 0 of o_proj and of every down_proj is zero), so after each
RMSNorm channel 0 is a positive number for every token. The gate weight on channel 0 then acts as a per-expert
bias: expert e gets `router_skew * hot_profile[e]`, hottest first (expert 0 hottest). Documented in docs/install.md.
"""
from __future__ import annotations

import json
import os

import numpy as np

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_CORPUS = (
    "The quick brown fox jumps over the lazy dog. ",
    "Hello world, this is a tiny tokenizer for SGLang CPU tests. ",
    "Mixture of experts models route each token to a few experts. ",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ ",
)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _write_tokenizer(out_dir: str, vocab_size: int) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([line * 3 for line in _CORPUS] * 20, trainer)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    eos = tok.token_to_id(SPECIAL_TOKENS[0])
    _dump(out_dir, "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": SPECIAL_TOKENS[0], "pad_token": SPECIAL_TOKENS[0],
        "bos_token": None, "model_max_length": 4096, "chat_template": CHAT_TEMPLATE,
    })
    _dump(out_dir, "special_tokens_map.json", {"eos_token": SPECIAL_TOKENS[0], "pad_token": SPECIAL_TOKENS[0]})
    return eos


def _dump(out_dir: str, name: str, obj) -> None:
    with open(os.path.join(out_dir, name), "w") as f:
        json.dump(obj, f, indent=1)


def hot_profile(num_experts: int) -> np.ndarray:
    """Per-expert bias profile, float [E]: linearly from +1 (expert 0) down to -1 (last expert)."""
    return np.linspace(1.0, -1.0, num_experts)


def _weights(cfg: dict, router_skew: float, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, inter, moe_inter = cfg["hidden_size"], cfg["intermediate_size"], cfg["moe_intermediate_size"]
    heads, kv_heads, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    E, V = cfg["num_experts"], cfg["vocab_size"]

    def gauss(*shape, std=0.05):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    w = {"model.embed_tokens.weight": gauss(V, h, std=0.5), "model.norm.weight": np.ones(h, np.float32),
         "lm_head.weight": gauss(V, h, std=0.5)}
    skewed = router_skew > 0
    if skewed:
        w["model.embed_tokens.weight"][:, 0] = 1.0
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        w[p + "input_layernorm.weight"] = np.ones(h, np.float32)
        w[p + "post_attention_layernorm.weight"] = np.ones(h, np.float32)
        w[p + "self_attn.q_proj.weight"] = gauss(heads * hd, h)
        w[p + "self_attn.k_proj.weight"] = gauss(kv_heads * hd, h)
        w[p + "self_attn.v_proj.weight"] = gauss(kv_heads * hd, h)
        w[p + "self_attn.o_proj.weight"] = gauss(h, heads * hd)
        w[p + "self_attn.q_norm.weight"] = np.ones(hd, np.float32)
        w[p + "self_attn.k_norm.weight"] = np.ones(hd, np.float32)
        gate = gauss(E, h, std=0.5)
        if skewed:
            w[p + "self_attn.o_proj.weight"][0, :] = 0.0  # nothing writes channel 0: it stays constant
            gate[:, 0] = router_skew * hot_profile(E)
        w[p + "mlp.gate.weight"] = gate
        for e in range(E):
            q = f"{p}mlp.experts.{e}."
            w[q + "gate_proj.weight"] = gauss(moe_inter, h)
            w[q + "up_proj.weight"] = gauss(moe_inter, h)
            w[q + "down_proj.weight"] = gauss(h, moe_inter)
            if skewed:
                w[q + "down_proj.weight"][0, :] = 0.0
    del inter
    return w


def make_tiny_moe(
    out_dir: str,
    router_skew: float = 0.0,
    num_layers: int = 2,
    num_experts: int = 8,
    top_k: int = 2,
    seed: int = 0,
) -> str:
    """Write a tiny Qwen3-MoE model folder; returns its path. Cheap (well under a second) and deterministic."""
    if router_skew < 0:
        raise ValueError(f"router_skew must be >= 0 (got {router_skew}); 0 means unbiased routing.")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be between 1 and num_experts={num_experts} (got {top_k}).")
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    eos = _write_tokenizer(out_dir, vocab_size=512)
    cfg = {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
        "num_hidden_layers": num_layers, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "num_experts": num_experts, "num_experts_per_tok": top_k, "norm_topk_prob": True,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "hidden_act": "silu", "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": False,
        "torch_dtype": "float32", "use_cache": True, "attention_bias": False, "attention_dropout": 0.0,
        "output_router_logits": False, "router_aux_loss_coef": 0.001, "bos_token_id": eos, "eos_token_id": eos,
        "sliding_window": None, "use_sliding_window": False, "max_window_layers": num_layers,
        "tiersched_router_skew": router_skew,
    }
    _dump(out_dir, "config.json", cfg)
    _dump(out_dir, "generation_config.json", {"eos_token_id": eos, "bos_token_id": eos, "do_sample": False})
    save_file(_weights(cfg, router_skew, seed), os.path.join(out_dir, "model.safetensors"))
    return out_dir


MODEL_MODULE = "qwen3_moe"  # the sglang.srt.models module that serves the tiny model's architecture


def server_env() -> dict[str, str]:
    """Environment for a server of a tiny model: upstream's `SGLANG_DISABLED_MODEL_ARCHS` lists every module of
    `sglang.srt.models` but MODEL_MODULE. Each scheduler otherwise imports all of them (~260, a few failing on
    CPU) to build its model registry, ~1.2 s of CPU per scheduler process here, for one architecture."""
    import importlib.util
    from pathlib import Path

    found = importlib.util.find_spec("sglang")  # the top-level package: found without importing it
    if found is None or found.origin is None:
        return {}
    models = Path(found.origin).parent / "srt" / "models"
    names = sorted(p.stem for p in models.glob("*.py") if p.stem not in (MODEL_MODULE, "__init__", "registry"))
    return {"SGLANG_DISABLED_MODEL_ARCHS": ",".join(names)} if names else {}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write a tiny Qwen3-MoE model folder for CPU tests.")
    parser.add_argument("out_dir")
    parser.add_argument("--router-skew", type=float, default=0.0)
    args = parser.parse_args()
    print(make_tiny_moe(args.out_dir, router_skew=args.router_skew))
