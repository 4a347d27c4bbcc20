"""The synthetic per-source routing model keeps the aggregate, skews sources, drifts, and is deterministic."""
import numpy as np
import pytest

from tiersched.sim.moe_routing import RoutingModel, calibrated_lift, deepseek_count_files, load_logical_counts


def test_aggregate_of_sources_is_layer_popularity():
    model = RoutingModel.synthetic(num_layers=3, num_experts=16, top_k=2, num_sources=4, seed=1, source_skew=0.6)
    expected = model.expected_counts(np.full(4, 100.0))
    assert expected.shape == (3, 4, 16)
    np.testing.assert_allclose(expected.sum(-1), 200.0)
    # homes are packed so each source's home mass is near 1/S: the aggregate stays close to the popularity
    aggregate = expected.sum(1) / expected.sum(axis=(1, 2))[:, None]
    assert np.abs(aggregate - model.popularity).sum(-1).max() < 0.1


def test_skew_concentrates_an_expert_on_its_home_source():
    model = RoutingModel.synthetic(2, 32, 2, 8, seed=3, source_skew=0.5)
    expected = model.expected_counts(np.full(8, 1000.0))
    home_share = np.take_along_axis(expected, model.home[:, None, :], axis=1)[:, 0] / expected.sum(1)
    # skew 0.5 -> home share is about 0.5 + 0.5/8 for equally loaded sources (vs 1/8 without skew)
    assert abs(np.median(home_share) - (0.5 + 0.5 / 8)) < 0.08
    assert home_share.min() > 0.3


def test_coactivation_marginals_and_lift():
    model = RoutingModel.synthetic(3, 16, 2, 4, seed=0)
    coact = model.expected_coactivation(1000.0)
    assert coact.shape == (2, 16, 16)
    np.testing.assert_allclose(coact[0].sum(1), 1000.0 * 4 * model.popularity[0], rtol=1e-6)
    rows = np.arange(16)[:, None]
    lifted = coact[0][rows, model.successor[0]] / (1000.0 * 4 * np.outer(model.popularity[0], model.popularity[1]))[rows, model.successor[0]]
    np.testing.assert_allclose(lifted, model.lift, rtol=1e-9)


def test_sampling_is_deterministic_and_drift_moves_popularity():
    model = RoutingModel.synthetic(2, 16, 2, 4, seed=0)
    a = model.sample_window(np.full(4, 500.0), np.random.default_rng(7), coactivation=True)
    b = model.sample_window(np.full(4, 500.0), np.random.default_rng(7), coactivation=True)
    np.testing.assert_array_equal(a.source_counts, b.source_counts)
    assert a.source_counts.shape == (1, 2, 4, 16) and a.coactivation.shape == (1, 16, 16)
    drifted = model.drift(np.random.default_rng(1), strength=1.0)
    np.testing.assert_allclose(drifted.popularity.sum(-1), 1.0)
    assert np.abs(np.log(drifted.popularity / model.popularity)).mean() > 0.05


def test_lift_calibration_on_hand_matrix():
    t = np.array([[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]])
    assert calibrated_lift(t) == pytest.approx((1.5 + 1.0) / 2)


def test_calibrated_on_shared_deepseek_counts():
    files = deepseek_count_files()
    if not files:
        pytest.skip("shared DeepSeek-V3 counts not found (../shared/data or TIERSCHED_SHARED_DATA)")
    counts = load_logical_counts(files[0])
    model = RoutingModel.from_logical_counts(counts, num_sources=32, source_skew=0.5, seed=0)
    assert model.popularity.shape == (61, 256)
    assert np.all(model.popularity[:3] == 0)  # dense layers stay empty
    np.testing.assert_allclose(model.popularity[3:].sum(-1), 1.0)


def test_model_has_a_name_that_says_where_popularity_came_from():
    assert RoutingModel.synthetic(2, 8, 2, 2, seed=0).name == "synthetic-zipf"
    counts = np.ones((2, 8))
    assert RoutingModel.from_logical_counts(counts, 2).name == "logical-counts"
    drifted = RoutingModel.synthetic(2, 8, 2, 2, seed=0).drift(np.random.default_rng(0))
    assert drifted.name == "synthetic-zipf"
    if deepseek_count_files():
        assert RoutingModel.deepseek_v3(4).name == "deepseek-v3"
