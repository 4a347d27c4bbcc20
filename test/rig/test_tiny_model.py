import json
import os

import numpy as np
import pytest

from tiersched.rig.tiny_model import make_tiny_moe


def _route_counts(model_dir, tokens=400, top_k=2):
    """Route random token embeddings through layer 0's gate exactly as Qwen3-MoE does (RMSNorm -> gate -> top-k)."""
    from safetensors.numpy import load_file

    w = load_file(os.path.join(model_dir, "model.safetensors"))
    emb = w["model.embed_tokens.weight"][np.random.default_rng(1).integers(0, 512, tokens)]
    # attention output adds to the residual but never to channel 0 when skewed; approximate with the embedding
    h = emb / np.sqrt((emb ** 2).mean(axis=1, keepdims=True) + 1e-6)
    logits = h @ w["model.layers.0.mlp.gate.weight"].T
    chosen = np.argsort(-logits, axis=1)[:, :top_k]
    return np.bincount(chosen.ravel(), minlength=logits.shape[1])


def test_files_and_config(tmp_path):
    d = make_tiny_moe(str(tmp_path / "m"))
    cfg = json.load(open(os.path.join(d, "config.json")))
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_experts"], cfg["num_experts_per_tok"]) == (2, 64, 8, 2)
    for name in ("tokenizer.json", "tokenizer_config.json", "model.safetensors", "generation_config.json"):
        assert os.path.exists(os.path.join(d, name))


def test_deterministic(tmp_path):
    a = open(make_tiny_moe(str(tmp_path / "a")) + "/model.safetensors", "rb").read()
    b = open(make_tiny_moe(str(tmp_path / "b")) + "/model.safetensors", "rb").read()
    assert a == b


def test_router_skew_makes_low_experts_hot(tmp_path):
    flat = _route_counts(make_tiny_moe(str(tmp_path / "flat")))
    skewed = _route_counts(make_tiny_moe(str(tmp_path / "skew"), router_skew=4.0))
    assert flat.max() / flat.mean() < 1.8  # near-uniform without skew
    assert skewed[:2].sum() > 0.6 * skewed.sum()  # experts 0 and 1 take most top-2 slots
    assert skewed[0] > skewed[-1]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="router_skew must be >= 0"):
        make_tiny_moe(str(tmp_path / "x"), router_skew=-1)
    with pytest.raises(ValueError, match="top_k"):
        make_tiny_moe(str(tmp_path / "y"), top_k=9)
