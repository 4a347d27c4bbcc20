"""benchmark/lockstep_tpot_decomposition.py (docs/lockstep.md "Where TPOT goes"): the attribution of every
decode-time second to a kind of lockstep step is exact and does not change the run it observes."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tiersched.sim import PolicySet, get_preset, simulate, workloads


@pytest.fixture(scope="module")
def decomposition():
    spec = importlib.util.spec_from_file_location(
        "lockstep_tpot_decomposition",
        Path(__file__).resolve().parents[2] / "benchmark" / "lockstep_tpot_decomposition.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("spec", [
    "ordering=fcfs,dispatch=round_robin,chunk=1024",
    "ordering=shortest-prefill-first,dispatch=total_tokens,chunk=1024,mixed=1,delay=60,queue_ratio=0.5",
    "ordering=fcfs,dispatch=round_robin,chunk=8192,mixed=1,plan=1",
])
def test_decomposition_adds_up_and_leaves_the_run_unchanged(decomposition, spec):
    arm = decomposition.parse_arm(spec)
    out = decomposition.run_arm("qwen3-dp4ep4", "Two-end", 30.0, 1.5, 0, arm)
    p = get_preset("qwen3-dp4ep4").with_scheduler(**decomposition._scheduler_changes(arm))
    plain = simulate(p, workloads.synthetic("Two-end", rate=30.0, duration_s=1.5, seed=0),
                     PolicySet(ordering=arm["ordering"], dispatch=arm["dispatch"],
                               step_plan="tiersched" if arm["plan"] else "none"), seed=0, record_timeline=False)
    assert out["metrics"]["tpot_mean"] == pytest.approx(plain.metrics["tpot_mean"], rel=1e-12)
    assert out["metrics"]["ttft_mean"] == pytest.approx(plain.metrics["ttft_mean"], rel=1e-12)
    parts = out["tpot_ms_by_kind"]
    assert all(v >= 0 for v in parts.values())
    assert sum(parts.values()) == pytest.approx(out["tpot_ms"], abs=5e-3)  # parts are rounded to 1 us
    assert out["prefill_steps"] > 0 and out["steps"] == out["decode_steps"] + out["prefill_steps"] == plain.steps
    # A rank that carries its decodes in its prefill step never leaves them without a token, and the other way.
    if arm["mixed"]:
        assert parts["mixed"] > 0 and parts["own_prefill"] == 0
    else:
        assert parts["mixed"] == 0 and parts["own_prefill"] > 0
    for kind, excess in out["excess_ms_by_kind"].items():
        assert 0 <= excess <= parts[kind] + 1e-9
