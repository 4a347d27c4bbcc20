"""Shared fixtures. Real-server tests are marked `server` (run alone: `pytest -m server`).

Real servers come from one session-wide pool (`rig_pool`, tiersched.rig.server.ServerPool), so a server that
several tests need starts once. A test (or its module, through `pytestmark`) declares the servers it uses with
`pytest.mark.rig_servers(SPEC, ...)` and asks for them with `rig_pool.get(SPEC)`; equal specs are one server. The
pool stops a server right after the last collected test that declared it, and starts servers ahead of need (the
next declared ones, up to 4 running) so that starts overlap. test/README.md, "Real servers", says how to add one.

With pytest-xdist, `pytest` runs on 2 workers and the real-server tests are in two xdist groups, each run by one
worker with a pool of its own: those marked `second_pool` (servers no other test uses) and all the others;
test/README.md, "Two workers".
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

_PLAN = pytest.StashKey[dict]()  # group -> (specs in order of first use, {spec: nodeid of the last test declaring it})
_GROUP = pytest.StashKey[str]()  # the server group of the test being set up / run
_POOL = pytest.StashKey[object]()
_CURRENT = pytest.StashKey[set]()  # specs declared by the test being set up / run
_QUIET_HELD = pytest.StashKey[contextlib.ExitStack]()  # the locks of a run of consecutive quiet_cpu tests


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


# ---- Two pytest-xdist workers; every real-server test on one of them (test/README.md, "Two workers") ----

XDIST_WORKERS = 2  # `pytest -q` runs on this many workers (`-n 0`, `-p no:xdist`, `-s`: one process)
SERVER_GROUP = "real-servers"  # the scope of every real-server test in the scheduler below...
SECOND_GROUP = "real-servers-2"  # ...but those marked second_pool: a scope of their own, with a pool of their own
ALL_GROUPS = "all"  # one process (no xdist): one pool for every group, in collection order
_XDIST_DIR = pytest.StashKey[str]()  # the controller's folder shared with its workers


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Parallel by default: with pytest-xdist installed and no `-n` given, `XDIST_WORKERS` workers; with any `-n`
    and no `--dist`, `--dist loadgroup`, which `pytest_xdist_make_scheduler` below turns into one group for the
    real-server tests (they must share one worker and its server pool). `-n 0`, `-p no:xdist`, `-s` (workers'
    output is not shown), `--pdb` and `--collect-only` run in one process."""
    if not config.pluginmanager.hasplugin("xdist") or hasattr(config, "workerinput"):
        return
    option = config.option
    if option.numprocesses is None and not (option.usepdb or option.collectonly or option.capture == "no"):
        option.numprocesses = XDIST_WORKERS
    if option.numprocesses and option.dist == "no":
        option.dist = "loadgroup"


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """xdist controller, per worker: the folder where workers list the real-server tests and share CPU locks."""
    if _XDIST_DIR not in node.config.stash:
        node.config.stash[_XDIST_DIR] = tempfile.mkdtemp(prefix="tiersched-xdist-")
    node.workerinput["tiersched_xdist_dir"] = node.config.stash[_XDIST_DIR]


def pytest_unconfigure(config):
    if _XDIST_DIR in config.stash:
        shutil.rmtree(config.stash[_XDIST_DIR], ignore_errors=True)


def _xdist_dir(config) -> str | None:
    """The shared folder, on an xdist worker; None elsewhere."""
    return getattr(config, "workerinput", {}).get("tiersched_xdist_dir")


