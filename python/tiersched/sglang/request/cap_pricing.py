"""The step-time model and rank load the request tier prices its LS cap with (core: lockstep.ls_cap_pays).

Two kinds of group: under DP attention the lockstep group (`lockstep.same_step_group`), whose ranks' steps are
one step; without DP attention a rank of its own (a group of one: `lockstep.join_own_rank_pricing`, a scheduler
that decides alone, i.e. tp and pp size 1, as each rank of `--dp-size N` without DP attention), where the cap's
extra steps are still paid by this rank's own running decodes. With `[request] ls_cap_pricing` on, a scheduler
process prices the cap with:

* the model: where the step plan runs (`[request] step_plan`), the group's model DP rank 0 publishes (fitted to
  the group's measured steps); otherwise this process's own: the simulator's prior for this DP size
  (step_plan.simulator_prior, a CPU server only; no prior: no pricing, the fixed rule) rescaled to this rank's own
  measured prefill steps (step_time_fit.scale_to_steps over the last `WINDOW` of them, from `SCALE_MIN_SAMPLES`
  on, every `SCALE_EVERY`). Only the scale is fitted here: a rank sees its own work, not the other ranks', so the
  prior keeps the shape. A sample is this rank's prefill forward (`step_plan.time_step` times it) with its own
  features in its column and zeros elsewhere; the forward ends after the group's MoE collective, so it is the
  lockstep step.
* the load: this rank's running requests and their context, its waiting queue, its chunk budget;
* the group's LS arrival rate and this step's fresh LS count, from the process's `LockstepLsSignal` (a group of
  one: this rank's own LS count each iteration, `observe_own_rank`, in a signal of its own here).

Each model this process takes up is logged: `tiersched cap pricing: model={...} (prior|scaled@N)`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from tiersched.core.request import RankLoad, RequestTierConfig
from tiersched.core.request.lockstep import LockstepLsSignal, LsCapPricing
from tiersched.core.request.step_plan import RooflineStepModel
from tiersched.core.request.step_time_fit import StepSamples, scale_to_steps

logger = logging.getLogger("tiersched.request_tier")

SCALE_MIN_SAMPLES, SCALE_EVERY, WINDOW = 8, 8, 512


@dataclass
class CapPricingState:
    """This process's pricing model (one scheduler per process)."""

    group_ranks: int = 0  # DP ranks of the group priced (0: not known yet / no pricing; 1: a rank of its own)
    dp_rank: int = 0
    full_sequence: bool = False
    prior: Optional[RooflineStepModel] = None
    prior_built: bool = False
    model: Optional[RooflineStepModel] = None
    source: str = "none"
    samples: Optional[StepSamples] = None
    scaled_at: int = 0
    own_signal: Optional[LockstepLsSignal] = None  # a group of one: this rank's LS counts (observe_own_rank)
    own_ls: int = 0  # a group of one: this rank's LS count observed this iteration


PRICING = CapPricingState()


def reset() -> None:
    global PRICING
    PRICING = CapPricingState()


def set_group(group_ranks: int, dp_rank: int, full_sequence: bool, config: Optional[RequestTierConfig] = None) -> None:
    """The group this process prices for (called once it is known): the lockstep group, or 1 for a rank of its
    own (then `config` sizes the signal that estimates this rank's LS arrival rate)."""
    PRICING.group_ranks, PRICING.dp_rank, PRICING.full_sequence = int(group_ranks), int(dp_rank), bool(full_sequence)
    if PRICING.group_ranks == 1:
        PRICING.own_signal = LockstepLsSignal(config if config is not None else RequestTierConfig())


def observe_own_rank(ls_count: int, now_s: float) -> None:
    """A group of one: this iteration's LS count of this rank (waiting + an LS chunked prefill), for the arrival
    rate and the fresh count the pricing reads."""
    if PRICING.own_signal is not None:
        PRICING.own_ls = max(0, int(ls_count))
        PRICING.own_signal.observe(PRICING.own_ls, now_s)


