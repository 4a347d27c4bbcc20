"""Lockstep step plan inside SGLang's schedulers (`[request] step_plan`, core: tiersched.core.request.step_plan).

Under `--enable-dp-attention` with `--schedule-policy prefix-aging` and `step_plan = true`, every scheduler of the
DP group, once per iteration BEFORE batch formation (lockstep.track_iteration, the place and condition of the
same-step LS all-reduce, so no rank can skip it and it cannot deadlock), all-gathers one int64 row over the
attention-DP CPU group instead of that all-reduce:

    [LS count | RankStepSummary fields | this rank's last step: prefill tokens, prefill pairs, decode count,
     decode context, measured forward ns | the step-time model in use (7 float64s as bits)]

The LS count's maximum over the rows is the same-step LS signal (what the all-reduce gave). Every rank decodes the
same rows, builds the same summaries, takes the model published by DP rank 0's row (so every rank prices steps
with bit-identical coefficients) and calls the core's `plan_step`: the same plan on every rank. This rank's entry
caps its prefill budget for this iteration's prefill pass (hooks.scope_prefill_pass -> `planned_budget`: the
scheduler's chunked_prefill_size, which upstream hands to this pass's PrefillAdder as its chunk budget, so the
running chunk and new admissions together take at most the budget). With one DP rank the planner returns
upstream's budget, and nothing is gathered anyway (lockstep.same_step_group).

Step-time model: DP rank 0 starts from a prior (the simulator's model of the deployment: on a CPU server the
calibrated `cpu-tiny` preset with this DP size, fitted with the core's `fit_roofline` over random steps priced by
the simulator's cost model). The prior's shape carries over to a live server far better than its scale (another
machine, another load: on the shared 2-core host it predicted a fifth to a third of the measured step), so from
`SCALE_MIN_SAMPLES` measured steps on, every `SCALE_EVERY` steps, DP rank 0 publishes the prior rescaled by the
median measured / predicted step (step_time_fit.scale_to_steps); once `FIT_MIN_SAMPLES` steps are in, the
ridge fit (core/request/step_time_fit.py) of the last `FIT_WINDOW` steps towards that rescaled prior, refitted
every `FIT_EVERY` steps. A sample is one
lockstep step: every rank's features (from the rows) and the step's time, the longest forward any rank measured
(`Scheduler.run_batch` hook: on CPU upstream runs the forward synchronously there; the forward ends on every rank
only after the slowest rank's MoE collective). Each forward is published once: the gather clears the rank's
last step, so an iteration without a forward (an idle server) publishes zeros, which are no sample. Without a
prior (GPU deployments) nothing is planned until a fit.

Attention pairs: upstream's torch_native prefill (the CPU server's backend) computes each chunk's attention over
its whole sequence, so a chunk of b tokens after p costs (p + b)(p + b + 1) / 2 pairs and small chunks of a long
prompt multiply its work (on the shared 2-core host a 64-token chunk after a 1,400-token prefix took ~120 ms, a
decode step ~20 ms); with such a backend (FULL_SEQUENCE_BACKENDS) the measured steps and the planner's candidate
steps count pairs that way.

The summary's `arrival_rate`: requests that entered this rank's waiting queue (upstream's
`time_stats.wait_queue_entry_time`) in the last `ARRIVAL_WINDOW_S`, per second.

Log, one line per iteration in which some rank has prefill demand, and every `LOG_EVERY`-th other iteration:
`tiersched step plan: seq=N budgets=(..) chunk=B predicted_ms=.. planned=0|1 model=TAG last_ms=.. last_pred_ms=..
last_tokens=(..) last_decode=(..) last_pairs=(..) last_context=(..)`; seq is the gather's sequence number (the
n-th gather of every rank is the same collective), last_* the previous step's measured and predicted time and its
per-rank features (the prediction check; tiersched.live.lockstep_ab reads them back). Each model DP rank 0
publishes is logged once with its source (prior, scaled@K, fit@K) and its parameters.
"""
from __future__ import annotations

