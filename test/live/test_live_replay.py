"""Replay records: format round trip, workload conversion, recorded dispatch, simulator replay (or pending)."""
import json

import numpy as np
import pytest

from tiersched.live import replay as live_replay
from tiersched.live.driver import RequestResult
from tiersched.live.requests import synthetic_shared_prefix
from tiersched.core.engine import DispatchRequest


@pytest.fixture
def record(tmp_path):
    s = synthetic_shared_prefix(n=40, block_tokens=8, rate=4.0, seed=1)
    rng = np.random.default_rng(0)
    results = []
    for i, r in enumerate(s.requests):
        ttft = 0.05 + 0.01 * i % 7
        results.append(RequestResult(r.rid, r.cls, r.priority, len(r.input_ids), r.output_len, sent_s=r.arrival_s,
                                     success=True, finished=True, ttft=ttft, latency=ttft + 0.02 * r.output_len,
                                     completion_tokens=r.output_len, cached_tokens=int(rng.integers(0, 16)),
                                     dp_rank=i % 2))
    path = tmp_path / "run.jsonl"
    live_replay.write_record(path, {"deployment": "dp2", "arm": "upstream-lpm", "dp": 2, "repeat": 0}, s, results)
    return path, s, results


def test_record_round_trip(record):
    path, s, results = record
    meta, rows = live_replay.read_record(path)
    assert meta["arm"] == "upstream-lpm" and meta["block_tokens"] == 8 and len(rows) == len(s)
    assert [r["dp_rank"] for r in rows] == [res.dp_rank for res in results]
    assert rows[3]["prefix_blocks"] == list(s.requests[3].prefix_blocks)
    live = live_replay.live_metrics(rows)
    assert live["requests_per_rank"] == [20, 20]
    assert live["ttft_mean_s"] == pytest.approx(np.mean([r.ttft for r in results]))


def test_record_without_meta_is_refused(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"type": "request"}) + "\n")
    with pytest.raises(ValueError, match="no meta line"):
        live_replay.read_record(path)


def test_workload_and_recorded_dispatch(record):
    path, s, _ = record
    meta, rows = live_replay.read_record(path)
    w, rows = live_replay.to_workload(meta, rows)
    assert len(w.arrival_s) == len(s) and w.arrival_s[0] == 0 and np.all(np.diff(w.arrival_s) >= 0)
    assert w.block_tokens == 8 and w.class_names == ("be", "ls")
    assert w.priority.max() == 10
    d = live_replay.RecordedDispatch(w.meta["recorded_ranks"], dp=2)
    picks = [d.pick(DispatchRequest(str(i), 10), 0.0).rank for i in range(len(s))]
    assert picks == [r["dp_rank"] for r in rows]


def test_relative_errors():
    errs = live_replay.relative_errors({"ttft_mean_s": 1.2, "cached_fraction": None}, {"ttft_mean_s": 1.0,
                                                                                        "cached_fraction": 0.5})
    assert errs["ttft_mean_s"] == pytest.approx(0.2) and errs["cached_fraction"] is None


def test_replay_runs_or_reports_pending(record):
    path, _, _ = record
    out = live_replay.replay(path, counterfactuals=("upstream-lpm",))
    if out["status"] == "pending":
        assert "cpu-tiny" in out["reason"]
        return
    assert out["status"] == "ok" and out["ran"] == "upstream-lpm"
    assert out["simulated"]["recorded-dispatch"]["requests_per_rank"] == [20, 20]
    assert out["error_on_ran_policy"]["ttft_mean_s"] is not None
