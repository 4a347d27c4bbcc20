"""Approximate per-rank prefix index keyed by chained KV-page hashes (what the DP controller believes each
rank's radix cache holds).

A prompt is cut into full pages of `block_tokens` tokens; page i's key hashes pages 0..i, so equal keys mean
equal prefixes (the scheme of vLLM's prefix caching and Dynamo's KV router). Each rank keeps its pages in a
dict (page key -> the insert that last touched it) bounded by its KV capacity in pages, evicted least recently
used first. An insert touches a prompt's pages leaf-first, so a prefix's root is always at least as recent as
its extensions: eviction trims leaves first, as RadixCache does, and every rank's pages stay prefix-closed.
Matching a prompt is then a binary search per rank over the prompt's pages.
"""
from __future__ import annotations

from collections import deque
from itertools import compress, repeat
from typing import Sequence

import numpy as np

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
