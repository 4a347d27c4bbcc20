"""Shared-data discovery and trace loaders."""
from __future__ import annotations

import numpy as np
import pytest

from tiersched import data


def test_env_var_points_at_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TIERSCHED_SHARED_DATA", str(tmp_path))
    assert data.shared_data_dir() == tmp_path
    monkeypatch.setenv("TIERSCHED_SHARED_DATA", str(tmp_path / "missing"))
    assert data.shared_data_dir() is None


def test_mooncake_loader_on_a_small_file(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"timestamp": 1000, "input_length": 1100, "output_length": 5, "hash_ids": [0, 1, 2]}\n'
                    '{"timestamp": 0, "input_length": 600, "output_length": 0, "hash_ids": [0, 7]}\n')
    trace = data.load_mooncake(path)
    assert trace.arrival_s.tolist() == [0.0, 1.0]
    assert trace.input_tokens.tolist() == [600, 1100]
    assert trace.output_tokens.tolist() == [1, 5]  # at least one output token
    assert trace.prefix_blocks == ((0,), (0, 1))  # only full 512-token pages


def test_azure_loader_on_a_small_file(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.5,10,2\n2023-11-16 18:15:48.0,20,3\n")
    trace = data.load_azure_conv(path)
    assert trace.arrival_s.tolist() == pytest.approx([0.0, 1.5])
    assert trace.input_tokens.tolist() == [10, 20]


needs_data = pytest.mark.skipif(data.shared_data_dir() is None, reason="../shared/data is absent (a user's clone)")


@needs_data
def test_shared_traces_load_with_documented_sizes():
    assert len(data.load_azure_conv()) == 19366
    moon = data.load_mooncake(limit=500)
    assert len(moon) == 500 and all(len(b) <= n // 512 for b, n in zip(moon.prefix_blocks, moon.input_tokens))
    prefill, decode = data.load_sharegpt_lengths()
    assert len(prefill) == len(decode) == 30731
    client = data.load_servegen_client(data.servegen_client_ids()[0])
    assert client.windows.shape == (144, 3)
    for values, probs in client.input_pmf.values():
        assert np.isclose(probs.sum(), 1.0)
    counts = data.load_deepseek_expert_counts()
    assert counts.shape == (61, 256) and counts[:3].sum() == 0
    assert np.allclose(data.load_mixtral_transition().sum(axis=1), 1.0)
