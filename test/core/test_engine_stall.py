"""Engine tier, lockstep stall term: q's prefill on rank r is priced by how far it reaches past the group's prefill
horizon (max over ranks of pending prefill), at the step-time model's stall per token; absent without lockstep."""
from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiersched.core.engine import DispatchRequest, EngineTierConfig, LockstepGroup, RankLoad
from tiersched.core.engine.prefix_index import chained_block_hashes
from tiersched.core.engine.score import SCORER_NAMES, STALL, ScoreDispatcher
from tiersched.core.request.step_plan import RooflineStepModel

# A roofline of the shape the simulator's prior has (qwen3-dp4ep4-like magnitudes): a prefill chunk is many decode
# steps long.
MODEL = RooflineStepModel(overhead_s=0.008, dense_per_token_s=7e-6, pair_s=1.4e-9, ctx_s=4e-8, moe_per_token_s=6e-6)
# exact ties only (tie_tokens=0): these tests check which rank the stall term itself prefers, not the picker's
# near-tie rule (test_engine_score.py)
ONLY_STALL = EngineTierConfig(**{f"weight_{n}": 0.0 for n in SCORER_NAMES}, weight_stall=1.0, tie_tokens=0.0)


def _loads(rng: random.Random, n: int, now: float) -> list[RankLoad]:
    return [RankLoad(rank=r, kv_capacity_tokens=200_000, kv_used_tokens=rng.randint(0, 100_000),
                     remaining_prefill_tokens=rng.choice([0, rng.randint(0, 30_000)]), queue_len=rng.randint(0, 8),
                     running_reqs=rng.randint(0, 64), running_decode_tokens=rng.randint(0, 200_000),
                     timestamp_s=now) for r in range(n)]


def _stall_reference(loads: list[RankLoad], group: LockstepGroup, weight: float, n_in: int) -> list[float]:
    """The term by its definition, one rank at a time with the scalar model call: weight x (S_r - S_decode) / S_r x
    max(0, pending_r + n_in - max_j pending_j)."""
    n = len(loads)
    dc = np.array([ld.running_reqs for ld in loads], dtype=float)
    dx = np.array([ld.running_decode_tokens for ld in loads], dtype=float)
    c = group.chunk_tokens
    s_dec = group.model.step_seconds(np.zeros(n), np.zeros(n), dc, dx)
    horizon = max(ld.remaining_prefill_tokens for ld in loads)
    out = []
    for r, ld in enumerate(loads):
        tok, pairs = np.zeros(n), np.zeros(n)
        tok[r], pairs[r] = c, c * (c + 1) / 2
        keep = np.ones(n)
        if not group.mixed_chunk:
            keep[r] = 0.0
        s_r = group.model.step_seconds(tok, pairs, dc * keep, dx * keep)
        out.append(weight * max(0.0, s_r - s_dec) / s_r * max(0, ld.remaining_prefill_tokens + n_in - horizon))
    return out


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 16), mixed=st.booleans(),
       chunk=st.sampled_from([512, 2048, 8192]), weight=st.sampled_from([0.5, 1.0, 4.0]))
def test_stall_is_the_models_excess_over_the_group_horizon(seed, n, mixed, chunk, weight):
    rng = random.Random(seed)
    group = LockstepGroup(MODEL, chunk, mixed)
    d = ScoreDispatcher(n, EngineTierConfig(weight_stall=weight))
    d.set_lockstep(group)
    loads = _loads(rng, n, 1.0)
    d.update_loads(loads, 1.0)
    n_in = rng.randint(1, 20_000)
    dec = d.pick(DispatchRequest("q", n_in), 1.0)
    want = _stall_reference(loads, group, weight, n_in)
    for r in range(n):
        assert dec.scores[r][STALL] == pytest.approx(want[r], rel=1e-9, abs=1e-9)
        others = sum(v for k, v in dec.scores[r].items() if k != "total")
        assert dec.scores[r]["total"] == pytest.approx(others)


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 16), mixed=st.booleans())
def test_stall_prefers_a_rank_whose_prefill_does_not_raise_the_groups_max(seed, n, mixed):
    """With the stall as the only scorer: if some rank can take q without its pending prefill passing the group's
    largest, the pick is such a rank (the lowest one); else the pick has the least priced excess."""
    rng = random.Random(seed)
    d = ScoreDispatcher(n, ONLY_STALL)
    d.set_lockstep(LockstepGroup(MODEL, 4096, mixed))
    loads = _loads(rng, n, 1.0)
    d.update_loads(loads, 1.0)
    pending = [ld.remaining_prefill_tokens for ld in loads]
    n_in = rng.randint(1, 20_000)
    dec = d.pick(DispatchRequest("q", n_in), 1.0)
    hidden = [r for r in range(n) if pending[r] + n_in <= max(pending)]
    if hidden:
        assert dec.rank == hidden[0]
        assert dec.scores[dec.rank][STALL] == 0.0
    else:
        assert dec.scores[dec.rank][STALL] > 0.0
        assert dec.scores[dec.rank][STALL] == min(t[STALL] for t in dec.scores.values())


