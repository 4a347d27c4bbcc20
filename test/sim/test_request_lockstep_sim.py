"""The request tier's lockstep rules in the simulator: the group LS signal caps another rank's BE chunk, and
DP-attention groups get the step-time model that prices the LS cap (core rules: test/core/test_request_lockstep.py,
test/core/test_request_cap_pricing.py)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from test_sim_mechanics import TINY, UniformRouting, preset

from tiersched.core.request import RequestTierConfig
from tiersched.core.request.ordering import AgingPrefixOrdering
from tiersched.core.request.preemption import LatencySensitivePreemption
from tiersched.sim import PolicySet
from tiersched.sim.loop import Simulation
from tiersched.sim.workloads import Workload

CFG = RequestTierConfig(be_chunk_tokens=256, min_chunk_tokens=64, ls_hold_s=1.0)
PRICED_CFG = RequestTierConfig(be_chunk_tokens=512, min_chunk_tokens=64)


# ---- simulator -----------------------------------------------------------------------------------------------
def _two_rank_run(cfg, lag):
    p = preset(dp=2, chunked_prefill_size=1000, max_prefill_tokens=1000)
    # BE 5k-token prompt -> rank 0 (chunk-prefilled); an LS request on rank 1 a little later; round robin.
    w = Workload("lockstep", np.array([0.0, 3.0]), np.array([5_000, 100]), np.array([4, 4]),
                 priority=np.array([0, 5]), class_of=np.array([1, 0]), class_names=("LS", "BE"))
    ordering = AgingPrefixOrdering(cfg)
    ordering.lockstep_signal_lag_steps = lag
    sim = Simulation(p, w, PolicySet(ordering=ordering, preemption=LatencySensitivePreemption(cfg)),
                     routing=UniformRouting(TINY.moe_layers, p.dp, TINY.num_experts, TINY.top_k),
                     record_timeline=False)
    sim.run()
    assert int(sim.table.rank[0]) == 0 and int(sim.table.rank[1]) == 1
    assert np.isfinite(sim.table.finish).all()
    return sim


def test_sim_group_signal_caps_the_other_ranks_be_chunk():
    local = _two_rank_run(replace(CFG, lockstep_chunk_cap=False, cap_be_admissions=False), lag=1)
    ideal = _two_rank_run(CFG, lag=0)
    gathered = _two_rank_run(CFG, lag=1)
    assert local.ranks[0].capped_chunks == 0  # the per-rank rule cannot see rank 1's LS request
    assert ideal.ranks[0].capped_chunks > 0 and gathered.ranks[0].capped_chunks > 0
    ttft = lambda s: s.table.first_token[1] - s.table.arrival[1]
    # same-step signal: the LS request's step is one short (capped) lockstep step instead of a 1000-token one
    assert ttft(ideal) < 0.6 * ttft(local)
    # one step old (what SGLang's gather gives): the LS request's own step was formed before the signal arrived
    assert ttft(gathered) == pytest.approx(ttft(local))


def test_simulator_gives_dp_attention_groups_the_step_model():
    w = Workload("one", np.array([0.0]), np.array([64]), np.array([2]), priority=np.array([0]),
                 class_of=np.array([0]))
    for dp, expect in [(2, True), (1, False)]:
        p = preset(dp=dp)
        sim = Simulation(p, w, PolicySet(ordering=AgingPrefixOrdering(PRICED_CFG)),
                         routing=UniformRouting(TINY.moe_layers, p.dp, TINY.num_experts, TINY.top_k),
                         record_timeline=False)
        models = [rs.ordering.step_model for rs in sim.ranks]
        assert all((m is not None) == expect for m in models) and len({id(m) for m in models}) == 1
        assert all(rs.ordering.group_ranks == (dp if expect else 1) for rs in sim.ranks)
        sim.run()
        assert np.isfinite(sim.table.finish).all()
