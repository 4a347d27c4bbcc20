"""Request sets for the live A/B runs: public traces turned into token prompts the tiny CPU model can serve.

Shared-prefix set (Mooncake conversation trace). Each Mooncake hash id names a 512-token prefix block; equal ids
mean equal prefixes. We map every hash id to a fixed pseudo-random block of `block_tokens` token ids (seeded by
the id, drawn from the tiny tokenizer's ordinary vocabulary), so two prompts share exactly as many leading
blocks as the trace says; the tail past the last full block is request-private. Lengths shrink by
`block_tokens / 512`. Early in the trace most blocks are first sightings (a cold cache) and a CPU run holds only
tens of requests, so from the first `window` requests we group those sharing at least `min_shared_blocks` blocks
with another request by the deepest such block (in practice: one conversation) and keep the largest groups until
`n` requests: the kept requests keep the trace's own sharing structure, lengths and relative timestamps.

Lengths set (Azure conversation trace): context/generated token counts scaled down by `length_scale`, private
random prompts (no sharing). Synthetic fallback (no ../shared): conversations that grow turn by turn over a
common system prompt, Poisson arrivals.

Every set carries a latency-sensitive / best-effort mix: a seeded `ls_fraction` of requests get class "ls" and
`priority=LS_PRIORITY` (higher = more urgent, upstream's default convention), the rest "be" with priority 0.
Arrivals are rescaled to `rate` requests/s keeping the trace's inter-arrival shape.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tiersched.data import MOONCAKE_BLOCK_TOKENS, load_azure_conv, load_mooncake, shared_path, AZURE_CONV, MOONCAKE_CONV

LS_PRIORITY = 10
BE_PRIORITY = 0
FIRST_ORDINARY_TOKEN = 3  # ids 0-2 are the tiny tokenizer's special tokens (tiersched.rig.tiny_model)
DEFAULT_VOCAB = 419  # the tiny tokenizer's trained vocabulary; the model's embedding table is larger (512)


@dataclass(frozen=True)
class LiveRequest:
    rid: str
    arrival_s: float
    input_ids: tuple[int, ...]
    output_len: int
    priority: int
    cls: str  # "ls" latency-sensitive or "be" best-effort
    prefix_blocks: tuple[int, ...] = ()  # the trace's hash ids covered by full blocks of this prompt


@dataclass(frozen=True)
class RequestSet:
    name: str
    source: str  # which trace (or "synthetic") it came from
    block_tokens: int
    requests: tuple[LiveRequest, ...]

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def duration_s(self) -> float:
        return self.requests[-1].arrival_s if self.requests else 0.0

    def reusable_block_fraction(self) -> float:
        """Share of prompt blocks already seen earlier in the set (what an unbounded, single cache could hit)."""
        seen, total, hits = set(), 0, 0
        for r in self.requests:
            for h in r.prefix_blocks:
                total += 1
                hits += h in seen
                seen.add(h)
        return hits / total if total else 0.0

    def with_rate(self, rate: float) -> "RequestSet":
        return RequestSet(self.name, self.source, self.block_tokens,
                          tuple(_rescaled(self.requests, rate)))

    def to_jsonl(self, path: str | Path) -> None:
        with open(path, "w") as f:
            for r in self.requests:
                f.write(json.dumps(asdict(r)) + "\n")


def block_token_ids(hash_id: int, block_tokens: int, vocab: int = DEFAULT_VOCAB) -> list[int]:
    """The fixed token block standing in for one Mooncake hash id (same id -> same tokens, always)."""
    rng = np.random.default_rng([0x5EED, int(hash_id)])
    return rng.integers(FIRST_ORDINARY_TOKEN, vocab, size=block_tokens).tolist()


def _rescaled(requests, rate: float | None):
    if not requests or rate is None:
        return list(requests)
    arrival = np.array([r.arrival_s for r in requests])
    arrival = arrival - arrival[0]
    span = arrival[-1]
    if span <= 0:
        scaled = np.arange(len(requests)) / rate
    else:
        scaled = arrival * ((len(requests) - 1) / rate) / span  # same shape, mean rate `rate`
    return [_replace_arrival(r, float(t)) for r, t in zip(requests, scaled)]


def _replace_arrival(r: LiveRequest, t: float) -> LiveRequest:
    return LiveRequest(r.rid, t, r.input_ids, r.output_len, r.priority, r.cls, r.prefix_blocks)


def _classes(n: int, ls_fraction: float, rng: np.random.Generator) -> np.ndarray:
    return rng.random(n) < ls_fraction


def _scaled_output(tokens: np.ndarray, scale: float, lo: int, hi: int) -> np.ndarray:
    return np.clip(np.round(tokens * scale), lo, hi).astype(int)


def mooncake_shared_prefix(n: int = 120, block_tokens: int = 8, rate: float = 4.0, ls_fraction: float = 0.25,
                           window: int = 1000, min_shared_blocks: int = 2, output_scale: float = 1 / 16,
                           max_output: int = 32, max_input: int = 1024, seed: int = 0,
                           vocab: int = DEFAULT_VOCAB) -> RequestSet:
    """`n` Mooncake requests with their shared-prefix structure, prompts scaled to `block_tokens` per block.

    Requests whose scaled prompt exceeds `max_input` tokens are left out (the CPU server's KV pool is small).
    """
    trace = load_mooncake(limit=window)
    counts = Counter(h for blocks in trace.prefix_blocks for h in blocks)
    scale = block_tokens / MOONCAKE_BLOCK_TOKENS
    groups: dict[int, list[int]] = defaultdict(list)  # deepest block shared with another request -> requests
    for i, blocks in enumerate(trace.prefix_blocks):
        shared = [h for h in blocks if counts[h] >= 2]
        if len(shared) >= min_shared_blocks and trace.input_tokens[i] * scale <= max_input:
            groups[shared[-1]].append(i)
    keep: list[int] = []
    for members in sorted(groups.values(), key=lambda g: (-len(g), g[0])):  # largest sharing groups first
        keep.extend(members)
        if len(keep) >= n:
            break
    keep = sorted(keep[:n])
    rng = np.random.default_rng(seed)
    is_ls = _classes(len(keep), ls_fraction, rng)
    outputs = _scaled_output(trace.output_tokens[keep], output_scale, 2, max_output)
    requests = []
    for j, i in enumerate(keep):
        blocks = trace.prefix_blocks[i]
        ids = [t for h in blocks for t in block_token_ids(h, block_tokens, vocab)]
        tail = int(round((int(trace.input_tokens[i]) - len(blocks) * MOONCAKE_BLOCK_TOKENS)
                         * block_tokens / MOONCAKE_BLOCK_TOKENS))
        ids += rng.integers(FIRST_ORDINARY_TOKEN, vocab, size=max(1, tail)).tolist()  # private tail
        requests.append(LiveRequest(f"mc-{i}", float(trace.arrival_s[i]), tuple(ids), int(outputs[j]),
                                    LS_PRIORITY if is_ls[j] else BE_PRIORITY, "ls" if is_ls[j] else "be",
                                    tuple(int(h) for h in blocks)))
    return RequestSet("shared-prefix", MOONCAKE_CONV, block_tokens, tuple(_rescaled(requests, rate)))


def azure_lengths(n: int = 120, length_scale: float = 1 / 16, rate: float = 4.0, ls_fraction: float = 0.25,
                  max_input: int = 512, max_output: int = 32, seed: int = 0,
                  vocab: int = DEFAULT_VOCAB) -> RequestSet:
    """`n` Azure conversation requests: scaled context/generated lengths, private prompts, trace arrivals."""
    trace = load_azure_conv(limit=n)
    rng = np.random.default_rng(seed)
    is_ls = _classes(len(trace), ls_fraction, rng)
    inputs = _scaled_output(trace.input_tokens, length_scale, 4, max_input)
    outputs = _scaled_output(trace.output_tokens, length_scale, 2, max_output)
    requests = [
        LiveRequest(f"az-{i}", float(trace.arrival_s[i]),
                    tuple(rng.integers(FIRST_ORDINARY_TOKEN, vocab, size=int(inputs[i])).tolist()),
                    int(outputs[i]), LS_PRIORITY if is_ls[i] else BE_PRIORITY, "ls" if is_ls[i] else "be")
        for i in range(len(trace))
    ]
    return RequestSet("lengths", AZURE_CONV, 0, tuple(_rescaled(requests, rate)))


def synthetic_shared_prefix(n: int = 120, block_tokens: int = 8, rate: float = 4.0, ls_fraction: float = 0.25,
                            conversations: int = 12, system_blocks: int = 4, turn_blocks: int = 3,
                            max_output: int = 32, seed: int = 0, vocab: int = DEFAULT_VOCAB) -> RequestSet:
    """Built-in fallback: `conversations` chats over one system prompt; turn k re-sends turns 0..k-1."""
    rng = np.random.default_rng(seed)
    is_ls = _classes(n, ls_fraction, rng)
    arrivals = np.cumsum(rng.exponential(1.0, size=n))
    history: dict[int, list[int]] = {c: list(range(system_blocks)) for c in range(conversations)}
    next_block = 1_000_000
    requests = []
    for i in range(n):
        conv = int(rng.integers(conversations))
        blocks = history[conv] + list(range(next_block, next_block + turn_blocks))
        next_block += turn_blocks
        history[conv] = blocks
        ids = [t for h in blocks for t in block_token_ids(h, block_tokens, vocab)]
        ids += rng.integers(FIRST_ORDINARY_TOKEN, vocab, size=block_tokens // 2 + 1).tolist()
        requests.append(LiveRequest(f"syn-{i}", float(arrivals[i]), tuple(ids), int(rng.integers(4, max_output + 1)),
                                    LS_PRIORITY if is_ls[i] else BE_PRIORITY, "ls" if is_ls[i] else "be",
                                    tuple(blocks)))
    return RequestSet("shared-prefix", "synthetic", block_tokens, tuple(_rescaled(requests, rate)))


def shared_prefix_set(n: int, rate: float, block_tokens: int = 8, ls_fraction: float = 0.25,
                      seed: int = 0, max_input: int = 1024) -> RequestSet:
    """The Mooncake-derived set when the shared traces are present, else the synthetic fallback."""
    if shared_path(MOONCAKE_CONV) is not None:
        return mooncake_shared_prefix(n=n, block_tokens=block_tokens, rate=rate, ls_fraction=ls_fraction, seed=seed,
                                      max_input=max_input)
    return synthetic_shared_prefix(n=n, block_tokens=block_tokens, rate=rate, ls_fraction=ls_fraction, seed=seed)


def lengths_set(n: int, rate: float, ls_fraction: float = 0.25, seed: int = 0) -> RequestSet | None:
    """The Azure-lengths set, or None without the shared traces (the shared-prefix fallback covers that case)."""
    if shared_path(AZURE_CONV) is None:
        return None
    return azure_lengths(n=n, rate=rate, ls_fraction=ls_fraction, seed=seed)
