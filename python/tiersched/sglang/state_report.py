"""The sizes of tiersched's own per-process state, readable on a running server (what the fault tests assert stays
bounded after a long or abusive run).

* Schedulers: upstream's `GET /server_info` gathers every DP rank's `SchedulerInternalStateController.
  get_internal_state()`; our AFTER hook adds a `tiersched` entry to each rank's dict: the request tier's LS
  overtake budget (credit, LS requests it placed ahead, keyed by rid), and the expert tier's statistics history
  and recorder buffer.
* DP controller (engine tier): the same request passes the controller as a control message; the engine tier logs
  `tiersched engine state: ...` (prefix-index keys and blocks per rank, optimistic charges, sessions) there
  (engine/hooks.py, `on_control_message`), since the controller adds nothing to the answer.
"""
from __future__ import annotations

HOOKS = (
    ("sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController.get_internal_state",
     "AFTER", "add_tiersched_state"),
)
KEY = "tiersched"


def request_tier_sizes(scheduler) -> dict | None:
    """The request tier's state in `scheduler` (None unless its policy is prefix-aging)."""
    from tiersched.sglang.request.state import policy_state

    state = policy_state(scheduler.policy)
    if state is None:
        return None
    budget = state.overtake
    return {"overtake_credit": budget.credit, "overtake_burst": budget.burst,
            "overtake_ahead_tracked": budget.tracked, "preemption_victims": state.preemptions.victims}


def expert_tier_sizes() -> dict:
    from tiersched.sglang.expert.state import STATE

    recorder = STATE.capture.recorder
    return {"history_windows": len(STATE.history), "history_max": STATE.history.maxlen,
            "recorder_rows": None if recorder is None else int(recorder.counts.shape[0]),
            "rebalances": STATE.rebalances}


def tiersched_sizes(scheduler) -> dict:
    from tiersched.sglang.plugin import STATE

    out: dict = {"loaded": list(STATE.active)}  # what the plugin registered (/server_info has the flags in effect)
    if "request" in STATE.active:
        out["request"] = request_tier_sizes(scheduler)
    if "expert" in STATE.active:
        out["expert"] = expert_tier_sizes()
    return out


def add_tiersched_state(result, controller, *args, **kwargs):
    """AFTER get_internal_state: `result` is upstream's GetInternalStateReqOutput for this rank."""
    result.internal_state[KEY] = tiersched_sizes(controller.scheduler)
    return result
