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
              + w_stall   * stall_rate[r] * max(0, pending + uncached - max_j pending_j)   # lockstep only

Lockstep stall (only when the caller set a `LockstepGroup`: DP attention with more than one rank; the term is
absent otherwise, and every cost is the same float64 as without it). In lockstep the group keeps running
prefill-length steps while any rank still has prefill queued, so a rank's queued prefill stalls the other ranks'
decodes only where it reaches past every other rank's: q on rank r adds max(0, pending_r + uncached_r - max_j
pending_j) tokens to the group's prefill horizon (the per-rank predicted prefill time after minus before, at
equal per-rank chunks), and each such token stalls the group by stall_rate[r] prefill-token equivalents:
(S_r - S_decode) / S_r, with S_r the step-time model's step where r prefills a chunk_tokens chunk and every other
rank decodes its running requests, S_decode the all-decode step (a queued token costs S_r / chunk_tokens seconds
of waiting, one stalled step S_r - S_decode seconds spread over its chunk_tokens tokens). stall_rate is computed
per snapshot (one batched model call over the ranks), so a decision adds five array operations.

Filters: inactive ranks are never candidates; ranks whose KV use (with optimistic charges) reaches
kv_overload_fraction are dropped unless every active rank is (overload escape). Picker: min cost; candidates less
than tie_tokens above it tie, and a tie goes to the rank whose prefix index holds the fewest pages, then to the
lowest rank index (upstream's DPBudget tie-break). Without the page count, idle ranks tie on every new prefix (or
differ by noise, e.g. a tenth of a token of expert pressure), so requests that arrive one at a time all land on one
rank: the other rank's cache stays empty and later load follows the cached prefixes to that one rank. The chosen
rank is charged optimistically (its pending prefill, KV and request count grow) until a snapshot newer than the
charge replaces it, so a burst between snapshots spreads instead of herding onto the rank that looked idlest.

