"""Load and fault runs on one real dp2 server with every tier on.

Load: the shared-prefix set tiled to `rate × duration` requests (tiles get fresh rids; prompts repeat, as chats
do), sent open-loop; a sampler thread reads the RSS of every process in the server's process group (launcher =
tokenizer + HTTP server, DP controller, schedulers, detokenizer) once per `sample_s`. Reports errors, lost
requests, peak and final RSS (group and per process), the quarter means, and the plateau measure: growth from
the 3rd to the 4th quarter (a leak grows there as in any quarter; warm-up that has reached its bound does not).

Fault (DP rank drained): upstream marks a DP rank inactive through `DataParallelController.update_active_ranks`
(an `ActiveRanksOutput` status list; elastic EP sends it when a rank dies) and only its round-robin path reads
`status`; the engine tier's `score` reads the same status. Two levers: the `drain_ranks` setting, applied at
controller start (`drain_run`, TIERSCHED_SET=engine.drain_ranks=N), and at runtime upstream's own
`/set_internal_state` endpoint with `{"server_args": {"tiersched_drain_dp_rank_N": 1}}` (0 takes it back;
sglang/engine/drain.py). `midrun_drain_run` drains a rank in the middle of an open-loop stream and takes it back
after it: requests sent after the drain call returned must all land elsewhere, and every request must finish.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import urllib.request

from tiersched.live import ab as live_ab, arms as live_arms
from tiersched.live.driver import drive
from tiersched.live.report import summarize
from tiersched.live.requests import LiveRequest, RequestSet, shared_prefix_set
from tiersched.rig.server import Server, launch_server

PAGE = os.sysconf("SC_PAGE_SIZE")


def _proc_name(pid: str, leader: int) -> str:
    """Upstream names its children with setproctitle (`sglang::scheduler_DP0`, `sglang::data_parallel_controller`,
    `sglang::detokenizer`); the group leader is the launcher process, which runs the tokenizer manager and the HTTP
    server. Anything else (e.g. multiprocessing's resource tracker) is named by its first command-line words."""
    if int(pid) == leader:
        return "tokenizer+http"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return f"pid{pid}"
    if cmd.startswith("sglang::"):
        return cmd.split()[0][len("sglang::"):]
    return " ".join(cmd.split()[:3])[:60] or f"pid{pid}"


def group_rss_by_process(pgid: int) -> dict[str, int]:
    """Resident bytes of each live process in process group `pgid` (from /proc/<pid>/stat), keyed by its name
    (`_proc_name`; a repeated name gets `#pid`)."""
    out: dict[str, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields after the command: state(0) ppid(1) pgrp(2) ... rss is field 24 of stat = index 21 here
        if int(fields[2]) != pgid:
            continue
        label = _proc_name(name, pgid)
        if label in out:
            label = f"{label}#{name}"
        out[label] = int(fields[21]) * PAGE
    return out


def group_rss_bytes(pgid: int) -> int:
    """Resident memory of every live process in process group `pgid`."""
    return sum(group_rss_by_process(pgid).values())


MIB = 1024 * 1024


def quarter_means(values: list[float]) -> list[float]:
    """Means of the four consecutive quarters of `values` (a time series sampled at a fixed period)."""
    n = len(values)
    if n < 4:
        return [sum(values) / n] * 4 if n else []
    cuts = [round(i * n / 4) for i in range(5)]
    return [sum(values[a:b]) / (b - a) for a, b in zip(cuts, cuts[1:])]


def memory_report(samples: list[tuple[float, dict[str, int]]]) -> dict:
    """Peak/start/end RSS of the group and per process, quarter means, and the plateau measure: growth of the
    4th quarter's mean over the 3rd's (a steady leak grows as much there as anywhere; a warm-up that has
    filled its bound does not)."""
    if not samples:
        return {}
    totals = [sum(by.values()) for _, by in samples]
    q = quarter_means(totals)
    names = sorted({n for _, by in samples for n in by}, key=lambda n: -max(by.get(n, 0) for _, by in samples))
    per_process = {}
    for name in names:
        series = [by.get(name, 0) for _, by in samples]
        pq = quarter_means(series)
        per_process[name] = {"start_mib": round(series[0] / MIB, 1), "peak_mib": round(max(series) / MIB, 1),
                             "end_mib": round(series[-1] / MIB, 1),
                             "quarter_means_mib": [round(v / MIB, 1) for v in pq],
                             "growth_q3_to_q4_mib": round((pq[3] - pq[2]) / MIB, 1)}
    return {"rss_peak_mib": round(max(totals) / MIB, 1), "rss_start_mib": round(totals[0] / MIB, 1),
            "rss_end_mib": round(totals[-1] / MIB, 1),
            "rss_quarter_means_mib": [round(v / MIB, 1) for v in q],
            "rss_growth_last_vs_first_quarter_mib": round((q[3] - q[0]) / MIB, 1),
            "rss_growth_q3_to_q4_mib": round((q[3] - q[2]) / MIB, 1),
            "rss_growth_q2_to_q3_mib": round((q[2] - q[1]) / MIB, 1),
            "rss_samples": len(totals), "rss_per_process": per_process}


def rss_bounded(report: dict, floor_mib: float = 64.0, fraction: float = 0.2) -> bool:
    """The load run's memory criterion: the group's growth from the 3rd to the 4th quarter is at most `floor_mib`
    or `fraction` of its growth from the 1st to the 4th. Steady growth at any rate puts a third of the total in
    the last step, so it fails once the run grows more than 3 x `floor_mib`; growth that stops before the 3rd
    quarter passes."""
    step = report["rss_growth_q3_to_q4_mib"]
    return step <= max(floor_mib, fraction * max(0.0, report["rss_growth_last_vs_first_quarter_mib"]))


class RssSampler(threading.Thread):
    """Samples every `sample_s` the RSS of each process in a process group (`group_rss_by_process`)."""

    def __init__(self, pgid: int, sample_s: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.pgid, self.sample_s = pgid, sample_s
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while not self._halt.is_set():
            self.samples.append((time.monotonic() - start, group_rss_by_process(self.pgid)))
            self._halt.wait(self.sample_s)

    def stop(self) -> dict:
        self._halt.set()
        self.join(timeout=5)
        return memory_report(self.samples)


def tiled(request_set: RequestSet, n: int, rate: float) -> RequestSet:
    """`n` requests cycling through the set (fresh rids), the set's inter-arrival shape, exactly `rate` req/s on
    average over the whole run (the trace is bursty: its first gaps alone would give another rate)."""
    base = request_set.requests
    gaps = [base[i + 1].arrival_s - base[i].arrival_s for i in range(len(base) - 1)] or [1.0]
    raw, t = [], 0.0
    for i in range(n):
        raw.append(t)
        t += gaps[i % len(gaps)]
    scale = (n - 1) / rate / raw[-1] if n > 1 and raw[-1] > 0 else 0.0
    reqs = []
    for i in range(n):
        r = base[i % len(base)]
        at = raw[i] * scale if scale else i / rate
        reqs.append(LiveRequest(f"{r.rid}-t{i // len(base)}", at, r.input_ids, r.output_len, r.priority, r.cls,
                                r.prefix_blocks))
    return RequestSet(request_set.name, request_set.source, request_set.block_tokens, tuple(reqs))


@contextlib.contextmanager
def _arm_server(model_dir: str, deployment: str, arm: live_arms.Arm, env: dict | None, server: Server | None):
    """`server` when the caller already runs this arm's server (checked, left running), else a fresh one."""
    if server is not None:
        live_ab.check_tiers(server, arm)
        yield server
        return
    with launch_server(model_dir, extra_args=live_arms.server_args(deployment, arm), env=env,
                       max_total_tokens=live_ab.MAX_TOTAL_TOKENS) as srv:
        live_ab.check_tiers(srv, arm)
        yield srv


def load_run(model_dir: str, duration_s: float, rate: float | None = None, factor: float = 2.0,
             sample_s: float = 1.0, env: dict | None = None, deployment: str = "dp2",
             timeout_s: float | None = None, arm_name: str = live_arms.TIERSCHED,
             server: Server | None = None) -> dict:
    """Drive the tiersched arm (or `arm_name`, an upstream arm, to compare memory) for `duration_s` at `rate`
    req/s, or (rate None) at `factor` x the capacity measured on the same server first; errors, lost, RSS of
    the server's process group and of each of its processes. `server`: that arm's already running server
    (started with `deployment`'s flags and `env`), else a fresh one is started and stopped."""
    arm = (live_arms.tiersched_arm(deployment) if arm_name == live_arms.TIERSCHED
           else live_arms.Arm(arm_name, live_arms.UPSTREAM_ARMS[arm_name]))
    base = shared_prefix_set(200, 1.0)
    out: dict = {}
    with _arm_server(model_dir, deployment, arm, env, server) as srv:
        if rate is None:
            capacity = live_ab.measure_capacity(srv.url, base, n=20)
            rate = factor * capacity
            out["capacity_req_s"] = round(capacity, 3)
        planned = max(1, int(rate * duration_s))
        requests = tiled(base, planned, rate)
        sampler = RssSampler(os.getpgid(srv.process.pid), sample_s)
        sampler.start()
        t0 = time.perf_counter()
        results = drive(srv.url, requests.requests, timeout_s=timeout_s or duration_s * 3 + 120)
        wall = time.perf_counter() - t0
        memory = sampler.stop()
        alive = srv.alive()
    out.update(summarize(results))
    out.update(memory)
    out.update({"rate_req_s": round(rate, 3), "planned_requests": planned, "arrival_span_s": round(requests.duration_s, 1), "wall_s": round(wall, 1),
                "server_alive": alive, "arm": arm.name, "tiers": list(arm.tiers),
                "missing_tiers": arm.skipped_tiers})
    return out


def drain_run(model_dir: str, drained_rank: int = 1, n: int = 30, rate: float = 2.0) -> dict:
    """dp2 tiersched arm with `drained_rank` marked inactive (engine tier's drain_ranks): who got what."""
    arm = live_arms.tiersched_arm("dp2")
    requests = shared_prefix_set(n, rate)
    env = {"TIERSCHED_SET": f"engine.drain_ranks={drained_rank}"}
    with launch_server(model_dir, extra_args=live_arms.server_args("dp2", arm), env=env,
                       max_total_tokens=live_ab.MAX_TOTAL_TOKENS) as srv:
        live_ab.check_tiers(srv, arm)
        results = drive(srv.url, requests.requests, timeout_s=300)
        log = srv.log_tail(400)
    out = summarize(results)
    out["drained_rank"] = drained_rank
    out["drain_logged"] = "drained" in log
    out["tiers"] = list(arm.tiers)
    return out


def set_drain(url: str, rank: int, drained: bool) -> list:
    """Upstream's /set_internal_state with the engine tier's drain key; returns the per-scheduler `updated` list."""
    body = json.dumps({"server_args": {f"tiersched_drain_dp_rank_{rank}": int(drained)}}).encode()
    req = urllib.request.Request(url + "/set_internal_state", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def midrun_drain_run(model_dir: str, drained_rank: int = 1, n: int = 30, rate: float = 3.0, drain_after: int = 12,
                     after_undrain: int = 6, in_flight: int = 12, in_flight_output: int = 400,
                     server: Server | None = None, wait_for_running_s: float = 20.0) -> dict:
    """dp2 tiersched arm, open-loop stream of `n` requests; once `drain_after` have been sent and a request is
    running on `drained_rank` (its stream has named the rank and not finished; at most `wait_for_running_s`), drain
    that rank over HTTP. When the stream has finished, take the rank back and send `after_undrain` more.
    "While drained" = requests sent after the drain call returned (the driver stamps `sent_s` before the HTTP send,
    so that split is conservative). The last `in_flight` requests before the drain generate `in_flight_output`
    tokens (~1.5-2 s on the CPU rig), so requests are still running on both ranks: a request of the usual 2-32
    tokens is done in ~0.1 s. Waiting for a running request on the drained rank rather than draining at a fixed
    send makes the "in-flight requests finish" check independent of where dispatch put the last few requests.
    `server`: an already running dp2 tiersched server with no rank drained (left running, rank taken back), else a
    fresh one; only its log written during this run is read."""
    import dataclasses

    arm = live_arms.tiersched_arm("dp2")
    full = list(shared_prefix_set(n + after_undrain, rate).requests)
    for i in range(max(0, drain_after - in_flight), drain_after):
        full[i] = dataclasses.replace(full[i], output_len=in_flight_output)
    stream, tail = full[:n], full[n:]
    tail = tuple(dataclasses.replace(r, arrival_s=r.arrival_s - tail[0].arrival_s) for r in tail)
    marks: dict = {}
    threads: list[threading.Thread] = []

    def running_on_drained(results) -> bool:
        return any(r.dp_rank == drained_rank and not r.finished for r in results)

    def drain(t0: float, results) -> None:
        deadline = time.perf_counter() + wait_for_running_s
        while not running_on_drained(results) and time.perf_counter() < deadline:
            time.sleep(0.005)
        marks["drained_with_running_request"] = running_on_drained(results)
        marks["drain_sent_s"] = time.perf_counter() - t0
        try:
            marks["drain_reply"] = set_drain(srv.url, drained_rank, True)
        except Exception as exc:  # noqa: BLE001 - reported, and the test fails on it
            marks["drain_reply"] = f"{type(exc).__name__}: {exc}"
        marks["drain_done_s"] = time.perf_counter() - t0

    def on_sent(i: int, elapsed: float, results) -> None:
        if i == drain_after - 1:
            t0 = time.perf_counter() - elapsed  # the driver's run start, on perf_counter
            threads.append(threading.Thread(target=drain, args=(t0, results), daemon=True))
            threads[-1].start()

    with _arm_server(model_dir, "dp2", arm, None, server) as srv:
        log_start = os.path.getsize(srv.log_path)
        results = drive(srv.url, stream, timeout_s=300, on_sent=on_sent)
        for t in threads:
            t.join(timeout=130)
        marks["undrain_reply"] = set_drain(srv.url, drained_rank, False)
        tail_results = drive(srv.url, tail, timeout_s=120) if tail else []
        with open(srv.log_path, errors="replace") as f:
            f.seek(log_start)
            log = f.read()
        alive = srv.alive()
    out = summarize(results + tail_results)
    drain_sent = marks.get("drain_sent_s", float("inf"))
    drain_done = marks.get("drain_done_s", float("inf"))
    before = [r for r in results if r.sent_s < drain_sent]
    out.update({
        "server_alive": alive, "drained_rank": drained_rank, "tiers": list(arm.tiers),
        **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in marks.items()},
        "ranks_before_drain": [r.dp_rank for r in before],
        "ranks_while_drained": [r.dp_rank for r in results if r.sent_s > drain_done],
        "ranks_after_undrain": [r.dp_rank for r in tail_results],
        # requests on the drained rank still running when the drain took effect: they must finish, not vanish
        "finished_on_drained_rank_after_drain": sum(
            1 for r in before if r.dp_rank == drained_rank and r.success and r.sent_s + r.latency > drain_done),
        "drain_logged": "DP ranks drained now: [%d]" % drained_rank in log,
        "undrain_logged": "DP ranks drained now: []" in log,
    })
    return out


EXPERT_FAULT_ENV = "TIERSCHED_EXPERT_INJECT_BAD_STATS"  # the expert tier's test-only fault switch (sglang/expert/hooks.py)


def eplb_fault_server_args(rebalance_every: int = 16) -> list[str]:
    """The ep2 tiersched arm's flags with EPLB rebalancing every `rebalance_every` forward passes."""
    arm = live_arms.tiersched_arm("ep2")
    return [*live_arms.server_args("ep2", arm), "--eplb-rebalance-num-iterations", str(rebalance_every)]


def eplb_fault_run(model_dir: str, faults: str = "ok,nan,negative", rebalance_every: int = 16, n: int = 40,
                   rate: float = 4.0, server: Server | None = None) -> dict:
    """ep2 with EPLB (tiersched's source_aware) rebalancing every `rebalance_every` forward passes; the i-th
    rebalance gets the i-th fault of `faults` injected into its statistics. Reports what the server logged about
    each rebalance (planned / kept the current placement) and whether any request failed or was lost. `server`:
    an already running server with `eplb_fault_server_args(rebalance_every)` and `faults` in its environment
    (EXPERT_FAULT_ENV) that has not rebalanced yet (left running), else a fresh one is started and stopped."""
    arm = live_arms.tiersched_arm("ep2")
    if "expert" not in arm.tiers:
        return {"status": "pending", "reason": arm.skipped_tiers.get("expert", "expert tier not in the arm")}
    requests = shared_prefix_set(n, rate)
    with contextlib.ExitStack() as stack:
        srv = server or stack.enter_context(launch_server(
            model_dir, extra_args=eplb_fault_server_args(rebalance_every), env={EXPERT_FAULT_ENV: faults},
            max_total_tokens=live_ab.MAX_TOTAL_TOKENS))
        live_ab.check_tiers(srv, arm)
        results = drive(srv.url, requests.requests, timeout_s=400)
        log = srv.log_tail(20000)
        alive = srv.alive()
    lines = [line for line in log.splitlines() if "tiersched expert tier:" in line]
    out = summarize(results)
    out.update({
        "status": "ok", "server_alive": alive, "faults": faults,
        "rebalances_planned": sum("planned" in line for line in lines),
        "faults_injected": sum("test fault" in line for line in lines),
        "kept_placement": sum("keeping the current placement" in line for line in lines),
        "expert_log": lines[-12:],
    })
    return out