def test_a_burst_between_snapshots_fills_under_the_horizon_before_raising_it():
    """Two idle ranks, 1000-token prompts, stall only: the first raises the horizon on rank 0, the second hides
    under it on rank 1 (the optimistic charge moved the horizon), the third raises it again."""
    d = ScoreDispatcher(2, ONLY_STALL)
    d.set_lockstep(LockstepGroup(MODEL, 2048))
    d.update_loads([RankLoad(rank=r, running_reqs=8, running_decode_tokens=8000, timestamp_s=1.0) for r in range(2)],
                   1.0)
    picks = [d.pick(DispatchRequest(str(i), 1000), 1.0) for i in range(3)]
    assert [p.rank for p in picks] == [0, 1, 0]
    assert picks[0].scores[0][STALL] > 0 and picks[1].scores[1][STALL] == 0.0 and picks[2].scores[0][STALL] > 0


def test_a_prefill_chunk_that_is_longer_than_a_decode_step_costs_and_a_free_one_does_not():
    """Rate = (S_r - S_decode) / S_r: in (0, 1) for a model where prefill steps are longer; 0 where a chunk costs no
    more than the decode step (only the overhead in the model)."""
    d = ScoreDispatcher(3, ONLY_STALL)
    d.set_lockstep(LockstepGroup(MODEL, 2048))
    d.update_loads([RankLoad(rank=r, running_reqs=4, running_decode_tokens=4000, timestamp_s=1.0) for r in range(3)],
                   1.0)
    s = d.pick(DispatchRequest("q", 500), 1.0).scores
    assert 0 < s[0][STALL] < 500
    flat = ScoreDispatcher(3, ONLY_STALL)
    flat.set_lockstep(LockstepGroup(RooflineStepModel(overhead_s=0.01), 2048))
    flat.update_loads([RankLoad(rank=r, running_reqs=4, timestamp_s=1.0) for r in range(3)], 1.0)
    assert all(t[STALL] == 0.0 for t in flat.pick(DispatchRequest("q", 500), 1.0).scores.values())


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 12), lockstep=st.sampled_from(["never", "none", "one-rank"]))
def test_without_lockstep_the_term_is_absent_and_decisions_are_unchanged(seed, n, lockstep):
    """No lockstep group (never set, or set to None), or a single rank: weight_stall changes nothing, the scores
    hold no stall entry, every cost is the same float as with weight_stall 0."""
    rng = random.Random(seed)
    if lockstep == "one-rank":
        n = 1
    base = ScoreDispatcher(n, EngineTierConfig())
    with_w = ScoreDispatcher(n, EngineTierConfig(weight_stall=4.0))
    if lockstep != "never":
        with_w.set_lockstep(LockstepGroup(MODEL, 2048) if lockstep == "one-rank" else None)
    assert with_w.lockstep is None and not (n == 1 and with_w.wants_lockstep())
    now = 1.0
    for i in range(20):
        if i % 5 == 0:
            now += 0.05
            loads = _loads(rng, n, now)
            base.update_loads(loads, now)
            with_w.update_loads(loads, now)
        req = DispatchRequest(str(i), rng.randint(1, 9000))
        a, b = base.pick(req, now), with_w.pick(req, now)
        assert a.rank == b.rank
        assert {r: dict(t) for r, t in a.scores.items()} == {r: dict(t) for r, t in b.scores.items()}
        assert all(STALL not in t for t in b.scores.values())


