"""Per-rank prefix cache: a block-hash LRU equivalent to upstream's RadixCache at page granularity.

Why not upstream's `sglang.srt.mem_cache.radix_cache.RadixCache`: it stores token-id tensors (torch) per node and
is called per request per step in the hot path; the simulator only needs (a) how many leading prompt pages are
cached, (b) lock/unlock while a request runs, (c) LRU eviction of unlocked pages. With chained page hashes (page i
hash covers tokens 0..i, as Mooncake's hash_ids and llm-d's KV events do) a flat dict gives the same answers:
a prefix match is the longest run of leading hashes present. Eviction order mirrors RadixCache's leaf-first LRU:
pages of one request are touched deepest-first, so a request's first page is its most recently used one.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence


class BlockLRUCache:
    def __init__(self, block_tokens: int):
        self.block_tokens = max(1, int(block_tokens))
        self._unlocked: OrderedDict[int, None] = OrderedDict()  # LRU first
        self._locked: dict[int, int] = {}  # hash -> lock count

    @property
    def total_tokens(self) -> int:
        return (len(self._unlocked) + len(self._locked)) * self.block_tokens

    @property
    def locked_tokens(self) -> int:
        return len(self._locked) * self.block_tokens

    @property
    def evictable_tokens(self) -> int:
        return len(self._unlocked) * self.block_tokens

    def match(self, blocks: Sequence[int]) -> int:
        """Number of leading blocks cached (locked or not)."""
        n = 0
        for h in blocks:
            if h in self._locked or h in self._unlocked:
                n += 1
            else:
                break
        return n

    def unlocked_tokens(self, blocks: Sequence[int]) -> int:
        """Tokens of `blocks` cached and not pinned (what pinning them takes out of the evictable pool)."""
        return sum(1 for h in blocks if h in self._unlocked) * self.block_tokens

    def lock(self, blocks: Sequence[int]) -> None:
        """Pin blocks (present or new) while a request uses them; new blocks are inserted."""
        for h in blocks:
            count = self._locked.get(h)
            if count is None:
                self._unlocked.pop(h, None)
                self._locked[h] = 1
            else:
                self._locked[h] = count + 1

    def unlock(self, blocks: Sequence[int]) -> None:
        """Release pins; blocks whose count drops to zero become evictable, deepest block least recent."""
        for h in reversed(blocks):
            count = self._locked.get(h)
            if count is None:
                continue
            if count > 1:
                self._locked[h] = count - 1
            else:
                del self._locked[h]
                self._unlocked[h] = None
                self._unlocked.move_to_end(h)

    def evict(self, tokens: int) -> int:
        """Evict least recently used unlocked blocks until `tokens` are freed; returns tokens freed."""
        freed = 0
        while freed < tokens and self._unlocked:
            self._unlocked.popitem(last=False)
            freed += self.block_tokens
        return freed
