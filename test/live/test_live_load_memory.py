"""Memory report of the load run without a server: per-process RSS of a process group, quarter means, plateau."""
import pytest

from tiersched.live.load import MIB, memory_report, quarter_means, rss_bounded


def test_quarter_means_split_the_series_in_four_consecutive_parts():
    assert quarter_means([1, 2, 3, 4, 5, 6, 7, 8]) == [1.5, 3.5, 5.5, 7.5]
    assert quarter_means(list(range(10))) == pytest.approx([0.5, 3.0, 6.0, 8.5])  # 2, 3, 3, 2 samples


def _series(values_mib):
    return [(float(i), {"tokenizer+http": int(v * MIB), "scheduler_DP0": 100 * MIB}) for i, v in enumerate(values_mib)]


def test_steady_growth_is_not_bounded_but_a_plateau_is():
    leak = memory_report(_series([1000 + 2 * i for i in range(300)]))  # +2 MiB/s for the whole run
    assert leak["rss_growth_q3_to_q4_mib"] == pytest.approx(150, abs=1)
    assert not rss_bounded(leak)
    warm = memory_report(_series([1000 + min(i, 150) * 4 for i in range(300)]))  # grows, then stays
    assert warm["rss_growth_last_vs_first_quarter_mib"] > 400  # the old first-vs-last measure calls this growth
    assert warm["rss_growth_q3_to_q4_mib"] == 0
    assert rss_bounded(warm)
    per = warm["rss_per_process"]
    assert per["scheduler_DP0"]["growth_q3_to_q4_mib"] == 0 and per["tokenizer+http"]["peak_mib"] == 1600


def test_engine_tier_dispatch_state_stays_bounded_over_many_requests():
    """Our per-request state in the DP controller (prefix index, optimistic charges, sessions) does not grow with
    the number of requests: 20,000 distinct prompts (as in a long load run) leave it at its bounds."""
    from tiersched.core.engine import EngineTierConfig, DispatchRequest, RankLoad
    from tiersched.core.engine.score import ScoreDispatcher

    config = EngineTierConfig(max_sessions=50)
    d = ScoreDispatcher(2, config)
    capacity_tokens = 16384  # the live runs' --max-total-tokens per rank
    for i in range(20_000):
        now = i * 0.01
        if i % 10 == 0:  # a fresh snapshot every 0.1 s, as the schedulers publish
            d.update_loads([RankLoad(rank=r, kv_capacity_tokens=capacity_tokens, timestamp_s=now) for r in (0, 1)], now)
        blocks = tuple(range(i * 8, i * 8 + 8))  # every prompt new: the worst case for the index
        d.pick(DispatchRequest(rid=f"r{i}", input_tokens=64, prefix_blocks=blocks, session_key=f"s{i}"), now)
    for r in (0, 1):
        assert d.index.blocks_on(r) <= capacity_tokens // config.block_tokens
        assert len(d._charges[r]) <= 20  # charges older than the last snapshot (+ grace) are dropped
    assert len(d._sessions) == 50