def test_set_lockstep_switches_the_term_and_checks_its_input():
    d = ScoreDispatcher(2, EngineTierConfig(weight_stall=1.0))
    assert d.wants_lockstep() and d.lockstep is None
    d.set_lockstep(LockstepGroup(MODEL, 1024))
    assert STALL in d.pick(DispatchRequest("a", 10), 1.0).scores[0]
    d.set_lockstep(None)
    assert STALL not in d.pick(DispatchRequest("b", 10), 1.0).scores[0]
    off = ScoreDispatcher(2, EngineTierConfig(weight_stall=0.0))
    off.set_lockstep(LockstepGroup(MODEL, 1024))
    assert not off.wants_lockstep() and off.lockstep is None
    with pytest.raises(TypeError, match="LockstepGroup"):
        d.set_lockstep(MODEL)
    with pytest.raises(TypeError, match="StepTimeModel"):
        LockstepGroup("not a model", 1024)
    with pytest.raises(ValueError, match="chunk"):
        LockstepGroup(MODEL, 0)
    with pytest.raises(ValueError, match="weight_stall"):
        EngineTierConfig(weight_stall=-1.0).validate()


def _scalar_costs(d: ScoreDispatcher, req: DispatchRequest) -> dict[int, float]:
    """Every candidate's cost by the module's formula, one rank at a time in Python floats (the order of terms the
    pick documents), from the dispatcher's state before the pick: the reference for its vectorised pass."""
    cfg = d.config
    ranks, _ = d.candidates()
    held, depths = d.index.match_held(req.prefix_blocks)
    depth = dict(zip(held, depths))
    horizon = int(d._pending.max())
    session = d._sessions.get(req.session_key) if req.session_key is not None else None
    out = {}
    for r in ranks:
        hit = depth.get(r, 0) * cfg.block_tokens
        uncached = req.input_tokens - hit if hit < req.input_tokens else 0
        prefill, decode, kv, queue, static, rate = (float(x) for x in d._terms[:, r])
        pend = int(d._pending[r])
        c = prefill + cfg.weight_prefix * uncached + static + rate * (pend + uncached)
        if d._stall_rate is not None:
            excess = pend + uncached - horizon
            c += float(d._stall_rate[r]) * (excess if excess > 0 else 0)
        if session is not None and session[0] in ranks and session[0] != r:
            c += cfg.weight_session * session[1]
        out[r] = c
    return out


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 32), lockstep=st.booleans(), mixed=st.booleans())
def test_vectorised_costs_equal_the_per_rank_formula_with_prefix_hits_sessions_and_stall(seed, n, lockstep, mixed):
    """The pick prices every rank in one numpy pass with per-rank uncached tokens; each total must be the very float
    the per-rank scalar formula gives (==, not approx), on ranks that hold none, part or all of the prompt, with a
    sticky session and with the stall term on or off."""
    rng = random.Random(seed)
    cfg = EngineTierConfig(weight_stall=1.0, block_tokens=4, tie_tokens=rng.choice([0.0, 64.0]))
    d = ScoreDispatcher(n, cfg)
    if lockstep:
        d.set_lockstep(LockstepGroup(MODEL, 2048, mixed))
    d.update_loads(_loads(rng, n, 1.0), 1.0)
    bases = [[rng.randrange(0, 5) for _ in range(rng.randrange(4, 80))] for _ in range(3)]
    for step in range(40):
        tokens = rng.choice(bases) + [rng.randrange(0, 5) for _ in range(rng.randrange(0, 40))]
        keys = chained_block_hashes(tokens, cfg.block_tokens)
        req = DispatchRequest(str(step), len(tokens), prefix_blocks=keys, session_key=rng.choice([None, "s", "t"]))
        if rng.random() < 0.3:
            d.record(rng.randrange(n), req, 1.0 + step * 1e-3)
            continue
        want = _scalar_costs(d, req)
        dec = d.pick(req, 1.0 + step * 1e-3)
        assert {r: dec.scores[r]["total"] for r in dec.scores} == want, step
        best = min(want.values())
        assert want[dec.rank] < best + max(cfg.tie_tokens, 0.0) or want[dec.rank] == best
