"""ServerPool bookkeeping (tiersched.rig.server) with `launch_server` replaced by a `sleep` process: equal specs are
one server, starts ahead of need stay within max_alive, release stops, a dead server is restarted, a failed start
is not retried, an undeclared spec is refused. The real starts are covered by every `server` test."""
from __future__ import annotations

import contextlib
import subprocess

import pytest

from tiersched.rig import server as rig
from tiersched.rig.server import ServerPool, ServerStartError, spec


@pytest.fixture
def launches(monkeypatch):
    """Every fake start: (model path, flags, env); a model named 'broken' fails to start."""
    started = []

    @contextlib.contextmanager
    def fake_launch(model_path, extra_args=(), env=None, timeout_s=None, max_total_tokens=8192, log_dir=None):
        if model_path == "/models/broken":
            raise ServerStartError("server exited with code 1")
        started.append((model_path, tuple(extra_args), dict(env or {})))
        process = subprocess.Popen(["sleep", "60"])
        try:
            yield rig.Server(url=f"http://fake/{len(started)}", log_path="", process=process, args=list(extra_args))
        finally:
            process.kill()
            process.wait()

    monkeypatch.setattr(rig, "launch_server", fake_launch)
    return started


MODELS = {"tiny": "/models/tiny", "broken": "/models/broken"}


def test_equal_specs_are_one_server_and_release_stops_it(launches, tmp_path):
    pool = ServerPool(MODELS, log_dir=str(tmp_path))
    a = pool.get(spec("tiny", ["--dp-size", "2"], env={"X": "1"}, name="first"))
    b = pool.get(spec("tiny", ["--dp-size", "2"], env={"X": "1"}, timeout_s=99, name="other label"))
    assert a is b and len(launches) == 1
    assert launches[0][2]["X"] == "1" and launches[0][2]["TIERSCHED_PLUGIN_TRACE"] == a.trace_path
    assert pool.get(spec("tiny", ["--dp-size", "2"], env={"X": "2"})) is not a  # env is part of the identity
    pool.release(spec("tiny", ["--dp-size", "2"], env={"X": "1"}))
    assert not a.alive() and len(pool.alive()) == 1
    pool.close()
    assert pool.alive() == []


def test_pool_env_reaches_every_start_under_the_specs_own(launches, tmp_path):
    pool = ServerPool(MODELS, log_dir=str(tmp_path), env={"A": "pool", "B": "pool"})
    pool.get_many([spec("tiny", ["--dp-size", "2"], env={"B": "spec"}), spec("tiny")])
    envs = sorted((env["A"], env["B"]) for _, _, env in launches)
    assert envs == [("pool", "pool"), ("pool", "spec")]
    pool.close()


def test_tiny_model_server_env_keeps_only_the_tiny_models_module():
    from tiersched.rig.tiny_model import MODEL_MODULE, server_env

    disabled = server_env()["SGLANG_DISABLED_MODEL_ARCHS"].split(",")
    assert MODEL_MODULE not in disabled and "registry" not in disabled
    assert "qwen2_moe" in disabled and "llama" in disabled  # other architectures' modules are skipped


def test_flag_order_is_not_part_of_the_identity_unless_an_option_repeats():
    a = spec("tiny", ["--dp-size", "2", "--schedule-policy", "lpm", "--enable-metrics"])
    b = spec("tiny", ["--enable-metrics", "--schedule-policy", "lpm", "--dp-size", "2"])
    assert a == b and hash(a) == hash(b)
    assert a.flags == ("--dp-size", "2", "--enable-metrics", "--schedule-policy", "lpm")  # values stay with options
    assert spec("tiny", ["--dp-size", "2", "--schedule-policy", "fcfs"]) != a
    # a repeated option: the last one wins in launch_server's parser, so the order is kept as written
    twice = ["--eplb-rebalance-num-iterations", "50", "--tp", "2", "--eplb-rebalance-num-iterations", "16"]
    assert spec("tiny", twice).flags == tuple(twice)
    assert spec("tiny", twice) != spec("tiny", [*twice[4:], *twice[2:4], *twice[:2]])  # 50 wins there, not 16


def test_starts_ahead_of_need_within_max_alive(launches, tmp_path):
    specs = [spec("tiny", [f"--n{i}"]) for i in range(6)]
    pool = ServerPool(MODELS, max_alive=3, log_dir=str(tmp_path))
    pool.set_plan(specs)
    pool.get(specs[1])
    assert sorted(l[1] for l in launches) == [("--n1",), ("--n2",), ("--n3",)]  # the asked one, the next planned
    pool.get(specs[0])  # asked for although not ahead: always started, nothing else (already 3 running)
    assert len(launches) == 4 and len(pool.alive()) == 4
    pool.release(specs[0], specs[1], specs[2])
    pool.get(specs[3])
    assert len(launches) == 4  # already running
    pool.get(specs[4])
    assert sorted(l[1] for l in launches[4:]) == [("--n4",), ("--n5",)]
    pool.close()


def test_dead_server_restarts_and_failed_start_is_not_retried(launches, tmp_path):
    pool = ServerPool(MODELS, log_dir=str(tmp_path))
    s = spec("tiny")
    first = pool.get(s)
    first.process.kill()
    first.process.wait()
    second = pool.get(s)
    assert second is not first and second.alive() and len(launches) == 2
    broken = spec("broken")
    for _ in range(2):
        with pytest.raises(ServerStartError):
            pool.get(broken)
    assert len(launches) == 2
    pool.close()


def test_undeclared_spec_is_refused(launches, tmp_path):
    pool = ServerPool(MODELS, log_dir=str(tmp_path))
    pool.expected = {spec("tiny", ["--a"])}
    with pytest.raises(ValueError, match="not declared"):
        pool.get(spec("tiny", ["--b"]))
    assert pool.get(spec("tiny", ["--a"])).alive() and len(launches) == 1
    pool.close()
