"""The simulator's use of request-tier policies: any OrderingPolicy / PreemptionPolicy runs, names are checked."""
from __future__ import annotations

import numpy as np
import pytest
from test_sim_mechanics import TINY, UniformRouting, preset, run, workload

from tiersched.core.request import OrderingPolicy, PreemptionPolicy
from tiersched.sim import PolicySet
from tiersched.sim.loop import Simulation


class ArrivalOrder(OrderingPolicy):
    """Only `order`: every other hook keeps its default."""

    def __init__(self):
        self.calls = 0

    def order(self, waiting, now_s):
        self.calls += 1
        return sorted(range(len(waiting)), key=lambda i: waiting[i].arrival_s)


class NewestFirst(OrderingPolicy):
    def order(self, waiting, now_s):
        return sorted(range(len(waiting)), key=lambda i: -waiting[i].arrival_s)


def _burst():
    # One rank, at most one request prefilled per step: a long request keeps the rank busy while three arrive.
    p = preset(dp=1, max_running_requests=8, chunked_prefill_size=2_000, max_prefill_tokens=2_000)
    return p, workload([0.0, 0.001, 0.002, 0.003], [2_000, 1_500, 1_500, 1_500], [4, 4, 4, 4])


def test_a_minimal_custom_ordering_runs_end_to_end_like_its_registry_twin():
    p, w = _burst()
    ours = run(p, w, PolicySet(ordering=ArrivalOrder()))
    fcfs = run(p, w, PolicySet(ordering="fcfs"))
    assert np.isfinite(ours.records["ttft"]).all()
    np.testing.assert_array_equal(ours.records["ttft"], fcfs.records["ttft"])
    newest = run(p, w, PolicySet(ordering=NewestFirst()))
    # The three waiting requests are served newest first: the last arrival gets its first token before the second.
    assert newest.records["ttft"][3] + w.arrival_s[3] < newest.records["ttft"][1] + w.arrival_s[1]


def test_each_rank_gets_its_own_copy_of_a_policy_object():
    p, w = _burst()
    ordering = ArrivalOrder()
    sim = Simulation(preset(dp=2), w, PolicySet(ordering=ordering),
                     routing=UniformRouting(TINY.moe_layers, 2, TINY.num_experts, TINY.top_k), record_timeline=False)
    sim.run()
    assert ordering.calls == 0 and sum(rs.ordering.calls for rs in sim.ranks) > 0
    assert sim.ranks[0].ordering is not sim.ranks[1].ordering


def test_a_custom_preemption_is_asked_when_slots_run_out():
    class RecordingPreemption(PreemptionPolicy):
        preempts_on_kv_shortage = False

        def __init__(self):
            self.asked = []

        def choose_victims(self, candidate, running, slots_short, kv_tokens_short, now_s):
            self.asked.append((candidate.rid, slots_short))
            return None

    p = preset(dp=1, max_running_requests=1)
    w = workload([0.0, 0.001], [100, 100], [50, 2])
    sim = Simulation(p, w, PolicySet(ordering="fcfs", preemption=RecordingPreemption()),
                     routing=UniformRouting(TINY.moe_layers, 1, TINY.num_experts, TINY.top_k), record_timeline=False)
    sim.run()
    asked = sim.ranks[0].preemption.asked
    assert asked and all(rid == "1" and short == 1 for rid, short in asked)  # the one slot is taken by request 0
    assert np.isfinite(sim.table.finish).all()


def test_unknown_names_and_foreign_objects_are_start_up_errors():
    p, w = _burst()
    with pytest.raises(ValueError, match="unknown ordering 'sjf'.*fcfs, fcfs-priority, lpm.*tiersched"):
        run(p, w, PolicySet(ordering="sjf"))
    with pytest.raises(ValueError, match="unknown preemption 'always'.*priority, tiersched"):
        run(p, w, PolicySet(ordering="fcfs", preemption="always"))

    class DuckTyped:  # has `order` but is no OrderingPolicy: its other hooks would be guessed
        def order(self, waiting, now_s):
            return list(range(len(waiting)))

    with pytest.raises(TypeError, match="OrderingPolicy"):
        run(p, w, PolicySet(ordering=DuckTyped()))
