"""Engine-tier adapter state in one process: the tier config and the expert-pressure provider.

Per-object state lives on the upstream object it belongs to: `ScoreDispatchState` on each DataParallelController
(hooks.py, attribute `tiersched_dispatch`), `LoadSidePublisher` on each Scheduler (loads.py, attribute
`tiersched_load_side`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from tiersched.core.engine import EngineTierConfig

# fn(scheduler) -> this rank's expert pressure (1.0 neutral) or None; supplied by the expert tier.
ExpertPressureProvider = Callable[[Any], Optional[float]]


@dataclass
class EngineTierState:
    config: EngineTierConfig = field(default_factory=EngineTierConfig)
    expert_pressure_provider: Optional[ExpertPressureProvider] = None


STATE = EngineTierState()
