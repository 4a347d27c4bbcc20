"""PolicySet: which policy object runs at each tier, by registry name or as an object.

Names: ordering "fcfs", "lpm", "hrrn", "shortest-prefill-first", "lof", "random", "fcfs-priority", "lof-priority"
(the `-priority` ones: upstream's --enable-priority-scheduling), "tiersched"; dispatch
"round_robin", "total_requests", "total_tokens", "vllm-dp", "tiersched"; eplb "none", upstream's
`--eplb-algorithm` values (UPSTREAM_EPLB_NAMES: "deepseek", "deepseek_hierarchical", "deepseek_vec",
"deepseek_vec_hierarchical", "elasticity_aware", "elasticity_aware_hierarchical", "auto"; hyphens are accepted for
underscores), "source_aware"; preemption "none", "priority", "tiersched", "auto". "tiersched" /
"source_aware" are the tier's own classes in tiersched.core. An ordering or preemption passed as an object must be
an OrderingPolicy / PreemptionPolicy (tiersched.core.request). Ordering and preemption objects are per rank (each
SGLang scheduler owns its own): objects passed in are deep-copied per rank.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from tiersched.core.engine import Dispatcher
from tiersched.core.engine.score import ScoreDispatcher
from tiersched.core.engine.upstream import BASELINES as UPSTREAM_DISPATCHERS
from tiersched.core.expert import ExpertPlanner, ExpertStats, Placement, PlacementConfig
from tiersched.core.expert.placement import rebalance
from tiersched.core.request import OrderingPolicy, PreemptionPolicy
from tiersched.core.request.ordering import AgingPrefixOrdering
from tiersched.core.request.preemption import LatencySensitivePreemption
from tiersched.core.request.upstream import (FcfsOrdering, FcfsPriorityOrdering, HrrnOrdering, LofOrdering,
                                             LofPriorityOrdering, LpmOrdering, PriorityPreemption, RandomOrdering,
                                             ShortestPrefillFirstOrdering)
from tiersched.sim.upstream_eplb import UPSTREAM_EPLB_NAMES, UpstreamEPLB

ORDERINGS: dict[str, type[OrderingPolicy]] = {
    "fcfs": FcfsOrdering,
    "fcfs-priority": FcfsPriorityOrdering,
    "lpm": LpmOrdering,
    "hrrn": HrrnOrdering,
    "shortest-prefill-first": ShortestPrefillFirstOrdering,
    "lof": LofOrdering,
    "lof-priority": LofPriorityOrdering,
    "random": RandomOrdering,
    "tiersched": AgingPrefixOrdering,
}
PREEMPTIONS: dict[str, Callable[[Any], PreemptionPolicy]] = {  # name -> factory(preset)
    "priority": lambda preset: PriorityPreemption(preset.scheduler.priority_preemption_threshold),
    "tiersched": lambda preset: LatencySensitivePreemption(),
}
# preemption "auto": the preemption that runs with that ordering (upstream's priority scheduling, or ours).
AUTO_PREEMPTION = {"fcfs-priority": "priority", "lof-priority": "priority", "tiersched": "tiersched"}
DISPATCHERS: dict[str, type[Dispatcher]] = {**UPSTREAM_DISPATCHERS, ScoreDispatcher.name: ScoreDispatcher}


@dataclass(frozen=True)
class PolicySet:
    ordering: Any = "fcfs"
    preemption: Any = "auto"  # "auto": upstream's priority preemption with fcfs-priority, tiersched's with tiersched
    dispatch: Any = "round_robin"
    eplb: Any = "none"
    expert_feedback: bool = False  # publish expert_pressure in RankLoad (dispatch may use it)
    # Lockstep step plan of the DP-attention group (sim/lockstep.make_planner): "none", "tiersched", a
    # RequestTierConfig (the plan with its plan tunables) or a StepPlanner.
    step_plan: Any = "none"

    def label(self) -> str:
        def name(x):
            return x if isinstance(x, str) else getattr(x, "name", type(x).__name__)

        dispatch = self.dispatch if isinstance(self.dispatch, str) else self.dispatch.name  # a Dispatcher
        parts = [name(self.ordering), dispatch, name(self.eplb)]
        plan = "" if self.step_plan in (None, False, "none") else "+plan"
        return "/".join(parts) + ("+feedback" if self.expert_feedback else "") + plan


def make_ordering(spec: Any, preset) -> OrderingPolicy:
    if isinstance(spec, OrderingPolicy):
        return copy.deepcopy(spec)
    if not isinstance(spec, str):
        raise TypeError(f"ordering {spec!r} is neither a name nor an OrderingPolicy (tiersched.core.request).")
    if spec not in ORDERINGS:
        raise ValueError(f"unknown ordering {spec!r}; choose one of {', '.join(ORDERINGS)}.")
    return ORDERINGS[spec]()


def make_preemption(spec: Any, ordering_spec: Any, preset) -> PreemptionPolicy | None:
    if spec == "auto":
        spec = AUTO_PREEMPTION.get(ordering_spec) if isinstance(ordering_spec, str) else None
    if spec in (None, "none"):
        return None
    if isinstance(spec, PreemptionPolicy):
        return copy.deepcopy(spec)
    if not isinstance(spec, str):
        raise TypeError(f"preemption {spec!r} is neither a name nor a PreemptionPolicy (tiersched.core.request).")
    if spec not in PREEMPTIONS:
        raise ValueError(f"unknown preemption {spec!r}; choose one of none, {', '.join(PREEMPTIONS)}, auto.")
    return PREEMPTIONS[spec](preset)


def make_dispatcher(spec: Any, preset) -> Dispatcher:
    """A registry name -> a fresh dispatcher over the preset's DP ranks; a Dispatcher object -> a deep copy."""
    if isinstance(spec, Dispatcher):
        return copy.deepcopy(spec)
    if not isinstance(spec, str):
        raise TypeError(f"dispatch {spec!r} is neither a name nor a Dispatcher (tiersched.core.engine).")
    if spec not in DISPATCHERS:
        raise ValueError(f"unknown dispatch {spec!r}; choose one of {', '.join(DISPATCHERS)}.")
    return DISPATCHERS[spec](preset.dp)


