"""prefix-aging preemption inside upstream's PrefillAdder, with the victim's computed prefix kept in the tree.

Mirrors upstream PrefillAdder.preempt_to_schedule (sglang/srt/managers/schedule_policy.py) for the bookkeeping
(memory_budget.total_offset, running_batch.filter_batch, preempt_list, which the scheduler re-queues), but:
  * victims come from tiersched.core.request.preemption.LatencySensitivePreemption (slots OR KV shortfall);
  * each victim is released with `release_kv_cache(checkpoint=True)` instead of upstream's
    ScheduleBatch.release_req -> release_req, which passes checkpoint=False ("TODO: for preempted requests, we
    may want to insert into the tree"); so the victim's computed tokens stay in the radix cache (unlocked,
    evictable) and it resumes from them.
"""
from __future__ import annotations

import logging
import time

from tiersched.core.request import RunningRequest, WaitingRequest
from tiersched.core.request.preemption import LatencySensitivePreemption
from tiersched.sglang.request.state import PolicyState, first_arrival

logger = logging.getLogger("tiersched.request_tier")


def _kv_shortfall(adder, req) -> int:
    """Upstream's own estimate in preempt_to_schedule: what the candidate needs minus rem_total_tokens."""
    from sglang.srt.managers.schedule_policy import CLIP_MAX_NEW_TOKENS

    need = (
        len(req.full_untruncated_fill_ids)
        - req.prefix_len
        + min(req.sampling_params.max_new_tokens, CLIP_MAX_NEW_TOKENS)
        + adder._request_slot_reserve_for_req(req)
        + adder.page_size
    )
    return int(max(0, need - adder.rem_total_tokens))


def snapshot_running(adder, state: PolicyState, now_s: float) -> list:
    """(RunningRequest, Req) for running requests that may be preempted now (upstream skips finished and
    already-preempted ones: their KV may already be freed). `preemptions` is upstream's Req.retraction_count
    (reset_for_retract counts our preemptions and upstream's retractions alike)."""
    out = []
    for r in adder.running_batch.reqs:
        if r in adder.preempt_list or r.finished():
            continue
        held = len(r.origin_input_ids) + len(r.output_ids)
        freed = int(held + adder._get_running_request_total_token_offset(r))
        out.append((RunningRequest(r.rid, state.priority(r), first_arrival(r, now_s), freed, held,
                                   preemptions=r.retraction_count), r))
    return out


def release_with_prefix_cached(req, tree_cache) -> None:
    """Upstream release_req with checkpoint=True: insert the computed prefix into the tree, then free."""
    from sglang.srt.mem_cache.common import release_kv_cache

    release_kv_cache(req, tree_cache, checkpoint=True)
    req.reset_for_retract()


def preempt(adder, req, state: PolicyState, slots_short: int) -> bool:
    """Preempt for `req` as the prefix-aging policy `state` allows; True when room was made (the caller then
    admits it)."""
    kv_short = _kv_shortfall(adder, req)
    now = time.perf_counter()
    candidate = WaitingRequest(req.rid, state.priority(req), first_arrival(req, now), len(req.full_untruncated_fill_ids))
    running = snapshot_running(adder, state, now)
    victims = LatencySensitivePreemption(state.config).choose_victims(
        candidate, [s for s, _ in running], slots_short, kv_short, now
    )
    if not victims:
        return False
    chosen = {rid for rid in victims}
    batch = adder.running_batch
    keep, released = [], []
    for i, r in enumerate(batch.reqs):
        if r.rid in chosen and r not in adder.preempt_list and not r.finished():
            adder.memory_budget.total_offset -= adder._get_running_request_total_token_offset(r)
            release_with_prefix_cached(r, batch.tree_cache)
            released.append(r)
        else:
            keep.append(i)
    batch.filter_batch(keep_indices=keep)
    adder.preempt_list.extend(released)
    if released:
        reason = "slots" if slots_short > 0 else "kv"
        counts = state.preemptions
        if reason == "slots":
            counts.slots += 1
        else:
            counts.kv += 1
        counts.victims += len(released)
        logger.info(
            "tiersched preempted %d request(s) [%s] for %s (reason=%s, kv_short=%d, victim computed tokens=%s)",
            len(released), ",".join(str(r.rid) for r in released), req.rid, reason, kv_short,
            ",".join(str(len(r.origin_input_ids) + len(r.output_ids)) for r in released),
        )
    return bool(released)
