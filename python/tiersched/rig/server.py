"""Start a real upstream `python -m sglang.launch_server` on this CPU, bounded and always stopped.

The server runs on 127.0.0.1 on a free port, in its own process group (so the schedulers, the DP controller
and the detokenizer die with it), with the flags a CPU-only machine needs (docs/install.md says why each).
"""
from __future__ import annotations

import contextlib
import os
import random
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


# Upstream derives its internal ZMQ/dist ports from --port (port + 233 and the few above it, server_args.py
# ZMQ_TCP_PORT_DELTA) and takes NCCL ports from 22000-29999; the kernel hands out ephemeral ports (every outgoing
# connection's, every bind to port 0) from 32768 up. An HTTP port from bind(0) therefore puts the derived block in
# the range where any process's next socket may land first (upstream then waits 30 s and exits: "metrics_port ...
# is not available"). The HTTP port comes from below both instead, with its derived block checked free too.
PORT_RANGE = (10000, 21700)
DERIVED_PORTS = range(233, 246)


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(attempts: int = 64) -> int:
    """A free HTTP port in PORT_RANGE whose upstream-derived ports are free too (else any free port)."""
    rng = random.Random()
    for _ in range(attempts):
        port = rng.randrange(*PORT_RANGE)
        if _bindable(port) and all(_bindable(port + d) for d in DERIVED_PORTS):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    log_path: str
    process: subprocess.Popen
    args: list[str] = field(default_factory=list)
    trace_path: str = ""  # the plugin's process trace (TIERSCHED_PLUGIN_TRACE) where the caller asked for one

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


# The HTTP port is chosen before the server binds it, ~30-90 s later; meanwhile another server starting beside it
# (the pool starts several at once) may take it, or one of the ports upstream derives from it, for one of its own.
# Upstream then exits with one of these messages, and a fresh port is the fix.
PORT_IN_USE = ("address already in use", "Port is already in use", "is not available in")
PORT_ATTEMPTS = 3


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
    (default: env TIERSCHED_SERVER_TIMEOUT_S, else 420 s). A start that fails only because its HTTP port was
    taken meanwhile (or a port upstream derives from it) is retried on a new port, up to PORT_ATTEMPTS starts in all.
    """
    if timeout_s is None:  # a loaded 2-core machine can take minutes; CI alone takes 20-40 s
        timeout_s = float(os.environ.get("TIERSCHED_SERVER_TIMEOUT_S", "420"))
    run_env = dict(os.environ)
    run_env["SGLANG_USE_CPU_ENGINE"] = "1"
    run_env.setdefault("PYTHONUNBUFFERED", "1")
    # On CPU "device memory" is the host's free RAM, shared by every rank and by whatever else runs here, so
    # upstream's per-rank balance check (distributed/bootstrap.py _check_tp_memory_balance) fires at random.
    run_env.setdefault("SGLANG_ENABLE_TP_MEMORY_INBALANCE_CHECK", "0")
    if _needs_thread_bind(list(extra_args)):
        run_env.setdefault("SGLANG_CPU_OMP_THREADS_BIND", "0|1")  # 2 ranks on one NUMA node
    run_env.update(env or {})
    log_dir = log_dir or tempfile.mkdtemp(prefix="tiersched-server-")
    deadline = time.monotonic() + timeout_s
    for attempt in range(1, PORT_ATTEMPTS + 1):
        port = free_port()
        args = [
            sys.executable, "-m", "sglang.launch_server", "--model-path", model_path,
            *CPU_FLAGS, "--max-total-tokens", str(max_total_tokens),
            "--host", "127.0.0.1", "--port", str(port), *extra_args,
        ]
        log_path = os.path.join(log_dir, f"server-{port}.log")
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env=run_env, start_new_session=True, cwd=log_dir
            )
        server = Server(url=f"http://127.0.0.1:{port}", log_path=log_path, process=process, args=args)
        while not _healthy(server.url) and server.alive() and time.monotonic() <= deadline:
            time.sleep(1.0)
        if server.alive() or attempt == PORT_ATTEMPTS or not any(m in server.log_tail(200) for m in PORT_IN_USE):
            break
        _stop(process)  # the port was taken before upstream bound it: try again on a new one
    try:
        if not server.alive():
            raise ServerStartError(f"server exited with code {process.returncode}; log tail:\n{server.log_tail()}")
        if not _healthy(server.url):
            raise ServerStartError(f"server not healthy after {timeout_s:.0f} s; log tail:\n{server.log_tail()}")
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


def canonical_flags(flags: Sequence[str]) -> tuple[str, ...]:
    """`flags` with its options sorted by name, each option followed by its values (the tokens up to the next
    `--`), so that the same server written in another order is the same spec. Argument order means nothing to
    `launch_server`'s parser unless an option is given twice (the last one wins): such a list is kept as it is."""
    groups: list[list[str]] = []
    for token in flags:
        if token.startswith("--") or not groups:
            groups.append([token])
        else:
            groups[-1].append(token)
    names = [g[0] for g in groups]
    if len(set(names)) != len(names) or not all(n.startswith("--") for n in names):
        return tuple(flags)
    return tuple(t for g in sorted(groups, key=lambda g: g[0]) for t in g)