class CoreRebalance(ExpertPlanner):
    """tiersched.core.expert.placement.rebalance as the simulator's planner (default PlacementConfig)."""

    name = "source_aware"

    def __init__(self, config: PlacementConfig | None = None):
        self.config = config if config is not None else PlacementConfig()

    def plan(self, stats: ExpertStats, num_slots: int, num_gpus: int, num_nodes: int,
             current: Placement | None = None) -> Placement:
        counts = stats.source_counts  # [W, L, S, E] with S = DP ranks; the planner's sources are GPUs
        per_rank = num_gpus // counts.shape[2]
        if per_rank > 1:  # a DP rank's tokens start on its tp GPUs evenly
            counts = np.repeat(counts / per_rank, per_rank, axis=2)
            stats = ExpertStats(source_counts=counts, coactivation=stats.coactivation)
        return rebalance(stats, num_slots, num_gpus, num_nodes, current, self.config)


def _upstream_planner(algorithm: str) -> Callable[[Any], ExpertPlanner]:
    return lambda preset: UpstreamEPLB(algorithm, num_groups=preset.model.expert_groups)


EPLB_PLANNERS: dict[str, Callable[[Any], ExpertPlanner]] = {  # name -> factory(preset)
    **{name: _upstream_planner(name) for name in UPSTREAM_EPLB_NAMES},
    CoreRebalance.name: lambda preset: CoreRebalance(),
}
EPLB_NAMES = ("none", *EPLB_PLANNERS)


def make_eplb(spec: Any, preset) -> ExpertPlanner | None:
    """A registry name -> a fresh planner ("none" -> None: no rebalancing); an ExpertPlanner object -> itself."""
    if isinstance(spec, ExpertPlanner):
        return spec
    if spec in (None, "none"):
        return None
    if not isinstance(spec, str):
        raise TypeError(f"eplb {spec!r} is neither a name nor an ExpertPlanner (tiersched.core.expert).")
    spec = spec.replace("-", "_")  # upstream's flag values use underscores; "deepseek-hierarchical" is the same
    if spec not in EPLB_PLANNERS:
        raise ValueError(f"unknown eplb {spec!r}; choose one of {', '.join(EPLB_NAMES)}.")
    return EPLB_PLANNERS[spec](preset)
