"""Engine tier: the array-based ScoreDispatcher, the radix-tree PrefixIndex and the in-place page hashing make the
same decisions as the per-rank-loop versions they replaced (frozen in engine_reference.py), on random snapshots,
prompts, sessions, explicit routings and cache flushes. Each side hashes the prompt with its own page hashing: the
reference finishes its chain with the splitmix64 mixer, this code does not (a bijection of Z/2^64, so the same pages
collide or not on both sides; checked key by key through the mixer). Compared: same rank, same expected hit, same
filters, the same score of every scorer on every candidate (float equality, not approximate), same pending work,
same index contents."""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import engine_reference as ref
from tiersched.core.engine import DispatchRequest, EngineTierConfig, RankLoad
from tiersched.core.engine.prefix_index import chained_block_hashes, page_keys
from tiersched.core.engine.score import SCORER_NAMES, ScoreDispatcher

_MASK = (1 << 64) - 1


def splitmix64(keys) -> tuple[int, ...]:
    """The reference's finishing mixer, applied to this code's keys (Python ints, mod 2^64)."""
    out = []
    for x in keys:
        x ^= x >> 30
        x = (x * 0xBF58476D1CE4E5B9) & _MASK
        x ^= x >> 27
        x = (x * 0x94D049BB133111EB) & _MASK
        out.append(x ^ (x >> 31))
    return tuple(out)


