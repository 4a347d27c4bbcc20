"""prefix-aging under DP attention: the "LS work waiting" signal of the lockstep group.

With `--enable-dp-attention` every rank's forward step is one lockstep step, so a BE chunk on rank B delays an
LS request on rank A. Two channels carry each rank's LS count to the others:

1. Same step (default, `same_step_signal`): at the start of `Scheduler.get_next_batch_to_run`, BEFORE batch
   formation, every scheduler all-reduces (MAX) its LS count (LS requests waiting + an LS chunked prefill) over
   the attention-DP CPU group (the tp group's gloo group, the one upstream's MLP sync uses with the overlap
   scheduler). The chunk cap (`chunk_token_limit(..., group_ls_waiting)`) and the BE admission cap
   (`be_admission_budget`) of THIS step read it. No deadlock: the collective runs exactly where upstream runs
   its own per-iteration collective. Every call of `get_next_batch_to_run` with `scheduler.require_mlp_sync`
   set reaches `prepare_mlp_sync_batch_raw` at least once on every code path (its last line calls
   `maybe_prepare_mlp_sync_batch`, idle ranks included: they gather a fallback row and get an idle batch),
   and that gathers over the same ranks unless `num_dp_ranks == 1` or `should_skip_scheduler_all_gather`. We
   run ours under exactly that condition (decided once per process from global config, so identical on every
   rank), before upstream's, so every rank issues the same sequence of collectives. The count itself never
   raises (a failure counts 0), so no rank can skip its turn.
2. One step late (always on; the only channel with `same_step_signal = false`, under elastic-EP WORLD gathers,
   or in loops that do not call `get_next_batch_to_run`, e.g. PD disaggregation): one column appended to
   upstream's per-step MLP-sync row (`MLPSyncBatchInfo._get_local_tensor` / `_get_fallback_tensor`, read after
   `all_gather`): LS requests waiting + LS requests in the prefill batch just formed. The column exists only
   while the signal is in use (`--schedule-policy prefix-aging`, `lockstep_chunk_cap`), which every rank reads
   from the same resolved server config; otherwise the row is upstream's own. The row is gathered after
   batch formation, so it reaches the other ranks' NEXT step (simulator: `lockstep_signal_lag_steps = 1`).

Where the same-step reduce ran, it subsumes the gathered count (an LS request in the batch just formed was
counted by the same step's reduce; one still waiting is counted by the next), so the gathered value is then
ignored, as the simulator's lag 0 does. The value used feeds `tiersched.core.request.lockstep.
LockstepLsSignal` (the `ls_hold_s` hold). Stale reads: a count is used only in the iteration it was reduced in /
right after its gather; otherwise only the hold remains, and it runs out. Without DP attention ranks are not in
lockstep and only the per-rank rule applies, priced for a group of one (`join_own_rank_pricing`).
"""
from __future__ import annotations

import logging
import time
import weakref

from tiersched.core.request.lockstep import LsCapPricing, be_admission_budget
from tiersched.sglang.request import cap_pricing, step_plan
from tiersched.sglang.request.state import POLICY_NAME, STATE, LockstepState, PolicyState, normalised_priority

logger = logging.getLogger("tiersched.request_tier")

DP_ATTN = "sglang.srt.managers.scheduler_components.dp_attn"
HOOKS = (
    ("sglang.srt.managers.scheduler.Scheduler.get_next_batch_to_run", "AROUND", "track_iteration"),
    (f"{DP_ATTN}.prepare_mlp_sync_batch_raw", "AROUND", "count_local_ls"),
    (f"{DP_ATTN}.MLPSyncBatchInfo._get_local_tensor", "AROUND", "append_local_ls"),
    (f"{DP_ATTN}.MLPSyncBatchInfo._get_fallback_tensor", "AROUND", "append_zero_ls"),
    (f"{DP_ATTN}.MLPSyncBatchInfo.all_gather", "AROUND", "read_group_ls"),
)
UPSTREAM_SYNC_COLUMNS = 11  # width of MLPSyncBatchInfo._get_local_tensor in sglang 0.5.23; ours is column 11


