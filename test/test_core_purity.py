import subprocess
import sys


def test_importing_core_pulls_neither_sglang_nor_torch():
    code = (
        "import sys, pkgutil, importlib, tiersched.core as c\n"
        "for m in pkgutil.walk_packages(c.__path__, 'tiersched.core.'): importlib.import_module(m.name)\n"
        "bad = [m for m in ('sglang', 'torch') if m in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, f"tiersched.core imported {result.stdout.strip()}: {result.stderr[-2000:]}"


def test_simulator_never_imports_the_adapters():
    code = (
        "import sys, pkgutil, importlib, tiersched.sim as s\n"
        "for m in pkgutil.walk_packages(s.__path__, 'tiersched.sim.'): importlib.import_module(m.name)\n"
        "bad = [m for m in sys.modules if m.startswith('tiersched.sglang')]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, f"tiersched.sim imported adapters {result.stdout.strip()}: {result.stderr[-2000:]}"