Hot path: every request-independent term lives in one row of a float64 array (rows: prefill, decode, kv, queue,
static = decode + kv + queue, expert rate; one column per rank), refreshed when a snapshot or a charge changes it.
A decision is one prefix-index match (the ranks that hold the prompt's first page and how deep), an int array of
each rank's uncached tokens (n_in where a rank holds none; one int for every rank when none holds any), and five
numpy operations over the ranks (four more with the stall term): no Python-level pass over the ranks. The per-rank
score dicts of `Decision.scores` are built only when someone reads them (the adapter's debug log, tests), from a
copy of the rows taken at the pick. The arithmetic is the scalar formula's, term by term in the same order, so the
costs are the same float64 values a per-rank loop computes.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from typing import Iterator, Mapping, Sequence

import numpy as np

from tiersched.core.engine import Decision, Dispatcher, DispatchRequest, EngineTierConfig, LockstepGroup, RankLoad
from tiersched.core.engine.prefix_index import PageKeys, PrefixIndex, pack_keys

SCORER_NAMES = ("prefill", "prefix", "decode", "kv", "queue", "expert", "session")
STALL = "stall"  # the lockstep scorer: in Decision.scores only while a LockstepGroup is set and weight_stall > 0


class ScoreTable(Mapping):
    """Decision.scores of one pick: rank -> {scorer: weighted score, "total": cost} over the candidate ranks, in
    rank order. Holds what the pick saw (a copy of the dispatcher's term rows, the request's uncached tokens per
    holding rank, the session charge, the stall rates and horizon) and builds the columns and dicts on first read;
    a pick itself never needs them."""

    __slots__ = ("_ranks", "_num_ranks", "_inputs", "_table")

    def __init__(self, ranks: np.ndarray | None, num_ranks: int, inputs: tuple) -> None:
        self._ranks = range(num_ranks) if ranks is None else ranks  # int [C] candidate ranks
        self._num_ranks = num_ranks
        self._inputs = inputs
        self._table: dict[int, dict[str, float]] | None = None

    def _columns(self) -> dict[str, np.ndarray | float]:
        """The per-rank term arrays of the pick (float [num_ranks], or one float for every rank), computed as the
        pick computed the costs: prefix = w_prefix * uncached, expert = rate * (pending + uncached), stall =
        stall_rate * max(0, pending + uncached - horizon)."""
        terms, pending, cost, uncached, w_prefix, sticky_rank, session_cost, stall_rate, horizon = self._inputs
        prefix = w_prefix * uncached
        sticky = 0.0
        if sticky_rank >= 0:
            sticky = np.full(self._num_ranks, session_cost)
            sticky[sticky_rank] = 0.0
        columns = {"prefill": terms[0], "prefix": prefix, "decode": terms[1], "kv": terms[2], "queue": terms[3],
                   "expert": terms[5] * (pending + uncached), "session": sticky}
        if stall_rate is not None:
            excess = pending + uncached
            excess -= horizon
            np.maximum(excess, 0, out=excess)
            columns[STALL] = stall_rate * excess
        columns["total"] = cost
        return columns

    def _built(self) -> dict[int, dict[str, float]]:
        if self._table is None:
            ranks = list(self._ranks)
            cols = {name: (col[ranks].tolist() if isinstance(col, np.ndarray) else [float(col)] * len(ranks))
                    for name, col in self._columns().items()}
            names = (*SCORER_NAMES, STALL, "total") if STALL in cols else (*SCORER_NAMES, "total")
            self._table = {r: {name: cols[name][i] for name in names} for i, r in enumerate(ranks)}
            self._inputs = ()
        return self._table

    def __getitem__(self, rank: int) -> dict[str, float]:
        return self._built()[rank]

    def __iter__(self) -> Iterator[int]:
        return iter(self._built())

    def __len__(self) -> int:
        return len(self._ranks)

    def __repr__(self) -> str:
        return repr(self._built())


class ScoreDispatcher(Dispatcher):
    """tiersched's dispatch over `num_ranks` DP ranks (`--load-balance-method score`)."""

    name = "tiersched"

    def __init__(self, num_ranks: int, config: EngineTierConfig | None = None) -> None:
        self.config = config or EngineTierConfig()
        self.config.validate()
        self.num_ranks = num_ranks
        self._index = PrefixIndex(num_ranks, self.config.max_blocks_per_rank)
        self._unsettled: tuple[int, bytes | PageKeys] | None = None  # decide()'s index insert, until settle()
        self.loads: list[RankLoad] = [RankLoad(rank=r) for r in range(num_ranks)]
        self._opt_prefill = [0] * num_ranks
        self._opt_kv = [0] * num_ranks
        self._opt_reqs = [0] * num_ranks
        self._charges: list[deque[tuple[float, int, int]]] = [deque() for _ in range(num_ranks)]
        self._sessions: OrderedDict[str, tuple[int, int]] = OrderedDict()  # key -> (rank, context tokens)
        # Per-rank terms that do not depend on the request, refreshed when a snapshot or a charge changes them:
        # rows of one array (copied whole into a pick's ScoreTable).
        self._terms = np.zeros((6, num_ranks))  # rows: w_prefill * pending, decode, kv, queue, static, expert rate
        self._prefill, self._decode, self._kv, self._queue, self._static, self._expert_rate = self._terms
        self._pending = np.zeros(num_ranks, dtype=np.int64)  # remaining prefill + optimistic, tokens
        self._full = [False] * num_ranks  # KV use with optimistic charges at or above the overload fraction
        self._mean_capacity = 0.0
        self._cands: tuple[np.ndarray | None, dict[int, str]] | None = None  # candidates() cache
        # Lockstep stall term: None while off (no lockstep group, one rank, or weight_stall 0).
        self._lockstep: LockstepGroup | None = None
        self._stall_rate: np.ndarray | None = None  # float [num_ranks]: w_stall x (S_r - S_decode) / S_r
        self._pending_max = 0  # max over all ranks of _pending (the group's prefill horizon, tokens)

    @property
    def index(self) -> PrefixIndex:
        """The prefix index, with the last decision's insert applied (settle)."""
        self.settle()
        return self._index

    # --- snapshots -------------------------------------------------------------------------------------

    def update_loads(self, loads: Sequence[RankLoad], now_s: float) -> None:
        self.settle()
        grace = self.config.optimistic_grace_s
        block = self.config.block_tokens
        for load in loads:
            r = load.rank
            if not 0 <= r < self.num_ranks:
                raise ValueError(f"load for rank {r} but the dispatcher has {self.num_ranks} ranks")
            previous = self.loads[r]
            self.loads[r] = load
            if load.kv_capacity_tokens > 0 and load.kv_capacity_tokens != previous.kv_capacity_tokens:
                self._index.set_capacity(r, load.kv_capacity_tokens // block)
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
        self._cands = None
        for r in range(self.num_ranks):
            self._refresh(r)
        if self._lockstep is not None:
            self._refresh_stall()

    def wants_lockstep(self) -> bool:
        return self.num_ranks > 1 and self.config.weight_stall > 0

    @property
    def lockstep(self) -> LockstepGroup | None:
        """The lockstep group the stall term prices with (None: the term is off)."""
        return self._lockstep

    def set_lockstep(self, group: LockstepGroup | None) -> None:
        if group is not None and not isinstance(group, LockstepGroup):
            raise TypeError(f"set_lockstep takes a LockstepGroup or None, got {type(group).__name__}.")
        on = group is not None and self.wants_lockstep()
        self._lockstep = group if on else None
        self._stall_rate = None
        if on:
            # The R + 1 candidate steps' prefill columns do not change between snapshots: row 0 all ranks decode,
            # row 1 + r rank r prefills a chunk (its own causal pairs) and, without mixed chunking, does not decode.
            n, c = self.num_ranks, float(group.chunk_tokens)
            eye = np.eye(n)
            self._stall_tok = np.vstack([np.zeros(n), eye * c])  # [R + 1, R]
            self._stall_pairs = self._stall_tok * ((c + 1.0) / 2.0)
            self._stall_keep = np.vstack([np.ones(n), np.ones((n, n)) if group.mixed_chunk else 1.0 - eye])
            self._refresh_stall()

    def _refresh_stall(self) -> None:
        """stall_rate and the prefill horizon from the current snapshots (module docstring): one batched call of
        the step-time model over R + 1 candidate steps (all ranks decode; rank r prefills a chunk, the others
        decode)."""
        self._pending_max = int(self._pending.max())
        loads, keep = self.loads, self._stall_keep
        dc = np.fromiter([load.running_reqs for load in loads], dtype=float, count=self.num_ranks)
        dx = np.fromiter([load.running_decode_tokens for load in loads], dtype=float, count=self.num_ranks)
        s = np.asarray(self._lockstep.model.batch_seconds(self._stall_tok, self._stall_pairs, keep * dc, keep * dx),
                       dtype=float)
        step, s_decode = s[1:], s[0]
        stall = np.maximum(step - s_decode, 0.0)
        rate = np.divide(stall, step, out=np.zeros(self.num_ranks), where=step > 0)
        self._stall_rate = self.config.weight_stall * rate

    def _refresh(self, r: int) -> None:
        """Recompute rank r's request-independent terms (Python floats, stored exactly in the float64 arrays)."""
        cfg, load = self.config, self.loads[r]
        cap = load.kv_capacity_tokens
        pending = load.remaining_prefill_tokens + self._opt_prefill[r]
        prefill = cfg.weight_prefill * pending
        decode = cfg.weight_decode * load.running_decode_tokens
        kv_scale = self._mean_capacity / cap if cap > 0 else 1.0
        kv_used = load.kv_used_tokens + self._opt_kv[r]
        kv = cfg.weight_kv * kv_used * kv_scale
        queue = cfg.weight_queue * (load.queue_len + load.running_reqs + self._opt_reqs[r])
        static = decode + kv + queue
        rate = cfg.weight_expert * (load.expert_pressure - 1.0)
        self._pending[r] = pending
        self._terms[:, r] = (prefill, decode, kv, queue, static, rate)
        full = cap > 0 and kv_used >= cfg.kv_overload_fraction * cap
        if full != self._full[r]:
            self._full[r] = full
            self._cands = None

    def forget_cache(self, rank: int | None = None) -> None:
        """The rank's (or every rank's) radix cache was flushed: drop what the index believes it holds."""
        self.settle()
        self._index.clear(rank)

    # --- decision ------------------------------------------------------------------------------------

    def candidates(self) -> tuple[list[int], dict[int, str]]:
        """Filters: active ranks, minus KV-overloaded ones unless that would leave none."""
        ranks, filtered = self._candidates()
        return (list(range(self.num_ranks)) if ranks is None else ranks.tolist()), dict(filtered)

    def _candidates(self) -> tuple[np.ndarray | None, dict[int, str]]:
        """(candidate ranks as an int array, or None when every rank is one; why each other rank is not), cached
        until a snapshot or a rank's overload state changes."""
        if self._cands is not None:
            return self._cands
        loads, full_l = self.loads, self._full
        active = [load.rank for load in loads if load.active]
        filtered = {load.rank: "inactive" for load in loads if not load.active} if len(active) < len(loads) else {}
        if not active:
            raise RuntimeError("no active DP rank to dispatch to")
        full = [r for r in active if full_l[r]]
        if full and len(full) < len(active):
            for r in full:
                filtered[r] = "kv_overloaded"
            full_set = set(full)
            active = [r for r in active if r not in full_set]
        # (all full: the overload escape ranks every active rank by cost anyway)
        ranks = None if len(active) == self.num_ranks else np.array(active, dtype=np.int64)
        self._cands = (ranks, filtered)
        return self._cands

    def pick(self, req: DispatchRequest, now_s: float) -> Decision:
        decision = self.decide(req, now_s)
        self.settle()
        return decision

    def decide(self, req: DispatchRequest, now_s: float) -> Decision:
        """pick, but the prefix-index insert of the prompt's pages (and, for lazily hashed keys from page_keys, the
        hashing of the pages the match did not need) waits for settle(), so a caller can send the request on
        first. Every other state change is made here, and any read of the index settles first (the `index`
        property, pick, decide, record, update_loads, forget_cache), so the decisions are pick's."""
        self.settle()
        cfg = self.config
        ranks, filtered = self._candidates()
        filtered = dict(filtered) if filtered else {}
        block = cfg.block_tokens
        n_in = req.input_tokens
        keys = req.prefix_blocks
        if isinstance(keys, PageKeys):  # hashed only as far as the match needs
            held_ranks, depths = self._index.match_held_keys(keys) if len(keys) else ((), ())
        else:
            keys = pack_keys(keys) if keys else b""
            held_ranks, depths = self._index.match_held_packed(keys) if keys else ((), ())
        session = self._sessions.get(req.session_key) if req.session_key is not None else None
        sticky_rank = -1
        if session is not None and (session[0] in ranks if ranks is not None else 0 <= session[0] < self.num_ranks):
            sticky_rank = session[0]
        session_cost = cfg.weight_session * session[1] if sticky_rank >= 0 else 0.0

        # Every rank's cost, (((prefill + prefix) + static) + expert) + stall, as numpy operations over the ranks;
        # uncached is n_in on every rank that holds none of the prompt (one int for all when no rank holds any).
        if held_ranks:
            uncached = np.full(self.num_ranks, n_in, dtype=np.int64)
            uncached[held_ranks] = np.maximum(n_in - np.array(depths, dtype=np.int64) * block, 0)
        else:
            uncached = n_in
        w_prefix = cfg.weight_prefix
        pending = self._pending
        expert = pending + uncached
        expert = self._expert_rate * expert
        cost = self._prefill + w_prefix * uncached
        cost += self._static
        cost += expert
        stall_rate, horizon = self._stall_rate, self._pending_max
        if stall_rate is not None:  # lockstep: the tokens q adds past the group's prefill horizon, priced per rank
            excess = pending + uncached
            excess -= horizon
            np.maximum(excess, 0, out=excess)
            cost += stall_rate * excess
        if sticky_rank >= 0:  # every other rank pays the session's context (the sticky rank adds 0.0)
            keep = cost[sticky_rank]
            cost += session_cost
            cost[sticky_rank] = keep
        costs = cost if ranks is None else cost[ranks]
        best = int(costs.argmin())  # first minimum: ties keep the lower rank index
        if costs[best] != costs[best]:  # argmin returns the first NaN; a NaN cost (NaN load field) never wins
            if np.isnan(costs).all():
                raise RuntimeError("every candidate DP rank's cost is NaN; check the ranks' load snapshots")
            best = int(np.nanargmin(costs))
        if cfg.tie_tokens > 0 and len(costs) > 1:
            tied = (costs < costs[best] + cfg.tie_tokens).nonzero()[0]
            if len(tied) > 1:  # fewest pages held, then the lowest rank (tied is in rank order)
                blocks_on = self._index.blocks_on
                best = min(tied.tolist(), key=lambda i: blocks_on(i if ranks is None else int(ranks[i])))
        best_rank = best if ranks is None else int(ranks[best])
        best_hit = n_in - int(uncached[best_rank]) if held_ranks else 0
        # as they are before the charge below
        scores = ScoreTable(ranks, self.num_ranks, (self._terms.copy(), pending.copy(), cost, uncached, w_prefix,
                                                    sticky_rank, session_cost, stall_rate, horizon))
        self._charge(best_rank, req, best_hit, now_s)
        if len(keys):
            self._unsettled = (best_rank, keys)
        return Decision(rank=best_rank, expected_cached_tokens=best_hit, scores=scores, filtered=filtered)

    def record(self, rank: int, req: DispatchRequest, now_s: float) -> int:
        """Account a request that was routed to `rank` by someone else (e.g. an explicit routed_dp_rank);
        returns the cached tokens the index expected there."""
        self.settle()
        packed = pack_keys(req.prefix_blocks) if req.prefix_blocks else b""
        held_ranks, depths = self._index.match_held_packed(packed) if packed else ((), ())
        depth = depths[held_ranks.index(rank)] if rank in held_ranks else 0
        hit = min(depth * self.config.block_tokens, req.input_tokens)
        self._charge(rank, req, hit, now_s)
        if packed:
            self._index.insert_packed(rank, packed)
        return hit

    @property
    def settled(self) -> bool:
        """Whether the last decide()'s index insert has been applied."""
        return self._unsettled is None

    def settle(self) -> None:
        """Apply the last decide()'s prefix-index insert (hashing the rest of a lazily hashed prompt first)."""
        if self._unsettled is not None:
            rank, keys = self._unsettled
            self._unsettled = None
            self._index.insert_packed(rank, keys.packed if isinstance(keys, PageKeys) else keys)

    def _charge(self, rank: int, req: DispatchRequest, hit: int, now_s: float) -> None:
        uncached = req.input_tokens - hit
        self._opt_prefill[rank] += uncached
        self._opt_kv[rank] += uncached
        self._opt_reqs[rank] += 1
        self._charges[rank].append((now_s, uncached, uncached))
        self._refresh(rank)
        if self._pending[rank] > self._pending_max:
            self._pending_max = int(self._pending[rank])
        if req.session_key is not None:
            sessions = self._sessions
            sessions[req.session_key] = (rank, req.input_tokens)
            sessions.move_to_end(req.session_key)
            while len(sessions) > self.config.max_sessions:
                sessions.popitem(last=False)

    def pending_work(self) -> list[int]:
        """Per-rank uncached prefill tokens queued, as last reported plus optimistic charges."""
        return self._pending.tolist()

    def state_sizes(self) -> dict:
        """Sizes of the per-request state this dispatcher keeps (each bounded by its config; read by the live
        state report): prefix-index keys and blocks per rank, optimistic charges per rank, sessions."""
        return {"prefix_index_keys": len(self.index),
                "prefix_blocks_per_rank": [self.index.blocks_on(r) for r in range(self.num_ranks)],
                "prefix_blocks_max_per_rank": self.index.max_blocks_per_rank,
                "pending_charges_per_rank": [len(c) for c in self._charges],
                "sessions": len(self._sessions), "sessions_max": self.config.max_sessions}