import logging
import math
import struct
import time
from collections import deque
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Optional

import numpy as np

from tiersched.core.request.step_plan import (ROOFLINE_PARAMS, RankStepSummary, RooflineStepModel, StepPlan,
                                              StepPlanner, fit_roofline)
from tiersched.core.request.step_time_fit import StepSamples, scale_to_steps
from tiersched.sglang.request import cap_pricing

logger = logging.getLogger("tiersched.request_tier")

HOOKS = (
    ("sglang.srt.managers.scheduler.Scheduler.run_batch", "AROUND", "time_step"),
)

SUMMARY_FIELDS = tuple(f for f in fields(RankStepSummary) if f.name != "rank")
LAST_STEP_COLUMNS = 5  # prefill tokens, prefill pairs, decode count, decode context, measured ns
ROW_WIDTH = 1 + len(SUMMARY_FIELDS) + LAST_STEP_COLUMNS + len(ROOFLINE_PARAMS)
FIT_MIN_SAMPLES, FIT_EVERY, FIT_WINDOW = 64, 64, 2048
SCALE_MIN_SAMPLES, SCALE_EVERY = 8, 8  # before the first fit: the prior rescaled to the measured steps
ARRIVAL_WINDOW_S = 10.0  # the summary's arrival rate: requests that entered this rank's queue in the last 10 s
LOG_EVERY = 50
PRIOR_SAMPLES = 600


# ---- row encoding (pure) --------------------------------------------------------------------------------------


def float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def bits_float(b: int) -> float:
    return struct.unpack("<d", struct.pack("<q", int(b)))[0]


@dataclass(frozen=True)
class StepFeatures:
    """What one rank ran in one step (zeros: idle) and how long its forward took."""

    prefill_tokens: int = 0
    prefill_pairs: float = 0.0  # sum over its chunks of chunk * (prefix + (chunk + 1) / 2)
    decode_count: int = 0
    decode_context: int = 0
    measured_s: float = 0.0


def encode_row(ls_count: int, summary: RankStepSummary, last: StepFeatures,
               model: Optional[RooflineStepModel]) -> list[int]:
    """One rank's row (module docstring); ints as they are, floats as their float64 bits; no model: NaNs."""
    row = [int(ls_count)]
    for f in SUMMARY_FIELDS:
        v = getattr(summary, f.name)
        row.append(float_bits(v) if isinstance(v, float) else int(v))
    row += [int(last.prefill_tokens), int(round(last.prefill_pairs)), int(last.decode_count),
            int(last.decode_context), int(round(last.measured_s * 1e9))]
    row += [float_bits(getattr(model, k) if model is not None else math.nan) for k in ROOFLINE_PARAMS]
    assert len(row) == ROW_WIDTH
    return row


@dataclass(frozen=True)
class GroupRows:
    """The decoded gather: per DP rank (rank order) its LS count, summary and last step; DP rank 0's model."""

    ls_counts: tuple[int, ...]
    summaries: tuple[RankStepSummary, ...]
    last: tuple[StepFeatures, ...]
    model: Optional[RooflineStepModel]

    def last_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return tuple(np.array([getattr(s, k) for s in self.last], dtype=float)
                     for k in ("prefill_tokens", "prefill_pairs", "decode_count", "decode_context"))

    def last_step_s(self) -> float:
        """The lockstep step's time: the longest forward any rank measured."""
        return max((s.measured_s for s in self.last), default=0.0)