def _lockstep() -> LockstepState:
    return STATE.lockstep  # looked up at each use: configure() replaces it


def _schedule_settings(ls: LockstepState) -> tuple[bool, bool]:
    """(prefix-aging scheduling here, low priority values first): set explicitly, else upstream's resolved
    schedule config, which every rank shares. Without a published config (in-process use) the tier is off."""
    if ls.enabled is not None and ls.low_values_first is not None:
        return ls.enabled, ls.low_values_first
    from sglang.srt.runtime_context import get_schedule  # deferred: the runtime context imports torch

    try:
        schedule = get_schedule()
        policy, low_first = schedule.schedule_policy, bool(schedule.schedule_low_priority_values_first)
    except ValueError:  # "... not published": no server in this process
        policy, low_first = None, False
    enabled = ls.enabled if ls.enabled is not None else policy == POLICY_NAME
    return enabled, ls.low_values_first if ls.low_values_first is not None else low_first


def _tier_active(ls: LockstepState) -> bool:
    """The lockstep signal is in use: prefix-aging scheduling with the lockstep chunk cap on."""
    return ls.config.lockstep_chunk_cap and _schedule_settings(ls)[0]


def _ls_test(ls: LockstepState):
    """req -> is it latency-sensitive, under this process's priority direction."""
    low_first = _schedule_settings(ls)[1]
    return lambda req: ls.config.is_latency_sensitive(normalised_priority(req, low_first))


# ---- publish ------------------------------------------------------------------------------------------------


def track_iteration(original_fn, self, *args, **kwargs):
    """Remember this process's scheduler (its waiting queue), count loop iterations (signal freshness), and
    run the same-step all-reduce before upstream forms the batch (module docstring: why it cannot deadlock)."""
    ls = _lockstep()
    if ls.scheduler is None or ls.scheduler() is not self:
        ls.scheduler = weakref.ref(self)
    ls.iteration += 1
    if not ls.same_step_decided:
        ls.same_step_group = same_step_group(self)
        ls.same_step_decided = True
        if ls.same_step_group is None:
            join_own_rank_pricing(self)
    if cap_pricing.PRICING.group_ranks == 1:
        cap_pricing.observe_own_rank(safe_local_ls_count(self), time.perf_counter())
    if ls.same_step_group is not None:
        if _plan_active(ls):  # one all-gather carries the LS count and the step plan's summaries (step_plan.py)
            running_batch, last_batch = _batches(*args, **kwargs)
            group_ls = step_plan.gather_and_plan(self, ls.same_step_group, running_batch, last_batch, _ls_test(ls),
                                                 ls.same_step_ranks, ls.iteration, ls.config)
            if _tier_active(ls):
                _observe_same_step(ls, group_ls)
        else:
            reduce_same_step(self, ls.same_step_group)
    return original_fn(self, *args, **kwargs)


def _batches(running_batch=None, last_batch=None, *_, **__):
    """(running_batch, last_batch): Scheduler.get_next_batch_to_run's arguments."""
    return running_batch, last_batch


def _plan_active(ls: LockstepState) -> bool:
    """The step plan is on: `[request] step_plan` under prefix-aging scheduling (every rank reads the same)."""
    return ls.config.step_plan and _schedule_settings(ls)[0]


