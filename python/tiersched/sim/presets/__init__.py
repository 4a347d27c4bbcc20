"""Deployment presets: model shape x hardware x SGLang scheduler settings, each coefficient's source beside it.

A preset describes N DP-attention ranks (each `tp` GPUs) whose MoE layers are expert-parallel over all
`num_gpus = dp * tp` GPUs. base.py holds the data types (and the H100 hardware defaults), gpu.py the GPU presets,
cpu_tiny.py the preset calibrated on the real CPU server (listed once its calibration file exists).
See docs/simulator.md for the derivations.
"""
from __future__ import annotations

from tiersched.sim.presets import cpu_tiny
from tiersched.sim.presets.base import Hardware, ModelShape, Preset, SchedulerSettings
from tiersched.sim.presets.gpu import ALIASES, PRESETS

__all__ = ["Hardware", "ModelShape", "Preset", "SchedulerSettings", "PRESETS", "ALIASES", "get_preset",
           "preset_names"]


def preset_names() -> list[str]:
    return sorted(PRESETS) + (["cpu-tiny"] if cpu_tiny.calibration_path().exists() else [])


def get_preset(name: str) -> Preset:
    name = ALIASES.get(name, name)
    if name == "cpu-tiny":
        return cpu_tiny.preset()
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS) + ['cpu-tiny'])}.")
    return PRESETS[name]()
