"""Shared fixtures. Real-server tests are marked `server` (run alone: `pytest -m server`).

Real servers come from one session-wide pool (`rig_pool`, tiersched.rig.server.ServerPool), so a server that
several tests need starts once. A test (or its module, through `pytestmark`) declares the servers it uses with
`pytest.mark.rig_servers(SPEC, ...)` and asks for them with `rig_pool.get(SPEC)`; equal specs are one server. The
pool stops a server right after the last collected test that declared it, and starts servers ahead of need (the
next declared ones, up to 4 running) so that starts overlap. test/README.md, "Real servers", says how to add one.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

_PLAN = pytest.StashKey[tuple]()  # (specs in order of first use, {spec: nodeid of the last test declaring it})
_POOL = pytest.StashKey[object]()
_CURRENT = pytest.StashKey[set]()  # specs declared by the test being set up / run


def shared_data_dir() -> Path | None:
    env = os.environ.get("TIERSCHED_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(REPO_ROOT.parent / "shared" / "data")
    return next((p for p in candidates if p.is_dir()), None)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("needs ../shared/data (public traces and expert counts); absent in a user's clone")
    return path


@pytest.fixture(scope="session", autouse=True)
def _servers_stop_in_background():
    """Real servers stop while the next test runs (tiersched.rig.server.stop_in_background); every one of them
    has stopped when the session ends."""
    from tiersched.rig import server

    server.stop_in_background(True)
    yield
    server.stop_in_background(False)
    server.wait_for_stops()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    from tiersched.rig.tiny_model import make_tiny_moe

    return make_tiny_moe(str(tmp_path_factory.mktemp("tiny-moe")))


@pytest.fixture(scope="session")
def skewed_tiny_model_dir(tmp_path_factory) -> str:
    from tiersched.rig.tiny_model import make_tiny_moe

    return make_tiny_moe(str(tmp_path_factory.mktemp("tiny-moe-skewed")), router_skew=4.0)


# Model names a ServerSpec may use: the tiny Qwen3-MoE, unbiased or with a skewed router (tiersched.rig.tiny_model).
POOL_MODELS = {"tiny": "tiny_model_dir", "tiny-skewed": "skewed_tiny_model_dir"}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "rig_servers(*specs): the tiersched.rig.server.ServerSpec servers this test gets from rig_pool")


def _declared(item) -> list:
    return [s for mark in item.iter_markers("rig_servers") for s in mark.args]


def pytest_collection_finish(session):
    """After selection (-m, -k): the order in which specs are first used and the last test using each."""
    order, last = [], {}
    for item in session.items:
        for s in _declared(item):
            order.append(s)
            last[s] = item.nodeid
    session.config.stash[_PLAN] = (order, last)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    item.config.stash[_CURRENT] = set(_declared(item))
    pool = item.config.stash.get(_POOL, None)
    if pool is not None:
        pool.expected = item.config.stash[_CURRENT]
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield  # the test's own fixtures are torn down first
    pool = item.config.stash.get(_POOL, None)
    if pool is not None:
        _, last = item.config.stash.get(_PLAN, ([], {}))
        pool.release(*[s for s, nodeid in last.items() if nodeid == item.nodeid])


@pytest.fixture(scope="session")
def rig_pool(request, tmp_path_factory):
    """The session's ServerPool; see the module docstring. At most TIERSCHED_POOL_MAX_ALIVE (default 4) servers
    run at once through starts ahead of need (a test's own declared servers always start)."""
    from tiersched.rig.server import ServerPool

    models = {name: request.getfixturevalue(fixture) for name, fixture in POOL_MODELS.items()}
    pool = ServerPool(models, max_alive=int(os.environ.get("TIERSCHED_POOL_MAX_ALIVE", "4")),
                      log_dir=str(tmp_path_factory.mktemp("rig-pool")))
    order, _ = request.config.stash.get(_PLAN, ([], {}))
    pool.set_plan(order)
    pool.expected = request.config.stash.get(_CURRENT, None)
    request.config.stash[_POOL] = pool
    yield pool
    pool.close()
    del request.config.stash[_POOL]
    if pool.starts:
        print("\n[rig pool] starts: " + ", ".join(f"{label} {s:.0f} s" for label, s in pool.starts), file=sys.stderr)
