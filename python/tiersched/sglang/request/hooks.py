"""Request-tier adapter: `--schedule-policy prefix-aging` inside upstream SGLang's scheduler.

Thin shell: every hook translates upstream objects (Req, ScheduleBatch, PrefillAdder) into the core snapshots
of tiersched.core.request and applies the core's answer back. Hooks are registered for every process
(the plugin runs before argument parsing) and pass straight through unless the scheduler was started with
`--schedule-policy prefix-aging`. Rows for every target: patches/request-tier.toml.
"""
from __future__ import annotations

import contextvars
import logging
import time

from tiersched.core.request import RequestTierConfig
from tiersched.core.request.lockstep import chunk_token_limit
from tiersched.sglang.cli_choices import add_choice
from tiersched.sglang.request import lockstep, step_plan
from tiersched.sglang.request.ordering import order_waiting_queue
from tiersched.sglang.request.preempt import preempt
from tiersched.sglang.request.state import (POLICY_ATTR, POLICY_NAME, STATE, PolicyState, policy_state,
                                            stamp_first_arrival)

logger = logging.getLogger("tiersched.request_tier")

# The upstream policy whose tree-cache handling prefix-aging reuses (cache-aware: prefix matches every step).
BASE_POLICY = "lpm"

HOOKS = (
    ("sglang.srt.server_args.ServerArgs.add_cli_args", "AROUND", "accept_policy_choice"),
    ("sglang.srt.arg_groups.validation_hook.check_server_args", "AROUND", "allow_policy_with_priority"),
    ("sglang.srt.managers.schedule_policy.SchedulePolicy.__init__", "AROUND", "init_schedule_policy"),
    ("sglang.srt.managers.schedule_policy.SchedulePolicy.calc_priority", "AROUND", "calc_priority"),
    ("sglang.srt.managers.schedule_policy.SchedulePolicy.shortest_prefill_chunk_limit", "AROUND", "chunk_limit"),
    ("sglang.srt.managers.scheduler.Scheduler.get_new_batch_prefill", "AROUND", "scope_prefill_pass"),
    ("sglang.srt.managers.scheduler.Scheduler._add_request_to_queue", "AROUND", "keep_first_arrival"),
    ("sglang.srt.managers.schedule_policy.PrefillAdder.preempt_to_schedule", "AROUND", "preempt_for_slots"),
    ("sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req", "AROUND", "preempt_for_kv"),
)

# The PolicyState of the scheduler whose prefill pass is running in this context (None outside any pass, or when
# that scheduler's policy is not prefix-aging): PrefillAdder has no reference to its scheduler's policy.
_prefill_pass: contextvars.ContextVar[PolicyState | None] = contextvars.ContextVar("tiersched_prefill_pass",
                                                                                   default=None)


def configure(config: RequestTierConfig) -> None:
    """Set this process's request-tier config (validated) and start a fresh lockstep signal with it."""
    STATE.configure(config)


# ---- argument parsing and validation -------------------------------------------------------------------------


def accept_policy_choice(original_fn, parser, *args, **kwargs):
    """Upstream builds `--schedule-policy` with fixed argparse `choices` (arg_groups/fields/schedule.py).
    Plugins load before `prepare_server_args` parses argv, so extending the built action is enough."""
    result = original_fn(parser, *args, **kwargs)
    add_choice(parser, "schedule_policy", POLICY_NAME)
    return result


def allow_policy_with_priority(original_fn, server_args, *args, **kwargs):
    """Upstream's check_server_args asserts priority scheduling uses fcfs/lof; prefix-aging is built for it.
    server_args is read-only after resolution, so the check reads its config through a view that answers
    `schedule_policy` with fcfs for the duration of the call; every other check runs unchanged."""
    if server_args.schedule_policy != POLICY_NAME:
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
        setattr(self, POLICY_ATTR, None)
        return original_fn(self, policy, tree_cache, *args, **kwargs)
    # Upstream LPM machinery (prefix matching, in-queue duplicate detection); falls back to fcfs without a cache.
    original_fn(self, BASE_POLICY, tree_cache, *args, **kwargs)
    state = PolicyState.build(STATE.config, self.schedule_low_priority_values_first)
    setattr(self, POLICY_ATTR, state)
    logger.info("tiersched request tier active: %s", state.config)


def calc_priority(original_fn, self, waiting_queue, running_batch=None, processed_tokens=0, *args, **kwargs):
    state = policy_state(self)
    if state is None:
        return original_fn(self, waiting_queue, running_batch, processed_tokens, *args, **kwargs)
    order_waiting_queue(self, waiting_queue, state, time.perf_counter())
    return None


