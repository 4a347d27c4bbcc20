"""`cpu-tiny` preset: the tiny Qwen3-MoE of tiersched.rig on the real CPU server, calibrated by a profiling run.

The coefficients are NOT guessed: `benchmark/sim_calibrate_cpu_tiny.py` profiles the real server and writes
`calibration_path()`. Until that file exists, `preset()` raises and the preset is not listed.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path


def calibration_path() -> Path:
    return Path(__file__).resolve().parent / "cpu_tiny_calibration.json"


def preset():
    from tiersched.sim.presets import Hardware, ModelShape, Preset, SchedulerSettings

    path = calibration_path()
    if not path.exists():
        raise ValueError(
            "preset 'cpu-tiny' is not calibrated yet; run `python benchmark/sim_calibrate_cpu_tiny.py` to profile "
            "the real CPU server first."
        )
    cal = json.loads(path.read_text())
    model = ModelShape(**cal["model"])
    return Preset(name="cpu-tiny", model=model, dp=cal.get("dp", 1), tp=1, hardware=Hardware(**cal["hardware"]),
                  scheduler=replace(SchedulerSettings(), **cal.get("scheduler", {})),
                  description="tiny Qwen3-MoE on the real CPU server (calibrated)")