def _server_tests_file(folder: str) -> str:
    return os.path.join(folder, "server-tests.json")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadgroup` with every real-server test in one scope, run by one worker in collection order (the
    workers list them after collecting, before the controller schedules). xdist's own `xdist_group` marker
    cannot be used: it renames items through `Item._nodeid`, which pytest 9.2 no longer reads."""
    if config.option.dist != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class ServerGroupScheduling(LoadGroupScheduling):
        server_tests: dict | None = None  # nodeid -> its server group

        def _split_scope(self, nodeid: str) -> str:
            if self.server_tests is None:
                with open(_server_tests_file(config.stash[_XDIST_DIR])) as f:
                    self.server_tests = json.load(f)
            return self.server_tests.get(nodeid) or super()._split_scope(nodeid)

    return ServerGroupScheduling(config, log)


def _in_server_group(item) -> bool:
    return bool(item.get_closest_marker("server") or _declared(item))


def _group(item) -> str | None:
    """The real-server group of a test (None: CPU-only)."""
    if not _in_server_group(item):
        return None
    return SECOND_GROUP if item.get_closest_marker("second_pool") else SERVER_GROUP


@contextlib.contextmanager
def _flock(path: str, operation: int):
    with open(path, "a") as f:
        fcntl.flock(f, operation)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """On an xdist worker, a CPU-only test (or a `second_pool` real-server test) holds the shared folder's cpu lock
    shared for its whole run, after passing its turnstile: a `quiet_cpu` test (below, only in the first server
    group) holding the turnstile keeps new ones from starting while it waits for the running ones to end."""
    folder = _xdist_dir(item.config)
    if folder is None or _group(item) == SERVER_GROUP:
        yield
        held = item.config.stash.get(_QUIET_HELD, None)
        if held is not None and not (nextitem is not None and nextitem.get_closest_marker("quiet_cpu")):
            del item.config.stash[_QUIET_HELD]
            held.close()
        return
    with _flock(os.path.join(folder, "turnstile.lock"), fcntl.LOCK_EX):
        pass
    with _flock(os.path.join(folder, "cpu.lock"), fcntl.LOCK_SH):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """A `quiet_cpu` test's call runs while no CPU-only or `second_pool` test runs on another worker (latency
    measured on a 2-core machine moves by up to 4x with a CPU-bound neighbour). Consecutive quiet tests keep the
    locks from the first one's call to the last one's end (pytest_runtest_protocol releases them): otherwise the
    other worker starts a test in between, often a server start of a minute or more, and the next quiet test
    waits for it with the first worker idle."""
    folder = _xdist_dir(item.config)
    if folder is not None and item.get_closest_marker("quiet_cpu") and _QUIET_HELD not in item.config.stash:
        held = contextlib.ExitStack()
        held.enter_context(_flock(os.path.join(folder, "turnstile.lock"), fcntl.LOCK_EX))
        held.enter_context(_flock(os.path.join(folder, "cpu.lock"), fcntl.LOCK_EX))
        item.config.stash[_QUIET_HELD] = held
    yield


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "rig_servers(*specs): the tiersched.rig.server.ServerSpec servers this test gets from rig_pool")
    config.addinivalue_line(
        "markers", "quiet_cpu: it measures latency; under xdist no CPU-only test runs on another worker during its "
                   "call")
    config.addinivalue_line(
        "markers", "second_pool: a real-server test whose servers no test outside this marker uses; under xdist "
                   "these tests run on the other worker with a pool of their own (test/README.md, 'Two workers')")


def _declared(item) -> list:
    return [s for mark in item.iter_markers("rig_servers") for s in mark.args]


@pytest.hookimpl(tryfirst=True)  # an xdist worker's own hook then reports the collection to the controller
def pytest_collection_finish(session):
    """After selection (-m, -k): per server group (and for all of them), the order in which specs are first used
    and the last test using each. On an xdist worker, also the real-server tests' groups for the controller's
    scheduler (every worker writes the same). A spec declared in both groups, or a `quiet_cpu` test in the second,
    is a usage error: the two pools would each start that server, and a quiet test must own the first worker."""
    plans: dict[str, tuple[list, dict]] = {}
    owner: dict = {}
    for item in session.items:
        group = _group(item)
        if group == SECOND_GROUP and item.get_closest_marker("quiet_cpu"):
            raise pytest.UsageError(f"{item.nodeid}: a quiet_cpu test cannot be second_pool")
        for s in _declared(item):
            if owner.setdefault(s, group) != group:
                raise pytest.UsageError(f"server {s.label()!r} is declared by tests of both server groups "
                                        f"({item.nodeid} is {group}); mark all of its tests second_pool or none")
            for key in (group, ALL_GROUPS):
                order, last = plans.setdefault(key, ([], {}))
                order.append(s)
                last[s] = item.nodeid
    session.config.stash[_PLAN] = plans
    folder = _xdist_dir(session.config)
    if folder is not None:
        path = _server_tests_file(folder)
        with tempfile.NamedTemporaryFile("w", dir=folder, delete=False) as f:
            json.dump({item.nodeid: _group(item) for item in session.items if _in_server_group(item)}, f)
        os.replace(f.name, path)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    item.config.stash[_CURRENT] = set(_declared(item))
    item.config.stash[_GROUP] = _group(item) or SERVER_GROUP
    pool = item.config.stash.get(_POOL, None)
    if pool is not None:
        pool.expected = item.config.stash[_CURRENT]
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield  # the test's own fixtures are torn down first
    pool = item.config.stash.get(_POOL, None)
    if pool is not None:
        _, last = item.config.stash.get(_PLAN, {}).get(ALL_GROUPS, ([], {}))
        pool.release(*[s for s, nodeid in last.items() if nodeid == item.nodeid])


@pytest.fixture(scope="session")
def rig_pool(request, tmp_path_factory):
    """The session's ServerPool; see the module docstring. At most TIERSCHED_POOL_MAX_ALIVE (default 4) servers
    run at once through starts ahead of need (a test's own declared servers always start)."""
    from tiersched.rig.server import ServerPool
    from tiersched.rig.tiny_model import server_env

    models = {name: request.getfixturevalue(fixture) for name, fixture in POOL_MODELS.items()}
    # an xdist worker runs one server group (the scheduler's scope): plan only its specs; one process runs all.
    # The second group's pool runs at most 2 servers, so that both pools together stay within ~6 servers' memory.
    group = request.config.stash.get(_GROUP, SERVER_GROUP) if _xdist_dir(request.config) else ALL_GROUPS
    max_alive = int(os.environ.get("TIERSCHED_POOL_MAX_ALIVE", "4"))
    pool = ServerPool(models, max_alive=min(max_alive, 2) if group == SECOND_GROUP else max_alive,
                      log_dir=str(tmp_path_factory.mktemp("rig-pool")), env=server_env())
    order, _ = request.config.stash.get(_PLAN, {}).get(group, ([], {}))
    pool.set_plan(order)
    pool.expected = request.config.stash.get(_CURRENT, None)
    request.config.stash[_POOL] = pool
    yield pool
    pool.close()
    del request.config.stash[_POOL]
    if pool.starts:
        print("\n[rig pool] starts: " + ", ".join(f"{label} {s:.0f} s" for label, s in pool.starts), file=sys.stderr)


@pytest.fixture(autouse=True)
def _declared_servers_started(request):
    """A test that uses `rig_pool` has its declared servers (and the pool's starts ahead of need) started in its
    setup, not in its call: a start then counts as setup time in `--durations`, and it never runs inside a
    `quiet_cpu` test's call, where the other worker would wait for it doing nothing."""
    specs = _declared(request.node)
    if specs and "rig_pool" in request.fixturenames:
        request.getfixturevalue("rig_pool").get_many(list(dict.fromkeys(specs)))
