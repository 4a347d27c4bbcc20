"""Request-tier adapter: `--schedule-policy prefix-aging` inside upstream SGLang's scheduler.

Thin shell: every hook translates upstream objects (Req, ScheduleBatch, PrefillAdder) into the core snapshots
of tiersched.core.request.ordering and applies the core's answer back. Hooks are registered for every process
(the plugin runs before argument parsing) and pass straight through unless the scheduler was started with
`--schedule-policy prefix-aging`. Rows for every target: patches/request-tier.toml.
"""
from __future__ import annotations

import logging
import time

from tiersched.core.request.ordering import RequestTierConfig

logger = logging.getLogger("tiersched.request_tier")

POLICY_NAME = "prefix-aging"
# The upstream policy whose tree-cache handling prefix-aging reuses (cache-aware: prefix matches every step).
BASE_POLICY = "lpm"

HOOKS = (
    ("sglang.srt.server_args.ServerArgs.add_cli_args", "AROUND", "accept_policy_choice"),
    ("sglang.srt.arg_groups.validation_hook.check_server_args", "AROUND", "allow_policy_with_priority"),
    ("sglang.srt.managers.schedule_policy.SchedulePolicy.__init__", "AROUND", "init_schedule_policy"),
    ("sglang.srt.managers.schedule_policy.SchedulePolicy.calc_priority", "AROUND", "calc_priority"),
    ("sglang.srt.managers.schedule_policy.SchedulePolicy.shortest_prefill_chunk_limit", "AROUND", "chunk_limit"),
    ("sglang.srt.managers.schedule_policy.PrefillAdder.preempt_to_schedule", "AROUND", "preempt_for_slots"),
    ("sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req", "AROUND", "preempt_for_kv"),
)

# Set when a SchedulePolicy is built with prefix-aging (one per scheduler process); PrefillAdder hooks read it.
_state: dict = {"config": RequestTierConfig(), "active": False, "low_values_first": False}


def configure(config: RequestTierConfig) -> None:
    config.validate()
    _state["config"] = config
    from tiersched.sglang.request import lockstep as request_tier_lockstep

    request_tier_lockstep.reset(config)


def register_hooks(config) -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from tiersched.sglang.request import lockstep

    configure(config.tier("request"))
    for target, type_name, fn_name in HOOKS:
        HookRegistry.register(target, globals()[fn_name], getattr(HookType, type_name))
    for target, type_name, fn_name in lockstep.HOOKS:  # DP-attention lockstep signal (request_tier_lockstep.py)
        HookRegistry.register(target, getattr(lockstep, fn_name), getattr(HookType, type_name))


# ---- argument parsing and validation -------------------------------------------------------------------------


def accept_policy_choice(original_fn, parser, *args, **kwargs):
    """Upstream builds `--schedule-policy` with fixed argparse `choices` (arg_groups/fields/schedule.py).
    Plugins load before `prepare_server_args` parses argv, so extending the built action is enough."""
    from tiersched.sglang.cli_choices import add_choice

    result = original_fn(parser, *args, **kwargs)
    add_choice(parser, "schedule_policy", POLICY_NAME)
    return result


def allow_policy_with_priority(original_fn, server_args, *args, **kwargs):
    """Upstream's check_server_args asserts priority scheduling uses fcfs/lof; prefix-aging is built for it.
    server_args is read-only after resolution, so the check reads its config through a view that answers
    `schedule_policy` with fcfs for the duration of the call; every other check runs unchanged."""
    if getattr(server_args, "schedule_policy", None) != POLICY_NAME:
        return original_fn(server_args, *args, **kwargs)
    from sglang.srt.arg_groups import validation_hook

    real_view = validation_hook.resolving_view
    validation_hook.resolving_view = lambda sa, *a, **k: _FcfsView(real_view(sa, *a, **k))
    try:
        return original_fn(server_args, *args, **kwargs)
    finally:
        validation_hook.resolving_view = real_view


class _FcfsView:
    def __init__(self, view):
        object.__setattr__(self, "_view", view)

    def __getattr__(self, name):
        return "fcfs" if name == "schedule_policy" else getattr(object.__getattribute__(self, "_view"), name)


# ---- ordering -------------------------------------------------------------------------------------------------


