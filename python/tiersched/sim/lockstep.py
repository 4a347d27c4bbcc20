"""The simulator side of lockstep step planning (tiersched.core.request.step_plan).

`prior_model(cost)`: the planner's step-time model for a deployment, fitted with the core's `fit_roofline` to
the simulator's own step-cost model over random steps: the same fit a live server runs on its measured step
timings (the simulator's model is the prior there). `summaries(ranks)`: each rank's `RankStepSummary`, built
from the rank's state exactly where the loop forms batches. `make_planner(spec, preset, cost)`: the `PolicySet.
step_plan` value -> a `StepPlanner` (or None).
"""
from __future__ import annotations

import hashlib

import numpy as np

from tiersched.core.request import RequestTierConfig
from tiersched.core.request.step_plan import RankStepSummary, RooflineStepModel, StepPlanner, fit_roofline

PRIOR_SAMPLES = 600
DECODE_ONLY_SHARE = 0.25  # sample_steps: share of steps in which no rank prefills
ALIGNED_SHARE = 0.5  # sample_steps: share of steps in which every prefilling rank prefills about the same tokens


def sample_steps(cost, samples: int = PRIOR_SAMPLES, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Random lockstep steps priced by the simulator's StepCostModel `cost`: (tokens, pairs, decode count, decode
    context, seconds), arrays [N, R] and [N]. Each rank prefills (1..upstream chunk tokens, a prefix up to 16k),
    decodes (1..max_running requests, 100..8000 tokens of context each) or idles; in DECODE_ONLY_SHARE of the
    steps no rank prefills."""
    preset = cost.preset
    r = preset.dp
    rng = np.random.default_rng(seed)
    chunk = preset.scheduler.chunked_prefill_size
    mode = rng.choice(3, size=(samples, r), p=[0.45, 0.45, 0.10])  # 0 prefill, 1 decode, 2 idle
    # A quarter of the steps without any prefill: with many ranks (0.55^R) all-decode steps would otherwise never be
    # drawn, and the planner's all-decode step (its stall reference) would be extrapolated from prefill steps alone.
    decode_only = rng.uniform(size=samples) < DECODE_ONLY_SHARE
    mode[decode_only] = np.where(mode[decode_only] == 0, 1, mode[decode_only])
    tokens = np.where(mode == 0, np.rint(np.exp(rng.uniform(0, np.log(chunk), (samples, r)))), 0.0)
    aligned = rng.uniform(size=samples) < ALIGNED_SHARE
    size = np.exp(rng.uniform(0, np.log(chunk), samples))[:, None] * rng.uniform(0.8, 1.0, (samples, r))
    tokens = np.where(aligned[:, None] & (mode == 0), np.maximum(1.0, np.rint(size)), tokens)
    prefix = np.where(rng.uniform(size=(samples, r)) < 0.5, 0.0, rng.uniform(0, 16_384, (samples, r)))
    pairs = tokens * (prefix + (tokens + 1) / 2)
    count = np.where(mode == 1, rng.integers(1, preset.scheduler.max_running_requests + 1, (samples, r)), 0)
    ctx = count * rng.uniform(100, 8000, (samples, r))
    seconds = np.empty(samples)
    for i in range(samples):
        step_tokens = np.where(tokens[i] > 0, tokens[i], count[i]).astype(float)
        seconds[i] = float(cost.step_times(step_tokens, pairs[i], ctx[i])[0][0])
    return tokens, pairs, count.astype(float), ctx, seconds


def prior_model(cost, samples: int = PRIOR_SAMPLES, seed: int = 0) -> RooflineStepModel:
    """The planner's model of this deployment: `fit_roofline` over `sample_steps` of the simulator's cost model.
    Memoised on everything the fit reads (the preset, the cost model's routing probabilities, placement and
    balance mode): it is the same fit for every simulation of a deployment, and a large share of a short one."""
    key = (repr(cost.preset), cost.ideal_balance, samples, seed, cost.probs.shape,
           hashlib.sha1(np.ascontiguousarray(cost.probs).tobytes()).hexdigest(),
           hashlib.sha1(np.ascontiguousarray(cost.placement.phy2log).tobytes()).hexdigest())
    model = _PRIOR_MEMO.get(key)
    if model is None:
        if len(_PRIOR_MEMO) >= 64:
            _PRIOR_MEMO.clear()
        model = _PRIOR_MEMO[key] = fit_roofline(*sample_steps(cost, samples, seed))
    return model


_PRIOR_MEMO: dict = {}  # prior_model's memo (RooflineStepModel is frozen)


def make_planner(spec, preset, cost, config: RequestTierConfig | None = None) -> StepPlanner | None:
    """PolicySet.step_plan -> planner: "none"/None/False -> None; "tiersched"/True -> a StepPlanner with the
    prior model and the [request] plan tunables (`config`, default RequestTierConfig()); a RequestTierConfig ->
    the same with its tunables; a StepPlanner object -> itself."""
    if isinstance(spec, StepPlanner):
        return spec
    if isinstance(spec, RequestTierConfig):
        spec, config = "tiersched", spec
    if spec in (None, False, "none"):
        return None
    if spec not in (True, "tiersched"):
        raise ValueError(f"unknown step_plan {spec!r}; use none, tiersched, a RequestTierConfig or a StepPlanner.")
    if preset.dp <= 1:
        return None  # no lockstep group: upstream's budgets exactly
    cfg = config or RequestTierConfig()
    return StepPlanner(prior_model(cost), min_chunk_tokens=cfg.min_chunk_tokens, ls_weight=cfg.plan_ls_weight,
                       ls_chunk_tokens=cfg.be_chunk_tokens, decode_weight=cfg.plan_decode_weight,
                       align_weight=cfg.plan_align_weight, hold_s=cfg.plan_hold_s)


ARRIVAL_WINDOW_S = 1.0


def arrival_rates(table, now_s: float, dp: int, window_s: float = ARRIVAL_WINDOW_S) -> np.ndarray:
    """Requests per second each rank received over the last `window_s` seconds ([R])."""
    lo, hi = np.searchsorted(table.arrival, [now_s - window_s, now_s], side="right")
    ranks = table.rank[lo:hi]
    return np.bincount(ranks[ranks >= 0], minlength=dp)[:dp] / window_s


def rank_summary(rs, ls_priority: int | None, arrival_rate: float = 0.0, now_s: float | None = None) -> RankStepSummary:
    """The summary a rank publishes: its chunk, its waiting queue's uncached tokens (prefix-cache matches taken
    now, summed only until the upstream budget is covered), running decodes, KV and slot room; with mixed chunking
    its running requests are the mixed rows of a prefill step (`RankState.prefill_pass` takes them off the budget)."""
    t, s = rs.t, rs.s
    upstream = min(s.chunked_prefill_size, s.max_prefill_tokens)
    chunk_tokens = chunk_prefix = 0
    ls = ls_tokens = 0
    if rs.chunked is not None:
        chunk_tokens = int(t.fill_len[rs.chunked] - t.prefilled[rs.chunked])
        chunk_prefix = int(t.prefilled[rs.chunked])
        if ls_priority is not None and t.priority[rs.chunked] >= ls_priority:
            ls, ls_tokens = 1, chunk_tokens
    waiting_tokens = counted = 0
    bt = rs.cache.block_tokens
    for rid in rs.waiting:
        is_ls = ls_priority is not None and t.priority[rid] >= ls_priority
        if waiting_tokens >= upstream and not is_ls:
            continue
        blocks = t.blocks[rid]
        cached = min(rs.cache.match(blocks) * bt, int(t.fill_len[rid]) - 1) if blocks else 0
        uncached = int(t.fill_len[rid]) - max(0, cached)
        waiting_tokens += uncached
        counted += 1
        if is_ls:
            ls += 1
            ls_tokens += uncached
    decode_count = len(rs.running)
    return RankStepSummary(
        rank=rs.rank, upstream_budget=upstream, chunk_tokens=chunk_tokens, chunk_prefix=chunk_prefix,
        waiting_tokens=waiting_tokens, waiting_requests=len(rs.waiting) + (rs.chunked is not None),
        ls_waiting=ls, ls_tokens=ls_tokens, decode_count=decode_count,
        decode_context=rs.decode_context() if decode_count else 0,
        kv_room_tokens=int(rs.free_for_alloc() - rs._reserved_decode()),
        slot_room=s.max_running_requests - decode_count, arrival_rate=float(arrival_rate),
        mixed_rows=decode_count if s.enable_mixed_chunk else 0, waiting_counted=counted,
        oldest_wait_s=_oldest_wait(rs, now_s))


def _oldest_wait(rs, now_s: float | None) -> float:
    """Seconds since the oldest of the rank's waiting requests and its chunked one entered the queue (0: none)."""
    queued = rs.waiting + ([rs.chunked] if rs.chunked is not None else [])
    if not queued or now_s is None:
        return 0.0
    return max(0.0, now_s - float(rs.t.queue_entry[queued].min()))


