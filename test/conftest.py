"""Shared fixtures. Real-server tests are marked `server` (run alone: `pytest -m server`)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


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
