"""Frozen reference for test_engine_dispatch_equivalence.py: the engine tier's ScoreDispatcher, PrefixIndex and
page hashing as they were before the hot path moved to per-rank arrays (a per-rank Python loop building every
score dict; an index of key -> last-insert stamps with a list of inserts walked for LRU eviction). Kept verbatim so
that the rewritten code can be checked to make the same decisions; not used by the package."""
from __future__ import annotations

from collections import OrderedDict, deque
from itertools import compress, repeat
from typing import Sequence

import numpy as np

from tiersched.core.engine import Decision, Dispatcher, DispatchRequest, EngineTierConfig, RankLoad

# Page keys: each page's tokens hashed by Python's tuple hash (C, no per-token Python work), then chained over
# pages with a polynomial over Z/2^64 (key_i = sum_j page_j * Q^(i-j) + seed * Q^(i+1)), vectorised with numpy and
# finished with the splitmix64 mixer. A collision (~2^-64 per pair of different prefixes of one length) only makes
# the dispatcher expect a cache hit that is not there; the rank's radix cache compares the tokens themselves.
_Q = np.uint64(0x9E3779B97F4A7C15)  # odd, so invertible mod 2^64
_Q_INV = np.uint64(pow(int(_Q), -1, 1 << 64))
_POWERS: list[np.ndarray] = [np.ones(0, dtype=np.uint64), np.ones(0, dtype=np.uint64)]  # Q^i, Q^-i


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    if _POWERS[0].size < n:
        size = max(n, 2 * _POWERS[0].size, 1024)
        with np.errstate(over="ignore"):
            up = np.cumprod(np.full(size, _Q, dtype=np.uint64)) * _Q_INV  # Q^0 .. Q^(size-1)
            down = np.cumprod(np.full(size, _Q_INV, dtype=np.uint64)) * _Q
        _POWERS[:] = [up, down]
    return _POWERS[0][:n], _POWERS[1][:n]


def chained_block_hashes(token_ids: Sequence[int], block_tokens: int, seed: int = 0) -> tuple[int, ...]:
    """Keys of the full pages of `token_ids` (length n) -> tuple of n // block_tokens ints in [0, 2^64); a partial
    last page is not cacheable as a block and gets no key. Equal keys at page i <=> equal tokens 0..(i+1)*B-1 (up to
    hash collisions). Deterministic across processes (no per-process hash seed)."""
    if block_tokens <= 0:
        raise ValueError("block_tokens must be positive")
    n_blocks = len(token_ids) // block_tokens
    if n_blocks == 0:
        return ()
    if isinstance(token_ids, np.ndarray):
        token_ids = token_ids.tolist()  # Python ints hash like numpy's, and 10x faster through the tuple hash
    # zip over one iterator yields the consecutive full pages as tuples (a partial last page is dropped)
    pages = np.fromiter(map(hash, zip(*[iter(token_ids)] * block_tokens)), dtype=np.int64, count=n_blocks)
    up, down = _powers(n_blocks)
    with np.errstate(over="ignore"):
        keys = (np.cumsum(pages.view(np.uint64) * down) + np.uint64(seed % (1 << 64)) * _Q) * up
        keys ^= keys >> np.uint64(30)  # splitmix64 finaliser: spreads the linear chain over all bits
        keys *= np.uint64(0xBF58476D1CE4E5B9)
        keys ^= keys >> np.uint64(27)
        keys *= np.uint64(0x94D049BB133111EB)
        keys ^= keys >> np.uint64(31)
    return tuple(keys.tolist())


