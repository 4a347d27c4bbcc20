"""Approximate per-rank prefix index keyed by chained KV-page hashes (what the DP controller believes each
rank's radix cache holds).

A prompt is cut into full pages of `block_tokens` tokens; page i's key hashes pages 0..i, so equal keys mean
equal prefixes (the scheme of vLLM's prefix caching and Dynamo's KV router). Each rank keeps its pages as a radix
tree, like the rank's own RadixCache: a node holds a run of consecutive page keys, and a prompt's pages are one
root-to-leaf walk. Each rank's pages are bounded by its KV capacity in pages and evicted least recently used first,
page by page: an insert touches the prompt's pages leaf first, so a prefix's root is always at least as recent as
its extensions, eviction trims leaves first, as RadixCache does, and every rank's pages stay prefix-closed.
Matching walks the tree; the keys are chained, so a page key appears at one place in a rank's tree only.

The index stores keys packed: each key mod 2^64 as 8 little-endian bytes, a run of keys one `bytes` object
(`pack_keys`). Comparing a prompt with a run is then one memcmp (`bytes.startswith`), a split or a trim one memcpy,
and no Python int per page is kept or touched (8 bytes a page instead of a pointer and a 32-byte int object). Keys
that are equal mod 2^64 are the same page to the index (for chained_block_hashes' keys, which are < 2^64, only
equal keys are).
"""
from __future__ import annotations

import struct
import sys
from collections import OrderedDict
from itertools import compress, islice, repeat
from typing import Sequence

import numpy as np

# Page keys: each page's tokens hashed by Python's tuple hash (C, no per-token Python work), then chained over
# pages with a polynomial over Z/2^64 (key_i = sum_j page_j * Q^(i-j) + seed * Q^(i+1)), vectorised with numpy. The
# position-dependent powers of Q matter: Python's tuple hash is close to additive in its items (add, rotate,
# multiply by constants), so a plain running sum of page hashes would collide for prompts whose pages hold the same
# small tokens in another order. No finishing mixer: a mixer (e.g. splitmix64's) is a bijection of Z/2^64, so it
# changes no collision, and the keys are only compared for equality and used as dict keys. A collision (~2^-64 per
# pair of different prefixes of one length) only makes the dispatcher expect a cache hit that is not there; the
# rank's radix cache compares the tokens themselves, so a wrong key never changes what a request computes.
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


def _chain(token_ids: Sequence[int], block_tokens: int, seed: int) -> np.ndarray:
    """The page keys of chained_block_hashes as a uint64 array [n // block_tokens]."""
    if block_tokens <= 0:
        raise ValueError("block_tokens must be positive")
    n_blocks = len(token_ids) // block_tokens
    if n_blocks == 0:
        return np.zeros(0, dtype=np.uint64)
    if isinstance(token_ids, np.ndarray):
        token_ids = token_ids.tolist()  # Python ints hash like numpy's, and 10x faster through the tuple hash
    # zip over one iterator yields the consecutive full pages as tuples (a partial last page is dropped)
    pages = np.fromiter(map(hash, zip(*[iter(token_ids)] * block_tokens)), dtype=np.int64, count=n_blocks)
    up, down = _powers(n_blocks)
    keys = pages.view(np.uint64)
    keys *= down  # unsigned integer arrays wrap mod 2^64 silently
    np.add.accumulate(keys, out=keys)  # (np.cumsum adds ~5 us of dispatch per call)
    if seed % (1 << 64):
        keys += np.uint64(seed * int(_Q) % (1 << 64))
    keys *= up
    return keys


def chained_block_hashes(token_ids: Sequence[int], block_tokens: int, seed: int = 0) -> tuple[int, ...]:
    """Keys of the full pages of `token_ids` (length n) -> tuple of n // block_tokens ints in [0, 2^64); a partial
    last page is not cacheable as a block and gets no key. Equal keys at page i <=> equal tokens 0..(i+1)*B-1 (up to
    hash collisions). Deterministic across processes (no per-process hash seed).

    Cost: one C-level pass over the ids (`zip` over one iterator cuts the pages, `map(hash)` hashes each as a tuple)
    plus three in-place numpy passes over the n // B page hashes. The ids arrive as a Python list; converting them to
    a numpy array costs more per token than this whole pass (`bench engine` prints the one-pass floor
    `hash(tuple(ids))` beside the hashing time), so only the per-page chain is vectorised."""
    return tuple(_chain(token_ids, block_tokens, seed).tolist())


