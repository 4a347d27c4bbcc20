"""Approximate per-rank prefix index keyed by chained KV-page hashes (what the DP controller believes each
rank's radix cache holds).

A prompt is cut into full pages of `block_tokens` tokens; page i's key hashes page i's tokens together with
page i-1's key, so equal keys mean equal prefixes (the scheme of vLLM's prefix caching and Dynamo's KV router).
One dict maps key -> bitmask of ranks holding it, so matching a prompt against all ranks is one walk over its
pages; each rank also keeps an LRU list bounded by its KV capacity in pages. Pages are touched leaf-first so a
prefix's root is always more recent than its extensions: eviction trims leaves first, as RadixCache does.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np


def chained_block_hashes(token_ids: Sequence[int], block_tokens: int, seed: int = 0) -> tuple[int, ...]:
    """Keys of the full pages of `token_ids` (length n) -> tuple of n // block_tokens ints; a partial last
    page is not cacheable as a block and gets no key."""
    if block_tokens <= 0:
        raise ValueError("block_tokens must be positive")
    n_blocks = len(token_ids) // block_tokens
    if n_blocks == 0:
        return ()
    pages = np.asarray(token_ids[: n_blocks * block_tokens], dtype=np.int64).reshape(n_blocks, block_tokens)
    keys = []
    prev = seed
    for row in pages:
        prev = hash((prev, row.tobytes()))
        keys.append(prev)
    return tuple(keys)


class PrefixIndex:
    """Which ranks hold which prefix pages, with per-rank LRU eviction.

    capacity_blocks[r]: pages rank r can keep (its KV capacity / block_tokens, capped by max_blocks_per_rank).
    """

    def __init__(self, num_ranks: int, max_blocks_per_rank: int) -> None:
        if num_ranks <= 0 or max_blocks_per_rank <= 0:
            raise ValueError("num_ranks and max_blocks_per_rank must be positive")
        self.num_ranks = num_ranks
        self.max_blocks_per_rank = max_blocks_per_rank
        self.capacity_blocks = [max_blocks_per_rank] * num_ranks
        self._owners: dict[int, int] = {}  # key -> bitmask of ranks
        self._lru: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(num_ranks)]
        self._all_mask = (1 << num_ranks) - 1

    def __len__(self) -> int:
        """Number of (rank, page) entries held."""
        return sum(len(lru) for lru in self._lru)

    def blocks_on(self, rank: int) -> int:
        return len(self._lru[rank])

    def set_capacity(self, rank: int, capacity_blocks: int) -> None:
        """Keep rank's page count within what its KV pool can hold (evicting LRU pages)."""
        self.capacity_blocks[rank] = max(0, min(capacity_blocks, self.max_blocks_per_rank))
        self._evict(rank)

    def match(self, keys: Sequence[int]) -> list[int]:
        """Matched prefix length in pages per rank -> list of num_ranks ints (0..len(keys)).

        Each rank's pages are prefix-closed (leaf-first eviction), so the owner mask can only shrink along a
        prompt: bisect between pages whose masks differ instead of walking every page.
        """
        n = len(keys)
        depth = [0] * self.num_ranks
        if n == 0:
            return depth
        owners = self._owners
        first = owners.get(keys[0], 0)
        if not first:
            return depth
        last = owners.get(keys[-1], 0) & first
        self._set_depth(depth, last, n)
        spans = [(0, first, n - 1, last)]  # masks at both ends; the mask between is sandwiched by them
        while spans:
            i, mask_i, j, mask_j = spans.pop()
            if mask_i == mask_j:
                continue  # nobody drops out inside this span
            if j - i == 1:
                self._set_depth(depth, mask_i & ~mask_j, j)  # held pages 0..i, not page j
                continue
            mid = (i + j) // 2
            mask_mid = (owners.get(keys[mid], 0) & mask_i) | mask_j
            spans.append((mid, mask_mid, j, mask_j))
            spans.append((i, mask_i, mid, mask_mid))
        return depth

    @staticmethod
    def _set_depth(depth: list[int], mask: int, value: int) -> None:
        while mask:
            low = mask & -mask
            depth[low.bit_length() - 1] = value
            mask ^= low

    def insert(self, rank: int, keys: Sequence[int]) -> None:
        """Record that rank now caches this prefix (all of keys), then evict down to its capacity."""
        bit = 1 << rank
        lru = self._lru[rank]
        owners = self._owners
        for key in reversed(keys):  # leaf first: the root ends most recent, so eviction trims leaves
            if key in lru:
                lru.move_to_end(key)
            else:
                lru[key] = None
                owners[key] = owners.get(key, 0) | bit
        self._evict(rank)

    def clear(self, rank: int | None = None) -> None:
        """Forget one rank's pages (its cache was flushed) or every rank's."""
        ranks = range(self.num_ranks) if rank is None else (rank,)
        for r in ranks:
            lru = self._lru[r]
            while lru:
                self._drop(r, lru.popitem(last=False)[0])

    def _evict(self, rank: int) -> None:
        lru = self._lru[rank]
        cap = self.capacity_blocks[rank]
        while len(lru) > cap:
            self._drop(rank, lru.popitem(last=False)[0])

    def _drop(self, rank: int, key: int) -> None:
        mask = self._owners.get(key, 0) & ~(1 << rank)
        if mask:
            self._owners[key] = mask
        else:
            self._owners.pop(key, None)
