"""Score-based DP dispatch: filters -> weighted scorers -> picker (the shape of llm-d's scheduler), with costs
in prefill-token equivalents (Dynamo's KV router counts blocks; we count tokens, the pages are only the index
granularity).

For request q and candidate rank r (docs/engine-tier.md says why each term is there):

    uncached  = q.input_tokens - expected_hit(q, r)             # from the approximate prefix index
    pending   = r.remaining_prefill_tokens + optimistic_prefill[r]
    cost(r)   = w_prefill * pending
              + w_prefix  * uncached
              + w_decode  * r.running_decode_tokens
              + w_kv      * (r.kv_used_tokens + optimistic_kv[r]) * mean_capacity / r.kv_capacity_tokens  (mean over all ranks)
              + w_queue   * (r.queue_len + r.running_reqs + optimistic_reqs[r])
              + w_expert  * (r.expert_pressure - 1) * (pending + uncached)
              + w_session * session_tokens  if q's session is bound to another candidate rank

Filters: inactive ranks are never candidates; ranks whose KV use (with optimistic charges) reaches
kv_overload_fraction are dropped unless every active rank is (overload escape). Picker: min cost, ties to the
lowest rank index (upstream's DPBudget tie-break). The chosen rank is charged optimistically (its pending
prefill, KV and request count grow) until a snapshot newer than the charge replaces it, so a burst between
snapshots spreads instead of herding onto the rank that looked idlest.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from typing import Sequence

from tiersched.core.engine import Decision, Dispatcher, DispatchRequest, EngineTierConfig, RankLoad
from tiersched.core.engine.prefix_index import PrefixIndex

SCORER_NAMES = ("prefill", "prefix", "decode", "kv", "queue", "expert", "session")


class ScoreDispatcher(Dispatcher):
    """tiersched's dispatch over `num_ranks` DP ranks (`--load-balance-method score`)."""

    name = "tiersched"

    def __init__(self, num_ranks: int, config: EngineTierConfig | None = None) -> None:
        self.config = config or EngineTierConfig()
        self.config.validate()
        self.num_ranks = num_ranks
        self.index = PrefixIndex(num_ranks, self.config.max_blocks_per_rank)
        self.loads: list[RankLoad] = [RankLoad(rank=r) for r in range(num_ranks)]
        self._opt_prefill = [0] * num_ranks
        self._opt_kv = [0] * num_ranks
        self._opt_reqs = [0] * num_ranks
        self._charges: list[deque[tuple[float, int, int]]] = [deque() for _ in range(num_ranks)]
        self._sessions: OrderedDict[str, tuple[int, int]] = OrderedDict()  # key -> (rank, context tokens)
        # Per-rank terms that do not depend on the request, refreshed when a snapshot or a charge changes them
        # (keeps a decision to one cheap pass over the ranks).
        self._pending = [0] * num_ranks
        self._decode = [0.0] * num_ranks
        self._kv = [0.0] * num_ranks
        self._queue = [0.0] * num_ranks
        self._static = [0.0] * num_ranks
        self._expert_rate = [0.0] * num_ranks
        self._mean_capacity = 0.0

    # --- snapshots -------------------------------------------------------------------------------------

    def update_loads(self, loads: Sequence[RankLoad], now_s: float) -> None:
        grace = self.config.optimistic_grace_s
        block = self.config.block_tokens
        for load in loads:
            r = load.rank
            if not 0 <= r < self.num_ranks:
                raise ValueError(f"load for rank {r} but the dispatcher has {self.num_ranks} ranks")
            previous = self.loads[r]
            self.loads[r] = load
            if load.kv_capacity_tokens > 0 and load.kv_capacity_tokens != previous.kv_capacity_tokens:
                self.index.set_capacity(r, load.kv_capacity_tokens // block)
            if load.timestamp_s == previous.timestamp_s and load.timestamp_s != 0.0:
                continue  # the same snapshot read again: it reflects none of the charges made since
            # Charges made before the snapshot was taken are in it now (the request reached the rank).
            cutoff = load.timestamp_s - grace
            charges = self._charges[r]
            while charges and charges[0][0] <= cutoff:
                _, prefill, kv = charges.popleft()
                self._opt_prefill[r] -= prefill
                self._opt_kv[r] -= kv
                self._opt_reqs[r] -= 1
        caps = [load.kv_capacity_tokens for load in self.loads if load.kv_capacity_tokens > 0]
        self._mean_capacity = sum(caps) / len(caps) if caps else 0.0
        for r in range(self.num_ranks):
            self._refresh(r)

    def _refresh(self, r: int) -> None:
        cfg, load = self.config, self.loads[r]
        cap = load.kv_capacity_tokens
        self._pending[r] = load.remaining_prefill_tokens + self._opt_prefill[r]
        self._decode[r] = cfg.weight_decode * load.running_decode_tokens
        kv_scale = self._mean_capacity / cap if cap > 0 else 1.0
        self._kv[r] = cfg.weight_kv * (load.kv_used_tokens + self._opt_kv[r]) * kv_scale
        self._queue[r] = cfg.weight_queue * (load.queue_len + load.running_reqs + self._opt_reqs[r])
        self._static[r] = self._decode[r] + self._kv[r] + self._queue[r]
        self._expert_rate[r] = cfg.weight_expert * (load.expert_pressure - 1.0)

    def forget_cache(self, rank: int | None = None) -> None:
        """The rank's (or every rank's) radix cache was flushed: drop what the index believes it holds."""
        self.index.clear(rank)

    # --- decision ------------------------------------------------------------------------------------

    def candidates(self) -> tuple[list[int], dict[int, str]]:
        """Filters: active ranks, minus KV-overloaded ones unless that would leave none."""
        loads, opt_kv, limit = self.loads, self._opt_kv, self.config.kv_overload_fraction
        active = [load.rank for load in loads if load.active]
        filtered = {load.rank: "inactive" for load in loads if not load.active} if len(active) < len(loads) else {}
        if not active:
            raise RuntimeError("no active DP rank to dispatch to")
        full = [
            r for r in active
            if loads[r].kv_capacity_tokens > 0
            and loads[r].kv_used_tokens + opt_kv[r] >= limit * loads[r].kv_capacity_tokens
        ]
        if not full or len(full) == len(active):  # overload escape: all full, so rank them by cost anyway
            return active, filtered
        for r in full:
            filtered[r] = "kv_overloaded"
        full_set = set(full)
        return [r for r in active if r not in full_set], filtered

    def pick(self, req: DispatchRequest, now_s: float) -> Decision:
        cfg = self.config
        ranks, filtered = self.candidates()
        block = cfg.block_tokens
        n_in = req.input_tokens
        depth = self.index.match(req.prefix_blocks) if req.prefix_blocks else None
        session = self._sessions.get(req.session_key) if req.session_key is not None else None
        sticky_rank = session[0] if session is not None and session[0] in ranks else -1
        session_cost = cfg.weight_session * session[1] if sticky_rank >= 0 else 0.0

        w_prefill, w_prefix = cfg.weight_prefill, cfg.weight_prefix
        pending_l, static_l, expert_l = self._pending, self._static, self._expert_rate
        decode_l, kv_l, queue_l = self._decode, self._kv, self._queue
        scores: dict[int, dict[str, float]] = {}
        best_rank, best_cost, best_hit = -1, float("inf"), 0
        for r in ranks:
            if depth is None:
                hit = 0
            else:
                hit = depth[r] * block
                if hit > n_in:
                    hit = n_in
            uncached = n_in - hit
            pending = pending_l[r]
            prefill = w_prefill * pending
            prefix = w_prefix * uncached
            expert = expert_l[r] * (pending + uncached)
            sticky = session_cost if r != sticky_rank else 0.0
            cost = prefill + prefix + static_l[r] + expert + sticky
            scores[r] = {
                "prefill": prefill, "prefix": prefix, "decode": decode_l[r], "kv": kv_l[r], "queue": queue_l[r],
                "expert": expert, "session": sticky, "total": cost,
            }
            if cost < best_cost:  # strict: ties keep the lower rank index
                best_rank, best_cost, best_hit = r, cost, hit
        self._charge(best_rank, req, best_hit, now_s)
        return Decision(rank=best_rank, expected_cached_tokens=best_hit, scores=scores, filtered=filtered)

    def record(self, rank: int, req: DispatchRequest, now_s: float) -> int:
        """Account a request that was routed to `rank` by someone else (e.g. an explicit routed_dp_rank);
        returns the cached tokens the index expected there."""
        depth = self.index.match(req.prefix_blocks)[rank] if req.prefix_blocks else 0
        hit = min(depth * self.config.block_tokens, req.input_tokens)
        self._charge(rank, req, hit, now_s)
        return hit

    def _charge(self, rank: int, req: DispatchRequest, hit: int, now_s: float) -> None:
        uncached = req.input_tokens - hit
        self._opt_prefill[rank] += uncached
        self._opt_kv[rank] += uncached
        self._opt_reqs[rank] += 1
        self._charges[rank].append((now_s, uncached, uncached))
        self._refresh(rank)
        if req.prefix_blocks:
            self.index.insert(rank, req.prefix_blocks)
        if req.session_key is not None:
            sessions = self._sessions
            sessions[req.session_key] = (rank, req.input_tokens)
            sessions.move_to_end(req.session_key)
            while len(sessions) > self.config.max_sessions:
                sessions.popitem(last=False)

    def pending_work(self) -> list[int]:
        """Per-rank uncached prefill tokens queued, as last reported plus optimistic charges."""
        return list(self._pending)

    def state_sizes(self) -> dict:
        """Sizes of the per-request state this dispatcher keeps (each bounded by its config; read by the live
        state report): prefix-index keys and blocks per rank, optimistic charges per rank, sessions."""
        return {"prefix_index_keys": len(self.index),
                "prefix_blocks_per_rank": [self.index.blocks_on(r) for r in range(self.num_ranks)],
                "prefix_blocks_max_per_rank": self.index.max_blocks_per_rank,
                "pending_charges_per_rank": [len(c) for c in self._charges],
                "sessions": len(self._sessions), "sessions_max": self.config.max_sessions}
