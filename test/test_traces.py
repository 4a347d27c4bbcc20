"""A user's own trace file (Mooncake JSONL, Azure CSV, BurstGPT CSV) becomes the simulator's Workload; a malformed
record stops the load with one line naming the file, the line and the field."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tiersched.bench.runner import Scenario, build_workload
from tiersched.traces import TraceError, detect_format, load_trace, read_trace

REPO_PYTHON = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python")


def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def _mooncake(tmp_path, rows, name="trace.jsonl"):
    return _write(tmp_path, name, "".join(json.dumps(r) + "\n" for r in rows))


MOONCAKE_ROWS = [
    {"timestamp": 0, "input_length": 1100, "output_length": 50, "hash_ids": [0, 1, 2]},
    {"timestamp": 250, "input_length": 600, "output_length": 0, "hash_ids": [0, 7]},
    {"timestamp": 100, "input_length": 300, "output_length": 9, "hash_ids": [5]},
    {"timestamp": 1500, "input_length": 2048, "output_length": 12, "hash_ids": [0, 1, 8, 9]},
]


def test_mooncake_jsonl(tmp_path):
    path = _mooncake(tmp_path, MOONCAKE_ROWS)
    assert detect_format(path) == "mooncake"
    w = load_trace(path)
    # sorted by arrival (the 100 ms row comes second), ms -> s, relative to the first request
    np.testing.assert_allclose(w.arrival_s, [0.0, 0.1, 0.25, 1.5])
    np.testing.assert_array_equal(w.input_tokens, [1100, 300, 600, 2048])
    np.testing.assert_array_equal(w.output_tokens, [50, 9, 1, 12])  # 0 output tokens -> 1
    # only the 512-token blocks the prompt fills completely are prefix pages
    assert w.prefix_blocks == ((0, 1), (), (0,), (0, 1, 8, 9))
    assert w.block_tokens == 512
    assert w.meta["format"] == "mooncake" and w.meta["reordered"] and w.meta["zero_output_as_one"] == 1


def test_azure_csv(tmp_path):
    path = _write(tmp_path, "azure.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n"
                  "2023-11-16 18:15:46.6805900,374,44\n"
                  "2023-11-16 18:15:50.9951690,396,109\n"
                  "\n"
                  "2023-11-16 18:15:47.0000000,1000,0\n")
    assert detect_format(path) == "azure"
    w = load_trace(path)
    np.testing.assert_allclose(w.arrival_s, [0.0, 47.0 - 46.68059, 50.995169 - 46.68059], atol=1e-6)
    np.testing.assert_array_equal(w.input_tokens, [374, 1000, 396])
    np.testing.assert_array_equal(w.output_tokens, [44, 1, 109])
    assert w.prefix_blocks == () and len(w) == 3


def test_burstgpt_csv_skips_zero_prompts(tmp_path):
    path = _write(tmp_path, "burst.csv", "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                  "5,ChatGPT,472,18,490,Conversation log\n"
                  "6.5,GPT-4,0,0,0,Conversation log\n"
                  "45,ChatGPT,1087,0,1087,API log\n")
    assert detect_format(path) == "burstgpt"
    w = load_trace(path)
    np.testing.assert_allclose(w.arrival_s, [0.0, 40.0])
    np.testing.assert_array_equal(w.input_tokens, [472, 1087])
    np.testing.assert_array_equal(w.output_tokens, [18, 1])
    assert w.meta["skipped_zero_input"] == 1 and w.meta["rows"] == 3


def test_rate_and_duration_like_shared_traces(tmp_path):
    rows = [{"timestamp": 1000 * i, "input_length": 100, "output_length": 5} for i in range(11)]  # 1 req/s
    path = _mooncake(tmp_path, rows)
    w = load_trace(path, rate=4.0, duration_s=1.0)
    np.testing.assert_allclose(w.arrival_s, [0.0, 0.25, 0.5, 0.75, 1.0])
    assert w.name == "trace:trace.jsonl-4rps" and w.meta["rate"] == 4.0
    assert len(load_trace(path, duration_s=3.5)) == 4


@pytest.mark.parametrize("line, message", [
    ('{"timestamp": 5, "input_length": "abc", "output_length": 3}',
     "field 'input_length' is not a non-negative integer: \"abc\""),
    ('{"timestamp": 5, "input_length": -4, "output_length": 3}', "field 'input_length' is not a non-negative"),
    ('{"timestamp": 5, "input_length": 7.5, "output_length": 3}', "field 'input_length' is not a non-negative"),
    ('{"timestamp": 5, "input_length": 7}', "field 'output_length' is missing"),
    ('{"timestamp": "soon", "input_length": 7, "output_length": 3}', "field 'timestamp' is not a finite number"),
    ('{"timestamp": 5, "input_length": 7, "output_length": 3, "hash_ids": [1, "x"]}',
     "field 'hash_ids' is not a list of integers"),
    ('{"timestamp": 5, "input_length": 7, ', "not a JSON object"),
    ('[1, 2]', "not a JSON object"),
])
def test_malformed_jsonl_line_names_file_line_and_field(tmp_path, line, message):
    good = json.dumps(MOONCAKE_ROWS[0])
    path = _write(tmp_path, "trace.jsonl", f"{good}\n\n{good}\n{line}\n{good}\n")
    with pytest.raises(TraceError) as err:
        load_trace(path)
    text = str(err.value)
    assert text.startswith(f"{path}:4: ") and message in text and "\n" not in text


@pytest.mark.parametrize("row, message", [
    ("2023-11-16 18:15:47,12x,3", "field 'ContextTokens' is not a non-negative integer: \"12x\""),
    ("yesterday,12,3", "field 'TIMESTAMP' is not a date-time or a number"),
    ("2023-11-16 18:15:47,12", "field 'GeneratedTokens' is missing"),
])
def test_malformed_csv_row_names_file_line_and_field(tmp_path, row, message):
    path = _write(tmp_path, "azure.csv", f"TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,1,1\n{row}\n")
    with pytest.raises(TraceError, match=f"^{str(path)}:3: ") as err:
        read_trace(path)
    assert message in str(err.value)


def test_empty_unknown_and_header_only_files(tmp_path):
    with pytest.raises(TraceError, match="is empty"):
        read_trace(_write(tmp_path, "empty.jsonl", "\n  \n"))
    with pytest.raises(TraceError, match="unknown trace format.*Mooncake JSONL.*Azure CSV.*BurstGPT CSV"):
        read_trace(_write(tmp_path, "other.csv", "time,prompt,answer\n1,2,3\n"))
    with pytest.raises(TraceError, match="holds no requests"):
        read_trace(_write(tmp_path, "header.csv", "Timestamp,Request tokens,Response tokens\n"))
    with pytest.raises(TraceError, match="every request has 0 prompt tokens"):
        read_trace(_write(tmp_path, "zeros.csv", "Timestamp,Request tokens,Response tokens\n1,0,5\n"))
    with pytest.raises(TraceError, match="no such trace file"):
        read_trace(tmp_path / "missing.jsonl")


def test_runner_treats_a_file_path_as_a_user_trace(tmp_path):
    path = _mooncake(tmp_path, MOONCAKE_ROWS)
    w = build_workload(Scenario(workload=str(path), rate=None, duration_s=1.0))
    assert len(w) == 3 and w.meta["trace"] == str(path)
    with pytest.raises(TraceError, match="no such trace file"):
        build_workload(Scenario(workload=str(tmp_path / "nope.jsonl")))
    with pytest.raises(ValueError, match="path of a trace file"):
        build_workload(Scenario(workload="not-a-workload"))


def _bench(*args, cwd):
    env = {**os.environ, "PYTHONPATH": REPO_PYTHON}
    return subprocess.run([sys.executable, "-m", "tiersched.bench", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def test_compare_cli_stops_on_a_malformed_trace_with_one_line(tmp_path):
    path = _write(tmp_path, "bad.jsonl", json.dumps(MOONCAKE_ROWS[0]) + "\n"
                  + '{"timestamp": 5, "input_length": "abc", "output_length": 3}\n')
    before = set(os.listdir(tmp_path))
    out = _bench("compare", "--json", "--trace", str(path), "--workers", "1", cwd=tmp_path)
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{path}:2: field 'input_length' is not a non-negative integer" in lines[0]
    assert set(os.listdir(tmp_path)) == before  # nothing written


@pytest.mark.parametrize("kind", ["mooncake", "azure"])
def test_compare_cli_runs_a_user_trace_and_prints_the_checked_fields(tmp_path, kind):
    """The machine-readable check on a user's Mooncake JSONL and Azure CSV: the search space with its chunk sizes,
    each metric's upstream winner, per-row headroom (mean TTFT and TPOT) and the CIs over seeds, which on a trace
    measure only the simulator's draws (the JSON says so)."""
    if kind == "mooncake":
        rows = [{"timestamp": 40 * i, "input_length": 300 + 37 * (i % 5), "output_length": 4, "hash_ids": []}
                for i in range(24)]
        path = _mooncake(tmp_path, rows)
    else:
        path = _write(tmp_path, "user.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
            f"2023-11-16 18:15:{i * 0.04:010.7f},{300 + 37 * (i % 5)},4\n" for i in range(24)))
    out = _bench("compare", "--json", "--trace", str(path), "--duration", "2", "--seeds", "2", "--workers", "1",
                 cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["scenario"]["workload"] == str(path) and report["scenario"]["requests"] == 24
    assert report["scenario"]["seeds"] == [0, 1] and report["scenario"]["seeds_vary"].startswith("only the simulator")
    space = report["upstream_best_space"]
    chunks = next(d for d in space["dimensions"].values() if d["field"] == "chunked_prefill_size")
    assert len(chunks["values"]) >= 4 and space["runs"] > 1
    for name in ("ttft", "tpot"):
        winner = report[f"upstream_best_{name}"]
        assert winner["label"] and winner["flags"] and winner[f"{name}_mean"] > 0
    for row, entry in report["policies"].items():
        if row.startswith("bound:"):
            continue
        assert set(entry["headroom_captured"]) >= {"ttft_mean", "tpot_mean"}, row
        for field in ("ratio_vs_upstream_best_ci95", "headroom_captured_ci95"):
            ci = entry[field]["ttft_mean"]
            assert ci is None or (len(ci) == 2 and ci[0] <= ci[1]), (row, field, ci)
    assert report["policies"]["upstream-best"]["headroom_captured"]["ttft_mean"] in (0, None)  # None: no headroom


@pytest.mark.parametrize("kind", ["mooncake", "azure"])
def test_a_shared_trace_read_as_a_user_file_equals_the_shared_loader(kind):
    """The shared Mooncake / Azure files passed as a user's trace give the workload the shared loaders give."""
    from tiersched import data
    from tiersched.sim import workloads

    path = data.shared_path(data.MOONCAKE_CONV if kind == "mooncake" else data.AZURE_CONV)
    if path is None:
        pytest.skip("no shared data folder (../shared/data or $TIERSCHED_SHARED_DATA)")
    ours = load_trace(path, rate=5.0, duration_s=30.0)
    shared = (workloads.mooncake if kind == "mooncake" else workloads.azure_conv)(rate=5.0, duration_s=30.0)
    assert len(ours) == len(shared) > 20
    np.testing.assert_allclose(ours.arrival_s, shared.arrival_s)
    np.testing.assert_array_equal(ours.input_tokens, shared.input_tokens)
    np.testing.assert_array_equal(ours.output_tokens, shared.output_tokens)
    assert ours.prefix_blocks == shared.prefix_blocks and ours.block_tokens == shared.block_tokens
