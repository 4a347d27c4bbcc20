"""The state report read after the fault runs: what each size counts, on real objects (a prefix-aging
SchedulePolicy's overtake budget after an ordering pass over real Reqs; the score dispatcher after many picks)."""
from __future__ import annotations

import array
from types import SimpleNamespace

import pytest

pytest.importorskip("sglang.srt.managers.schedule_policy")

from sglang.srt.managers.schedule_batch import Req  # noqa: E402
from sglang.srt.managers.schedule_policy import SchedulePolicy  # noqa: E402
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: E402

from tiersched.core.engine import DispatchRequest, EngineTierConfig, RankLoad  # noqa: E402
from tiersched.core.engine.score import ScoreDispatcher  # noqa: E402
from tiersched.core.request import RequestTierConfig  # noqa: E402
from tiersched.sglang import plugin, state_report  # noqa: E402
from tiersched.sglang.request import hooks as request_tier  # noqa: E402


def test_request_sizes_count_the_ls_requests_placed_ahead_of_promoted_ones(monkeypatch):
    monkeypatch.setattr(request_tier.STATE, "config", RequestTierConfig(aging_cap_s=1.0, ls_overtake_burst=2))
    pol = SchedulePolicy.__new__(SchedulePolicy)
    request_tier.init_schedule_policy(SchedulePolicy.__init__, pol, "prefix-aging", None, False, True, False)
    queue = []
    for i, (priority, age) in enumerate([(0, 5.0), (10, 0.0), (10, 0.0), (10, 0.0)]):
        r = Req(f"r{i}", "", array.array("q", range(100 * i, 100 * i + 8)), SamplingParams(max_new_tokens=4),
                priority=priority)
        r.time_stats.set_wait_queue_entry_time(100.0 - age)
        queue.append(r)
    monkeypatch.setattr(request_tier.time, "perf_counter", lambda: 100.0)
    request_tier.calc_priority(lambda *a, **k: pytest.fail("upstream ordering ran"), pol, queue)
    assert [r.rid for r in queue][:2] == ["r1", "r2"]  # two LS overtakes (burst 2) ahead of the promoted r0
    monkeypatch.setattr(plugin, "STATE", plugin.PluginState(True, None, ("input-validation", "request")))
    sizes = state_report.tiersched_sizes(SimpleNamespace(policy=pol))
    assert sizes["loaded"] == ["input-validation", "request"] and "expert" not in sizes
    assert sizes["request"]["overtake_ahead_tracked"] == 2 and sizes["request"]["overtake_burst"] == 2
    assert state_report.tiersched_sizes(SimpleNamespace(policy=SimpleNamespace()))["request"] is None


def test_engine_sizes_stay_at_their_bounds():
    d = ScoreDispatcher(2, EngineTierConfig(max_sessions=5, max_blocks_per_rank=40))
    for i in range(500):
        if i % 10 == 0:
            d.update_loads([RankLoad(rank=r, kv_capacity_tokens=16384, timestamp_s=i * 0.01) for r in (0, 1)], i * 0.01)
        d.pick(DispatchRequest(rid=f"r{i}", input_tokens=64, prefix_blocks=tuple(range(8 * i, 8 * i + 8)),
                               session_key=f"s{i}"), i * 0.01)
    sizes = d.state_sizes()
    assert sizes["sessions"] == 5 == sizes["sessions_max"]
    assert all(b == 40 for b in sizes["prefix_blocks_per_rank"]) and sizes["prefix_blocks_max_per_rank"] == 40
    assert sizes["prefix_index_keys"] <= 80 and all(c <= 20 for c in sizes["pending_charges_per_rank"])
