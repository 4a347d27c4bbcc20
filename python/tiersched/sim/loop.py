"""The simulation loop: dispatch arrivals, step all DP ranks in lockstep, rebalance experts every K steps.

Time advances one lockstep forward step at a time, except that runs of pure-decode steps with an unchanged batch
are advanced together ("macro steps": the step times of the run are computed as one numpy array, the run ends at
the first request completion, the first step boundary after the next arrival, the KV limit or the next EPLB
rebalance), so results equal step-by-step simulation while costing one Python iteration per event.
Arrivals reach their rank at the first step boundary at or after their arrival time (SGLang's schedulers poll
for new requests once per loop iteration); the dispatcher sees rank snapshots refreshed at most every
`load_refresh_interval_s` (upstream DataParallelController.refresh_load_budget) and its own optimistic updates.
Host-CPU contention (cpu-tiny only; 0 on GPU presets): with `co_busy` (intervals when OTHER ranks of the host are
busy, from an earlier pass of a per-rank replay) a step that starts inside one is slower by the preset's
contention factor, and macro steps end at the intervals' boundaries; `record_busy` returns this run's busy intervals.
New prefill shapes (cpu-tiny only): a rank's first prefill step of a token count costs the preset's new-shape extra;
with `first_token_one_step_late` (cpu-tiny) a request's first token is reported when the rank's next step ends.
Upstream's prefill delayer (`enable_prefill_delayer`): each step every rank's prefill pass runs to the point where
upstream negotiates, the ranks' infos are gathered, every rank takes the verdict and finishes its pass
(`_negotiated_prefill`). Mixed chunking (`enable_mixed_chunk`): a rank whose prefill batch carries its running
decodes (`RankState.mixes_running`) prices both in one step and advances the decodes one token with it.
"""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from tiersched.core.engine import DispatchRequest, LockstepGroup, RankLoad
from tiersched.core.expert import ExpertStats
from tiersched.core.expert.metrics import expert_pressure
from tiersched.core.request.prefill_delayer import (
    PrefillDelayer, PrefillDelayerConfig, RankPrefillDelayer, estimate_attempted_prefill_bs,
)
from tiersched.sim.cost_model import StepCostModel
from tiersched.sim.lockstep import arrival_rates, make_planner, prior_model, rank_summary, run_lockstep_free
from tiersched.sim.metrics import SimResult, build_result
from tiersched.sim.moe_routing import MoeRouting, make_routing, token_probs
from tiersched.sim.policies import PolicySet, make_dispatcher, make_eplb, make_ordering, make_preemption
from tiersched.sim.presets import Preset, get_preset
from tiersched.sim.rank import RankState, RequestTable
from tiersched.sim.workloads import Workload

MAX_MACRO_STEPS = 4096
DRAIN_LIMIT_S = 1800.0  # stop this long after the last arrival even if requests remain (reported as unfinished)


