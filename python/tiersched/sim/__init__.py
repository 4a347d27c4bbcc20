"""A fast discrete-step twin of SGLang DP-attention + EP deployments that runs tiersched's core policy objects.

    from tiersched.sim import simulate, PolicySet, get_preset, workloads
    result = simulate("qwen3", workloads.synthetic("Random", rate=4.0), PolicySet(dispatch="total_tokens"))
    result.metrics["ttft_mean"]

Imports the core (tiersched.core), never the SGLang adapters or the live tools; no module of this package imports
the package itself (this file only re-exports). Model and assumptions: docs/simulator.md.
"""
from tiersched.sim import capacity, workloads
from tiersched.sim.loop import simulate
from tiersched.sim.metrics import SimResult
from tiersched.sim.policies import PolicySet
from tiersched.sim.presets import Preset, get_preset, preset_names

__all__ = ["simulate", "SimResult", "PolicySet", "get_preset", "preset_names", "Preset",
           "workloads", "capacity"]