def same_step_group(scheduler):
    """The process group of the same-step all-reduce, or None when it must not run. Mirrors when upstream's
    MLP sync collects over ranks (`Scheduler.get_next_batch_to_run` -> `maybe_prepare_mlp_sync_batch` if
    `require_mlp_sync`; `prepare_mlp_sync_batch_raw` gathers unless num_dp_ranks == 1 or
    `should_skip_scheduler_all_gather`); only global config is read, so every rank decides the same."""
    ls = _lockstep()
    wanted = (_tier_active(ls) and ls.config.same_step_signal) or _plan_active(ls)
    if not (wanted and scheduler.require_mlp_sync):
        return None
    # deferred: upstream's dp-attention modules import torch.distributed
    from sglang.srt.layers.dp_attention import world_dp_gather_enabled
    from sglang.srt.managers.scheduler_components.dp_attn import should_skip_scheduler_all_gather
    from sglang.srt.runtime_context import get_parallel

    parallel = get_parallel()
    if not parallel.attn_dp_enabled or parallel.num_dp_ranks <= 1:
        return None  # only DP attention puts ranks in lockstep
    if should_skip_scheduler_all_gather(parallel.num_dp_ranks) or world_dp_gather_enabled():
        return None  # no per-iteration gather to mirror (elastic WORLD gathers resize: keep the lag-1 column)
    ls.same_step_ranks = parallel.num_dp_ranks
    if ls.config.ls_cap_pricing and _tier_active(ls):
        _join_pricing_group(parallel)
    if _plan_active(ls):
        logger.info("tiersched lockstep: same-step step-plan all-gather over the attention-DP CPU group (%d DP "
                    "ranks)", parallel.num_dp_ranks)
    else:
        logger.info("tiersched lockstep: same-step LS all-reduce over the attention-DP CPU group (%d DP ranks)",
                    parallel.num_dp_ranks)
    return parallel.tp_group.cpu_group


