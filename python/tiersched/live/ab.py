"""A/B runs on real upstream servers: every arm's server stays up for the whole deployment, runs alternate.

Order per repeat is counterbalanced (A B C, then C B A, ...), each run starts from a flushed cache, and all arms
get the identical request set (same prompts, same arrival times), so machine drift and cache history cancel.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from tiersched.live import arms as live_arms
from tiersched.live.driver import RequestResult, drive, flush_cache
from tiersched.live.report import summarize
from tiersched.live.requests import RequestSet
from tiersched.rig.server import Server, launch_server

MAX_TOTAL_TOKENS = 16384  # per rank: the prefix cache must hold a few conversations' shared blocks


class TierNotActive(RuntimeError):
    pass


@dataclass
class ArmRuns:
    arm: live_arms.Arm
    summaries: list[dict] = field(default_factory=list)
    results: list[list[RequestResult]] = field(default_factory=list)
    log_tail: str = ""
    died: bool = False  # the arm's server exited during the runs (its unanswered requests count as lost)


def check_tiers(server: Server, arm: live_arms.Arm) -> None:
    """The plugin prints its active tiers in every process at start-up; a tier the arm needs but the log lacks is
    an error. The whole log is read: a server kept for several runs has long since scrolled those lines out of
    any tail."""
    with open(server.log_path, errors="replace") as f:
        active = live_arms.active_tiers_in_log(f.read())
    missing = [t for t in arm.tiers if t not in active]
    if missing:
        raise TierNotActive(f"arm {arm.name}: tier(s) {', '.join(missing)} not active in the server (log says "
                            f"{sorted(active) or 'nothing'}); refusing to report upstream as tiersched")


@contextlib.contextmanager
def servers_for(model_dir: str, deployment: str, arms: Sequence[live_arms.Arm], log_dir: str | None = None,
                env: dict | None = None, timeout_s: float | None = None):
    """Start one server per arm (concurrently: start-up is mostly imports and waits), yield {arm: Server}, stop all.
    `timeout_s` per start: None = the rig's default (TIERSCHED_SERVER_TIMEOUT_S, else 420 s); three servers
    starting at once on a loaded 2-core machine have taken over 300 s."""
    managers = {arm.name: launch_server(model_dir, extra_args=live_arms.server_args(deployment, arm),
                                        env={**(env or {}), **arm.env},
                                        timeout_s=timeout_s, max_total_tokens=MAX_TOTAL_TOKENS, log_dir=log_dir)
                for arm in arms}
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack, ThreadPoolExecutor(len(arms)) as pool:
        futures = {name: pool.submit(cm.__enter__) for name, cm in managers.items()}
        servers, failure = {}, None
        for name, future in futures.items():
            try:
                servers[name] = future.result()
                stack.push(managers[name].__exit__)  # stopped however this block ends
            except Exception as exc:  # the rig already stopped this one; keep collecting the others to stop them
                failure = failure or exc
        if failure is not None:
            raise failure
        for arm in arms:
            check_tiers(servers[arm.name], arm)
        print(f"[live] {deployment}: {len(arms)} servers up in {time.monotonic() - t0:.0f} s", file=sys.stderr)
        yield servers


def measure_capacity(url: str, request_set: RequestSet, n: int = 40) -> float:
    """Sustainable request rate of this server on this set: `n` requests sent at once, completions per second."""
    burst = [replace(r, arrival_s=0.0) for r in request_set.requests[:n]]
    start = time.perf_counter()
    results = drive(url, burst, timeout_s=300.0)
    elapsed = time.perf_counter() - start
    flush_cache(url)
    done = sum(r.success for r in results)
    return done / elapsed if elapsed > 0 else 0.0


@contextlib.contextmanager
def only_running(servers: dict[str, Server], name: str):
    """SIGSTOP every other arm's process group while `name` is driven, SIGCONT them after.

    Upstream's DataParallelController polls its socket in a busy loop (event_loop with zmq.NOBLOCK) even when
    idle, about a third of a core each here; paused servers cannot steal the measured server's CPU.
    """
    paused = [srv for other, srv in servers.items() if other != name and srv.alive()]
    for srv in paused:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(srv.process.pid, signal.SIGSTOP)
    try:
        yield servers[name]
    finally:
        for srv in paused:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(srv.process.pid, signal.SIGCONT)


PREFILL_LINE = re.compile(r"\] Prefill batch, #new-seq: (\d+), #new-token: (\d+), #cached-token: (\d+)")
DECODE_LINE = re.compile(r"\] Decode batch, .*gen throughput \(token/s\): ([0-9.]+)")
PRICED_LINE = re.compile(r"tiersched cap pricing: kept (\d+) dropped (\d+) LS caps this pass")


def server_steps(log_text: str) -> dict:
    """What the server's schedulers logged in one run (upstream logs every prefill batch, and a decode line every
    `--decode-log-interval` decode steps): prefill batches over all ranks, their new and cached tokens, the
    lockstep caps tiersched logged, the priced cap's decisions where the fixed rule would cap (kept: capped;
    dropped: priced as not paying), and the mean decode throughput of the decode lines (token/s per rank)."""
    prefill = [tuple(map(int, m.groups())) for m in PREFILL_LINE.finditer(log_text)]
    decode = [float(m.group(1)) for m in DECODE_LINE.finditer(log_text)]
    return {"prefill_batches": len(prefill), "prefill_new_tokens": sum(p[1] for p in prefill),
            "prefill_seqs": sum(p[0] for p in prefill), "prefill_cached_tokens": sum(p[2] for p in prefill),
            "lockstep_caps_logged": log_text.count("tiersched lockstep cap:"),
            "priced_caps_kept": sum(int(m.group(1)) for m in PRICED_LINE.finditer(log_text)),
            "priced_caps_dropped": sum(int(m.group(2)) for m in PRICED_LINE.finditer(log_text)),
            "decode_gen_tok_s_mean": round(sum(decode) / len(decode), 2) if decode else None}


def _log_size(server: Server) -> int:
    try:
        return os.path.getsize(server.log_path)
    except OSError:
        return 0


def _log_since(server: Server, offset: int) -> str:
    try:
        with open(server.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def alternate(arms: Sequence[str], repeat: int) -> list[str]:
    return list(arms) if repeat % 2 == 0 else list(reversed(arms))


def run_ab(servers: dict[str, Server], arms: Sequence[live_arms.Arm], request_set: RequestSet, repeats: int,
           timeout_s: float = 600.0, record=None) -> dict[str, ArmRuns]:
    """Run the set `repeats` times on every arm, alternating; `record(arm, repeat, results)` is called per run."""
    runs = {arm.name: ArmRuns(arm) for arm in arms}
    for repeat in range(repeats):
        for name in alternate([a.name for a in arms], repeat):
            with only_running(servers, name) as srv:
                flush_cache(srv.url)
                offset = _log_size(srv)
                t0 = time.perf_counter()
                results = drive(srv.url, request_set.requests, send_priority=runs[name].arm.send_priority,
                                timeout_s=timeout_s)
            summary = summarize(results)
            summary["wall_s"] = round(time.perf_counter() - t0, 2)
            summary["server_steps"] = server_steps(_log_since(srv, offset))
            runs[name].summaries.append(summary)
            runs[name].results.append(results)
            if record is not None:
                record(name, repeat, results)
            steps = summary["server_steps"]
            print(f"[live] repeat {repeat} {name}: ttft {summary['ttft_mean_s']} ls_ttft {summary['ls_ttft_mean_s']} "
                  f"tpot {summary['tpot_mean_s']} cached {summary['cached_tokens']} errors {summary['errors']} "
                  f"lost {summary['lost']} prefill batches {steps['prefill_batches']} "
                  f"({steps['prefill_new_tokens']} new tokens) ({summary['wall_s']} s)", file=sys.stderr)
    for name, srv in servers.items():
        if name not in runs:
            continue
        runs[name].log_tail = srv.log_tail(40)
        if not srv.alive():
            runs[name].died = True
            print(f"[live] server of arm {name} died during the runs (log {srv.log_path}); log tail:\n"
                  f"{runs[name].log_tail}", file=sys.stderr)
    return runs


def record_path(out_dir: str | Path | None, deployment: str, set_name: str, arm: str, repeat: int) -> Path | None:
    if out_dir is None:
        return None
    path = Path(out_dir) / f"{deployment}-{set_name}-{arm}-r{repeat}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
