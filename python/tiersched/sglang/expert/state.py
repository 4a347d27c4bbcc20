"""Expert-tier adapter state in one process: the planner's config and statistics history, and the recorder feed.

Per process: the seams it lives between are module functions (`eplb_algorithms.rebalance_experts`,
`compute_algorithm`) and upstream's per-process expert-distribution recorder; each scheduler process runs one
EPLB manager and one recorder.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from tiersched.core.expert import PlacementConfig
from tiersched.sglang.expert.recorder import SourceLayout, SourceRecorder

ALGORITHMS = ("source_aware", "source_aware_hierarchical")
HISTORY_WINDOWS = 6  # windows the planner sees (older ones weigh 2**(-age / window_half_life) in the core)


def is_ours(raw_algorithm) -> bool:
    """Whether an `--eplb-algorithm` value names one of our algorithms."""
    return isinstance(raw_algorithm, str) and raw_algorithm in ALGORITHMS


@dataclass
class Window:
    """One recording window: counts float [L, S, E]; coactivation top-K (index, value) [L-1, E, k] or None."""

    counts: np.ndarray
    coact_index: Optional[np.ndarray] = None
    coact_value: Optional[np.ndarray] = None


@dataclass
class CaptureState:
    """The per-source recorder fed from upstream's expert-distribution recorder (capture.py).

    decided: whether this process runs one of our algorithms, read once from upstream's resolved args at the first
    recorded pass (None until then); layout: this rank's own-token rows for the current pass."""

    decided: Optional[bool] = None
    recorder: Optional[SourceRecorder] = None
    layout: Optional[SourceLayout] = None


@dataclass
class ExpertTierState:
    """config: the planner's; history: the last HISTORY_WINDOWS windows planned on; pending: the window gathered at
    the last recorder dump, consumed by the next rebalance; pressure: float [R] after the last plan; last: summary
    of the last rebalance (tests, logs)."""

    config: PlacementConfig = field(default_factory=PlacementConfig)
    history: deque = field(default_factory=lambda: deque(maxlen=HISTORY_WINDOWS))
    pending: Optional[Window] = None
    rebalances: int = 0
    pressure: Optional[np.ndarray] = None
    last: Optional[dict] = None
    capture: CaptureState = field(default_factory=CaptureState)

    def configure(self, config: PlacementConfig) -> None:
        config.validate()
        self.config = config


STATE = ExpertTierState()