def decode_rows(rows: list[list[int]], num_dp_ranks: int) -> GroupRows:
    """Rows of the attention-DP CPU group (tp ranks in order; the attn-tp ranks of one DP rank are consecutive and
    publish the same state) -> GroupRows with one entry per DP rank."""
    if num_dp_ranks < 1 or len(rows) % num_dp_ranks or any(len(r) != ROW_WIDTH for r in rows):
        raise ValueError(f"expected rows of width {ROW_WIDTH} in a multiple of {num_dp_ranks}, got "
                         f"{[len(r) for r in rows]}")
    stride = len(rows) // num_dp_ranks
    ls, summaries, last = [], [], []
    for dp in range(num_dp_ranks):
        row = rows[dp * stride]
        ls.append(int(row[0]))
        values = {}
        for f, v in zip(SUMMARY_FIELDS, row[1:1 + len(SUMMARY_FIELDS)]):
            values[f.name] = bits_float(v) if f.type in (float, "float") else int(v)
        summaries.append(RankStepSummary(rank=dp, **values))
        t, p, c, x, ns = row[1 + len(SUMMARY_FIELDS):1 + len(SUMMARY_FIELDS) + LAST_STEP_COLUMNS]
        last.append(StepFeatures(int(t), float(p), int(c), int(x), ns / 1e9))
    params = [bits_float(b) for b in rows[0][ROW_WIDTH - len(ROOFLINE_PARAMS):]]
    model = None if any(math.isnan(v) for v in params) else RooflineStepModel(*params)
    return GroupRows(tuple(ls), tuple(summaries), tuple(last), model)


# ---- per-process state ----------------------------------------------------------------------------------------


@dataclass
class StepPlanState:
    """This scheduler's part of the group plan (one scheduler per process)."""

    seq: int = 0  # gathers so far
    plan: Optional[StepPlan] = None
    plan_iteration: int = -1  # lockstep iteration the plan is for (a plan is applied only in it)
    dp_rank: int = 0
    last: StepFeatures = field(default_factory=StepFeatures)  # this rank's last forward
    # DP rank 0 only: the model it publishes and its samples
    prior: Optional[RooflineStepModel] = None
    prior_built: bool = False
    scaled_prior: Optional[RooflineStepModel] = None  # the prior times the median measured / predicted step
    scaled_at: int = 0
    model: Optional[RooflineStepModel] = None
    model_source: str = "none"
    samples: Optional[StepSamples] = None
    fitted_at: int = 0
    model_in_use: Optional[RooflineStepModel] = None  # the one decoded from this step's rows
    budgets_applied: int = 0
    plans_logged: int = 0
    warned_no_chunking: bool = False
    warned_hold: bool = False  # plan_hold_s > 0 was asked for and refused (logged once)
    full_sequence: bool = False  # the prefill attention backend attends over whole sequences (pairs counted so)
    # arrival rate: when this rank's requests entered its waiting queue (perf_counter), within ARRIVAL_WINDOW_S
    arrivals: deque = field(default_factory=deque)
    last_gather_t: float = 0.0


PLAN = StepPlanState()


def reset() -> None:
    global PLAN
    PLAN = StepPlanState()


# ---- the simulator's prior -------------------------------------------------------------------------------------


def simulator_prior(num_dp_ranks: int, samples: int = PRIOR_SAMPLES, seed: int = 0) -> Optional[RooflineStepModel]:
    """On a CPU server: `fit_roofline` over random steps priced by the simulator's calibrated `cpu-tiny` cost
    model at this DP size (None where no calibrated preset describes the deployment)."""
    from dataclasses import replace

    from tiersched.sim.cost_model import StepCostModel
    from tiersched.sim.moe_routing import make_routing, token_probs
    from tiersched.sim.presets import get_preset

    try:
        preset = replace(get_preset("cpu-tiny"), dp=num_dp_ranks)
    except ValueError:  # not calibrated in this checkout
        return None
    cost = StepCostModel(preset, token_probs(make_routing(preset, 0), preset.dp))
    rng = np.random.default_rng(seed)
    r, chunk = preset.dp, preset.scheduler.chunked_prefill_size
    mode = rng.choice(3, size=(samples, r), p=[0.45, 0.45, 0.10])  # prefill, decode, idle
    tokens = np.where(mode == 0, np.rint(np.exp(rng.uniform(0, np.log(chunk), (samples, r)))), 0.0)
    prefix = np.where(rng.uniform(size=(samples, r)) < 0.5, 0.0, rng.uniform(0, 4096, (samples, r)))
    pairs = tokens * (prefix + (tokens + 1) / 2)
    count = np.where(mode == 1, rng.integers(1, preset.scheduler.max_running_requests + 1, (samples, r)), 0)
    ctx = count * rng.uniform(50, 2000, (samples, r))
    seconds = np.array([float(cost.step_times(np.where(tokens[i] > 0, tokens[i], count[i]).astype(float), pairs[i],
                                              ctx[i])[0][0]) for i in range(samples)])
    keep = seconds > 0
    return fit_roofline(tokens[keep], pairs[keep], count[keep].astype(float), ctx[keep], seconds[keep])


