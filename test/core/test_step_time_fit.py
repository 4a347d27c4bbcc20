"""Ridge-to-prior fit of the step planner's model from measured steps (core/request/step_time_fit.py)."""
from __future__ import annotations

import numpy as np
import pytest

from tiersched.core.request.step_plan import ROOFLINE_PARAMS, RooflineStepModel
from tiersched.core.request.step_time_fit import StepSamples, fit_step_model, relative_errors, scale_to_steps

TRUE = RooflineStepModel(overhead_s=0.004, dense_floor_s=0.002, dense_per_token_s=2e-5, pair_s=1e-9, ctx_s=3e-7,
                         moe_floor_s=0.003, moe_per_token_s=1e-5)
# A prior off by 2-3x on every coefficient (the simulator's model of another machine).
PRIOR = RooflineStepModel(overhead_s=0.010, dense_floor_s=0.001, dense_per_token_s=5e-5, pair_s=3e-9, ctx_s=1e-7,
                          moe_floor_s=0.001, moe_per_token_s=3e-5)


def steps(n, ranks=2, seed=0, decode_only=False):
    rng = np.random.default_rng(seed)
    mode = rng.choice(3, size=(n, ranks), p=[0.0, 0.9, 0.1] if decode_only else [0.45, 0.45, 0.10])
    tok = np.where(mode == 0, np.rint(np.exp(rng.uniform(0, np.log(2048), (n, ranks)))), 0.0)
    prefix = np.where(rng.uniform(size=(n, ranks)) < 0.5, 0.0, rng.uniform(0, 4000, (n, ranks)))
    pairs = tok * (prefix + (tok + 1) / 2)
    count = np.where(mode == 1, rng.integers(1, 64, (n, ranks)), 0).astype(float)
    ctx = count * rng.uniform(50, 2000, (n, ranks))
    y = TRUE.batch_seconds(tok, pairs, count, ctx)
    keep = y > 0
    return tok[keep], pairs[keep], count[keep], ctx[keep], y[keep]


def test_fit_recovers_the_true_model_from_a_wrong_prior():
    tok, pairs, count, ctx, y = steps(600)
    noisy = y * np.random.default_rng(1).lognormal(0, 0.03, y.size)
    fit = fit_step_model(tok, pairs, count, ctx, noisy, prior=PRIOR)
    err_fit = np.abs(relative_errors(fit, tok, pairs, count, ctx, y))
    err_prior = np.abs(relative_errors(PRIOR, tok, pairs, count, ctx, y))
    assert np.median(err_fit) < 0.02 and np.median(err_prior) > 0.3
    # the slopes are identifiable (the three floors only as their sum when every step is on the floor side)
    for k in ("dense_per_token_s", "ctx_s", "moe_per_token_s"):
        assert getattr(fit, k) == pytest.approx(getattr(TRUE, k), rel=0.25), (k, fit)


def test_ridge_keeps_unobserved_parameters_at_the_prior():
    """Decode-only samples say nothing about the prefill attention pairs: pair_s stays at the prior's value, while
    the data still decide what they observe."""
    tok, pairs, count, ctx, y = steps(300, decode_only=True)
    assert not tok.any()
    fit = fit_step_model(tok, pairs, count, ctx, y, prior=PRIOR)
    assert fit.pair_s == pytest.approx(PRIOR.pair_s, rel=1e-6)
    assert np.median(np.abs(relative_errors(fit, tok, pairs, count, ctx, y))) < 0.02
    assert fit.ctx_s == pytest.approx(TRUE.ctx_s, rel=0.1)


def test_large_ridge_is_the_prior_and_fit_is_deterministic():
    tok, pairs, count, ctx, y = steps(200, seed=3)
    stiff = fit_step_model(tok, pairs, count, ctx, y, prior=PRIOR, ridge=1e9)
    for k in ROOFLINE_PARAMS:
        assert getattr(stiff, k) == pytest.approx(getattr(PRIOR, k), rel=1e-3), k
    a = fit_step_model(tok, pairs, count, ctx, y, prior=PRIOR)
    b = fit_step_model(tok.copy(), pairs.copy(), count.copy(), ctx.copy(), y.copy(), prior=PRIOR)
    assert a == b


def test_rejects_bad_input():
    tok, pairs, count, ctx, y = steps(20)
    with pytest.raises(ValueError, match="measured step times > 0"):
        fit_step_model(tok, pairs, count, ctx, np.zeros_like(y), prior=PRIOR)
    with pytest.raises(ValueError, match=r"\[N, R\]"):
        fit_step_model(tok[:-1], pairs, count, ctx, y, prior=PRIOR)
    with pytest.raises(ValueError, match="ridge"):
        fit_step_model(tok, pairs, count, ctx, y, prior=PRIOR, ridge=-1)


def test_samples_ring_buffer_keeps_the_newest_in_order():
    s = StepSamples(ranks=2, capacity=3)
    assert not s.add([0, 0], [0, 0], [0, 0], [0, 0], 0.01)  # idle step: not a sample
    assert not s.add([5, 0], [15, 0], [0, 2], [0, 10], 0.0)  # no time
    for i in range(1, 6):
        assert s.add([i, 0], [i, 0], [0, 3], [0, 30], i / 100)
    assert len(s) == 3 and s.added == 5
    tok, _, count, _, y = s.arrays()
    assert tok[:, 0].tolist() == [3, 4, 5] and y.tolist() == [0.03, 0.04, 0.05]
    with pytest.raises(ValueError, match="2 ranks"):
        s.add([1, 2, 3], [0, 0, 0], [0, 0, 0], [0, 0, 0], 0.1)


def test_samples_fit_matches_direct_fit():
    tok, pairs, count, ctx, y = steps(100, seed=5)
    s = StepSamples(ranks=2)
    for row in zip(tok, pairs, count, ctx, y):
        s.add(*row)
    assert s.fit(PRIOR) == fit_step_model(tok, pairs, count, ctx, y, prior=PRIOR)


def test_scale_to_steps_removes_a_common_factor_from_a_few_steps():
    tok, pairs, count, ctx, y = steps(8, seed=3)
    slow = y * 3.0  # the same machine three times slower (e.g. a loaded host)
    scaled = scale_to_steps(TRUE, tok, pairs, count, ctx, slow)
    assert np.allclose(relative_errors(scaled, tok, pairs, count, ctx, slow), 0.0, atol=1e-9)
    assert np.median(relative_errors(TRUE, tok, pairs, count, ctx, slow)) == pytest.approx(-2 / 3)
    # a wrong shape keeps its shape: only the median error goes to 0
    shaped = scale_to_steps(PRIOR, tok, pairs, count, ctx, y)
    # (an even count: the median of the errors sits between the two middle steps, not exactly at 0)
    assert abs(np.median(relative_errors(shaped, tok, pairs, count, ctx, y))) < 0.01
    assert scale_to_steps(TRUE, tok[:0], pairs[:0], count[:0], ctx[:0], y[:0]) == TRUE  # no steps: unchanged
