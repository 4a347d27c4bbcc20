"""cpu_fixes.block_while_idle against upstream's own socket helpers: the DP controller loop it replaces under
`--sleep-on-idle` dispatches every request, in order, and does not spin while nothing arrives."""
import threading
import time
from types import SimpleNamespace

import pytest

zmq = pytest.importorskip("zmq")
io_struct = pytest.importorskip("sglang.srt.managers.io_struct")

from tiersched.sglang import cpu_fixes  # noqa: E402


class _Stop(Exception):
    pass


def _controller(sock, received):
    def dispatch(req):
        if req == "stop":
            raise _Stop
        received.append(req)

    return SimpleNamespace(recv_from_tokenizer=sock, soft_watchdog=SimpleNamespace(feed=lambda: None),
                           _request_dispatcher=dispatch)


@pytest.fixture
def sockets():
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push.connect(f"tcp://127.0.0.1:{port}")
    yield pull, push
    pull.close(0)
    push.close(0)
    ctx.term()


def _run_loop(monkeypatch, sock, received, sleep_on_idle):
    import sglang.srt.runtime_context as rc

    import sglang.srt.managers.data_parallel_controller  # noqa: F401 -- imported by the hook; not inside the timing

    monkeypatch.setattr(rc, "get_device", lambda: SimpleNamespace(sleep_on_idle=sleep_on_idle))
    errors = []

    def original(self):
        errors.append("upstream loop called")  # must not run with --sleep-on-idle

    def body():
        try:
            cpu_fixes.block_while_idle(original, _controller(sock, received))
        except _Stop:
            pass

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, errors


def test_dispatches_every_request_in_order_and_does_not_spin(monkeypatch, sockets):
    pull, push = sockets
    received = []
    thread, errors = _run_loop(monkeypatch, pull, received, sleep_on_idle=True)
    for i in range(5):
        io_struct.sock_send(push, {"rid": i})
    deadline = time.monotonic() + 10
    while len(received) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    cpu0 = time.process_time()
    time.sleep(1.0)  # idle: upstream's NOBLOCK loop burns ~1 CPU second here
    idle_cpu = time.process_time() - cpu0
    for i in range(5, 8):
        io_struct.sock_send(push, {"rid": i})
    io_struct.sock_send(push, "stop")
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert errors == []
    assert [r["rid"] for r in received] == list(range(8))
    assert idle_cpu < 0.3, idle_cpu


def test_without_sleep_on_idle_upstream_loop_runs(monkeypatch, sockets):
    pull, _ = sockets
    thread, errors = _run_loop(monkeypatch, pull, [], sleep_on_idle=False)
    thread.join(timeout=5)
    assert errors == ["upstream loop called"]
