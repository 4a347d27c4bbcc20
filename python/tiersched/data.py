"""Shared data discovery and trace loaders (no copies: files are read in place from ../shared/data).

`shared_data_dir()` looks at $TIERSCHED_SHARED_DATA, then `<repo>/../shared/data`; it returns None when neither
exists, and callers fall back to built-in synthetic workloads. Loaders return plain numpy arrays (one row per
request) so the simulator can vectorise over them. Layout and licences: ../shared/data/README.md.
"""
from __future__ import annotations

import ast
import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

AZURE_CONV = "traces/azure_llm_2023/AzureLLMInferenceTrace_conv.csv"
MOONCAKE_CONV = "traces/mooncake/conversation_trace.jsonl"
SHAREGPT_LENGTHS = "traces/length_dists/sharegpt_8k_filtered_stats_llama2_tokenizer.csv"
SERVEGEN_DIR = "traces/servegen/reason_deepseek-r1"
DEEPSEEK_EXPERT_COUNTS = "moe/deepseek_v3_expert_counts"
MIXTRAL_TRANSITION = "moe/mixtral_transition/expert_transition_lookup.json"
MOONCAKE_BLOCK_TOKENS = 512  # the Mooncake trace's hash_ids cover 512-token prefix blocks


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path | None:
    """The shared data folder, or None when this clone has none (tests then skip, tools use synthetic data)."""
    env = os.environ.get("TIERSCHED_SHARED_DATA")
    if env:
        path = Path(env)
        return path if path.is_dir() else None
    path = repo_root().parent / "shared" / "data"
    return path if path.is_dir() else None


def shared_path(relative: str) -> Path | None:
    root = shared_data_dir()
    if root is None:
        return None
    path = root / relative
    return path if path.exists() else None


@dataclass(frozen=True)
class TraceRequests:
    """One row per request, arrivals sorted, relative to the first one.

    arrival_s float[N]; input_tokens int[N]; output_tokens int[N]; prefix_blocks: per request a tuple of block
    hashes (chained: equal hashes = equal prefix up to that block) or () when the trace has none.
    """

    arrival_s: np.ndarray
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    prefix_blocks: tuple[tuple[int, ...], ...] = ()
    block_tokens: int = 0

    def __len__(self) -> int:
        return int(self.arrival_s.shape[0])


def _limit(n: int, limit: int | None) -> int:
    return n if limit is None else min(n, limit)