def wants_steps() -> bool:
    """Whether `step_plan.time_step` should time this process's forwards for the pricing model."""
    return PRICING.group_ranks >= 1 and PRICING.prior is not None


def record_step(prefill_tokens: int, prefill_pairs: float, measured_s: float) -> None:
    """One forward of this rank: a prefill one is a sample; every SCALE_EVERY samples the prior is rescaled."""
    st = PRICING
    if st.samples is None or prefill_tokens <= 0 or st.prior is None:
        return
    r = st.group_ranks
    tok, pairs, zero = np.zeros(r), np.zeros(r), np.zeros(r)
    tok[st.dp_rank], pairs[st.dp_rank] = prefill_tokens, prefill_pairs
    if not st.samples.add(tok, pairs, zero, zero, measured_s):
        return
    s = st.samples
    if len(s) >= SCALE_MIN_SAMPLES and s.added - st.scaled_at >= SCALE_EVERY:
        st.scaled_at = s.added
        st.model, st.source = scale_to_steps(st.prior, *s.arrays()), f"scaled@{s.added}"
        _log(st.model, st.source)


def _log(model: RooflineStepModel, source: str) -> None:
    logger.info("tiersched cap pricing: model=%s (%s)", model.as_dict(), source)


def model_for(scheduler, plan_model: Optional[RooflineStepModel],
              prior_factory: Callable[[int], Optional[RooflineStepModel]]) -> Optional[RooflineStepModel]:
    """The model to price with now: the step plan's group model when there is one, else this process's own
    (on first use on a CPU server, `prior_factory(DP size)` builds the prior: step_plan.simulator_prior; None
    where there is none)."""
    if plan_model is not None:
        return plan_model
    st = PRICING
    if st.group_ranks < 1:
        return None
    if not st.prior_built:
        st.prior_built = True
        try:
            if str(scheduler.device).startswith("cpu"):
                st.prior = prior_factory(st.group_ranks)
        except Exception:  # noqa: BLE001 -- no prior: the fixed rule
            logger.exception("tiersched cap pricing: no simulator prior; the LS cap stays the fixed rule")
        if st.prior is not None:
            st.model, st.source = st.prior, "prior"
            st.samples = StepSamples(st.group_ranks, WINDOW)
            logger.info("tiersched cap pricing: model=%s (prior)", st.prior.as_dict())
    return st.model


def rank_load(scheduler, waiting_behind: int) -> RankLoad:
    """This rank now: its running requests (the running batch) and their context, `waiting_behind` waiting
    requests, its chunk budget."""
    running = scheduler.running_batch.reqs if scheduler.running_batch is not None else []
    cps, mpt = scheduler.chunked_prefill_size, scheduler.max_prefill_tokens
    return RankLoad(decode_count=len(running),
                    decode_context=sum(len(r.origin_input_ids) + len(r.output_ids) for r in running),
                    waiting_requests=max(0, int(waiting_behind)),
                    upstream_budget=int(min(cps, mpt) if cps and cps > 0 else mpt))


def pricing(model: Optional[RooflineStepModel], load: RankLoad, signal: LockstepLsSignal, group_ls_now: int,
            now_s: float, config: RequestTierConfig) -> Optional[LsCapPricing]:
    """The core's pricing inputs, or None (no model, pricing off, no group known): the fixed rule. A group of one
    reads its own signal and count (`observe_own_rank`), not the lockstep ones passed in."""
    if model is None or not config.ls_cap_pricing or PRICING.group_ranks < 1:
        return None
    if PRICING.group_ranks == 1 and PRICING.own_signal is not None:
        signal, group_ls_now = PRICING.own_signal, PRICING.own_ls
    return LsCapPricing(model, signal.ls_rate_per_s(now_s), max(0, int(group_ls_now)), load.decode_count,
                        load.decode_context, load.waiting_requests, load.upstream_budget, PRICING.full_sequence,
                        PRICING.group_ranks)
