"""Prefill step times of the simulator's qwen3-dp4ep4 step model (`StepCostModel.step_times`) for one rank
prefilling n tokens while the others idle. Quoted in docs/request-tier.md ("What it costs BE"):
    .venv/bin/python benchmark/sim_step_times.py
"""
import numpy as np

from tiersched.sim.cost_model import StepCostModel
from tiersched.sim.presets import get_preset
from tiersched.sim.moe_routing import make_routing, token_probs

preset = get_preset("qwen3")
model = StepCostModel(preset, token_probs(make_routing(preset, 0), preset.dp))


def one_rank_ms(n: int, prefix: int = 0) -> float:
    tokens = np.array([n] + [0] * (preset.dp - 1), float)
    pairs = np.array([e * (prefix + (e + 1) / 2) for e in tokens])  # attention (query, context) pairs
    return 1e3 * float(model.step_times(tokens, pairs, np.zeros(preset.dp))[0][0])


for n in (512, 1024, 8192):
    print(f"{preset.name}: {n} tokens on one rank {one_rank_ms(n):.1f} ms; after an 8k prefix {one_rank_ms(n, 8192):.1f} ms")
