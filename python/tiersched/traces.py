"""Bring your own trace: read a user's request trace file into the simulator's Workload.

Formats, told apart by the first record (a JSON object) or the CSV header:
- Mooncake JSONL: one object per line with `timestamp` (ms), `input_length`, `output_length` and, optional,
  `hash_ids` (ids of the prompt's 512-token blocks, chained: equal id = equal prefix up to that block; only the
  blocks the prompt fills completely are kept, as the shared Mooncake loader does).
- Azure LLM inference CSV (2023/2024): `TIMESTAMP` (a date-time such as `2023-11-16 18:15:46.6805900`, or
  seconds), `ContextTokens`, `GeneratedTokens`.
- BurstGPT CSV: `Timestamp` (s), `Request tokens`, `Response tokens` (other columns are ignored).

Handling, decided here and documented in docs/simulator.md:
- a malformed record stops the load with one line naming the file, the line number and the field
  (`TraceError`, e.g. `trace.jsonl:17: field 'input_length' is not a non-negative integer: "abc"`); nothing is
  simulated. Blank lines are skipped.
- an empty file, a file with no request rows, or an unknown header/record is an error.
- arrivals are sorted (stable) and made relative to the first one: traces merged from several sources are not
  always in order. `meta["reordered"]` says whether the order changed.
- a request with 0 prompt tokens cannot be served (SGLang rejects an empty prompt): it is skipped and counted in
  `meta["skipped_zero_input"]`; 0 output tokens count as 1 (every request produces its first token), as the
  shared-trace loaders do, counted in `meta["zero_output_as_one"]`.
- `rate` rescales the arrival times to that mean rate and `duration_s` keeps the arrivals up to then, as for the
  shared traces (tiersched.sim.workloads.from_trace).
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from tiersched.data import MOONCAKE_BLOCK_TOKENS, TraceRequests

FORMATS = ("mooncake", "azure", "burstgpt")
CSV_COLUMNS = {  # format -> (timestamp, input tokens, output tokens) columns
    "azure": ("TIMESTAMP", "ContextTokens", "GeneratedTokens"),
    "burstgpt": ("Timestamp", "Request tokens", "Response tokens"),
}
MOONCAKE_FIELDS = ("timestamp", "input_length", "output_length")


class TraceError(ValueError):
    """A trace file that cannot be read; the message is one line, starting with `file:line:` when a record is
    at fault."""


def _show(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _count(where: str, field: str, value) -> int:
    """A non-negative integer token count (JSON int, integral float, or its text)."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip()) if value.strip() else None
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) \
            or number < 0 or number != int(number):
        raise TraceError(f"{where}: field {field!r} is not a non-negative integer: {_show(value)}")
    return int(number)


def _seconds(where: str, field: str, value, scale: float = 1.0) -> float:
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
        raise TraceError(f"{where}: field {field!r} is not a finite number: {_show(value)}")
    return float(number) * scale


def _azure_time(where: str, value) -> float:
    """Seconds since the epoch from an Azure TIMESTAMP (date-time text, or a number of seconds)."""
    text = (value or "").strip() if isinstance(value, str) else value
    try:
        return float(text)
    except (TypeError, ValueError):
        pass
    try:
        stamp = np.datetime64(text, "ns")
    except (TypeError, ValueError):
        stamp = np.datetime64("NaT")
    if np.isnat(stamp):
        raise TraceError(f"{where}: field 'TIMESTAMP' is not a date-time or a number: {_show(value)}")
    return stamp.astype(np.int64) / 1e9


