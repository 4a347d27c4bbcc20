"""benchmark/live_floor.py: the per-request floor over every arm and repeat of a recorded live A/B, and each arm's
capture of the best upstream arm's headroom above it."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest


def _module():
    spec = importlib.util.spec_from_file_location(
        "live_floor", Path(__file__).resolve().parents[2] / "benchmark" / "live_floor.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _record(path: Path, ttfts: dict, failed: str | None = None):
    with open(path, "w") as f:
        f.write(json.dumps({"type": "meta"}) + "\n")
        for rid, (cls, ttft) in ttfts.items():
            f.write(json.dumps({"type": "request", "rid": rid, "cls": cls, "ttft_s": ttft,
                                "success": rid != failed}) + "\n")


def test_floor_is_each_requests_best_and_capture_is_relative_to_the_best_upstream_arm(tmp_path):
    runs = {  # arm -> repeats -> {rid: (class, ttft)}
        "upstream-lpm": [{"a": ("be", 1.0), "b": ("ls", 0.8)}, {"a": ("be", 1.2), "b": ("ls", 0.6)}],
        "upstream-priority": [{"a": ("be", 0.9), "b": ("ls", 0.5)}, {"a": ("be", 0.9), "b": ("ls", 0.5)}],
        "tiersched": [{"a": ("be", 0.5), "b": ("ls", 0.3)}, {"a": ("be", 0.7), "b": ("ls", 0.2)}],
        "tiersched-fixed": [{"a": ("be", 0.4), "b": ("ls", 0.9)}],
    }
    for arm, reps in runs.items():
        for i, rows in enumerate(reps):
            _record(tmp_path / f"dp2-shared-prefix-x0.8-{arm}-r{i}.jsonl", rows)
    # a failed run: out of its arm's means, but its successes count towards the floor
    _record(tmp_path / "dp2-shared-prefix-x0.8-upstream-lpm-r2.jsonl", {"a": ("be", 0.1), "b": ("ls", 9.0)}, "b")
    out = _module().floors(str(tmp_path), "dp2")["shared-prefix-x0.8"]
    assert out["floor_ttft_mean_s"] == pytest.approx((0.1 + 0.2) / 2)
    assert out["floor_ls_ttft_mean_s"] == pytest.approx(0.2)
    assert out["best_upstream_all"] == "upstream-priority" and out["best_upstream_ls"] == "upstream-priority"
    ours = out["arms"]["tiersched"]
    assert ours["ttft_mean_s"] == pytest.approx(0.425) and ours["ls_ttft_mean_s"] == pytest.approx(0.25)
    assert ours["capture"] == pytest.approx((0.7 - 0.425) / (0.7 - 0.15), abs=1e-3)
    assert ours["ls_capture"] == pytest.approx((0.5 - 0.25) / (0.5 - 0.2), abs=1e-3)
    assert out["arms"]["upstream-priority"]["capture"] == 0.0
    assert out["arms"]["upstream-lpm"]["runs"] == 2  # the failed run is left out
    assert out["arms"]["tiersched-fixed"]["ls_capture"] < 0  # worse than the best upstream arm on LS


def test_no_records_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no dp2 records"):
        _module().floors(str(tmp_path), "dp2")