def page_keys(token_ids: Sequence[int], block_tokens: int, seed: int = 0) -> "PageKeys":
    """chained_block_hashes' keys held packed (PageKeys), hashed lazily: what the DP-controller adapter puts in a
    DispatchRequest. Nothing is hashed here; the prefix match hashes pages only as far as the ranks' trees reach
    (PrefixIndex.match_held_keys), the index insert after the decision hashes the rest, and any other read of
    the keys (`packed`, iteration, equality) hashes them all. The keys are the same uint64 values either way."""
    if block_tokens <= 0:
        raise ValueError("block_tokens must be positive")
    return PageKeys(b"", _PageHasher(token_ids, block_tokens, seed))


class _PageHasher:
    """The chain of _chain, computed a run of pages at a time: carry = sum over the pages hashed so far of
    page_j * Q^-j (+ seed * Q), so the keys of pages i..k are (carry + cumsum(page_j * Q^-j)) * Q^j, the same
    uint64 values as one pass over all pages."""

    __slots__ = ("pages", "total", "done", "carry")

    def __init__(self, token_ids: Sequence[int], block_tokens: int, seed: int) -> None:
        if isinstance(token_ids, np.ndarray):
            token_ids = token_ids.tolist()  # Python ints hash like numpy's, and 10x faster through the tuple hash
        self.total = len(token_ids) // block_tokens
        self.pages = zip(*[iter(token_ids)] * block_tokens)  # consecutive full pages as tuples, consumed in order
        self.done = 0
        self.carry = seed * int(_Q) % (1 << 64)

    def next_run(self, count: int) -> bytes:
        """The packed keys of the next `count` pages (fewer at the end)."""
        count = min(count, self.total - self.done)
        if count <= 0:
            return b""
        if count == 1 and self.done == 0:  # the first page alone (the match's first look-up): Q^0 = 1, no numpy
            self.carry = key = (hash(next(self.pages)) + self.carry) & _MASK
            self.done = 1
            return key.to_bytes(8, "little")
        done = self.done
        end = done + count
        up, down = _powers(end)
        keys = np.fromiter(map(hash, islice(self.pages, count)), dtype=np.int64, count=count).view(np.uint64)
        keys *= down[done:]
        keys[0] = (int(keys[0]) + self.carry) & _MASK  # the chain so far, carried into this run
        np.add.accumulate(keys, out=keys)  # (np.cumsum adds ~5 us of dispatch per call)
        self.carry = int(keys[-1])
        keys *= up[done:]
        self.done = end
        return keys.tobytes() if _LITTLE else keys.astype("<u8").tobytes()


_MASK = (1 << 64) - 1
_LITTLE = sys.byteorder == "little"


def pack_keys(keys: Sequence[int]) -> bytes:
    """Page keys as the index stores them: each key mod 2^64, 8 bytes little-endian, concatenated (8 * len bytes)."""
    if isinstance(keys, PageKeys):
        return keys.packed
    try:
        return struct.pack(f"<{len(keys)}Q", *keys)
    except struct.error:  # a key < 0 or >= 2^64 (e.g. a signed hash): reduce it mod 2^64
        return struct.pack(f"<{len(keys)}Q", *(int(k) & _MASK for k in keys))


def _unpack(run: bytes) -> tuple[int, ...]:
    return struct.unpack(f"<{len(run) >> 3}Q", run)


