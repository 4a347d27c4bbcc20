"""The bench_serving A/B recipe: upstream's own client, `python -m sglang.bench_serving`, against each arm's server.

Each arm's server is a plain `python -m sglang.launch_server` (tiersched.rig.server, flags from tiersched.live.arms).
Per repeat the arms run one after another, alternating the order (A B, then B A), each from a flushed cache and
with the other arms' servers paused (tiersched.live.ab.only_running). A run is one bench_serving process per
request class ("stream"), all started together against the same server: bench_serving sends one
`--extra-request-body` to every request, so a latency-sensitive class with its own priority is a second process
(its own prompts, from its own `--seed`). The streams' processes are started through a start gate
(tiersched.live.bench_serving_gate: the same bench_serving CLI, called once its imports are done), so that their
measured windows coincide although importing SGLang takes each of them tens of seconds here. Streams use `--dataset-name generated-shared-prefix`, which needs no
download (`random` fetches ShareGPT), with `--warmup-requests 0` (the cache is flushed just before the streams
start, so no stream's warm-up or flush lands in another's measured window), `--output-details --cache-report`,
and `--tag ARM:CLASS`; each (arm, class) appends its runs to `OUT/ARM-CLASS.jsonl`, which
`python -m tiersched.bench serving-ab OUT/*.jsonl` reads.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tiersched.live import ab as live_ab
from tiersched.live.driver import flush_cache
from tiersched.live.requests import BE_PRIORITY, LS_PRIORITY
from tiersched.rig.server import Server


@dataclass(frozen=True)
class Stream:
    """One request class: a generated-shared-prefix set of `groups` × `per_group` requests at `rate` req/s."""
    cls: str
    priority: int
    rate: float
    groups: int = 4
    per_group: int = 8
    system_len: int = 256
    question_len: int = 32
    output_len: int = 16
    seed: int = 1

    @property
    def requests(self) -> int:
        return self.groups * self.per_group


def default_streams(rate: float, ls_fraction: float = 0.25, requests: int = 32, groups: int = 4,
                    system_len: int = 256, question_len: int = 32, output_len: int = 16) -> list[Stream]:
    """A best-effort stream and a latency-sensitive one (`ls_fraction` of the requests and of the rate; none when
    0), both over `groups` shared system prompts of their own."""
    n_ls = int(round(requests * ls_fraction))
    n_be = requests - n_ls
    streams = []
    for cls, prio, n, seed in (("be", BE_PRIORITY, n_be, 1), ("ls", LS_PRIORITY, n_ls, 2)):
        if n <= 0:
            continue
        g = max(1, min(groups, n // 2))  # at least two requests per shared system prompt
        streams.append(Stream(cls, prio, rate * n / requests, g, max(1, n // g), system_len, question_len,
                              output_len, seed))
    return streams


def bench_serving_command(url: str, stream: Stream, tag: str, output_file: str | Path,
                          python: str = sys.executable, extra: Sequence[str] = ()) -> list[str]:
    """The exact `python -m sglang.bench_serving` command line of one stream."""
    return [python, "-m", "sglang.bench_serving", "--backend", "sglang", "--base-url", url,
            "--dataset-name", "generated-shared-prefix",
            "--gsp-num-groups", str(stream.groups), "--gsp-prompts-per-group", str(stream.per_group),
            "--gsp-system-prompt-len", str(stream.system_len), "--gsp-question-len", str(stream.question_len),
            "--gsp-output-len", str(stream.output_len), "--seed", str(stream.seed),
            "--request-rate", f"{stream.rate:g}", "--extra-request-body", json.dumps({"priority": stream.priority}),
            "--warmup-requests", "0", "--output-details", "--cache-report", "--disable-tqdm",
            "--tag", tag, "--output-file", str(output_file), *extra]


class BenchServingError(RuntimeError):
    pass


def _run_streams(url: str, arm: str, streams: Sequence[Stream], out_dir: Path, log_dir: Path, repeat: int,
                 timeout_s: float) -> list[Path]:
    """Start one gated bench_serving per stream, wait until all have imported, flush the cache, open the gate."""
    gate = log_dir / f"gate-{arm}-r{repeat}"
    for stale in log_dir.glob(gate.name + "*"):
        stale.unlink()
    procs = []
    for stream in streams:
        out = out_dir / f"{arm}-{stream.cls}.jsonl"
        log = log_dir / f"{arm}-{stream.cls}-r{repeat}.log"
        cmd = bench_serving_command(url, stream, f"{arm}:{stream.cls}", out)
        gated = [cmd[0], "-m", "tiersched.live.bench_serving_gate", str(gate), *cmd[3:]]
        with open(log, "w") as f:
            f.write(" ".join(cmd) + "\n")
            f.flush()
            procs.append((subprocess.Popen(gated, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                           env={**os.environ, "PYTHONUNBUFFERED": "1"}), out, log))
    deadline = time.monotonic() + timeout_s
    try:
        while len(list(log_dir.glob(gate.name + ".ready.*"))) < len(procs):
            if any(p.poll() is not None for p, _, _ in procs) or time.monotonic() > deadline:
                break  # a stream died while importing (or never got ready): reported below
            time.sleep(0.05)
        else:
            if not flush_cache(url):
                raise BenchServingError(f"arm {arm}: /flush_cache did not succeed")
            gate.touch()
        failed = []
        for proc, out, log in procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            if proc.returncode != 0:
                failed.append((proc.returncode, log))
    finally:
        for proc, _, _ in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if failed:
        tails = "\n".join(f"--- {log} (exit {rc}):\n" + "".join(open(log, errors="replace").readlines()[-15:])
                          for rc, log in failed)
        raise BenchServingError(f"bench_serving failed for arm {arm} repeat {repeat}:\n{tails}")
    return [out for _, out, _ in procs]


def run_recipe(servers: dict[str, Server], arms: Sequence[str], streams: Sequence[Stream], out_dir: str | Path,
               repeats: int, timeout_s: float = 600.0) -> list[Path]:
    """Every arm `repeats` times, alternating, each run = all `streams` at once from a flushed cache; returns the
    results files (bench_serving appends one line per run to each)."""
    out_dir = Path(out_dir)
    log_dir = out_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    for repeat in range(repeats):
        for arm in live_ab.alternate(arms, repeat):
            with live_ab.only_running(servers, arm) as srv:
                t0 = time.perf_counter()
                for path in _run_streams(srv.url, arm, streams, out_dir, log_dir, repeat, timeout_s):
                    if path not in files:
                        files.append(path)
            print(f"[serving-ab] repeat {repeat} {arm}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    for arm in arms:
        if not servers[arm].alive():
            raise BenchServingError(f"server of arm {arm} died; log tail:\n{servers[arm].log_tail(40)}")
    return files