@dataclass(frozen=True)
class ServerSpec:
    """What a pooled server is: equal specs are one server. `model` is a name the pool resolves to a model folder
    (e.g. "tiny"); `flags` are in `canonical_flags` order and `env` is a sorted tuple of pairs so that the spec is
    hashable and independent of how its flags and environment were written (`spec()` builds both).
    `timeout_s` and `name` (a label for logs and errors) are not part of the identity."""

    model: str
    flags: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    max_total_tokens: int = 8192
    timeout_s: float | None = field(default=None, compare=False)
    name: str = field(default="", compare=False)

    def label(self) -> str:
        return self.name or f"{self.model} {' '.join(self.flags)}".strip()


def spec(model: str, flags: Sequence[str] = (), env: Mapping[str, str] | None = None, max_total_tokens: int = 8192,
         timeout_s: float | None = None, name: str = "") -> ServerSpec:
    return ServerSpec(model, canonical_flags(flags), tuple(sorted((env or {}).items())), max_total_tokens, timeout_s,
                      name)


class ServerPool:
    """Servers shared across tests: each spec's server starts on first `get` and runs until `release` (or `close`).

    The caller says when a server is no longer needed (test/conftest.py releases a spec after the last test that
    declared it). `plan` optionally lists the specs in the order they will first be asked for: a start then also
    starts the next planned specs at the same time (a start is mostly one process importing at a time, so on two
    cores two or three starts take little longer than one), as long as at most `max_alive` servers run.

    `env` is given to every start, under each spec's own environment (which wins where both set a variable).
    Every pooled server writes the plugin's process trace (`TIERSCHED_PLUGIN_TRACE`) to `server.trace_path`. A
    server found dead on `get` is restarted (its log says why it died); a spec whose start failed raises the same
    error again on every later `get` rather than starting again.
    """

    def __init__(self, models: Mapping[str, str] | None = None, resolve_model=None, max_alive: int = 4,
                 log_dir: str | None = None, env: Mapping[str, str] | None = None):
        self._models = dict(models or {})
        self.env = dict(env or {})
        self._resolve_model = resolve_model
        self.max_alive = max_alive
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="tiersched-pool-")
        self._servers: dict[ServerSpec, tuple[Server, contextlib.ExitStack]] = {}
        self._failed: dict[ServerSpec, BaseException] = {}
        self._plan: list[ServerSpec] = []
        self._lock = threading.RLock()
        self.starts: list[tuple[str, float]] = []  # (label, seconds) per start, for reports
        self.expected: set[ServerSpec] | None = None  # when set, `get` of any other spec is an error

    def model_path(self, name: str) -> str:
        if name not in self._models:
            if self._resolve_model is None:
                raise KeyError(f"no model named {name!r} in this pool (known: {sorted(self._models)})")
            self._models[name] = self._resolve_model(name)
        return self._models[name]

    def set_plan(self, specs: Sequence[ServerSpec]) -> None:
        """The specs in the order of their first use (duplicates ignored); drives the starts done ahead of need."""
        self._plan = list(dict.fromkeys(specs))

    def alive(self) -> list[ServerSpec]:
        return list(self._servers)

    def get(self, spec_: ServerSpec) -> Server:
        return self.get_many([spec_])[0]

    def get_many(self, specs: Sequence[ServerSpec]) -> list[Server]:
        """The servers of `specs`, starting every missing one (and the next planned ones) concurrently."""
        with self._lock:
            undeclared = [s.label() for s in specs if self.expected is not None and s not in self.expected]
            if undeclared:
                raise ValueError(f"server spec(s) not declared by this test: {undeclared}; declare them (test/"
                                 "README.md, 'Real servers') so the pool knows when they are no longer needed")
            for s in specs:
                if s in self._servers and not self._servers[s][0].alive():
                    dead = self._servers.pop(s)
                    print(f"[rig pool] {s.label()}: server died (exit {dead[0].process.returncode}), restarting; "
                          f"its log: {dead[0].log_path}", file=sys.stderr)
                    dead[1].close()
            for s in specs:
                if s in self._failed:
                    raise self._failed[s]
            missing = [s for s in dict.fromkeys(specs) if s not in self._servers]
            if missing:
                self._start([*missing, *self._ahead(missing)])
            for s in specs:
                if s in self._failed:
                    raise self._failed[s]
            return [self._servers[s][0] for s in specs]

    def _ahead(self, missing: list[ServerSpec]) -> list[ServerSpec]:
        """Planned specs after the missing ones, in order, while the count of running servers stays in bounds."""
        if not self._plan or not any(s in self._plan for s in missing):
            return []
        first = max(self._plan.index(s) for s in missing if s in self._plan)
        room = self.max_alive - len(self._servers) - len(missing)
        ahead = []
        for s in self._plan[first + 1:]:
            if room <= 0:
                break
            if s in self._servers or s in self._failed or s in missing:
                continue
            ahead.append(s)
            room -= 1
        return ahead

    def _start(self, specs: list[ServerSpec]) -> None:
        def start(s: ServerSpec):
            t0 = time.monotonic()
            log_dir = tempfile.mkdtemp(prefix="server-", dir=self.log_dir)
            trace = os.path.join(log_dir, "plugin-trace.jsonl")
            stack = contextlib.ExitStack()
            server = stack.enter_context(launch_server(
                self.model_path(s.model), extra_args=s.flags, env={**self.env, "TIERSCHED_PLUGIN_TRACE": trace, **dict(s.env)},
                timeout_s=s.timeout_s, max_total_tokens=s.max_total_tokens, log_dir=log_dir))
            server.trace_path = trace
            return server, stack, time.monotonic() - t0

        labels = ", ".join(s.label() for s in specs)
        print(f"[rig pool] starting {len(specs)}: {labels}", file=sys.stderr)
        with ThreadPoolExecutor(len(specs)) as executor:
            futures = [executor.submit(start, s) for s in specs]
        for s, future in zip(specs, futures):
            try:
                server, stack, seconds = future.result()
            except Exception as exc:  # launch_server already stopped it
                self._failed[s] = exc
                continue
            self._servers[s] = (server, stack)
            self.starts.append((s.label(), seconds))

    def release(self, *specs: ServerSpec) -> None:
        """Stop these specs' servers now (a later `get` starts a fresh one)."""
        with self._lock:
            for s in specs:
                entry = self._servers.pop(s, None)
                if entry is not None:
                    entry[1].close()

    def close(self) -> None:
        self.release(*list(self._servers))