# Prefill attention backends that compute a chunk's attention over its whole sequence: upstream's torch_native
# extend (layers/attention/torch_native_backend._run_sdpa_forward_extend) pads the chunk's queries to prefix + chunk
# and runs causal SDPA on the square, so a chunk costs (prefix + chunk)^2 / 2 pairs, not chunk * (prefix + chunk / 2).
FULL_SEQUENCE_BACKENDS = frozenset({"torch_native"})


def full_sequence_attention() -> bool:
    """Whether this server's prefill attention backend is one of FULL_SEQUENCE_BACKENDS (the same on every rank)."""
    from sglang.srt.runtime_context import attention_backends

    prefill_backend, _ = attention_backends()
    return prefill_backend in FULL_SEQUENCE_BACKENDS


def _is_cpu_server(scheduler) -> bool:
    return str(scheduler.device).startswith("cpu")


# ---- the scheduler side ---------------------------------------------------------------------------------------


def local_summary(scheduler, running_batch, last_batch, is_ls: Callable, dp_rank: int) -> tuple[int, RankStepSummary]:
    """(LS count, RankStepSummary) of this rank at the start of an iteration, before upstream merges the last
    prefill batch into the running batch (its requests are counted as decoding) and stashes the chunked request."""
    cps, mpt = scheduler.chunked_prefill_size, scheduler.max_prefill_tokens
    upstream = min(cps, mpt) if cps else mpt
    chunk_tokens = chunk_prefix = ls = ls_tokens = 0
    ch = scheduler.chunked_req
    if ch is not None:
        done = max(ch.prefix_len, ch.extend_end or 0)
        chunk_tokens = max(0, len(ch.origin_input_ids) + len(ch.output_ids) - done)
        chunk_prefix = done
        if is_ls(ch):
            ls, ls_tokens = 1, chunk_tokens
    waiting_tokens = counted = 0
    for r in scheduler.waiting_queue:
        r_ls = is_ls(r)
        if waiting_tokens >= upstream and not r_ls:
            continue
        uncached = max(1, len(r.origin_input_ids) + len(r.output_ids) - r.num_matched_prefix_tokens)
        waiting_tokens += uncached
        counted += 1
        if r_ls:
            ls, ls_tokens = ls + 1, ls_tokens + uncached
    running = [r for r in running_batch.reqs if r is not ch] if running_batch is not None else []
    if last_batch is not None and last_batch is not running_batch and last_batch.forward_mode.is_extend():
        running += [r for r in last_batch.reqs if r is not ch and r is not last_batch.chunked_req]
    decode_count = len(running)
    decode_context = sum(len(r.origin_input_ids) + len(r.output_ids) for r in running)
    kv_room = scheduler.token_to_kv_pool_allocator.available_size() + scheduler.tree_cache.evictable_size()
    slot_room = min(scheduler.max_running_requests - decode_count, scheduler.req_to_token_pool.available_size())
    return ls, RankStepSummary(
        rank=dp_rank, upstream_budget=int(upstream), chunk_tokens=chunk_tokens, chunk_prefix=chunk_prefix,
        waiting_tokens=waiting_tokens, waiting_requests=len(scheduler.waiting_queue) + (ch is not None),
        ls_waiting=ls, ls_tokens=ls_tokens, decode_count=decode_count, decode_context=decode_context,
        kv_room_tokens=int(kv_room), slot_room=max(0, int(slot_room)),
        mixed_rows=decode_count if scheduler.is_mixed_chunk else 0,  # upstream's num_mixed_decode_tokens
        waiting_counted=counted)


