"""Routing model for the simulator: the expert-tier's `tiersched.sim.moe_routing_model.RoutingModel` when present.

The simulator only needs per-token routing probabilities: `token_probs()` -> float [L, S, E] where S = DP source
ranks and each (l, s) row sums to top_k (expected (token, expert) assignments per token). RoutingModel's
`expected_counts(tokens_per_source[S]) -> [L, S, E]` is linear in the token counts, so one call with one token per
source gives exactly that.

Until the expert-tier module lands (or when it cannot be imported) `ZipfRouting` stands in: per layer a Zipf
popularity (exponent `skew`) over a per-layer random permutation of experts, with each source rank's popularity
a Dirichlet perturbation of its layer's profile. It is labelled as the fallback in SimResult.notes.
"""
from __future__ import annotations

import numpy as np


class ZipfRouting:
    """Fallback routing: float [L, S, E] per-token probabilities (x top_k), fixed over time."""

    name = "zipf-fallback"

    def __init__(self, layers: int, sources: int, experts: int, top_k: int, skew: float = 1.0,
                 source_concentration: float = 200.0, seed: int = 0):
        rng = np.random.default_rng(seed)
        ranks = np.arange(1, experts + 1, dtype=float)
        base = ranks ** -skew
        base /= base.sum()
        probs = np.empty((layers, sources, experts))
        for layer in range(layers):
            layer_profile = base[rng.permutation(experts)]
            for source in range(sources):
                probs[layer, source] = rng.dirichlet(layer_profile * source_concentration + 1e-3)
        self._probs = probs * top_k
        self.top_k = top_k

    def expected_counts(self, tokens_per_source: np.ndarray) -> np.ndarray:
        return self._probs * np.asarray(tokens_per_source, dtype=float)[None, :, None]


def make_routing(preset, seed: int = 0, skew: float = 1.0):
    """The routing model for `preset`: RoutingModel.synthetic(...) if available, else ZipfRouting."""
    model = preset.model
    try:
        from tiersched.sim.moe_routing_model import RoutingModel  # written by the expert-tier engineer
    except ImportError:
        RoutingModel = None
    if RoutingModel is not None and hasattr(RoutingModel, "synthetic"):
        try:
            return RoutingModel.synthetic(
                num_layers=model.moe_layers, num_sources=preset.dp, num_experts=model.num_experts,
                top_k=model.top_k, seed=seed,
            )
        except TypeError:
            pass  # signature differs from what we expect: keep the documented fallback
    return ZipfRouting(model.moe_layers, preset.dp, model.num_experts, model.top_k, skew=skew, seed=seed)


def token_probs(routing, sources: int) -> np.ndarray:
    """float [L, S, E]: expected (token, expert) assignments of one token from each source."""
    return np.asarray(routing.expected_counts(np.ones(sources)), dtype=float)
