"""Upstream SGLang's DP-attention prefill alignment (`--enable-prefill-delayer`): a copy of its per-pass decision.

Upstream (0.5.23 `managers/prefill_delayer.py`) lets a DP-attention rank hold back a prefill for a few scheduler
passes so that the ranks prefill together instead of one rank's prefill stalling the others' decode. Each pass
every rank all-gathers six integers (`RankDelayInfo`) and every rank evaluates the same rule on them
(`PrefillDelayer.negotiate`, upstream `_negotiate_should_allow_prefill_pure`):

- no rank can prefill ("none"): allow (nothing to align), forget any wait in progress;
- some ranks can, others not ("mixed"): delay, unless a prefillable rank's KV usage is under the low watermark
  (`token_usage_low_watermark`) or the wait has already lasted `max_delay_passes - 1` passes ("wait_timeout");
- every rank can ("all"): allow, except that when the fullest rank's free request slots cannot take the largest
  recent prefill batch (`max_running_requests - max running < max max_prefill_bs`, the slot trigger) or, with
  `queue_min_ratio` set, when every queue is shorter than min(max running x ratio, prefill capacity) (the queue
  trigger; cancelled once a rank's wait exceeded `max_delay_ms`), delay under the same pass bound. The first time
  a trigger fires it is skipped (upstream's `skip_first_delayer`, once per delayer).

State is per rank (`DelayerState`): the wait in progress (passes delayed, when it began) and the skip-first flag.
All ranks see the same gathered infos, so their verdicts agree; only their clocks may differ. `RankPrefillDelayer`
adds what upstream's scheduler keeps beside the delayer: the recent prefill batch sizes (`max_prefill_bs`, the
largest of the last 16 non-empty prefill attempts, a rejected attempt counted by `estimate_attempted_prefill_bs`).

Time is the caller's clock in seconds (upstream: `time.perf_counter()`). Pure Python, no SGLang import; proven
equal to upstream's function by test/core/test_prefill_delayer_upstream.py.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace
from typing import Sequence

DEFAULT_MAX_DELAY_MS = 5000.0  # upstream's fallback when --prefill-delayer-max-delay-ms is unset
DEFAULT_PREFILL_BS_WINDOW = 16  # upstream SGLANG_PREFILL_DELAYER_MAX_PREFILL_BS_WINDOW_SIZE


@dataclass(frozen=True, slots=True)
class PrefillDelayerConfig:
    max_delay_passes: int = 30
    token_usage_low_watermark: float | None = None
    queue_min_ratio: float | None = None  # None: the queue trigger is off
    max_delay_ms: float | None = None  # None: DEFAULT_MAX_DELAY_MS
    prefill_max_requests: int | None = None  # upstream --prefill-max-requests (caps the queue trigger's target)
    num_dp_ranks: int = 1
    attn_dp_enabled: bool = True  # False: max_running_requests is split over the DP ranks

    @property
    def effective_max_delay_ms(self) -> float:
        return DEFAULT_MAX_DELAY_MS if self.max_delay_ms is None else self.max_delay_ms


@dataclass(frozen=True, slots=True)
class RankDelayInfo:
    """What one rank contributes to the pass's all-gather (upstream's six int64 fields, in order)."""
    prefillable: bool
    token_watermark_force_allow: bool
    running_batch: int
    max_prefill_bs: int
    waiting_queue_len: int
    queue_timeout_expired: bool

    def as_row(self) -> tuple[int, int, int, int, int, int]:
        return (int(self.prefillable), int(self.token_watermark_force_allow), self.running_batch,
                self.max_prefill_bs, self.waiting_queue_len, int(self.queue_timeout_expired))


@dataclass(frozen=True, slots=True)
class DelayWait:
    """A wait in progress (upstream `_State`): passes delayed so far and when the wait began."""
    delayed_count: int
    start_s: float


@dataclass(frozen=True, slots=True)
class DelayerState:
    wait: DelayWait | None = None
    skip_first: bool = True  # upstream `skip_first_delayer`: the first trigger in the "all" branch is ignored


@dataclass(frozen=True, slots=True)
class DelayerDecision:
    allow: bool
    reason: str  # "", "no_wait", "wait_success", "delay", "wait_timeout", "token_watermark"
    estimation: str  # "all", "none", "mixed": which ranks reported prefillable
    state: DelayerState  # the rank's state after this pass
    num_prefillable: int
    num_token_watermark_force_allow: int
    wait_passes: int = 0  # released waits: passes waited (upstream's metrics)
    wait_s: float = 0.0


class PrefillDelayer:
    """Upstream's `PrefillDelayer` decision as pure functions of a rank's state and the gathered infos."""

    def __init__(self, config: PrefillDelayerConfig):
        self.config = config

    def local_info(self, state: DelayerState, *, prefillable: bool, token_usage: float, running_batch: int = 0,
                   max_prefill_bs: int = 0, waiting_queue_len: int = 0, now_s: float = 0.0) -> RankDelayInfo:
        """The rank's row of the all-gather. A rank that did not try to prefill this pass reports
        prefillable=False and zeros (upstream's `finalize` negotiates with the defaults)."""
        c = self.config
        watermark = c.token_usage_low_watermark
        expired = (c.queue_min_ratio is not None and state.wait is not None
                   and (now_s - state.wait.start_s) * 1000.0 >= c.effective_max_delay_ms)
        return RankDelayInfo(bool(prefillable), bool(prefillable and watermark is not None and token_usage < watermark),
                             int(running_batch), int(max_prefill_bs), int(waiting_queue_len), bool(expired))

    def negotiate(self, state: DelayerState, infos: Sequence[RankDelayInfo], max_running_requests: int = 0,
                  now_s: float = 0.0) -> DelayerDecision:
        """The pass's verdict for a rank in `state`, given every rank's info (the rank's own included)."""
        c = self.config
        prefillable = [i.prefillable for i in infos]
        n_prefillable = sum(prefillable)
        n_watermark = sum(i.token_watermark_force_allow for i in infos)
        if all(prefillable):
            estimation = "all"
        elif not any(prefillable):
            estimation = "none"
        else:
            estimation = "mixed"
        wait = state.wait
        waited = dict(wait_passes=wait.delayed_count if wait else 0, wait_s=(now_s - wait.start_s) if wait else 0.0)
        base = dict(estimation=estimation, num_prefillable=n_prefillable, num_token_watermark_force_allow=n_watermark)
        released = replace(state, wait=None)

        def delay_or_timeout(st: DelayerState) -> DelayerDecision:
            count = wait.delayed_count if wait else 0
            if count < c.max_delay_passes - 1:
                nxt = DelayWait(count + 1, wait.start_s if wait else now_s)
                return DelayerDecision(False, "delay", state=replace(st, wait=nxt), **base)
            return DelayerDecision(True, "wait_timeout", state=replace(st, wait=None), **base, **waited)

        if estimation == "none":
            return DelayerDecision(True, "", state=released, **base, **waited)
        if n_watermark > 0:  # a prefillable rank's KV is under the low watermark: the GPU is underused, go
            return DelayerDecision(True, "token_watermark", state=released, **base, **waited)
        if estimation == "mixed":
            return delay_or_timeout(state)
        if not c.attn_dp_enabled:
            max_running_requests = (max_running_requests + c.num_dp_ranks - 1) // c.num_dp_ranks
        running_max = max(i.running_batch for i in infos)
        prefill_bs_max = max(i.max_prefill_bs for i in infos)
        queue_max = max(i.waiting_queue_len for i in infos)
        queue_condition = False
        if c.queue_min_ratio is not None and running_max > 0:
            capacity = c.prefill_max_requests if c.prefill_max_requests is not None else prefill_bs_max
            queue_min = min(int(running_max * c.queue_min_ratio), capacity)
            queue_condition = queue_min > 0 and queue_max < queue_min
            if queue_condition and any(i.queue_timeout_expired for i in infos):
                queue_condition = False
        slot_condition = max_running_requests - running_max < prefill_bs_max
        if slot_condition or queue_condition:
            if state.skip_first:
                state = replace(state, skip_first=False)
            else:
                return delay_or_timeout(state)
        return DelayerDecision(True, "wait_success" if wait is not None else "no_wait",
                               state=replace(state, wait=None), **base, **waited)


def estimate_attempted_prefill_bs(running_batch: int, max_running_requests: int, waiting_queue_len: int,
                                  num_dp_ranks: int = 1, attn_dp_enabled: bool = True) -> int:
    """Upstream `PrefillDelayerSinglePassExecutor._estimate_attempted_prefill_bs`: the batch size a prefillable
    pass would have admitted, bounded by the queue and the free request slots (each at least 1)."""
    local_max = max_running_requests
    if not attn_dp_enabled:
        local_max = (max_running_requests + num_dp_ranks - 1) // num_dp_ranks
    return min(max(waiting_queue_len, 1), max(local_max - running_batch, 1))


class RankPrefillDelayer:
    """One rank's delayer as upstream's scheduler holds it: the decision state plus the recent prefill batch sizes.

    Per pass: `info(...)` gives the rank's row, `decide(infos, ...)` applies the gathered verdict, and
    `observe_pass(actual_bs, attempted)` records the pass's prefill batch size (upstream `finalize`: the actual
    batch size, or the attempted estimate for a prefillable pass that admitted nothing; 0 records nothing)."""

    def __init__(self, delayer: PrefillDelayer, window: int = DEFAULT_PREFILL_BS_WINDOW):
        if window <= 0:
            raise ValueError(f"window must be positive, got {window}")
        self.delayer = delayer
        self.state = DelayerState()
        self.recent_bs: deque[int] = deque(maxlen=window)
        self.last: DelayerDecision | None = None

    @property
    def max_prefill_bs(self) -> int:
        return max(self.recent_bs, default=0)

    def info(self, *, prefillable: bool, token_usage: float, running_batch: int, waiting_queue_len: int,
             now_s: float) -> RankDelayInfo:
        if not prefillable:
            return self.delayer.local_info(self.state, prefillable=False, token_usage=token_usage, now_s=now_s)
        return self.delayer.local_info(self.state, prefillable=True, token_usage=token_usage,
                                       running_batch=running_batch, max_prefill_bs=self.max_prefill_bs,
                                       waiting_queue_len=waiting_queue_len, now_s=now_s)

    def decide(self, infos: Sequence[RankDelayInfo], max_running_requests: int, now_s: float) -> DelayerDecision:
        self.last = self.delayer.negotiate(self.state, infos, max_running_requests, now_s)
        self.state = self.last.state
        return self.last

    def observe_pass(self, actual_bs: int, attempted_bs: int = 0) -> None:
        observed = actual_bs or attempted_bs
        if observed > 0:
            self.recent_bs.append(observed)