class PageKeys(Sequence[int]):
    """A prompt's page keys, packed as the index stores them (pack_keys); reads as the tuple of ints it packs (equal
    to it, same hash), so a DispatchRequest may carry either. Built by page_keys, which hashes lazily: `packed`
    holds every key (hashing what is left on first read), `prefix(n)` at least the first n."""

    __slots__ = ("_packed", "_hasher")

    def __init__(self, packed: bytes, hasher: "_PageHasher | None" = None) -> None:
        if len(packed) % 8:
            raise ValueError(f"packed page keys are 8 bytes each; got {len(packed)} bytes")
        self._packed = packed
        self._hasher = hasher if hasher is not None and hasher.done < hasher.total else None

    @property
    def packed(self) -> bytes:
        if self._hasher is not None:
            self._packed += self._hasher.next_run(self._hasher.total)
            self._hasher = None
        return self._packed

    def prefix(self, pages: int) -> bytes:
        """The packed keys hashed so far, after hashing up to `pages` pages (all of them, if fewer)."""
        hasher = self._hasher
        if hasher is not None and hasher.done < pages:
            self._packed += hasher.next_run(pages - hasher.done)
            if hasher.done == hasher.total:
                self._hasher = None
        return self._packed

    @property
    def hashed(self) -> int:
        """Pages hashed so far."""
        return len(self._packed) >> 3

    def __len__(self) -> int:
        return self._hasher.total if self._hasher is not None else len(self._packed) >> 3

    def __getitem__(self, i):  # an int or a slice, as on the tuple (slices are tuples)
        return _unpack(self.packed)[i]

    def __iter__(self):
        return iter(_unpack(self.packed))

    def __eq__(self, other) -> bool:
        if isinstance(other, PageKeys):
            return self.packed == other.packed
        if isinstance(other, tuple):
            return _unpack(self.packed) == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(_unpack(self.packed))

    def __repr__(self) -> str:
        return f"PageKeys({list(self)!r})"


class _Node:
    """A run of consecutive pages of one rank's tree: `run` their packed keys (root side first, 8 bytes a page),
    `children` the next runs keyed by their first packed key."""

    __slots__ = ("run", "children", "parent")

    def __init__(self, run: bytes, parent: "_Node | None") -> None:
        self.run = run
        self.children: dict[bytes, _Node] = {}
        self.parent = parent


def _common(run: bytes, packed: bytes, start: int) -> int:
    """Bytes (whole keys) of the common prefix of run and packed[start:]: the two spans read as little-endian ints
    and XORed, so the lowest set bit is in the first differing byte (two C-level passes, no Python work per key)."""
    if packed.startswith(run, start):
        return len(run)
    span = min(len(run), len(packed) - start)
    diff = int.from_bytes(run[:span], "little") ^ int.from_bytes(packed[start : start + span], "little")
    if not diff:
        return span
    return ((diff & -diff).bit_length() - 1) >> 6 << 3


def _advance(packed: bytes, i: int, node: _Node, j: int) -> tuple[int, "_Node | None", int]:
    """Continue a walk that has matched packed[:i] and is j bytes into node's run: (bytes matched, and None when
    it met a miss, or the node and offset where packed ran out, to be resumed on a longer packed)."""
    n = len(packed)
    while True:
        run = node.run
        if j < len(run):
            part = run if j == 0 else memoryview(run)[j:]
            if not packed.startswith(part, i):  # the prompt leaves this run, or packed ends inside it
                if run.startswith(memoryview(packed)[i:] if i else packed, j):  # packed ends inside it: resume there
                    return n, node, j + n - i
                return i + _common(part, packed, i), None, 0
            i += len(run) - j
        if i == n:
            return i, node, len(run)
        node = node.children.get(packed[i : i + 8])
        if node is None:
            return i, None, 0
        j = 0


