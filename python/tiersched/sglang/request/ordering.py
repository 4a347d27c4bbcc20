"""prefix-aging ordering over upstream `Req` objects: radix-cache prefix match (upstream's own), then the core key.

Mirrors upstream SchedulePolicy.calc_priority for cache-aware policies (sglang/srt/managers/schedule_policy.py):
`_compute_prefix_matches` fills `req.num_matched_prefix_tokens` / `prefix_len` from the radix tree and returns
the rids that share an uncached prefix with a request ahead of them in the queue (LPM's in-batch deferral).
Above upstream's WAITING_QUEUE_PREFIX_MATCH_MAX waiting requests upstream skips matching (its LPM/HRRN turn into
FCFS there); we skip matching too but still order by the core key, using each request's last match.
Then the policy's `LsOvertakeBudget` (core/request/overtake.py; one per SchedulePolicy, i.e. per scheduler) lets
a bounded number of LS requests go ahead of promoted ones.
"""
from __future__ import annotations

import numpy as np

from tiersched.core.request.ordering import order_keys
from tiersched.sglang.request.state import PolicyState, first_arrival


def order_waiting_queue(policy, waiting_queue: list, state: PolicyState, now_s: float) -> None:
    """Sort `waiting_queue` (a list of upstream Req) in place, most urgent first, as the prefix-aging `policy`
    (its PolicyState `state`: config, priority direction, LS overtake budget) orders it. `now_s`:
    time.perf_counter(), the clock of Req.time_stats.wait_queue_entry_time. Requests age from their first
    arrival (state.first_arrival), which preemption and retraction do not reset."""
    # deferred: schedule_policy imports torch and the scheduler stack
    from sglang.srt.managers.schedule_policy import WAITING_QUEUE_PREFIX_MATCH_MAX, CacheAwarePolicy

    config = state.config
    n = len(waiting_queue)
    if n == 0:
        return
    deferred_rids: set = set()
    if isinstance(policy.policy, CacheAwarePolicy) and n <= WAITING_QUEUE_PREFIX_MATCH_MAX:
        deferred_rids = policy._compute_prefix_matches(waiting_queue, CacheAwarePolicy.LPM)
    priority = np.fromiter((state.priority(r) for r in waiting_queue), np.float64, n)
    arrival = np.fromiter((first_arrival(r, now_s) for r in waiting_queue), np.float64, n)
    uncached = np.fromiter(
        (len(r.origin_input_ids) + len(r.output_ids) - r.num_matched_prefix_tokens for r in waiting_queue), np.float64, n
    )
    if deferred_rids:
        deferred = np.fromiter((r.rid in deferred_rids for r in waiting_queue), np.bool_, n)
    else:
        deferred = np.zeros(n, dtype=np.bool_)
    perm = order_keys(priority, arrival, np.maximum(uncached, 0.0), deferred, now_s, config)
    perm = state.overtake.reorder(perm, lambda i: waiting_queue[i].rid, priority >= config.ls_priority, arrival, now_s)
    waiting_queue[:] = [waiting_queue[i] for i in perm]