def _publish_model(state: StepPlanState, scheduler, num_dp_ranks: int) -> Optional[RooflineStepModel]:
    """DP rank 0: the model it publishes this step (prior until enough samples, then the latest fit)."""
    if not state.prior_built:
        state.prior_built = True
        try:
            state.prior = simulator_prior(num_dp_ranks) if _is_cpu_server(scheduler) else None
        except Exception:  # noqa: BLE001 -- no prior: the planner waits for the fit
            logger.exception("tiersched step plan: no simulator prior")
        state.model, state.model_source = state.prior, "prior" if state.prior is not None else "none"
        logger.info("tiersched step plan: DP rank 0 publishes model=%s (%s) %s", _model_tag(state.model),
                    state.model_source, state.model.as_dict() if state.model is not None else {})
        state.samples = StepSamples(num_dp_ranks, FIT_WINDOW)
    s = state.samples
    if (state.prior is not None and state.fitted_at == 0 and len(s) >= SCALE_MIN_SAMPLES
            and s.added - state.scaled_at >= SCALE_EVERY):
        # The prior is the simulator's model of another machine's (or a quieter machine's) steps: its shape
        # carries over far better than its scale, so until enough steps for a fit it is rescaled to them.
        state.scaled_at = s.added
        state.scaled_prior = scale_to_steps(state.prior, *s.arrays())
        state.model, state.model_source = state.scaled_prior, f"scaled@{s.added}"
        logger.info("tiersched step plan: DP rank 0 publishes model=%s (%s, %d samples) %s", _model_tag(state.model),
                    state.model_source, len(s), state.model.as_dict())
    if len(s) >= FIT_MIN_SAMPLES and s.added - state.fitted_at >= FIT_EVERY:
        state.fitted_at = s.added
        try:
            target = state.scaled_prior or state.prior
            state.model = s.fit(target) if target is not None else fit_roofline(*s.arrays())
            state.model_source = f"fit@{s.added}"
            logger.info("tiersched step plan: DP rank 0 publishes model=%s (%s, %d samples) %s", _model_tag(state.model),
                        state.model_source, len(s), state.model.as_dict())
        except ValueError:
            logger.exception("tiersched step plan: fit failed; keeping the %s model", state.model_source)
    return state.model


