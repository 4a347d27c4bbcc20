"""Start a real upstream `python -m sglang.launch_server` on this CPU, bounded and always stopped.

The server runs on 127.0.0.1 on a free port, in its own process group (so the schedulers, the DP controller
and the detokenizer die with it), with the flags a CPU-only machine needs (docs/install.md says why each).
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

CPU_FLAGS = (
    "--device", "cpu",
    "--attention-backend", "torch_native",
    "--sleep-on-idle",  # otherwise every idle scheduler spins a core at 100%
    "--skip-server-warmup",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    log_path: str
    process: subprocess.Popen
    args: list[str] = field(default_factory=list)

    def log_tail(self, lines: int = 60) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no server log)"

    def alive(self) -> bool:
        return self.process.poll() is None


class ServerStartError(RuntimeError):
    pass


def _needs_thread_bind(args: Sequence[str]) -> bool:
    def value(flag: str) -> int:
        for i, a in enumerate(args):
            if a == flag and i + 1 < len(args):
                return int(args[i + 1])
            if a.startswith(flag + "="):
                return int(a.split("=", 1)[1])
        return 1

    return max(value("--tp"), value("--tp-size"), value("--dp"), value("--dp-size")) > 1


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ConnectionError):
        return False


def _stop(process: subprocess.Popen, grace_s: float = 15.0) -> None:
    if process.poll() is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # reap stragglers of an exited launcher
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


_background_stops: list[threading.Thread] = []
_stop_in_background = False


def stop_in_background(enabled: bool) -> None:
    """Whether leaving `launch_server` signals the server and returns at once, its wait and escalation running in
    a thread (`wait_for_stops` joins them). Upstream's SIGTERM handler acts on its next 5-s watchdog tick, so a
    test session that starts many servers one after another otherwise waits ~5 s per server doing nothing."""
    global _stop_in_background
    _stop_in_background = enabled


def wait_for_stops() -> None:
    """Join every background stop (each bounded: SIGTERM, 15 s grace, then SIGKILL of the whole group)."""
    while _background_stops:
        _background_stops.pop().join()


@contextlib.contextmanager
def launch_server(
    model_path: str,
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    timeout_s: float | None = None,
    max_total_tokens: int = 8192,
    log_dir: str | None = None,
) -> Iterator[Server]:
    """Context manager: start the server, wait until /health answers, yield a Server, always stop the group.

    Raises ServerStartError (with the log tail) if the server exits or is not healthy within timeout_s
    (default: env TIERSCHED_SERVER_TIMEOUT_S, else 420 s).
    """
    if timeout_s is None:  # a loaded 2-core machine can take minutes; CI alone takes 20-40 s
        timeout_s = float(os.environ.get("TIERSCHED_SERVER_TIMEOUT_S", "420"))
    port = free_port()
    args = [
        sys.executable, "-m", "sglang.launch_server", "--model-path", model_path,
        *CPU_FLAGS, "--max-total-tokens", str(max_total_tokens),
        "--host", "127.0.0.1", "--port", str(port), *extra_args,
    ]
    run_env = dict(os.environ)
    run_env["SGLANG_USE_CPU_ENGINE"] = "1"
    run_env.setdefault("PYTHONUNBUFFERED", "1")
    # On CPU "device memory" is the host's free RAM, shared by every rank and by whatever else runs here, so
    # upstream's per-rank balance check (distributed/bootstrap.py _check_tp_memory_balance) fires at random.
    run_env.setdefault("SGLANG_ENABLE_TP_MEMORY_INBALANCE_CHECK", "0")
    if _needs_thread_bind(args):
        run_env.setdefault("SGLANG_CPU_OMP_THREADS_BIND", "0|1")  # 2 ranks on one NUMA node
    run_env.update(env or {})
    log_dir = log_dir or tempfile.mkdtemp(prefix="tiersched-server-")
    log_path = os.path.join(log_dir, f"server-{port}.log")
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=run_env, start_new_session=True, cwd=log_dir
        )
    server = Server(url=f"http://127.0.0.1:{port}", log_path=log_path, process=process, args=args)
    try:
        deadline = time.monotonic() + timeout_s
        while not _healthy(server.url):
            if not server.alive():
                raise ServerStartError(f"server exited with code {process.returncode}; log tail:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                raise ServerStartError(f"server not healthy after {timeout_s:.0f} s; log tail:\n{server.log_tail()}")
            time.sleep(1.0)
        yield server
    finally:
        if _stop_in_background:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGTERM)  # stopping starts now; the thread waits and escalates
            stopper = threading.Thread(target=_stop, args=(process,), name=f"stop-server-{process.pid}")
            stopper.start()
            _background_stops.append(stopper)
        else:
            _stop(process)


@contextlib.contextmanager
def launch_servers(model_path: str, configs: Sequence[Mapping]) -> Iterator[list[Server]]:
    """Start several servers at once, each `launch_server(model_path, **config)`; yield them in the order of
    `configs`; always stop every one that started. A start is mostly one process importing torch and SGLang at a
    time (the launcher, then the scheduler), so on two cores two starts take little longer than one.

    Raises the first start's error once every start has finished (the ones that did start are stopped)."""
    managers = [launch_server(model_path, **config) for config in configs]
    with contextlib.ExitStack() as stack:
        with ThreadPoolExecutor(max(1, len(managers))) as pool:
            futures = [pool.submit(manager.__enter__) for manager in managers]
        servers, failure = [], None
        for manager, future in zip(managers, futures):
            try:
                servers.append(future.result())
                stack.push(manager.__exit__)
            except Exception as exc:  # the rig already stopped this one
                failure = failure or exc
        if failure is not None:
            raise failure
        yield servers
