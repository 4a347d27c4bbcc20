"""Request sets for the live A/B: prefix structure preserved token-exactly, classes, rates, fallbacks."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tiersched.live import requests as lr


def common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


shared_blocks = common_prefix  # the same count, over hash-id lists instead of token lists


@given(st.integers(0, 2**40), st.integers(1, 64))
@settings(max_examples=50, deadline=None)
def test_block_tokens_are_fixed_per_hash_and_ordinary(hash_id, block_tokens):
    a = lr.block_token_ids(hash_id, block_tokens)
    assert a == lr.block_token_ids(hash_id, block_tokens)
    assert len(a) == block_tokens
    assert all(lr.FIRST_ORDINARY_TOKEN <= t < lr.DEFAULT_VOCAB for t in a)


def _check_prefix_structure(s):
    reqs = s.requests
    for i in range(0, len(reqs), 3):
        for j in range(i + 1, min(len(reqs), i + 15)):
            a, b = reqs[i], reqs[j]
            blocks = shared_blocks(a.prefix_blocks, b.prefix_blocks)
            # equal leading blocks give equal leading tokens; the next block (if both have one) differs
            assert a.input_ids[: blocks * s.block_tokens] == b.input_ids[: blocks * s.block_tokens]
            if blocks < min(len(a.prefix_blocks), len(b.prefix_blocks)):
                assert common_prefix(a.input_ids, b.input_ids) < (blocks + 1) * s.block_tokens


def test_synthetic_set_shares_prefixes_like_its_blocks():
    s = lr.synthetic_shared_prefix(n=60, block_tokens=8, rate=2.0)
    assert len(s) == 60 and s.source == "synthetic"
    _check_prefix_structure(s)
    assert s.reusable_block_fraction() > 0.3  # conversations re-send earlier turns


def test_rate_rescaling_keeps_order_and_hits_rate():
    s = lr.synthetic_shared_prefix(n=50, rate=5.0)
    arrivals = np.array([r.arrival_s for r in s.requests])
    assert arrivals[0] == 0 and np.all(np.diff(arrivals) >= 0)
    assert (len(s) - 1) / arrivals[-1] == pytest.approx(5.0)
    slower = s.with_rate(1.0)
    assert slower.duration_s == pytest.approx(5.0 * s.duration_s)
    assert [r.input_ids for r in slower.requests] == [r.input_ids for r in s.requests]


def test_classes_carry_priorities():
    s = lr.synthetic_shared_prefix(n=200, ls_fraction=0.25, seed=3)
    ls = [r for r in s.requests if r.cls == "ls"]
    assert 20 < len(ls) < 80
    assert all(r.priority == lr.LS_PRIORITY for r in ls)
    assert all(r.priority == lr.BE_PRIORITY for r in s.requests if r.cls == "be")


def test_mooncake_set_keeps_trace_sharing(shared_data):
    s = lr.mooncake_shared_prefix(n=80, block_tokens=8, rate=3.0)
    assert len(s) == 80 and "mooncake" in s.source
    _check_prefix_structure(s)
    assert all(len(r.input_ids) <= 1024 for r in s.requests)
    assert all(len(r.input_ids) >= 8 * len(r.prefix_blocks) for r in s.requests)
    # the window filter keeps requests that share blocks, so a single cache could reuse a real share of them
    assert s.reusable_block_fraction() > 0.1
    assert 2 <= min(r.output_len for r in s.requests) and max(r.output_len for r in s.requests) <= 32


def test_azure_lengths_scaled(shared_data):
    s = lr.azure_lengths(n=50, rate=2.0)
    assert len(s) == 50 and s.block_tokens == 0
    assert all(4 <= len(r.input_ids) <= 512 and 2 <= r.output_len <= 32 for r in s.requests)


def test_shared_prefix_set_falls_back_without_shared_data(monkeypatch, tmp_path):
    monkeypatch.setenv("TIERSCHED_SHARED_DATA", str(tmp_path / "absent"))
    s = lr.shared_prefix_set(30, 2.0)
    assert s.source == "synthetic" and len(s) == 30
    assert lr.lengths_set(30, 2.0) is None