def _join_pricing_group(parallel) -> None:
    """Tell the cap pricing (cap_pricing.py) this process's lockstep group: its DP size, this rank's DP index (the
    attention-TP ranks of one DP rank are consecutive in the tp group) and the prefill attention backend. A
    failure leaves pricing off (the fixed rule); it decides nothing any other rank depends on."""
    try:
        import torch.distributed as dist  # deferred: the scheduler process imports torch

        group = parallel.tp_group.cpu_group
        size, me = dist.get_world_size(group), dist.get_rank(group)
        try:
            full = step_plan.full_sequence_attention()
        except Exception:  # noqa: BLE001 -- causal pairs then
            full = False
        cap_pricing.set_group(parallel.num_dp_ranks, me // max(1, size // parallel.num_dp_ranks), full)
    except Exception:  # noqa: BLE001
        logger.exception("tiersched cap pricing: lockstep group unknown; the LS cap stays the fixed rule")


def join_own_rank_pricing(scheduler) -> None:
    """Without DP attention a rank's step stalls no other rank, but the LS cap's extra steps are still steps its
    own running requests do not decode in: price the cap for a group of one (cap_pricing.set_group(1, ...)). Only
    where this scheduler decides alone (tp and pp size 1): the model is rescaled to this process's own measured
    steps, and the TP ranks of one scheduler group must form identical batches, which per-process timings cannot
    promise; there the fixed rule stays. Under DP attention without the same-step group the ranks are still in
    lockstep, so a group of one would misprice them: the fixed rule too. A failure leaves pricing off."""
    ls = _lockstep()
    if not (ls.config.ls_cap_pricing and _schedule_settings(ls)[0]):
        return
    try:
        from sglang.srt.runtime_context import get_parallel  # deferred: the runtime context imports torch

        parallel = get_parallel()
        if parallel.attn_dp_enabled:
            return
        tp, pp = int(getattr(parallel, "tp_size", 1) or 1), int(getattr(parallel, "pp_size", 1) or 1)
        if tp != 1 or pp != 1:
            logger.info("tiersched cap pricing: off (tp %d, pp %d: the ranks of one scheduler group must decide "
                        "alike); the LS cap stays the fixed rule", tp, pp)
            return
        try:
            full = step_plan.full_sequence_attention()
        except Exception:  # noqa: BLE001 -- causal pairs then
            full = False
        cap_pricing.set_group(1, 0, full, ls.config)
        logger.info("tiersched cap pricing: a rank of its own (no DP attention): the LS cap is priced for a group "
                    "of one")
    except Exception:  # noqa: BLE001
        logger.exception("tiersched cap pricing: own-rank group unknown; the LS cap stays the fixed rule")


def _pricing_active(ls: LockstepState) -> bool:
    """Pricing applies: on, under prefix-aging, and either the lockstep tier (a lockstep group) or a rank of its
    own (group of one: its per-rank cap needs no group signal)."""
    if not ls.config.ls_cap_pricing:
        return False
    if cap_pricing.PRICING.group_ranks == 1:
        return _schedule_settings(ls)[0]
    return _tier_active(ls)


def cap_pricing_for(waiting_behind: int) -> LsCapPricing | None:
    """The LS cap's pricing inputs for this scheduling pass (None: the fixed rule): pricing on, the lockstep tier
    active or a rank of its own, a model known (cap_pricing.model_for). The fresh group count is this iteration's
    same-step count, else the count gathered in the previous iteration, else 0 (only the hold); a group of one
    reads its own count. Never raises."""
    ls = _lockstep()
    if not _pricing_active(ls) or ls.scheduler is None:
        return None
    sched = ls.scheduler()
    if sched is None:
        return None
    try:
        model = cap_pricing.model_for(sched, step_plan.PLAN.model_in_use if _plan_active(ls) else None,
                                      step_plan.simulator_prior)
        if model is None:
            return None
        if ls.reduced_at == ls.iteration:
            fresh = ls.same_step_ls
        else:
            fresh = ls.group_ls if ls.gathered_at == ls.iteration - 1 else 0
        return cap_pricing.pricing(model, cap_pricing.rank_load(sched, waiting_behind), ls.signal, fresh,
                                   time.perf_counter(), ls.config)
    except Exception:  # noqa: BLE001 -- pricing is an optimisation; the fixed rule is always safe
        logger.exception("tiersched cap pricing failed; the fixed rule this pass")
        return None


def note_priced(priced, fixed, budget: int) -> None:
    """Count one priced cap decision where the fixed rule would cap (`fixed` below `budget`): kept when the
    priced rule caps as much, dropped when it caps less or not at all (None: no cap)."""
    if fixed is None or fixed >= budget:
        return
    counters = _lockstep().counters
    if priced is not None and priced <= fixed:
        counters.priced_caps_kept += 1
    else:
        counters.priced_caps_dropped += 1


def log_priced_decisions(before: tuple[int, int]) -> None:
    """One log line per prefill pass in which the priced cap decided (what `bench live` counts per run)."""
    c = _lockstep().counters
    kept, dropped = c.priced_caps_kept - before[0], c.priced_caps_dropped - before[1]
    if kept or dropped:
        logger.info("tiersched cap pricing: kept %d dropped %d LS caps this pass (group %d, model %s; totals kept %d "
                    "dropped %d)", kept, dropped, cap_pricing.PRICING.group_ranks, cap_pricing.PRICING.source,
                    c.priced_caps_kept, c.priced_caps_dropped)


def priced_totals() -> tuple[int, int]:
    c = _lockstep().counters
    return c.priced_caps_kept, c.priced_caps_dropped


def safe_local_ls_count(scheduler) -> int:
    """LS requests waiting + an LS chunked prefill on this rank; never raises (every rank must reduce)."""
    try:
        is_ls = _ls_test(_lockstep())
        n = sum(1 for r in scheduler.waiting_queue if is_ls(r))
        chunked = scheduler.chunked_req
        return n + (1 if chunked is not None and is_ls(chunked) else 0)
    except Exception:  # noqa: BLE001 -- a count of 0 only loses protection for one step; a skipped collective hangs
        logger.exception("tiersched lockstep: LS count failed; publishing 0")
        return 0


def reduce_same_step(scheduler, group) -> int:
    """All-reduce (MAX) this rank's LS count over `group`; the result is this iteration's group signal."""
    import torch  # deferred: torch is imported by the scheduler process, not by the plugin
    import torch.distributed as dist

    ls = _lockstep()
    value = torch.tensor([safe_local_ls_count(scheduler)], dtype=torch.int64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return _observe_same_step(ls, int(value.item()))


def _observe_same_step(ls: LockstepState, group_ls: int) -> int:
    """Record this iteration's same-step group LS count (from the all-reduce or the step plan's all-gather)."""
    ls.same_step_ls, ls.reduced_at = group_ls, ls.iteration
    ls.counters.same_step_reduces += 1
    ls.counters.same_step_reduces_with_ls += group_ls > 0
    ls.signal.observe(group_ls, time.perf_counter())
    return group_ls


def local_ls_count(scheduler, local_batch) -> int:
    """LS requests waiting on this rank + LS requests in the batch this rank is about to run as a prefill.
    `local_batch` is upstream's Optional[ScheduleBatch]; `scheduler` None in loops that never called
    get_next_batch_to_run."""
    is_ls = _ls_test(_lockstep())
    n = sum(1 for r in scheduler.waiting_queue if is_ls(r)) if scheduler is not None else 0
    if local_batch is not None and local_batch.forward_mode.is_extend():
        n += sum(1 for r in local_batch.reqs if is_ls(r))
    return n


def count_local_ls(original_fn, local_batch, *args, **kwargs):
    ls = _lockstep()
    if _tier_active(ls):
        ls.local_ls = local_ls_count(ls.scheduler() if ls.scheduler is not None else None, local_batch)
    return original_fn(local_batch, *args, **kwargs)


def append_local_ls(original_fn, self, device, dtype=None, *args, **kwargs):
    row = original_fn(self, device, *args, **_dtype(dtype, kwargs))
    ls = _lockstep()
    return _append(row, ls.local_ls) if _tier_active(ls) else row


def append_zero_ls(original_fn, self, device, dtype=None, *args, **kwargs):
    row = original_fn(self, device, *args, **_dtype(dtype, kwargs))
    return _append(row, 0) if _tier_active(_lockstep()) else row


def _dtype(dtype, kwargs):
    return dict(kwargs, dtype=dtype) if dtype is not None else kwargs


def _append(row, value: int):
    """Upstream's row plus our column. Only while the signal is in use, which every rank decides alike from the
    resolved server config, so all rows of one gather have the same width."""
    import torch  # deferred: torch is imported by the scheduler process, not by the plugin

    if row.numel() != UPSTREAM_SYNC_COLUMNS:  # an upstream change of the row: leave it alone (patch check flags it)
        return row
    return torch.cat([row, torch.tensor([value], device=row.device, dtype=row.dtype)])


def read_group_ls(original_fn, self, *args, **kwargs):
    result = original_fn(self, *args, **kwargs)
    info = self.tp0_info_cpu
    if info is not None and info.shape[-1] == UPSTREAM_SYNC_COLUMNS + 1:
        ls = _lockstep()
        group = int(info[:, UPSTREAM_SYNC_COLUMNS].max())
        ls.group_ls, ls.gathered_at = group, ls.iteration
        ls.counters.gathers += 1
        ls.counters.gathers_with_ls += group > 0
        if ls.reduced_at != ls.iteration:  # with the same-step reduce on, the hold follows it only
            ls.signal.observe(group, time.perf_counter())
    return result


# ---- read -------------------------------------------------------------------------------------------------


def group_ls_signal() -> int:
    """The signal this scheduling pass uses: this iteration's same-step count, else the count gathered in the
    previous iteration, else 1 within the hold after the last nonzero count; 0 when nothing fresh was seen
    (stale values expire through the hold)."""
    ls = _lockstep()
    if not _tier_active(ls):
        return 0
    if ls.reduced_at == ls.iteration:  # subsumes the gathered count (module docstring)
        if ls.same_step_ls > 0:
            ls.source = "same-step"
            return ls.same_step_ls
    elif ls.gathered_at == ls.iteration - 1 and ls.group_ls > 0:
        ls.source = "gathered"
        return ls.group_ls
    ls.source = "hold"
    return ls.signal.expire(time.perf_counter())


def signal_source() -> str:
    """Where the last `group_ls_signal()` value came from: same-step, gathered (one step old) or hold."""
    return _lockstep().source


def capped_be_add(original_fn, adder, req, policy: PolicyState, *args, **kwargs):
    """add_one_req under prefix-aging: never a second chunked request while the scheduler holds one, and, for a BE
    request while LS work waits in the group, a chunk this step of at most what is left of `be_chunk_tokens` after
    the BE tokens already in the batch (core `be_admission_budget`).

    One chunked request: upstream's scheduler tracks one (`Scheduler.chunked_req`) and asserts `self.chunked_req is
    None` when a pass makes a new one. Upstream's own pass only makes one while it holds one under
    shortest-prefill-first, whose chunk limit can leave the held chunk unfinished with budget to spare, and its
    adder refuses that case for that policy only. prefix-aging's chunk limit (`hooks.chunk_limit`: the shorter-waiter
    reservation and the LS cap) leaves budget to spare the same way, for an LS or a BE request, so the same refusal
    applies here: a request whose uncached prompt does not fit the budget left waits for the held chunk to finish."""
    from sglang.srt.managers.schedule_policy import AddReqResult  # deferred: imports torch and the scheduler stack

    if adder.rem_chunk_tokens is None:
        return original_fn(adder, req, *args, **kwargs)
    has_chunked_req = kwargs.get("has_chunked_req", args[0] if args else False)
    if has_chunked_req and _uncached_len(req) > adder.rem_chunk_tokens:
        return AddReqResult.OTHER
    if policy.is_ls(req):
        return original_fn(adder, req, *args, **kwargs)
    ls = _lockstep()
    sched = ls.scheduler() if ls.scheduler is not None else None
    local = sum(1 for r in sched.waiting_queue if policy.is_ls(r)) if sched is not None else 0
    used = sum(_extend_len(r) for r in adder.can_run_list if not policy.is_ls(r))
    group = group_ls_signal()
    pricing = None
    if group or local:
        queue = sched.waiting_queue if sched is not None else []
        behind = max(0, len(queue) - len(adder.can_run_list) - 1)  # waiting requests not in this step's batch
        pricing = cap_pricing_for(behind)
    step_tokens = sum(_extend_len(r) for r in adder.can_run_list)
    left = be_admission_budget(local, group, used, policy.config, pricing, _uncached_len(req), req.prefix_len,
                               step_tokens, adder.rem_chunk_tokens)
    if pricing is not None:
        note_priced(left, be_admission_budget(local, group, used, policy.config), adder.rem_chunk_tokens)
    if left is None or left >= adder.rem_chunk_tokens:
        return original_fn(adder, req, *args, **kwargs)
    if left <= 0:
        return AddReqResult.OTHER
    if has_chunked_req and _uncached_len(req) > left:
        return AddReqResult.OTHER  # it would be chunked under the cap: the same one-chunked-request rule
    saved = adder.rem_chunk_tokens
    adder.rem_chunk_tokens = left
    try:
        return original_fn(adder, req, *args, **kwargs)
    finally:
        adder.rem_chunk_tokens = saved - (left - adder.rem_chunk_tokens)
        ls.counters.be_admissions_capped += 1


def _uncached_len(req) -> int:
    """Tokens `req` still has to prefill (after init_next_round_input set its prefix)."""
    return max(0, len(req.full_untruncated_fill_ids) - req.prefix_len)


def _extend_len(req) -> int:
    """Tokens `req` adds to the batch being formed (Req.extend_end is None until init_next_round_input)."""
    end = req.extend_end
    return max(0, end - req.prefix_len) if end is not None else 0