def load_azure_conv(path: Path | None = None, limit: int | None = None) -> TraceRequests:
    """Azure LLM inference trace 2023 (conversation): TIMESTAMP, ContextTokens, GeneratedTokens."""
    path = path or shared_path(AZURE_CONV)
    if path is None:
        raise FileNotFoundError(f"{AZURE_CONV} not found under the shared data folder")
    stamps, ctx, gen = [], [], []
    with open(path, newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            if limit is not None and i >= limit:
                break
            stamps.append(row["TIMESTAMP"])
            ctx.append(int(row["ContextTokens"]))
            gen.append(int(row["GeneratedTokens"]))
    t = np.array(stamps, dtype="datetime64[ns]")
    arrival = (t - t.min()).astype(np.int64) / 1e9
    order = np.argsort(arrival, kind="stable")
    return TraceRequests(arrival[order], np.array(ctx)[order], np.maximum(1, np.array(gen)[order]))


def load_mooncake(path: Path | None = None, limit: int | None = None) -> TraceRequests:
    """Mooncake conversation trace: timestamp (ms), input_length, output_length, hash_ids (512-token blocks)."""
    path = path or shared_path(MOONCAKE_CONV)
    if path is None:
        raise FileNotFoundError(f"{MOONCAKE_CONV} not found under the shared data folder")
    ts, inp, out, blocks = [], [], [], []
    with open(path) as f:
        for i, line in enumerate(f):
            if limit is not None and i >= limit:
                break
            row = json.loads(line)
            ts.append(row["timestamp"] / 1000.0)
            inp.append(int(row["input_length"]))
            out.append(int(row["output_length"]))
            # hash_ids cover ceil(input/512) blocks; only full blocks are reusable KV pages.
            blocks.append(tuple(row["hash_ids"][: int(row["input_length"]) // MOONCAKE_BLOCK_TOKENS]))
    arrival = np.array(ts, dtype=float)
    arrival -= arrival.min()
    order = np.argsort(arrival, kind="stable")
    return TraceRequests(
        arrival[order],
        np.array(inp)[order],
        np.maximum(1, np.array(out)[order]),
        tuple(blocks[i] for i in order),
        MOONCAKE_BLOCK_TOKENS,
    )


def load_sharegpt_lengths(path: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """ShareGPT (sarathi-serve filtered) prompt and output lengths: (prefill int[N], decode int[N])."""
    path = path or shared_path(SHAREGPT_LENGTHS)
    if path is None:
        raise FileNotFoundError(f"{SHAREGPT_LENGTHS} not found under the shared data folder")
    data = np.loadtxt(path, delimiter=",", skiprows=1, usecols=(0, 1))
    return data[:, 0].astype(np.int64), data[:, 1].astype(np.int64)


@dataclass(frozen=True)
class ServeGenClient:
    """One ServeGen client: 600 s windows with arrival statistics and per-window length PMFs.

    windows: float[W, 3] = (window_start_s, rate_req_per_s, cv); patterns: per window (name, param1, param2);
    input_pmf / output_pmf: per window start -> (values int[K], probs float[K]) (absent windows are missing).
    """

    client_id: int
    windows: np.ndarray
    patterns: tuple[tuple[str, float, float], ...]
    input_pmf: dict[int, tuple[np.ndarray, np.ndarray]]
    output_pmf: dict[int, tuple[np.ndarray, np.ndarray]]


def _parse_pmf(text: str) -> tuple[np.ndarray, np.ndarray]:
    pmf = ast.literal_eval(text) if text else {}  # stored as a Python dict literal string
    values = np.fromiter(pmf.keys(), dtype=np.int64, count=len(pmf))
    probs = np.fromiter(pmf.values(), dtype=float, count=len(pmf))
    return values, (probs / probs.sum() if probs.size else probs)


def pmf_for_window(pmfs: dict[int, tuple[np.ndarray, np.ndarray]], window_start_s: float):
    """The length PMF in force at `window_start_s`: the latest one recorded at or before it (else the first)."""
    if not pmfs:
        return None
    starts = sorted(pmfs)
    earlier = [s for s in starts if s <= window_start_s]
    return pmfs[earlier[-1] if earlier else starts[0]]


def servegen_client_ids(folder: Path | None = None) -> list[int]:
    folder = folder or shared_path(SERVEGEN_DIR)
    if folder is None:
        return []
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("chunk-*-trace.csv"))


def load_servegen_client(client_id: int, folder: Path | None = None) -> ServeGenClient:
    folder = folder or shared_path(SERVEGEN_DIR)
    if folder is None:
        raise FileNotFoundError(f"{SERVEGEN_DIR} not found under the shared data folder")
    windows, patterns = [], []
    with open(folder / f"chunk-{client_id}-trace.csv", newline="") as f:
        for row in csv.reader(f):
            start, rate, cv = float(row[0]), float(row[1] or 0), float(row[2] or 0)
            windows.append((start, rate, cv))
            patterns.append((row[3], float(row[4] or 0), float(row[5] or 0)))
    input_pmf, output_pmf = {}, {}
    dataset = folder / f"chunk-{client_id}-dataset.json"
    if dataset.exists():
        with open(dataset) as f:
            for start, entry in json.load(f).items():
                pmf_in, pmf_out = _parse_pmf(entry["input_tokens"]), _parse_pmf(entry["output_tokens"])
                if pmf_in[0].size and pmf_out[0].size:  # some windows carry empty PMFs: skip them
                    input_pmf[int(float(start))] = pmf_in
                    output_pmf[int(float(start))] = pmf_out
    return ServeGenClient(client_id, np.array(windows, dtype=float), tuple(patterns), input_pmf, output_pmf)


def load_deepseek_expert_counts(name: str = "decode_in1000out1000", path: Path | None = None) -> np.ndarray:
    """float[L=61, E=256] logical expert counts (layers 0-2 dense, all zero)."""
    path = path or shared_path(f"{DEEPSEEK_EXPERT_COUNTS}/{name}.json")
    if path is None:
        raise FileNotFoundError(f"{DEEPSEEK_EXPERT_COUNTS}/{name}.json not found under the shared data folder")
    with open(path) as f:
        return np.asarray(json.load(f)["logical_count"], dtype=float)


def load_mixtral_transition(path: Path | None = None) -> np.ndarray:
    """float[8, 8]: P(expert j at layer n+1 | expert i at layer n), Mixtral-8x7B."""
    path = path or shared_path(MIXTRAL_TRANSITION)
    if path is None:
        raise FileNotFoundError(f"{MIXTRAL_TRANSITION} not found under the shared data folder")
    with open(path) as f:
        return np.asarray(json.load(f)["matrix"], dtype=float)
