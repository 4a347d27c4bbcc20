"""Metric functions on hand-computed cases."""
import numpy as np
import pytest

from tiersched.core.expert import metrics
from tiersched.core.expert import ExpertStats, placement_from_phy2log

# 2 ranks, 4 slots (2 per rank), 3 experts: rank 0 holds {0, 1}, rank 1 holds {0, 2}
PLACE = placement_from_phy2log(np.array([[0, 1, 0, 2]]), 3)


def test_balancedness_aggregate_spreads_over_replicas():
    stats = ExpertStats(source_counts=np.array([[[[40.0, 10.0, 30.0]]]]))  # S == 1
    # rank0 = 40/2 + 10 = 30, rank1 = 40/2 + 30 = 50 -> mean 40 / max 50
    assert metrics.balancedness(PLACE, stats, num_ranks=2) == pytest.approx(0.8)


def test_local_replica_first_dispatch_and_cross_rank_share():
    # source 0 sends 40 to e0 (local on rank 0), 10 to e2 (remote); source 1 sends 20 to e0 (local), 10 to e1 (remote)
    counts = np.array([[[[40.0, 0.0, 10.0], [20.0, 10.0, 0.0]]]])
    stats = ExpertStats(source_counts=counts)
    loads = metrics.rank_loads(metrics.replica_matrix(PLACE.phy2log, 3, 2), counts[0])
    np.testing.assert_allclose(loads, [[50.0, 30.0]])  # rank0 = 40 + 10(e1), rank1 = 20 + 10(e2)
    assert metrics.balancedness(PLACE, stats) == pytest.approx(40.0 / 50.0)
    assert metrics.cross_rank_share(PLACE, stats) == pytest.approx(20.0 / 80.0)
    # pressure of a source = load of the ranks its tokens go to over the mean (rank0 50/40, rank1 30/40):
    # source 0 sends 40 to rank 0 and 10 to rank 1, source 1 sends 20 to rank 1 and 10 to rank 0
    np.testing.assert_allclose(metrics.placement_pressure(PLACE, stats),
                               [(40 * 1.25 + 10 * 0.75) / 50, (20 * 0.75 + 10 * 1.25) / 30])


def test_all_zero_layers_are_skipped():
    place = placement_from_phy2log(np.array([[0, 1, 0, 2], [0, 1, 2, 0]]), 3)
    counts = np.zeros((1, 2, 1, 3))
    counts[0, 0, 0] = [40.0, 10.0, 30.0]
    assert metrics.balancedness(place, ExpertStats(source_counts=counts), num_ranks=2) == pytest.approx(0.8)


def test_migrated_fraction():
    other = placement_from_phy2log(np.array([[0, 1, 2, 0]]), 3)
    assert metrics.migrated_fraction(other, PLACE) == pytest.approx(0.5)
    assert metrics.migrated_fraction(PLACE, None) == 0.0


def test_cross_rank_share_when_tokens_stay_with_their_expert():
    # layer 0: source 0 sends 10 to e1 (rank 0 only). layer 1 places e2 on rank 1 only: the pair (e1 -> e2) hops.
    place = placement_from_phy2log(np.array([[0, 1, 0, 2], [0, 1, 0, 2]]), 3)
    counts = np.zeros((1, 2, 2, 3))
    counts[0, 0, 0, 1] = 10.0
    counts[0, 1, 0, 2] = 10.0
    coact = np.zeros((1, 3, 3))
    coact[0, 1, 2] = 10.0
    stats = ExpertStats(source_counts=counts, coactivation=coact)
    # layer 0: local (10 of 10); hop e1@rank0 -> e2@rank1: cross (10 of 10) -> 10 / 20
    assert metrics.cross_rank_share_stay(place, stats) == pytest.approx(0.5)
    # combine model: layer 1 source 0 -> e2 on rank 1 is remote as well -> 10 / 20
    assert metrics.cross_rank_share(place, stats) == pytest.approx(0.5)


def test_source_destinations_sum_to_rank_loads():
    rng = np.random.default_rng(0)
    place = placement_from_phy2log(rng.permutation(np.arange(8) % 6).reshape(1, 8), 6)
    has = metrics.replica_matrix(place.phy2log, 6, 4)
    for sources in (1, 4):
        counts = rng.integers(0, 50, size=(1, sources, 6)).astype(float)
        dest = metrics.source_destinations(has, counts)
        np.testing.assert_allclose(dest.sum(1), metrics.rank_loads(has, counts))
        np.testing.assert_allclose(dest.sum(2), counts.sum(2))  # every token is served somewhere


def test_aggregate_statistics_give_every_rank_the_same_pressure():
    stats = ExpertStats(source_counts=np.array([[[[40.0, 10.0, 30.0]]]]))  # S == 1: senders unknown
    # rank loads 30 / 50 (e0 split over both): (30 * 0.75 + 50 * 1.25) / 80 for every rank
    np.testing.assert_allclose(metrics.placement_pressure(PLACE, stats, num_ranks=2), [85.0 / 80.0] * 2)
    with pytest.raises(ValueError, match="3 sources"):
        metrics.placement_pressure(PLACE, ExpertStats(source_counts=np.ones((1, 1, 3, 3))), num_ranks=2)


def test_pressure_is_neutral_on_balanced_destinations():
    dest = np.array([[[3.0, 1.0], [0.0, 2.0]]])  # [L=1, S=2, G=2]
    np.testing.assert_allclose(metrics.expert_pressure(dest, np.array([[7.0, 7.0]])), [1.0, 1.0])
    np.testing.assert_allclose(metrics.expert_pressure(dest, np.array([[3.0, 1.0]])), [(3 * 1.5 + 0.5) / 4, 0.5])