def run_lockstep_free(sim) -> None:
    """Run `sim` (a loop.Simulation) without lockstep: the reference beside the perfect-balance bound.

    Every rank keeps its own clock and runs its own steps back to back; a step of rank r costs the step overhead
    + r's own attention-side work + the MoE/all-to-all time of the tokens every rank has in flight now (r's step
    and the other ranks' current steps: MoE as it is). So no rank waits for another rank's attention, which no
    DP-attention deployment can do, while each request's attention stays on its own rank (perfect balance
    spreads it over all ranks). Each rank's step pays a whole MoE pass, so where MoE dominates the step (many
    ranks, e.g. deepseek-v3-32) this reference can be slower than lockstep and is no bound there. Arrivals are
    dispatched when the earliest rank clock passes them; one step at a time (no macro steps); GPU presets only
    (no host-CPU contention or new-shape costs). With `enable_mixed_chunk` a rank's running decodes ride in its
    prefill step as in the lockstep loop (one token each, their KV read priced), so its own prefill no longer
    stalls its own decodes; upstream's prefill delayer has no meaning without a lockstep group and is refused."""
    t, ranks, cost = sim.table, sim.ranks, sim.cost
    dp, hw = len(ranks), sim.preset.hardware
    if hw.contention_prefill or hw.contention_decode or hw.new_shape_s or hw.first_token_one_step_late:
        raise ValueError("the lockstep-free bound models GPU presets only (no host-CPU contention or new-shape costs).")
    if sim.preset.scheduler.enable_prefill_delayer:
        raise ValueError("the lockstep-free bound has no DP group to negotiate with: run it without the prefill "
                         "delayer.")
    mixed_chunk = sim.preset.scheduler.enable_mixed_chunk
    clock = np.zeros(dp)
    current = np.zeros(dp)  # tokens of each rank's step in flight (the MoE load every step sees)
    arrivals, n, nxt = t.arrival, t.n, 0
    horizon = (arrivals[-1] if n else 0.0) + 1800.0
    while True:
        r = int(np.argmin(clock))
        now = float(clock[r])
        if now > horizon:
            break
        while nxt < n and arrivals[nxt] <= now:
            sim.now = float(arrivals[nxt])
            sim._dispatch(nxt)
            nxt += 1
        rs = ranks[r]
        batch = rs.schedule_prefill(now) if (rs.waiting or rs.chunked is not None) else []
        if not batch and rs.running:
            rs.retract_for_decode(now)
        if not batch and not rs.running:
            current[r] = 0.0
            if nxt < n:
                clock[r] = max(now, float(arrivals[nxt]))
                continue
            if not any(q.waiting or q.running or q.chunked is not None for q in ranks):
                break
            clock[r] = np.inf  # idle for good; the others finish
            continue
        tokens = np.zeros(dp)
        pairs = np.zeros(dp)
        ctx = np.zeros(dp)
        mixed = mixed_chunk and rs.mixes_running(batch)
        decode_reqs = None
        if batch:
            tokens[r] = sum(e for _, e, _ in batch)
            pairs[r] = sum(e * (p + (e + 1) / 2) for _, e, p in batch)
            if mixed:  # the running decodes ride in the same forward: one token each, their KV read
                decode_reqs = np.zeros(dp)
                decode_reqs[r] = len(rs.running)
                tokens[r] += len(rs.running)
                ctx[r] = rs.decode_context()
        else:
            tokens[r] = len(rs.running)
            ctx[r] = rs.decode_context()
        attn = float(cost.attention_time(tokens, pairs, ctx, decode_reqs)[r])
        current[r] = tokens[r]
        moe, _ = cost.moe_time(current)
        step = hw.step_overhead_s + attn + moe
        clock[r] = now + step
        sim.steps += 1
        if batch:
            if mixed:  # the decodes first: the requests this prefill finishes join them afterwards
                rs.advance_decode(1, float(clock[r]))
                sim.mixed_steps += 1
            rs.finish_prefill(batch, float(clock[r]))
        else:
            rs.advance_decode(1, float(clock[r]))
    finite = clock[np.isfinite(clock)]
    sim.now = float(finite.max()) if finite.size else sim.now
