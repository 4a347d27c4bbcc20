"""launch_server retries on a new port when its chosen port, or one upstream derives from it, was taken before the
server bound it; free_port picks ports below upstream's NCCL range and the kernel's ephemeral range.

A fake interpreter stands in for `python -m sglang.launch_server`: it binds `--port` and answers /health, or, if
the port is taken, prints upstream's bind error and exits, as uvicorn does; if the port upstream would use for
metrics (port + 233 + 4) is taken, it prints upstream's "not available" error and exits, as server_args does.
"""
from __future__ import annotations

import os
import socket
import stat
import sys

import pytest

from tiersched.rig import server as rig

FAKE = """#!{python}
import http.server, socket, sys
port = int(sys.argv[sys.argv.index("--port") + 1])
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a):
        pass
probe = socket.socket()
try:
    probe.bind(("127.0.0.1", port + 237))
except OSError:
    print(f"ValueError: metrics_port at {{port + 237}} is not available in 30 seconds.", flush=True)
    sys.exit(1)
probe.close()
try:
    httpd = http.server.HTTPServer(("127.0.0.1", port), Health)
except OSError as exc:
    print(f"ERROR:    [Errno 98] error while attempting to bind on address ('127.0.0.1', {{port}}): address already in use", flush=True)
    sys.exit(3)
httpd.serve_forever()
"""


@pytest.fixture
def fake_python(tmp_path, monkeypatch):
    path = tmp_path / "bin" / "fake-python"
    path.parent.mkdir()
    path.write_text(FAKE.format(python=sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(rig.sys, "executable", str(path))
    return path


def _taken_ports(count: int):
    socks = []
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    return socks


def test_a_taken_port_is_retried_on_a_new_one(fake_python, monkeypatch, tmp_path):
    logs_dir = tmp_path / "logs"
    logs_dir.mkdir()
    taken = _taken_ports(1)
    ports = iter([taken[0].getsockname()[1]])
    real = rig.free_port
    monkeypatch.setattr(rig, "free_port", lambda: next(ports, None) or real())
    try:
        with rig.launch_server("unused", timeout_s=30, log_dir=str(logs_dir)) as srv:
            assert srv.alive()
            assert not srv.url.endswith(f":{taken[0].getsockname()[1]}")
        logs = sorted(os.listdir(logs_dir))
        assert len(logs) == 2, logs  # the failed start's log is kept beside the one that served
    finally:
        for s in taken:
            s.close()


def test_a_port_taken_on_every_attempt_is_a_clear_error(fake_python, monkeypatch, tmp_path):
    logs_dir = tmp_path / "logs"
    logs_dir.mkdir()
    taken = _taken_ports(rig.PORT_ATTEMPTS)
    ports = iter(s.getsockname()[1] for s in taken)
    monkeypatch.setattr(rig, "free_port", lambda: next(ports))
    try:
        with pytest.raises(rig.ServerStartError, match="address already in use"):
            with rig.launch_server("unused", timeout_s=30, log_dir=str(logs_dir)):
                pass
        assert len(os.listdir(logs_dir)) == rig.PORT_ATTEMPTS
    finally:
        for s in taken:
            s.close()


def test_a_taken_derived_port_is_retried_on_a_new_one(fake_python, monkeypatch, tmp_path):
    logs_dir = tmp_path / "logs"
    logs_dir.mkdir()
    first = rig.free_port()
    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    blocker.bind(("127.0.0.1", first + 237))
    ports = iter([first])
    real = rig.free_port
    monkeypatch.setattr(rig, "free_port", lambda: next(ports, None) or real())
    try:
        with rig.launch_server("unused", timeout_s=30, log_dir=str(logs_dir)) as srv:
            assert srv.alive()
            assert not srv.url.endswith(f":{first}")
        assert len(os.listdir(logs_dir)) == 2
    finally:
        blocker.close()


def test_free_port_is_below_nccl_and_ephemeral_ranges_and_skips_a_taken_derived_block(monkeypatch):
    for _ in range(20):
        port = rig.free_port()
        assert rig.PORT_RANGE[0] <= port < rig.PORT_RANGE[1]
        assert port + max(rig.DERIVED_PORTS) < 22000  # upstream's NCCL ports start there
    # every candidate but the last has a taken derived port: free_port must pass over them
    candidates = [rig.PORT_RANGE[0] + 17 * i for i in range(1, 5)]
    blockers = []
    for c in candidates[:-1]:
        b = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        b.bind(("127.0.0.1", c + 240))
        blockers.append(b)
    seq = iter(candidates)
    monkeypatch.setattr(rig.random.Random, "randrange", lambda self, lo, hi: next(seq))
    try:
        assert rig.free_port() == candidates[-1]
    finally:
        for b in blockers:
            b.close()