def gather_and_plan(scheduler, group, running_batch, last_batch, is_ls: Callable, num_dp_ranks: int,
                    iteration: int, config) -> int:
    """All-gather this rank's row over `group`, plan this step; returns the group's LS count (max over ranks).
    The local parts never raise (a failure publishes an empty summary): every rank must reach the collective."""
    import torch  # deferred: torch is imported by the scheduler process, not by the plugin
    import torch.distributed as dist

    state = PLAN
    if state.seq == 0:
        try:
            state.full_sequence = full_sequence_attention()
        except Exception:  # noqa: BLE001 -- see docstring; causal pairs then
            logger.exception("tiersched step plan: prefill attention backend unknown; pricing causal pairs")
        logger.info("tiersched step plan: attention pairs priced as %s",
                    "whole-sequence (p + b)(p + b + 1) / 2" if state.full_sequence else "causal b (p + (b + 1) / 2)")
    size, me = dist.get_world_size(group), dist.get_rank(group)
    state.dp_rank = me // max(1, size // num_dp_ranks)  # rows of one DP rank are consecutive (decode_rows)
    try:
        ls, summary = local_summary(scheduler, running_batch, last_batch, is_ls, state.dp_rank)
        summary = replace(summary, arrival_rate=note_arrivals(state, scheduler.waiting_queue, time.perf_counter()))
    except Exception:  # noqa: BLE001 -- see docstring
        logger.exception("tiersched step plan: summary failed; publishing an empty one")
        ls, summary = 0, RankStepSummary(rank=state.dp_rank, upstream_budget=0)
    model = None
    if me == 0:
        try:
            model = _publish_model(state, scheduler, num_dp_ranks)
        except Exception:  # noqa: BLE001
            logger.exception("tiersched step plan: model failed; publishing none")
    row = torch.tensor(encode_row(ls, summary, state.last, model), dtype=torch.int64)
    # Each forward is published exactly once: an iteration that runs no forward (an idle server between
    # requests) must not publish the previous step again, which would repeat that step as a sample.
    state.last = StepFeatures()
    out = [torch.empty_like(row) for _ in range(size)]
    dist.all_gather(out, row, group=group)
    state.seq += 1
    rows = decode_rows([t.tolist() for t in out], num_dp_ranks)
    state.model_in_use = rows.model
    last_s = rows.last_step_s()
    lt, lp, lc, lx = rows.last_arrays()
    if me == 0 and state.samples is not None:
        state.samples.add(lt, lp, lc, lx, last_s)
    if config.plan_hold_s > 0 and not state.warned_hold:
        # A held step skips every rank's prefill pass, a chunked request's continuation included; this adapter
        # only caps upstream's chunk budget, so it plans without holding (the simulator evaluates the hold).
        state.warned_hold = True
        logger.warning("tiersched step plan: plan_hold_s=%s is not applied on a server yet; planning without "
                       "holding", config.plan_hold_s)
    planner = None if rows.model is None else StepPlanner(
        rows.model, min_chunk_tokens=config.min_chunk_tokens, ls_weight=config.plan_ls_weight,
        ls_chunk_tokens=config.be_chunk_tokens, page_size=int(getattr(scheduler, "page_size", 1) or 1),
        decode_weight=config.plan_decode_weight, align_weight=config.plan_align_weight,
        full_sequence_attention=state.full_sequence, hold_s=0.0)
    plan = planner.plan(rows.summaries) if planner is not None else None
    state.plan, state.plan_iteration = plan, iteration
    last_prefill = bool(lt.any())
    if (plan is not None and plan.planned) or last_prefill or state.seq % LOG_EVERY == 0:
        pred = (rows.model.step_seconds(lt, lp, np.where(lt > 0, 0.0, lc), np.where(lt > 0, 0.0, lx))
                if rows.model is not None and last_s > 0 else math.nan)
        state.plans_logged += 1
        logger.info("tiersched step plan: seq=%d budgets=%s chunk=%s predicted_ms=%.3f planned=%d model=%s "
                    "last_ms=%.3f last_pred_ms=%.3f last_tokens=%s last_decode=%s last_pairs=%s last_context=%s",
                    state.seq, plan.budgets if plan else None, plan.chunk if plan else None,
                    plan.predicted_s * 1e3 if plan else math.nan, int(bool(plan and plan.planned)),
                    _model_tag(rows.model), last_s * 1e3, pred * 1e3, tuple(int(v) for v in lt),
                    tuple(int(v) for v in lc), tuple(int(v) for v in lp), tuple(int(v) for v in lx))
    return max(rows.ls_counts)


def note_arrivals(state: StepPlanState, waiting_queue, now: float) -> float:
    """Requests per second that entered this rank's waiting queue within the last ARRIVAL_WINDOW_S: a request
    whose queue-entry time (upstream's `time_stats.wait_queue_entry_time`, set when it is queued) is after the
    previous gather is new. A request re-queued after a retraction counts again."""
    since = state.last_gather_t
    state.last_gather_t = now
    for r in waiting_queue:
        entered = r.time_stats.wait_queue_entry_time
        if entered > since:
            state.arrivals.append(entered)
    while state.arrivals and state.arrivals[0] < now - ARRIVAL_WINDOW_S:
        state.arrivals.popleft()
    return len(state.arrivals) / ARRIVAL_WINDOW_S