class PrefixIndex:
    """Which ranks hold which prefix pages, with per-rank LRU eviction of pages.

    capacity_blocks[r]: pages rank r can keep (its KV capacity / block_tokens, capped by max_blocks_per_rank).
    Per rank: a radix tree of page runs (`_roots[r]`), the page count, and `_lru[r]`, the tree's nodes from least
    to most recently touched. An insert walks the prompt's path, splits the node where the prompt leaves it, adds one
    node for the pages it brings, merges each path node with its only child when that child is on the path too, and
    moves the path's nodes to the recent end leaf first; every page of a node was last touched by the same insert,
    so the page-level LRU order is the node order with each node's pages leaf first, and the oldest node is always
    a leaf. Eviction trims the oldest leaves from their tail. An insert or a match costs a few dict operations and
    memcmp/memcpy calls per node on the path, not Python work per page. `match_held_packed` and `insert_packed`
    take the keys already packed (`pack_keys`), so a caller doing both packs once.
    """

    def __init__(self, num_ranks: int, max_blocks_per_rank: int) -> None:
        if num_ranks <= 0 or max_blocks_per_rank <= 0:
            raise ValueError("num_ranks and max_blocks_per_rank must be positive")
        self.num_ranks = num_ranks
        self.max_blocks_per_rank = max_blocks_per_rank
        self.capacity_blocks = [max_blocks_per_rank] * num_ranks
        self._roots = [_Node(b"", None) for _ in range(num_ranks)]
        self._tops = [root.children for root in self._roots]  # first page's packed key -> node, per rank
        self._lru: list[OrderedDict[_Node, None]] = [OrderedDict() for _ in range(num_ranks)]
        self._pages = [0] * num_ranks
        self._ranks = range(num_ranks)

    def __len__(self) -> int:
        """Number of (rank, page) entries held."""
        return sum(self._pages)

    def blocks_on(self, rank: int) -> int:
        return self._pages[rank]

    def holds(self, rank: int, key: int) -> bool:
        """Whether rank holds the page with this key (a scan of its tree: for checks, not the hot path)."""
        key = int(key) & _MASK
        return any(key in _unpack(node.run) for node in self._lru[rank])

    def pages_lru(self, rank: int) -> list[int]:
        """rank's page keys (mod 2^64) from least to most recently touched (the order eviction takes them)."""
        return [key for node in self._lru[rank] for key in reversed(_unpack(node.run))]

    def set_capacity(self, rank: int, capacity_blocks: int) -> None:
        """Keep rank's page count within what its KV pool can hold (evicting LRU pages)."""
        self.capacity_blocks[rank] = max(0, min(capacity_blocks, self.max_blocks_per_rank))
        self._evict(rank)

    def match(self, keys: Sequence[int]) -> list[int]:
        """Matched prefix length in pages per rank -> list of num_ranks ints (0..len(keys))."""
        depth = [0] * self.num_ranks
        for r, d in zip(*self.match_held(keys)):
            depth[r] = d
        return depth

    def match_held(self, keys: Sequence[int]) -> tuple[list[int], list[int]]:
        """(ranks that hold at least the first page, in rank order; matched prefix length in pages on each)."""
        return self.match_held_packed(pack_keys(keys)) if len(keys) else ([], [])

    def match_held_packed(self, packed: bytes) -> tuple[list[int], list[int]]:
        """match_held for keys packed by pack_keys. The ranks that hold not even the first page are skipped in one
        C-level pass over the ranks' roots; on the others the walk compares whole runs (memcmp) and stops at the
        first miss."""
        if not packed:
            return [], []
        ranks = list(compress(self._ranks, map(dict.__contains__, self._tops, repeat(packed[:8]))))
        return ranks, self._walk(packed, ranks)

    def match_held_keys(self, keys: "PageKeys", min_step: int = 8) -> tuple[list[int], list[int]]:
        """match_held for lazily hashed keys (page_keys), hashing pages only as far as some rank's walk can still
        match. The first page finds each holding rank's first run; then, in rounds, the keys are hashed up to the
        nearest end of a run that an unfinished walk is in, plus one page (a walk inside a run can match at most to
        its end, and the page after it decides: a child or a miss), and at least `min_step` pages more, and the
        unfinished walks resume where they stopped. A walk that stops before the last key hashed met a miss there
        and is final (the keys after it cannot change it). The answer is match_held_packed's over all the keys."""
        total = len(keys)
        if total == 0:
            return [], []
        packed = keys.prefix(1)
        first, tops = packed[:8], self._tops
        ranks = list(compress(self._ranks, map(dict.__contains__, tops, repeat(first))))
        depths = [1] * len(ranks)
        # (index in ranks, node, bytes into its run) of each unfinished walk; all have matched packed[:start]
        walks = [(k, tops[r][first], 0) for k, r in enumerate(ranks)]
        start = 0
        while walks:
            reach = min((start - j + len(node.run)) >> 3 for _, node, j in walks) + 1
            packed = keys.prefix(max(reach, (start >> 3) + min_step))
            n = len(packed)
            still = []
            for k, node, j in walks:
                i, node, j = _advance(packed, start, node, j)
                depths[k] = i >> 3
                if node is not None:
                    still.append((k, node, j))
            if n >> 3 >= total:
                break
            walks, start = still, n
        return ranks, depths

    def _walk(self, packed: bytes, ranks: list[int]) -> list[int]:
        """Matched pages of packed on each of `ranks` (each holds packed's first page)."""
        n, first, tops = len(packed), packed[:8], self._tops
        depths: list[int] = []
        append = depths.append
        for r in ranks:
            node, i = tops[r][first], 0
            while True:
                run = node.run
                if not packed.startswith(run, i):  # the prompt leaves or ends inside this run
                    i += _common(run, packed, i)
                    break
                i += len(run)
                if i == n:
                    break
                node = node.children.get(packed[i : i + 8])
                if node is None:
                    break
            append(i >> 3)
        return depths

    def insert(self, rank: int, keys: Sequence[int]) -> None:
        """Record that rank now caches this prefix (all of keys), then evict down to its capacity."""
        if len(keys):
            self.insert_packed(rank, pack_keys(keys))

    def insert_packed(self, rank: int, packed: bytes) -> None:
        """insert for keys packed by pack_keys."""
        n = len(packed)
        if n == 0:
            return
        lru, parent, i, path = self._lru[rank], self._roots[rank], 0, []
        while i < n:
            head_key = packed[i : i + 8]
            node = parent.children.get(head_key)
            if node is None:  # the rest of the prompt is new: one node
                node = _Node(packed[i:], parent)
                parent.children[head_key] = node
                lru[node] = None
                self._pages[rank] += (n - i) >> 3
                path.append(node)
                break
            run = node.run
            m = _common(run, packed, i)
            if m < len(run):  # the prompt leaves (or ends inside) this run: split off the untouched tail
                head = _Node(run[:m], parent)
                parent.children[head_key] = head
                node.run = run[m:]
                node.parent = head
                head.children[node.run[:8]] = node
                lru[head] = None
                node = head
            path.append(node)
            parent = node
            i += m
        # Every node on the path was touched now: a path node whose only child is the next path node merges with
        # it (their pages are adjacent in the LRU order, the child's first), so chains of single-child nodes left
        # by splits close up again and walks stay as short as the prompts' branch points.
        kept = [path[0]]
        for node in path[1:]:
            top = kept[-1]
            if len(top.children) == 1:
                top.run += node.run
                top.children = node.children
                for child in top.children.values():
                    child.parent = top
                del lru[node]
            else:
                kept.append(node)
        for node in reversed(kept):  # leaf first: the root side ends up most recent
            lru.move_to_end(node)
        if self._pages[rank] > self.capacity_blocks[rank]:
            self._evict(rank)

    def clear(self, rank: int | None = None) -> None:
        """Forget one rank's pages (its cache was flushed) or every rank's."""
        for r in range(self.num_ranks) if rank is None else (rank,):
            self._roots[r].children.clear()
            self._lru[r].clear()
            self._pages[r] = 0

    def _evict(self, rank: int) -> None:
        excess = self._pages[rank] - self.capacity_blocks[rank]
        lru = self._lru[rank]
        while excess > 0:
            node = next(iter(lru))  # the oldest node; a leaf (children are touched before their parents)
            m = len(node.run) >> 3
            if m <= excess:
                del lru[node]
                del node.parent.children[node.run[:8]]
                self._pages[rank] -= m
                excess -= m
            else:
                node.run = node.run[: (m - excess) << 3]
                self._pages[rank] -= excess
                excess = 0