class PrefixIndex:
    """Which ranks hold which prefix pages, with per-rank LRU eviction.

    capacity_blocks[r]: pages rank r can keep (its KV capacity / block_tokens, capped by max_blocks_per_rank).
    Per rank: `_held` maps page key -> the number of the insert that last touched it; `_touches` lists the inserts
    oldest first as [insert number, keys, next position to look at (from the leaf end)]. Eviction walks it from the
    oldest insert, leaf to root, and drops a page only if that insert is still its last touch (a page touched
    again later is skipped there and met again at its newer insert): the order of an LRU list that moves every
    touched page to the end, without moving anything per page on an insert.
    """

    def __init__(self, num_ranks: int, max_blocks_per_rank: int) -> None:
        if num_ranks <= 0 or max_blocks_per_rank <= 0:
            raise ValueError("num_ranks and max_blocks_per_rank must be positive")
        self.num_ranks = num_ranks
        self.max_blocks_per_rank = max_blocks_per_rank
        self.capacity_blocks = [max_blocks_per_rank] * num_ranks
        self._held: list[dict[int, int]] = [{} for _ in range(num_ranks)]
        self._touches: list[deque[list]] = [deque() for _ in range(num_ranks)]
        self._queued = [0] * num_ranks  # keys listed in _touches[r] not yet walked past
        self._inserts = 0

    def __len__(self) -> int:
        """Number of (rank, page) entries held."""
        return sum(len(held) for held in self._held)

    def blocks_on(self, rank: int) -> int:
        return len(self._held[rank])

    def holds(self, rank: int, key: int) -> bool:
        return key in self._held[rank]

    def set_capacity(self, rank: int, capacity_blocks: int) -> None:
        """Keep rank's page count within what its KV pool can hold (evicting LRU pages)."""
        self.capacity_blocks[rank] = max(0, min(capacity_blocks, self.max_blocks_per_rank))
        self._evict(rank)

    def match(self, keys: Sequence[int]) -> list[int]:
        """Matched prefix length in pages per rank -> list of num_ranks ints (0..len(keys)).

        Each rank's pages are prefix-closed (leaf-first eviction), so a binary search over the prompt's pages
        finds how far it holds the prompt; most ranks hold not even the first page (one lookup)."""
        n = len(keys)
        depth = [0] * self.num_ranks
        if n == 0:
            return depth
        first, last = keys[0], keys[-1]
        for r, held in enumerate(self._held):
            if first not in held:
                continue
            if last in held:
                depth[r] = n
                continue
            lo, hi = 0, n - 1  # keys[lo] held, keys[hi] not
            while hi - lo > 1:
                mid = (lo + hi) >> 1
                if keys[mid] in held:
                    lo = mid
                else:
                    hi = mid
            depth[r] = lo + 1
        return depth

    def insert(self, rank: int, keys: Sequence[int]) -> None:
        """Record that rank now caches this prefix (all of keys), then evict down to its capacity."""
        if not keys:
            return
        self._inserts += 1
        keys = tuple(keys)
        self._held[rank].update(dict.fromkeys(keys, self._inserts))
        self._touches[rank].append([self._inserts, keys, len(keys) - 1])
        self._queued[rank] += len(keys)
        self._evict(rank)
        if self._queued[rank] > 4 * len(self._held[rank]) + 4096:
            self._compact(rank)

    def clear(self, rank: int | None = None) -> None:
        """Forget one rank's pages (its cache was flushed) or every rank's."""
        for r in range(self.num_ranks) if rank is None else (rank,):
            self._held[r].clear()
            self._touches[r].clear()
            self._queued[r] = 0

    def _evict(self, rank: int) -> None:
        held = self._held[rank]
        excess = len(held) - self.capacity_blocks[rank]
        touches = self._touches[rank]
        while excess > 0:
            touch = touches[0]
            number, keys, pos = touch
            leaf_first = keys[pos::-1]
            # the pages this insert is still the last touch of, leaf first (C-level iterators: no per-page bytecode)
            live = list(compress(leaf_first, map(number.__eq__, map(held.get, leaf_first, repeat(-1)))))
            if len(live) <= excess:  # the whole insert goes
                deque(map(held.__delitem__, live), maxlen=0)
                excess -= len(live)
                touches.popleft()
                self._queued[rank] -= pos + 1
                continue
            while excess > 0:  # the oldest insert goes in part: walk it leaf first
                key = keys[pos]
                pos -= 1
                self._queued[rank] -= 1
                if held.get(key) == number:
                    del held[key]
                    excess -= 1
            touch[2] = pos

    def _compact(self, rank: int) -> None:
        """Drop the listed touches that are no longer a page's last one (pages touched again and again while the
        rank never reaches its capacity would otherwise grow the list without bound)."""
        held, kept, queued = self._held[rank], deque(), 0
        for number, keys, pos in self._touches[rank]:
            live = tuple(k for k in keys[: pos + 1] if held.get(k) == number)
            if live:
                kept.append([number, live, len(live) - 1])
                queued += len(live)
        self._touches[rank], self._queued[rank] = kept, queued


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
            if cost < best_cost:  # strict: equal costs keep the lower rank index
                best_rank, best_cost, best_hit = r, cost, hit
        if cfg.tie_tokens > 0 and best_rank >= 0:  # near ties: fewest pages held, then the lower rank index
            tied = [r for r in ranks if scores[r]["total"] < best_cost + cfg.tie_tokens]
            best_rank = min(tied, key=lambda r: (self.index.blocks_on(r), r))
            best_hit = min((depth[best_rank] if depth is not None else 0) * block, n_in)
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
