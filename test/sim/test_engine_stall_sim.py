"""The simulator tells the engine tier's dispatcher that its DP ranks run in lockstep, with the step planner's model
of the deployment and the preset's chunk size; not in the perfect-balance reference, not to a dispatcher without a
stall term."""
from __future__ import annotations

from tiersched.core.engine import EngineTierConfig
from tiersched.core.engine.score import ScoreDispatcher
from tiersched.sim import PolicySet, get_preset, simulate, workloads
from tiersched.sim.lockstep import prior_model
from tiersched.sim.loop import Simulation


def _work():
    return workloads.synthetic("Two-end", rate=30.0, duration_s=0.5, seed=3)


def test_simulation_hands_its_lockstep_group_to_a_dispatcher_with_a_stall_weight():
    preset = get_preset("qwen3-dp4ep4").with_scheduler(chunked_prefill_size=2048, enable_mixed_chunk=True)
    sim = Simulation(preset, _work(), PolicySet(dispatch=ScoreDispatcher(preset.dp, EngineTierConfig(weight_stall=2.0))))
    group = sim.dispatcher.lockstep
    assert group is not None
    assert group.chunk_tokens == 2048 and group.mixed_chunk
    assert group.model == prior_model(sim.cost)


def test_no_lockstep_group_without_a_stall_weight_or_in_the_perfect_balance_reference():
    preset = get_preset("qwen3-dp4ep4")
    off = Simulation(preset, _work(), PolicySet(dispatch=ScoreDispatcher(preset.dp, EngineTierConfig(weight_stall=0.0))))
    assert off.dispatcher.lockstep is None
    by_name = Simulation(preset, _work(), PolicySet(dispatch="tiersched"))  # the default config
    assert (by_name.dispatcher.lockstep is not None) == (EngineTierConfig().weight_stall > 0)
    ideal = Simulation(preset, _work(), PolicySet(dispatch=ScoreDispatcher(preset.dp, EngineTierConfig(weight_stall=2.0))),
                       ideal_balance=True)
    assert ideal.dispatcher.lockstep is None


def test_a_run_with_the_stall_term_serves_every_request():
    preset = get_preset("qwen3-dp4ep4")
    m = simulate(preset, _work(), PolicySet(dispatch=ScoreDispatcher(preset.dp, EngineTierConfig(weight_stall=4.0)),
                                            step_plan="tiersched"), record_timeline=False).metrics
    assert m["finished"] == m["requests"] > 0