class Simulation:
    def __init__(self, preset: Preset, workload: Workload, policies: PolicySet, seed: int = 0,
                 ideal_balance: bool = False, routing: MoeRouting | None = None, record_timeline: bool = True,
                 co_busy: np.ndarray | None = None, record_busy: bool = False, seen_prefill_shapes=None):
        self.preset, self.workload, self.policies = preset, workload, policies
        # Prefill token counts each rank has run (cpu-tiny's new-shape cost); seeded with a warm-up's.
        self.seen_shapes = [set(s) for s in (seen_prefill_shapes or [()] * preset.dp)]
        self.first_token_pending: list[list[int]] = [[] for _ in range(preset.dp)]  # first_token_one_step_late
        co = np.asarray(co_busy, dtype=float).reshape(-1, 2) if co_busy is not None else np.zeros((0, 2))
        self.co_start, self.co_end = co[:, 0], co[:, 1]
        self.busy: list[list[float]] | None = [] if record_busy else None
        self.table = RequestTable(workload)
        self.routing = routing if routing is not None else make_routing(preset, seed)
        self.cost = StepCostModel(preset, token_probs(self.routing, preset.dp), ideal_balance)
        sched = preset.scheduler
        delayer = None
        if sched.enable_prefill_delayer:  # every DP-attention rank holds one (upstream: one per scheduler)
            delayer = PrefillDelayer(PrefillDelayerConfig(
                max_delay_passes=sched.prefill_delayer_max_delay_passes,
                token_usage_low_watermark=sched.prefill_delayer_token_usage_low_watermark,
                queue_min_ratio=sched.prefill_delayer_queue_min_ratio,
                max_delay_ms=sched.prefill_delayer_max_delay_ms,
                num_dp_ranks=preset.dp, attn_dp_enabled=True))
        self.ranks = [
            RankState(r, preset, self.table, make_ordering(policies.ordering, preset),
                      make_preemption(policies.preemption, policies.ordering, preset),
                      RankPrefillDelayer(delayer) if delayer is not None else None)
            for r in range(preset.dp)
        ]
        self.mixed_steps = 0  # rank-steps whose prefill batch carried the rank's running decodes
        self.dispatcher = make_dispatcher(policies.dispatch, preset)
        if preset.dp > 1 and not ideal_balance and self.dispatcher.wants_lockstep():
            # every rank of the simulated DP-attention group runs each step in lockstep; the dispatcher prices it
            # with the step planner's model of the deployment
            sched = preset.scheduler
            chunk = sched.chunked_prefill_size if sched.chunked_prefill_size > 0 else sched.max_prefill_tokens
            self.dispatcher.set_lockstep(LockstepGroup(prior_model(self.cost), chunk, sched.enable_mixed_chunk))
        self.eplb = make_eplb(policies.eplb, preset)
        self.record_timeline = record_timeline
        self.notes: list[str] = [f"routing model: {self.routing.name}"]
        L, G = preset.model.moe_layers, preset.num_gpus
        self.expert_load = np.zeros((L, G))
        self.recent_gpu_load = np.full((L, G), 1.0)
        self.window_tokens = np.zeros(preset.dp)
        self.acc = {"bal_num": 0.0, "bal_den": 0.0, "cross": 0.0, "assign": 0.0, "migrations": 0, "stall_s": 0.0,
                    "rebalances": 0}
        self.timeline = {"time": [], "running": [], "waiting": [], "kv_used": []}
        self.now = 0.0
        self.steps = 0
        self.next_rebalance = preset.scheduler.eplb_rebalance_steps if self.eplb is not None else None
        # Routing drift: every routing_drift_steps steps the routing becomes a fresh draw around the base model
        # (RoutingModel.drift: popularity x exp(strength * sigma * N(0, 1)), sigma measured between recorded
        # DeepSeek-V3 windows), so a placement planned on one window is served on the next one.
        sched = preset.scheduler
        self.base_routing = self.routing
        self.next_drift = sched.routing_drift_steps if sched.routing_drift_steps > 0 else None
        if self.next_drift is not None and not self.routing.can_drift:
            raise ValueError(f"routing_drift_steps > 0 needs a routing model that drifts; {self.routing.name!r} "
                             "is fixed over time (use moe_routing.RoutingModel).")
        self.drift_rng = np.random.default_rng(seed + 7919)
        self.window_counts = None  # float [L, S, E] expected assignments since the last rebalance
        self.history: list[np.ndarray] = []  # last eplb_history_windows windows, oldest first
        self.drifts = 0
        self.last_refresh = -np.inf
        self._ls_signal_setup()
        if self.ls_signal_lag is not None and preset.dp > 1:
            # The DP-attention group's step-time model (the one the step planner and a live server's prior use):
            # orderings that price their LS caps with it (request tier: lockstep.ls_cap_pays) get it.
            model = prior_model(self.cost)
            for rs in self.ranks:
                rs.ordering.set_step_model(model, group_ranks=preset.dp)
        self.planner = make_planner(policies.step_plan, preset, self.cost)
        self.plans = 0  # steps the lockstep step plan shaped
        self.held = False  # the last plan held every rank's prefill (plan_hold_s)
        self.held_steps = 0  # steps run under such a plan

    # ---- engine tier ----------------------------------------------------------------------------------------
    def _pressure(self) -> np.ndarray:
        """Expert pressure per source rank: load of the GPUs its tokens go to, relative to the mean (1 = neutral)."""
        if not self.policies.expert_feedback:
            return np.ones(self.preset.dp)
        return expert_pressure(self.cost.gpu_probs, self.recent_gpu_load)  # [L, S, G] per-token shares, [L, G]

    def _snapshot(self) -> list[RankLoad]:
        t = self.table
        pressure = self._pressure()
        loads = []
        for rs in self.ranks:
            waiting = np.fromiter(rs.waiting, dtype=np.int64, count=len(rs.waiting))
            remaining = int((t.fill_len[waiting] - np.maximum(t.prefilled[waiting], 0)).sum()) if waiting.size else 0
            if rs.chunked is not None:
                remaining += int(t.fill_len[rs.chunked] - t.prefilled[rs.chunked])
            loads.append(RankLoad(
                rank=rs.rank, kv_capacity_tokens=rs.s.kv_capacity_tokens, kv_used_tokens=rs.kv_used(),
                remaining_prefill_tokens=remaining, queue_len=len(rs.waiting),
                running_reqs=len(rs.running) + (rs.chunked is not None), running_decode_tokens=rs.decode_context(),
                expert_pressure=float(pressure[rs.rank]), timestamp_s=self.now,
                waiting_tokens=int(t.fill_len[waiting].sum()) if waiting.size else 0,
            ))
        return loads

    def _dispatch(self, i: int) -> None:
        if self.now - self.last_refresh >= self.preset.scheduler.load_refresh_interval_s:
            self.dispatcher.update_loads(self._snapshot(), self.now)
            self.last_refresh = self.now
        w, t = self.workload, self.table
        session = None if w.session is None else str(int(w.session[i]))
        req = DispatchRequest(t.rid[i], int(t.input[i]), tuple(t.blocks[i]), session, int(t.priority[i]))
        rank = int(self.dispatcher.pick(req, self.now).rank)
        t.rank[i] = rank
        self.ranks[rank].enqueue(i, self.now)

    # ---- expert tier ----------------------------------------------------------------------------------------
    def _account_moe(self, stats: dict, tokens: np.ndarray, steps: int) -> None:
        load = stats.get("gpu_load")
        if load is None:
            return
        self.expert_load += load * steps
        if self.policies.expert_feedback:  # the only reader of the EMA
            self.recent_gpu_load = 0.99 ** steps * self.recent_gpu_load + (1 - 0.99 ** steps) * load
        self.acc["bal_num"] += steps * stats["bal_mean_sum"]
        self.acc["bal_den"] += steps * stats["bal_max_sum"]
        self.acc["cross"] += steps * stats["cross_assign"]
        self.acc["assign"] += steps * stats["total_assign"]
        self.window_tokens += tokens * steps

    def _flush_window(self) -> None:
        """Fold the tokens seen under the current routing into the window's expected expert counts."""
        if self.window_tokens.sum() <= 0:
            return
        counts = np.asarray(self.routing.expected_counts(self.window_tokens), dtype=float)
        self.window_counts = counts if self.window_counts is None else self.window_counts + counts
        self.window_tokens[:] = 0

    def _maybe_drift(self) -> None:
        if self.next_drift is None or self.steps < self.next_drift:
            return
        sched = self.preset.scheduler
        self.next_drift = self.steps + sched.routing_drift_steps
        if self.eplb is not None:
            self._flush_window()
        self.routing = self.base_routing.drift(self.drift_rng, sched.routing_drift_strength)
        self.cost.probs = token_probs(self.routing, self.preset.dp)
        self.cost.set_placement(self.cost.placement)
        self.drifts += 1

    def _maybe_rebalance(self) -> None:
        if self.next_rebalance is None or self.steps < self.next_rebalance:
            return
        self.next_rebalance = self.steps + self.preset.scheduler.eplb_rebalance_steps
        self._flush_window()
        if self.window_counts is None:
            return
        self.history = (self.history + [self.window_counts])[-max(1, self.preset.scheduler.eplb_history_windows):]
        self.window_counts = None
        p = self.preset
        nodes = max(1, p.num_gpus // p.hardware.gpus_per_node)
        old = self.cost.placement
        new = self.eplb.plan(ExpertStats(source_counts=np.stack(self.history)), p.num_slots, p.num_gpus, nodes, old)
        changed = new.phy2log != old.phy2log  # [L, P]
        moved = int(changed.sum())
        self.acc["rebalances"] += 1
        if moved:
            # Migration stall: every GPU receives its changed slots' weights; all ranks wait for the slowest.
            per_gpu = changed.reshape(changed.shape[0], p.num_gpus, -1).sum(axis=(0, 2))
            stall = float(per_gpu.max()) * p.expert_params * p.model.weight_bytes / p.hardware.intra_node_bytes_s
            self.now += stall
            self.acc["stall_s"] += stall
            self.acc["migrations"] += moved
            self.cost.set_placement(new)

    # ---- request tier: lockstep LS signal -------------------------------------------------------------------
    def _ls_signal_setup(self) -> None:
        """All DP-attention ranks run each forward step in lockstep (one group). Orderings that declare
        `lockstep_signal_lag_steps` and an `ls_priority` get the group's largest LS-waiting count each step (through
        their `observe_group_ls_waiting`): lag 1 = what SGLang's per-step MLP-sync all-gather delivers (counts
        taken after batch formation, used at the next step), lag 0 = the ideal same-step signal."""
        lags = {rs.ordering.lockstep_signal_lag_steps for rs in self.ranks}
        lag = lags.pop() if len(lags) == 1 else None
        ls_priority = self.ranks[0].ordering.ls_priority
        self.ls_signal_lag = lag if lag in (0, 1) and ls_priority is not None else None
        self.ls_min_priority = ls_priority

    def _publish_ls_signal(self, batches=None) -> None:
        """Each rank's count = LS requests waiting + LS requests in this step's prefill batch (incl. a chunked one)."""
        t, best, ls = self.table, 0, self.ls_min_priority
        for r, rs in enumerate(self.ranks):
            n = sum(1 for rid, _, _ in batches[r] if t.priority[rid] >= ls) if batches else 0
            if rs.waiting:
                idx = np.fromiter(rs.waiting, dtype=np.int64, count=len(rs.waiting))
                n += int((t.priority[idx] >= ls).sum())
            if rs.chunked is not None and t.priority[rs.chunked] >= ls and not batches:
                n += 1  # (with batches, a chunked LS request is in its rank's batch already)
            best = max(best, n)
        for rs in self.ranks:
            rs.group_ls_waiting = rs.ordering.observe_group_ls_waiting(best, self.now)

    def _plan_budgets(self) -> list:
        """Each rank's prefill budget from the group's step plan (None: upstream's budgets)."""
        self.held = False
        if self.planner is None or not any(rs.waiting or rs.chunked is not None for rs in self.ranks):
            return [None] * len(self.ranks)
        rates = arrival_rates(self.table, self.now, len(self.ranks))
        plan = self.planner.plan([rank_summary(rs, rs.ordering.ls_priority, rates[r], self.now)
                                  for r, rs in enumerate(self.ranks)])
        if not plan.planned:
            return [None] * len(self.ranks)
        self.plans += 1
        self.held = plan.held
        return list(plan.budgets)

    def _report_pending_first_tokens(self, ranks, batches, first_step_s: float) -> None:
        """cpu-tiny: first tokens of the last prefill on a rank are reported when this step ends on that rank."""
        for r, (rs, batch) in enumerate(zip(ranks, batches)):
            if self.first_token_pending[r] and (batch or rs.running):
                self.table.first_token[self.first_token_pending[r]] = self.now + first_step_s
                self.first_token_pending[r] = []

    def _new_shape_cost(self, tokens: np.ndarray, batches) -> float:
        """cpu-tiny: the first prefill of a token count on a rank costs new_shape_s + per-token extra. Ranks run in
        lockstep here, so the step pays the largest such cost (exact for one rank, the per-rank replay)."""
        hw = self.preset.hardware
        if not (hw.new_shape_s or hw.new_shape_per_token_s):
            return 0.0
        extra = 0.0
        for r, batch in enumerate(batches):
            n = int(tokens[r])
            if batch and n not in self.seen_shapes[r]:
                self.seen_shapes[r].add(n)
                extra = max(extra, hw.new_shape_s + hw.new_shape_per_token_s * n)
        return extra

    # ---- host-CPU contention (per-rank replay) --------------------------------------------------------------
    def _co_busy_at(self, now: float) -> tuple[bool, float | None]:
        """(another rank busy at `now`, the next time that changes or None); intervals sorted and disjoint."""
        i = int(np.searchsorted(self.co_end, now, side="right"))
        if i >= self.co_end.size:
            return False, None
        inside = bool(self.co_start[i] <= now)
        return inside, float(self.co_end[i] if inside else self.co_start[i])

    def _record_busy(self, start: float, end: float) -> None:
        if self.busy is None:
            return
        if self.busy and start <= self.busy[-1][1] + 1e-12:
            self.busy[-1][1] = end
        else:
            self.busy.append([start, end])

    # ---- upstream's prefill delayer and mixed chunking ------------------------------------------------------
    def _negotiated_prefill(self, ranks, budgets) -> list[list[tuple[int, int, int]]]:
        """One scheduler pass of every rank with upstream's prefill delayer: each rank's pass runs to where upstream
        negotiates (or ends: not prefillable), the ranks' infos are all-gathered, each rank's delayer takes the
        verdict, the passes finish; then each rank records its prefill batch size (upstream's finalize)."""
        max_running = self.preset.scheduler.max_running_requests
        batches: list = [[] for _ in ranks]
        asked: list = [None] * len(ranks)  # (running_batch, waiting_queue_len) where a pass negotiated
        passes, infos = {}, []
        for r, rs in enumerate(ranks):
            usage = rs.kv_used() / rs.s.kv_capacity_tokens  # upstream: max pool usage when the pass starts
            if rs.waiting or rs.chunked is not None:
                gen = rs.prefill_pass(self.now, budgets[r])
                try:
                    asked[r] = next(gen)
                    passes[r] = gen
                except StopIteration as done:
                    batches[r] = done.value
            running, queue = asked[r] if asked[r] is not None else (0, 0)
            infos.append(rs.delayer.info(prefillable=asked[r] is not None, token_usage=usage, running_batch=running,
                                         waiting_queue_len=queue, now_s=self.now))
        verdicts = [rs.delayer.decide(infos, max_running, self.now).allow for rs in ranks]
        for r, gen in passes.items():
            try:
                gen.send(verdicts[r])
            except StopIteration as done:
                batches[r] = done.value
            else:
                raise RuntimeError("prefill_pass negotiated twice in one pass")
        for r, rs in enumerate(ranks):
            actual = len(batches[r]) + (len(rs.running) if rs.mixes_running(batches[r]) else 0)
            attempted = estimate_attempted_prefill_bs(asked[r][0], max_running, asked[r][1]) if asked[r] else 0
            rs.delayer.observe_pass(actual, attempted)
        return batches

    # ---- main loop ------------------------------------------------------------------------------------------
    def _record(self) -> None:
        if self.record_timeline:
            tl = self.timeline
            tl["time"].append(self.now)
            tl["running"].append([len(r.running) + (r.chunked is not None) for r in self.ranks])
            tl["waiting"].append([len(r.waiting) for r in self.ranks])
            tl["kv_used"].append([r.kv_used() for r in self.ranks])

    def run(self) -> None:
        t, ranks, dp = self.table, self.ranks, self.preset.dp
        mixed_chunk = self.preset.scheduler.enable_mixed_chunk
        arrivals, n = t.arrival, t.n
        nxt = 0
        horizon = (arrivals[-1] if n else 0.0) + DRAIN_LIMIT_S
        while self.now <= horizon:
            while nxt < n and arrivals[nxt] <= self.now:
                self._dispatch(nxt)
                nxt += 1
            if self.ls_signal_lag == 0:
                self._publish_ls_signal()
            # A rank with nothing waiting and no chunk in flight cannot prefill: skip PrefillAdder entirely.
            budgets = self._plan_budgets()
            if ranks[0].delayer is not None:
                batches = self._negotiated_prefill(ranks, budgets)
            else:
                batches = [rs.schedule_prefill(self.now, budgets[r]) if (rs.waiting or rs.chunked is not None) else []
                           for r, rs in enumerate(ranks)]
            mixed = [rs.mixes_running(b) for rs, b in zip(ranks, batches)] if mixed_chunk else [False] * dp
            if self.ls_signal_lag == 1:  # gathered with this step's batch, used by the next step's scheduling
                self._publish_ls_signal(batches)
            any_prefill = any(batches)
            if not any_prefill and not any(rs.running for rs in ranks):
                for rs in ranks:
                    rs.on_group_idle()
                if ranks[0].delayer is not None and any(rs.delayer.state.wait is not None for rs in ranks):
                    # A delayed prefill on an otherwise idle group: upstream's loop keeps running passes without a
                    # forward; each is priced at step_overhead_s (assumed: the scheduler's per-step overhead).
                    self.now += self.preset.hardware.step_overhead_s
                    continue
                if nxt >= n:
                    break
                self.now = max(self.now, float(arrivals[nxt]))
                continue
            for rs, batch in zip(ranks, batches):
                if not batch and rs.running:
                    rs.retract_for_decode(self.now)
            tokens = np.zeros(dp)
            pairs = np.zeros(dp)
            ctx = np.zeros(dp)
            growth = np.zeros(dp)
            decode_reqs = np.zeros(dp) if any(mixed) else None  # decode rows of mixed prefill steps
            k = MAX_MACRO_STEPS
            for r, (rs, batch) in enumerate(zip(ranks, batches)):
                if batch:
                    tokens[r] = sum(e for _, e, _ in batch)
                    pairs[r] = sum(e * (p + (e + 1) / 2) for _, e, p in batch)
                    if mixed[r]:  # the running decodes ride in the same forward: one token each, their KV read
                        idx = np.fromiter(rs.running, dtype=np.int64, count=len(rs.running))
                        tokens[r] += idx.size
                        ctx[r] = float((t.input[idx] + t.generated[idx]).sum())
                        decode_reqs[r] = idx.size
                elif rs.running:
                    # One pass over the running set gives the context and the run length bound.
                    idx = np.fromiter(rs.running, dtype=np.int64, count=len(rs.running))
                    gen = t.generated[idx]
                    tokens[r] = growth[r] = idx.size
                    ctx[r] = float((t.input[idx] + gen).sum())
                    k = min(k, int((t.output[idx] - gen).min()), max(1, rs.free_for_alloc() // idx.size))
            if ranks[0].delayer is not None and any(rs.delayer.state.wait is not None for rs in ranks):
                k = 1  # a delayed prefill: the next pass negotiates again (no macro steps while a wait is on)
            if self.held:
                k = 1  # a held prefill: the next step plans again (the hold is bounded by the queue's wait)
                self.held_steps += 1
            other_busy, co_change = self._co_busy_at(self.now) if self.co_end.size else (False, None)
            if any_prefill:
                k = 1
                times, stats = self.cost.step_times(tokens, pairs, ctx, decode_reqs=decode_reqs)
                if other_busy:
                    times = times * self.cost.contention_scale(tokens > 0, True, True)
                times = times + self._new_shape_cost(tokens, batches)
            else:
                for boundary in (self.next_rebalance, self.next_drift):
                    if boundary is not None:
                        k = max(1, min(k, boundary - self.steps))
                # Price only the steps that can start before the next arrival or contention change (the run ends
                # at the first of them anyway).
                stops = [float(arrivals[nxt])] if nxt < n else []
                stops += [co_change] if co_change is not None else []
                until = min(stops) - self.now if stops else None
                times, stats = self.cost.step_times(tokens, pairs, ctx, growth, k, until)
                if other_busy:
                    times = times * self.cost.contention_scale(tokens > 0, False, True)
                k = min(k, times.size)
                if stops:
                    ends = self.now + np.cumsum(times)
                    k = min(k, int(np.searchsorted(ends, min(stops), side="left")) + 1)
            if self.preset.hardware.first_token_one_step_late:
                self._report_pending_first_tokens(ranks, batches, float(times[0]))
            self._record_busy(self.now, self.now + float(times[:k].sum()))
            self.now += float(times[:k].sum())
            self.steps += k
            self._account_moe(stats, tokens, k)
            for r, (rs, batch) in enumerate(zip(ranks, batches)):
                if batch:
                    if mixed[r]:  # the decodes first: the requests this prefill finishes join them afterwards
                        rs.advance_decode(1, self.now)
                        self.mixed_steps += 1
                    rs.finish_prefill(batch, self.now)
                    if self.preset.hardware.first_token_one_step_late:
                        self.first_token_pending[r] = [rid for rid, _, _ in batch if t.first_token[rid] == self.now
                                                       and np.isnan(t.finish[rid])]
                elif rs.running:
                    rs.advance_decode(k, self.now)
            self._record()
            self._maybe_rebalance()
            self._maybe_drift()
        frontend = self.preset.hardware.frontend_latency_s
        if frontend:  # a constant delay outside the ranks shifts every request's first token and finish alike
            t.first_token += frontend
            t.finish += frontend
            self.now += frontend


def simulate(preset, workload: Workload, policies: PolicySet | None = None, seed: int = 0,
             duration_s: float | None = None, *, ideal_balance: bool = False, routing: MoeRouting | None = None,
             record_timeline: bool = True, co_busy: np.ndarray | None = None,
             record_busy: bool = False, seen_prefill_shapes=None, lockstep_free: bool = False) -> SimResult:
    """Simulate `workload` on `preset` (a Preset or its name) under `policies`; deterministic for a seed.
    co_busy / record_busy: host-CPU contention of a per-rank replay (see the module docstring);
    seen_prefill_shapes: per rank, prefill token counts already run before the workload (cpu-tiny new-shape cost);
    lockstep_free: the reference bound without lockstep, each rank on its own clock (sim/lockstep.run_lockstep_free)."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    policies = policies or PolicySet()
    if duration_s is not None:
        keep = int(np.searchsorted(workload.arrival_s, duration_s, side="right"))
        workload = _head(workload, max(1, keep))
    start = time.perf_counter()
    sim = Simulation(preset, workload, policies, seed, ideal_balance, routing, record_timeline, co_busy, record_busy,
                     seen_prefill_shapes)
    if lockstep_free:
        sim.dispatcher.set_lockstep(None)  # the reference's ranks run on their own clocks
    run_lockstep_free(sim) if lockstep_free else sim.run()
    wall = time.perf_counter() - start
    result = build_result(sim, wall)
    if sim.busy is not None:
        result.busy = np.asarray(sim.busy, dtype=float).reshape(-1, 2)
    return result


def _head(w: Workload, n: int) -> Workload:
    cut = lambda a: None if a is None else a[:n]
    return replace(w, arrival_s=w.arrival_s[:n], input_tokens=w.input_tokens[:n], output_tokens=w.output_tokens[:n],
                   priority=w.priority[:n], class_of=w.class_of[:n], session=cut(w.session),
                   ignore_eos=cut(w.ignore_eos),
                   prefix_blocks=w.prefix_blocks[:n] if w.prefix_blocks else ())