def init_schedule_policy(original_fn, self, policy, tree_cache, *args, **kwargs):
    if policy != POLICY_NAME:
        self.tiersched_active = False
        return original_fn(self, policy, tree_cache, *args, **kwargs)
    # Upstream LPM machinery (prefix matching, in-queue duplicate detection); falls back to fcfs without a cache.
    original_fn(self, BASE_POLICY, tree_cache, *args, **kwargs)
    self.tiersched_active = True
    from tiersched.core.request.overtake import LsOvertakeBudget

    cfg = _state["config"]
    self.tiersched_overtake = LsOvertakeBudget(cfg.ls_overtake_burst, cfg.ls_overtakes_per_promoted, cfg.aging_cap_s)
    _state["active"] = True
    _state["low_values_first"] = bool(self.schedule_low_priority_values_first)
    logger.info("tiersched request tier active: %s", _state["config"])


def normalised_priority(req) -> int:
    """Core convention: higher = more urgent. Upstream's --schedule-low-priority-values-first flips it."""
    p = req.priority if req.priority is not None else 0
    return -p if _state["low_values_first"] else p


def calc_priority(original_fn, self, waiting_queue, running_batch=None, processed_tokens=0, *args, **kwargs):
    if not getattr(self, "tiersched_active", False):
        return original_fn(self, waiting_queue, running_batch, processed_tokens, *args, **kwargs)
    from tiersched.sglang.request.ordering import order_waiting_queue

    order_waiting_queue(self, waiting_queue, _state["config"], time.perf_counter(),
                        getattr(self, "tiersched_overtake", None))
    return None


def chunk_limit(original_fn, self, chunked_req, waiting_queue, budget, page_size, *args, **kwargs):
    if not getattr(self, "tiersched_active", False):
        return original_fn(self, chunked_req, waiting_queue, budget, page_size, *args, **kwargs)
    from tiersched.core.request.preemption import chunk_token_limit
    from tiersched.sglang.request import lockstep

    remaining = len(chunked_req.full_untruncated_fill_ids) - chunked_req.prefix_len
    waiting = [
        (normalised_priority(r), max(1, len(r.origin_input_ids) + len(r.output_ids) - r.num_matched_prefix_tokens))
        for r in waiting_queue
    ]
    group = lockstep.group_ls_signal()
    cfg = _state["config"]
    limit = chunk_token_limit(normalised_priority(chunked_req), remaining, waiting, budget, page_size, cfg, group)
    if group and limit is not None and limit < remaining and not cfg.is_latency_sensitive(normalised_priority(chunked_req)):
        local_ls = sum(1 for p, _ in waiting if cfg.is_latency_sensitive(p))
        lockstep.counters["be_chunks_capped"] += 1
        if not local_ls:  # the DP-wide case: no LS here, another rank of the lockstep group has LS work
            lockstep.counters["be_chunks_capped_by_group"] += 1
            logger.info("tiersched lockstep cap: BE chunk %s capped to %d of %d tokens (group LS signal=%d, "
                        "source=%s, no LS waiting on this rank)", chunked_req.rid, limit, remaining, group,
                        lockstep.signal_source())
    return limit


# ---- preemption ----------------------------------------------------------------------------------------------


def preempt_for_slots(original_fn, self, req, *args, **kwargs):
    """Upstream calls this when running slots are full; prefix-aging decides victims with the core policy and
    caches their computed prefix before releasing their KV."""
    if not _state["active"]:
        return original_fn(self, req, *args, **kwargs)
    from tiersched.sglang.request.preempt import preempt

    return preempt(self, req, _state["config"], slots_short=1)


def preempt_for_kv(original_fn, self, req, *args, **kwargs):
    """Upstream never preempts on a KV shortage (add_one_req returns NO_TOKEN and the pass ends); an LS request
    that does not fit preempts BE victims and is admitted on one retry."""
    if _state["active"]:
        from tiersched.sglang.request.lockstep import capped_be_add

        result = capped_be_add(original_fn, self, req, *args, **kwargs)
    else:
        result = original_fn(self, req, *args, **kwargs)
    if not _state["active"] or not _state["config"].preempt_on_kv_shortage:
        return result
    from sglang.srt.managers.schedule_policy import AddReqResult

    if result is not AddReqResult.NO_TOKEN or req in self.can_run_list:
        return result
    if not _state["config"].is_latency_sensitive(normalised_priority(req)):
        return result
    from tiersched.sglang.request.preempt import preempt

    if preempt(self, req, _state["config"], slots_short=0):
        return original_fn(self, req, *args, **kwargs)
    return result