def chunk_limit(original_fn, self, chunked_req, waiting_queue, budget, page_size, *args, **kwargs):
    state = policy_state(self)
    if state is None:
        return original_fn(self, chunked_req, waiting_queue, budget, page_size, *args, **kwargs)
    remaining = len(chunked_req.full_untruncated_fill_ids) - chunked_req.prefix_len
    waiting = [
        (state.priority(r), max(1, len(r.origin_input_ids) + len(r.output_ids) - r.num_matched_prefix_tokens))
        for r in waiting_queue
    ]
    group = lockstep.group_ls_signal()
    cfg = state.config
    chunked_priority = state.priority(chunked_req)
    pricing = lockstep.cap_pricing_for(len(waiting_queue)) if group or waiting else None
    limit = chunk_token_limit(chunked_priority, remaining, waiting, budget, page_size, cfg, group, pricing,
                              chunked_req.prefix_len)
    if pricing is not None:
        fixed = chunk_token_limit(chunked_priority, remaining, waiting, budget, page_size, cfg, group)
        lockstep.note_priced(limit, fixed, min(budget, remaining))
    if group and limit is not None and limit < remaining and not cfg.is_latency_sensitive(chunked_priority):
        local_ls = sum(1 for p, _ in waiting if cfg.is_latency_sensitive(p))
        counters = STATE.lockstep.counters
        counters.be_chunks_capped += 1
        if not local_ls:  # the DP-wide case: no LS here, another rank of the lockstep group has LS work
            counters.be_chunks_capped_by_group += 1
            logger.info("tiersched lockstep cap: BE chunk %s capped to %d of %d tokens (group LS signal=%d, "
                        "source=%s, no LS waiting on this rank)", chunked_req.rid, limit, remaining, group,
                        lockstep.signal_source())
    return limit


def keep_first_arrival(original_fn, self, req, *args, **kwargs):
    """Every request enters a waiting queue here, and every preempted or retracted one re-enters here (upstream
    re-stamps its queue-entry time each time); under prefix-aging it keeps the time of its first entry, which the
    ordering and the victim choice age from."""
    result = original_fn(self, req, *args, **kwargs)
    if policy_state(getattr(self, "policy", None)) is not None:
        stamp_first_arrival(req)
    return result


# ---- preemption ----------------------------------------------------------------------------------------------


def scope_prefill_pass(original_fn, self, *args, **kwargs):
    """Scheduler.get_new_batch_prefill builds this pass's PrefillAdder and runs it: for the duration, the adder
    hooks below act for this scheduler's policy (prefix-aging: its PolicyState; any other policy: upstream), and
    the lockstep step plan's budget for this rank, if any, is its chunk budget."""
    # getattr: Scheduler.policy is set in Scheduler.__init__; a scheduler assembled without it (upstream's
    # in-process tests) reaches this method too and must run upstream's pass unchanged.
    token = _prefill_pass.set(policy_state(getattr(self, "policy", None)))
    before = lockstep.priced_totals()
    try:
        # The group's step plan (step_plan.py) caps this pass's chunk budget; no plan for this iteration: upstream's.
        with step_plan.BudgetCap(self, step_plan.planned_budget(self, STATE.lockstep.iteration)):
            return original_fn(self, *args, **kwargs)
    finally:
        _prefill_pass.reset(token)
        lockstep.log_priced_decisions(before)


def preempt_for_slots(original_fn, self, req, *args, **kwargs):
    """Upstream calls this when running slots are full; prefix-aging decides victims with the core policy and
    caches their computed prefix before releasing their KV."""
    state = _prefill_pass.get()
    if state is None:
        return original_fn(self, req, *args, **kwargs)
    return preempt(self, req, state, slots_short=1)


def preempt_for_kv(original_fn, self, req, *args, **kwargs):
    """Upstream never preempts on a KV shortage (add_one_req returns NO_TOKEN and the pass ends); an LS request
    that does not fit preempts BE victims and is admitted on one retry."""
    state = _prefill_pass.get()
    if state is None:
        return original_fn(self, req, *args, **kwargs)
    result = lockstep.capped_be_add(original_fn, self, req, state, *args, **kwargs)
    if not state.config.preempt_on_kv_shortage:
        return result
    from sglang.srt.managers.schedule_policy import AddReqResult  # deferred: imports torch and the scheduler stack

    if result is not AddReqResult.NO_TOKEN or req in self.can_run_list:
        return result
    if not state.is_ls(req):
        return result
    if preempt(self, req, state, slots_short=0):
        return original_fn(self, req, *args, **kwargs)
    return result