def _model_tag(model: Optional[RooflineStepModel]) -> str:
    """A short identity of the model in use (its parameters' bits hashed), the same on every rank."""
    if model is None:
        return "none"
    return format(hash(tuple(float_bits(getattr(model, k)) for k in ROOFLINE_PARAMS)) & 0xFFFFFFFF, "08x")


def planned_budget(scheduler, iteration: int) -> Optional[int]:
    """This rank's prefill budget for the prefill pass of `iteration`, or None (no plan for it, nothing planned,
    a zero budget: no demand was seen, so upstream's budget stands)."""
    state = PLAN
    plan = state.plan
    if plan is None or not plan.planned or state.plan_iteration != iteration:
        return None
    b = plan.budget(state.dp_rank) if state.dp_rank < len(plan.budgets) else 0
    if b <= 0:
        return None
    if not scheduler.chunked_prefill_size:
        if not state.warned_no_chunking:
            state.warned_no_chunking = True
            logger.warning("tiersched step plan: chunked prefill is off (--chunked-prefill-size -1); the plan's "
                           "budgets are logged but not applied")
        return None
    return b


class BudgetCap:
    """Context manager: caps `scheduler.chunked_prefill_size` at `budget` for one prefill pass, then restores."""

    def __init__(self, scheduler, budget: Optional[int]):
        self.scheduler, self.budget, self.saved = scheduler, budget, None

    def __enter__(self):
        if self.budget is not None and self.budget < self.scheduler.chunked_prefill_size:
            self.saved = self.scheduler.chunked_prefill_size
            self.scheduler.chunked_prefill_size = self.budget
            PLAN.budgets_applied += 1
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            self.scheduler.chunked_prefill_size = self.saved
        return False


# ---- step timing ----------------------------------------------------------------------------------------------


def batch_features(batch, full_sequence: bool = False) -> StepFeatures:
    """The work of upstream's ScheduleBatch: an extend batch's tokens and attention pairs, a decode batch's size
    and context, an idle batch nothing. Pairs of a chunk of e tokens after a prefix p: e (p + (e + 1) / 2) for a
    causal backend; (p + e)(p + e + 1) / 2 with `full_sequence` (the backend attends over the whole sequence,
    `full_sequence_attention`)."""
    mode = batch.forward_mode
    if mode.is_extend():
        ext, pre = list(batch.extend_lens or []), list(batch.prefix_lens or [])
        if full_sequence:
            pairs = sum((p + e) * (p + e + 1) / 2 for e, p in zip(ext, pre))
        else:
            pairs = sum(e * (p + (e + 1) / 2) for e, p in zip(ext, pre))
        return StepFeatures(prefill_tokens=int(sum(ext)), prefill_pairs=float(pairs))
    if mode.is_decode():
        return StepFeatures(decode_count=len(batch.reqs),
                            decode_context=sum(len(r.origin_input_ids) + len(r.output_ids) for r in batch.reqs))
    return StepFeatures()


def time_step(original_fn, self, batch, *args, **kwargs):
    """Scheduler.run_batch: time the forward (synchronous on CPU) and remember this rank's step for the next
    gather (only while a plan is in use in this process: a gather has run), and hand it to the LS cap's pricing
    model (only while that model is this process's own: cap_pricing.wants_steps)."""
    for_plan, for_pricing = PLAN.seq > 0, cap_pricing.wants_steps()
    if not (for_plan or for_pricing):
        return original_fn(self, batch, *args, **kwargs)
    t0 = time.perf_counter()
    result = original_fn(self, batch, *args, **kwargs)
    dt = time.perf_counter() - t0
    try:
        f = batch_features(batch, PLAN.full_sequence or cap_pricing.PRICING.full_sequence)
        if for_plan:
            PLAN.last = StepFeatures(f.prefill_tokens, f.prefill_pairs, f.decode_count, f.decode_context, dt)
        if for_pricing:
            cap_pricing.record_step(f.prefill_tokens, f.prefill_pairs, dt)
    except Exception:  # noqa: BLE001 -- timing is best effort
        PLAN.last = StepFeatures()
    return result
