"""`cpu-tiny` preset: the tiny Qwen3-MoE of tiersched.rig on the real CPU server, calibrated by a profiling run.

The coefficients are NOT guessed: `benchmark/sim_cpu_tiny_calibrate.py` profiles the real server (dp2, tp1) and
writes `calibration_path()` (committed, with the command, date and load average that produced it). Until that file
exists, `preset()` raises and the preset is not listed.

Mapping of the fitted coefficients (tiersched.live.fidelity) onto the generic cost model (cost_model.py):
- every rank runs all experts of its own tokens (no EP on this server), so expert compute is folded into the
  per-token term and the MoE / all-to-all terms are zero (expert_params = 0 via moe_intermediate = 0, no bytes);
- dense per-token time = per_token_s  (flops = 2 / per_token_s with dense_params = 1, weight time 0);
- prefill (query, context) pair time = per_prefill_pair_s; decode KV-read time per context token = per_decode_ctx_s;
- step_overhead_s every step, plus prefill_overhead_s on a rank running a prefill, plus decode_token_extra_s per
  decoding request (CPU decode is less efficient per token than batched prefill);
- contention_prefill / contention_decode: measured slowdown of a rank's step while the other rank is busy too;
- frontend_latency_s: measured client TTFT minus the scheduler's own prefill time of a lone prompt;
- new_shape_s / new_shape_per_token_s: measured extra time of a rank's first prefill of a token count it has not
  run before (a fresh length vs the same length again);
- active_expert_s: decode time per (MoE layer, expert) that received tokens (the torch-native MoE loops over them);
- first_token_one_step_late: upstream's overlap loop reports a batch's results after running the next batch.
Calibrations made before these terms existed load with 0 for them.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from tiersched.sim.presets.base import Hardware, ModelShape, Preset, SchedulerSettings

MOE_LAYERS, NUM_EXPERTS, TOP_K = 2, 8, 2  # tiersched.rig.tiny_model's Qwen3-MoE


def calibration_path() -> Path:
    return Path(__file__).resolve().parent / "cpu_tiny.json"


def preset(path: Path | None = None, calibration: dict | None = None) -> Preset:
    """The preset from the committed calibration file (or `path`), or from a `calibration` dict with the file's
    "coefficients" (and optional "dp", "scheduler") sections."""
    if calibration is None:
        path = path or calibration_path()
        if not path.exists():
            raise ValueError(
                "preset 'cpu-tiny' is not calibrated yet; run `python benchmark/sim_cpu_tiny_calibrate.py` to "
                "profile the real CPU server first."
            )
        calibration = json.loads(Path(path).read_text())
    cal = calibration
    c = cal["coefficients"]
    hbm = 1e12  # arbitrary unit: kv_bytes_per_token below is expressed against it
    model = ModelShape(name="tiny-qwen3-moe", moe_layers=MOE_LAYERS, num_experts=NUM_EXPERTS, top_k=TOP_K, hidden=64,
                       moe_intermediate=0,
                       dense_params=1.0, weight_bytes=0.0, attn_flops_per_ctx_token=0.0,
                       kv_bytes_per_token=c["per_decode_ctx_s"] * hbm)
    flops = 2.0 / max(c["per_token_s"], 1e-12)
    model = replace(model, attn_flops_per_ctx_token=c["per_prefill_pair_s"] * flops)
    hardware = Hardware(flops=flops, hbm_bytes_s=hbm, gpus_per_node=64, a2a_latency_s=0.0,
                        step_overhead_s=c["step_overhead_s"], dispatch_bytes_per_elem=0.0,
                        prefill_overhead_s=c["prefill_overhead_s"], decode_token_extra_s=c["decode_token_extra_s"],
                        contention_prefill=c.get("contention_prefill", 0.0),
                        contention_decode=c.get("contention_decode", 0.0),
                        frontend_latency_s=c.get("frontend_latency_s", 0.0),
                        new_shape_s=c.get("new_shape_s", 0.0),
                        new_shape_per_token_s=c.get("new_shape_per_token_s", 0.0),
                        first_token_one_step_late=bool(c.get("first_token_one_step_late", False)),
                        active_expert_s=c.get("active_expert_s", 0.0))
    return Preset(name="cpu-tiny", model=model, dp=int(cal.get("dp", 2)), tp=1, hardware=hardware,
                  scheduler=replace(SchedulerSettings(load_refresh_interval_s=0.0), **cal.get("scheduler", {})),
                  slo_ttft_s=5.0, slo_tpot_s=0.5,
                  description="tiny Qwen3-MoE on the real CPU server, dp2 tp1 (calibrated)")