def _random_load(rng: random.Random, rank: int, now: float, capacity: int, previous: RankLoad | None,
                 trouble: float) -> RankLoad:
    """trouble: chance that the rank is inactive or near its KV limit (0 in most snapshot rounds)."""
    if previous is not None and rng.random() < 0.15:
        return previous  # the same publication read again (same timestamp)
    cap = capacity if rng.random() < 0.9 else rng.choice([0, capacity // 2, capacity * 2])
    used = rng.randint(0, cap) if cap else rng.randint(0, 1000)
    if cap and rng.random() < trouble:
        used = rng.randint(int(0.93 * cap), cap)  # at or near the overload fraction
    return RankLoad(rank=rank, active=rng.random() >= trouble / 2, kv_capacity_tokens=cap, kv_used_tokens=used,
                    remaining_prefill_tokens=rng.choice([0, rng.randint(0, 20_000)]), queue_len=rng.randint(0, 10),
                    running_reqs=rng.randint(0, 40), running_decode_tokens=rng.randint(0, 80_000),
                    expert_pressure=rng.choice([1.0, rng.uniform(0.5, 1.6)]), timestamp_s=now - rng.uniform(0, 0.03),
                    waiting_tokens=rng.randint(0, 1000))


def _compare(new, old, label: str) -> None:
    assert new.rank == old.rank, label
    assert new.expected_cached_tokens == old.expected_cached_tokens, label
    assert new.filtered == old.filtered, label
    assert list(new.scores) == list(old.scores), label
    for r, terms in old.scores.items():
        got = new.scores[r]
        assert list(got) == list(terms), label
        assert all(got[k] == terms[k] for k in terms), (label, r, got, terms)


def run_both(seed: int, num_ranks: int, cfg: EngineTierConfig, steps: int, max_prompt: int, lazy: bool = False,
             stats: dict | None = None) -> int:
    """Drive both dispatchers with one random sequence of operations; returns the number of decisions compared.
    lazy: this code gets the adapter's lazily hashed keys (page_keys) and decides with decide(), settling the index
    insert explicitly, or not at all (the next operation settles it), at random."""
    rng = random.Random(seed)
    new, old = ScoreDispatcher(num_ranks, cfg), ref.ScoreDispatcher(num_ranks, cfg)
    block = cfg.block_tokens
    # prompts: a few shared bases (some extending others) + private suffixes, over a small alphabet
    bases = [[rng.randrange(0, 6) for _ in range(rng.randrange(0, max_prompt // 2))] for _ in range(4)]
    bases.append(bases[0] + [rng.randrange(0, 6) for _ in range(rng.randrange(1, 4) * block)])
    capacity = rng.choice([4, 16, 400, 5000]) * block  # small capacities force evictions and overloads
    now, decisions, last = 1.0, 0, [None] * num_ranks
    new_key = {}  # reference page key -> this code's key for the same page
    for step in range(steps):
        now += rng.uniform(0, 0.01)
        op = rng.random()
        if op < 0.15 or step == 0:
            chosen = sorted(rng.sample(range(num_ranks), rng.randint(1, num_ranks)))
            trouble = rng.choice([0.0, 0.0, 0.05, 0.3])
            loads = [_random_load(rng, r, now, capacity, last[r], trouble) for r in chosen]
            for load in loads:
                last[load.rank] = load
            new.update_loads(loads, now)
            old.update_loads(loads, now)
            continue
        if op < 0.18:
            rank = rng.choice([None, rng.randrange(num_ranks)])
            new.forget_cache(rank)
            old.forget_cache(rank)
            continue
        tokens = list(rng.choice(bases)) + [rng.randrange(0, 6) for _ in range(rng.randrange(0, max_prompt // 2))]
        keys, old_keys = chained_block_hashes(tokens, block), ref.chained_block_hashes(tokens, block)
        assert splitmix64(keys) == old_keys
        new_key.update(zip(old_keys, keys))
        n_in = len(tokens) if rng.random() < 0.9 else max(0, len(tokens) - rng.randrange(0, 2 * block))
        session = rng.choice([None, None, "a", "b", "c", str(step)])
        lazy_keys = page_keys(tokens, block) if lazy else keys
        req = DispatchRequest(rid=str(step), input_tokens=n_in, prefix_blocks=lazy_keys, session_key=session)
        old_req = DispatchRequest(rid=str(step), input_tokens=n_in, prefix_blocks=old_keys, session_key=session)
        if op < 0.26:
            rank = rng.randrange(num_ranks)
            assert new.record(rank, req, now) == old.record(rank, old_req, now)
        else:
            try:
                expect = old.pick(old_req, now)
            except RuntimeError as exc:
                with pytest.raises(RuntimeError, match=str(exc)):
                    new.pick(req, now)
                continue
            if lazy:
                got = new.decide(req, now)
                assert lazy_keys.hashed <= len(keys)
                if stats is not None and lazy_keys.hashed < len(keys):
                    stats["partly_hashed"] = stats.get("partly_hashed", 0) + 1
                if rng.random() < 0.5:
                    new.settle()
                    assert lazy_keys == keys  # every page hashed by now, to the same keys
            else:
                got = new.pick(req, now)
            _compare(got, expect, f"seed {seed} step {step}")
            decisions += 1
        assert new.pending_work() == old.pending_work()
        assert new.state_sizes() == old.state_sizes()
    for r in range(num_ranks):
        assert sorted(new.index.pages_lru(r)) == sorted(new_key[o] for o in old.index._held[r])
    return decisions


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), num_ranks=st.integers(1, 40), block=st.sampled_from([1, 4, 16, 32]),
       weights=st.lists(st.sampled_from([0.0, 0.02, 0.1, 0.5, 1.0, 2.0, 3.7, 8.0]), min_size=7, max_size=7),
       fraction=st.sampled_from([0.5, 0.95, 1.0]))
def test_random_operations_decide_as_the_reference(seed, num_ranks, block, weights, fraction):
    if not any(weights):
        weights[0] = 1.0
    cfg = EngineTierConfig(**{f"weight_{n}": w for n, w in zip(SCORER_NAMES, weights)}, block_tokens=block,
                           max_blocks_per_rank=200, kv_overload_fraction=fraction, max_sessions=3)
    run_both(seed, num_ranks, cfg, steps=30, max_prompt=12 * block)


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), num_ranks=st.integers(1, 40), block=st.sampled_from([1, 4, 16, 32]),
       fraction=st.sampled_from([0.5, 0.95, 1.0]))
def test_lazily_hashed_keys_and_deferred_insert_decide_as_the_reference(seed, num_ranks, block, fraction):
    """The adapter's path: keys hashed only as far as the match needs (page_keys), the index insert after the
    decision (decide, then settle or the next operation): the same decisions, scores and index as the reference."""
    cfg = EngineTierConfig(block_tokens=block, max_blocks_per_rank=200, kv_overload_fraction=fraction, max_sessions=3)
    run_both(seed, num_ranks, cfg, steps=30, max_prompt=40 * block, lazy=True)


def test_lazy_default_config_at_32_ranks_decides_as_the_reference():
    """The bench's shape on the adapter's path: 32 ranks, default weights, prompts of up to ~2k tokens (64 pages,
    several doublings of the lazily hashed run)."""
    stats: dict = {}
    decisions = sum(run_both(seed, 32, EngineTierConfig(max_blocks_per_rank=300), steps=400, max_prompt=2048,
                             lazy=True, stats=stats) for seed in range(2))
    assert decisions >= 500, decisions
    assert stats.get("partly_hashed", 0) >= decisions // 10, stats  # the laziness is exercised, not only the end


def test_default_config_at_32_ranks_decides_as_the_reference_on_2000_requests():
    """The bench's shape: 32 ranks, default weights, 32-token pages, prompts of up to ~1k tokens."""
    decisions = sum(run_both(seed, 32, EngineTierConfig(max_blocks_per_rank=300), steps=700, max_prompt=1024)
                    for seed in range(4))
    assert decisions >= 1000, decisions


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), block=st.sampled_from([1, 2, 16, 32, 64]), hash_seed=st.integers(0, 3))
def test_page_keys_same_blocks_same_ids_and_prefix_property(seed, block, hash_seed):
    """Equal token prefixes <=> equal keys page by page, and the reference's key values; a prompt's keys are a prefix
    of its extension's keys; a page repeated at another position, or two pages swapped, change the key."""
    rng = random.Random(seed)
    base = [rng.randrange(0, 4) for _ in range(rng.randrange(0, 10 * block))]
    a = base + [rng.randrange(0, 4) for _ in range(rng.randrange(0, 5 * block))]
    b = base + [rng.randrange(0, 4) for _ in range(rng.randrange(0, 5 * block))]
    ka, kb = chained_block_hashes(a, block, hash_seed), chained_block_hashes(b, block, hash_seed)
    ra, rb = ref.chained_block_hashes(a, block, hash_seed), ref.chained_block_hashes(b, block, hash_seed)
    assert splitmix64(ka) == ra and len(ka) == len(a) // block
    for i in range(min(len(ka), len(kb))):
        assert (ka[i] == kb[i]) == (a[: (i + 1) * block] == b[: (i + 1) * block]) == (ra[i] == rb[i])
    page = [rng.randrange(0, 4) for _ in range(block)]
    other = [t ^ 1 for t in page]
    assert len(set(chained_block_hashes(page * 3, block, hash_seed))) == 3
    assert chained_block_hashes(page + other, block)[1] != chained_block_hashes(other + page, block)[1]
    extended = chained_block_hashes(a + [rng.randrange(0, 4) for _ in range(3 * block)], block, hash_seed)
    assert extended[: len(ka)] == ka
    assert chained_block_hashes(list(a), block, hash_seed) == ka  # same blocks, same ids (a fresh list)
