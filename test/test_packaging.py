"""The wheel is the package: every module and the cpu-tiny calibration ship in it, and an installed copy runs
without the checkout (the patch manifests, which stay in the checkout, are then asked for by folder)."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "python" / "tiersched"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build the wheel from a copy of the sources (setuptools writes build/ and egg-info next to them)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(PACKAGE, src / "python" / "tiersched", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp / "dist"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index", "--no-build-isolation", "-q",
         "--disable-pip-version-check", "-w", str(out), str(src)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    (path,) = out.glob("*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel unpacked as a site directory (what `pip install` would put in site-packages)."""
    site = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    return site


def _run_installed(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("TIERSCHED_PATCHES_DIR", None)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=site, env=env)


def test_wheel_holds_every_module_and_the_calibration(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
    assert sources - names == set()
    assert "tiersched/sim/presets/cpu_tiny.json" in names
    assert not [n for n in names if n.startswith("tiersched/") and n not in sources and not n.endswith(".json")]


def test_installed_wheel_runs_compare_without_the_checkout(installed):
    code = (
        "import tiersched, tiersched.bench.compare\n"
        "from tiersched.sim.presets.cpu_tiny import calibration_path, preset\n"
        "print(tiersched.__file__)\nprint(calibration_path())\nprint(preset().model.num_experts)\n"
    )
    result = _run_installed(installed, "-c", code)
    assert result.returncode == 0, result.stderr[-3000:]
    package_file, calibration, experts = result.stdout.split()
    assert Path(package_file).is_relative_to(installed)
    assert Path(calibration).is_relative_to(installed) and Path(calibration).is_file()
    assert experts == "8"
    help_run = _run_installed(installed, "-m", "tiersched.bench", "compare", "--help")
    assert help_run.returncode == 0 and "--preset" in help_run.stdout, help_run.stderr[-2000:]


def test_installed_wheel_asks_for_the_patch_manifests_by_folder(installed):
    missing = _run_installed(installed, "-m", "tiersched.patches", "list")
    assert missing.returncode == 2
    assert "not from a source checkout" in missing.stderr and "--patches-dir" in missing.stderr
    given = _run_installed(installed, "-m", "tiersched.patches", "list", "--patches-dir", str(REPO / "patches"))
    assert given.returncode == 0, given.stderr[-2000:]
    assert "sglang.srt.managers.schedule_policy.SchedulePolicy.calc_priority" in given.stdout