def detect_format(path: str | Path) -> str:
    """'mooncake', 'azure' or 'burstgpt' from the first non-blank line; TraceError if it is none of them."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                return _format_of(path, number, line)
    raise TraceError(f"{path}: the file is empty; a trace needs a header or a first record")


def _format_of(path: Path, number: int, line: str) -> str:
    text = line.strip().lstrip("\ufeff")
    if text.startswith("{"):
        return "mooncake"
    header = {c.strip() for c in next(csv.reader([text]))}
    for name, columns in CSV_COLUMNS.items():
        if set(columns) <= header:
            return name
    known = "; ".join([f"Mooncake JSONL ({', '.join(MOONCAKE_FIELDS)}, hash_ids)"]
                      + [f"{n} CSV ({', '.join(c)})" for n, c in (("Azure", CSV_COLUMNS["azure"]),
                                                                   ("BurstGPT", CSV_COLUMNS["burstgpt"]))])
    raise TraceError(f"{path}:{number}: unknown trace format (first line {_show(text)}); expected {known}")


def _mooncake_rows(path: Path, f):
    for number, line in enumerate(f, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{where}: not a JSON object ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise TraceError(f"{where}: not a JSON object: {_show(row)}")
        for field in MOONCAKE_FIELDS:
            if field not in row:
                raise TraceError(f"{where}: field {field!r} is missing")
        t = _seconds(where, "timestamp", row["timestamp"], 1e-3)
        n_in = _count(where, "input_length", row["input_length"])
        n_out = _count(where, "output_length", row["output_length"])
        ids = row.get("hash_ids", [])
        if not isinstance(ids, list) or any(isinstance(h, bool) or not isinstance(h, int) for h in ids):
            raise TraceError(f"{where}: field 'hash_ids' is not a list of integers: {_show(ids)}")
        yield t, n_in, n_out, tuple(ids[: n_in // MOONCAKE_BLOCK_TOKENS])


def _csv_rows(path: Path, f, fmt: str):
    t_col, in_col, out_col = CSV_COLUMNS[fmt]
    reader = csv.DictReader(f)
    reader.fieldnames = [name.strip().lstrip("\ufeff") for name in reader.fieldnames or []]
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if not any((v or "").strip() for k, v in row.items() if k is not None):
            continue  # a blank line
        for col in (t_col, in_col, out_col):
            if row.get(col) is None:
                raise TraceError(f"{where}: field {col!r} is missing")
        t = _azure_time(where, row[t_col]) if fmt == "azure" else _seconds(where, t_col, row[t_col])
        yield t, _count(where, in_col, row[in_col]), _count(where, out_col, row[out_col]), ()


def read_trace(path: str | Path) -> tuple[TraceRequests, dict]:
    """The file's requests (sorted by arrival, relative to the first; zero-prompt rows skipped) and what was done
    to them: {"format", "rows", "skipped_zero_input", "zero_output_as_one", "reordered"}."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: no such trace file")
    fmt = detect_format(path)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(_mooncake_rows(path, f) if fmt == "mooncake" else _csv_rows(path, f, fmt))
    if not rows:
        raise TraceError(f"{path}: the trace holds no requests (only a header or blank lines)")
    kept = [r for r in rows if r[1] > 0]
    if not kept:
        raise TraceError(f"{path}: every request has 0 prompt tokens; nothing to simulate")
    arrival = np.array([r[0] for r in kept], dtype=float)
    order = np.argsort(arrival, kind="stable")
    arrival = arrival[order] - arrival[order[0]]
    inputs = np.array([kept[i][1] for i in order], dtype=np.int64)
    outputs = np.array([kept[i][2] for i in order], dtype=np.int64)
    blocks = tuple(kept[i][3] for i in order) if fmt == "mooncake" else ()
    trace = TraceRequests(arrival, inputs, np.maximum(1, outputs), blocks,
                          MOONCAKE_BLOCK_TOKENS if fmt == "mooncake" else 0)
    info = {"format": fmt, "rows": len(rows), "skipped_zero_input": len(rows) - len(kept),
            "zero_output_as_one": int((outputs == 0).sum()), "reordered": bool((np.diff(order) < 0).any())}
    return trace, info


def load_trace(path: str | Path, rate: float | None = None, duration_s: float | None = None):
    """A user's trace file -> the simulator's Workload (format detected; see the module docstring)."""
    from tiersched.sim.workloads import from_trace

    trace, info = read_trace(path)
    return from_trace(trace, f"trace:{Path(path).name}", rate=rate, duration_s=duration_s,
                      meta={"trace": str(path), **info})
