"""Layering rules: the core imports neither sglang nor torch; the simulator never imports the adapters."""
import subprocess
import sys


def _modules_loaded_by_walking(package: str, prefixes: tuple[str, ...]) -> list[str]:
    """Import every module of `package` in a fresh interpreter; return loaded modules starting with `prefixes`."""
    code = (
        "import sys, pkgutil, importlib\n"
        f"root = importlib.import_module({package!r})\n"
        f"for m in pkgutil.walk_packages(root.__path__, {package + '.'!r}): importlib.import_module(m.name)\n"
        f"print('\\n'.join(m for m in sys.modules if m.split('.')[0] in {prefixes!r} or m.startswith({prefixes!r})))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return [line for line in result.stdout.splitlines() if line]


def test_importing_core_pulls_neither_sglang_nor_torch():
    assert _modules_loaded_by_walking("tiersched.core", ("sglang", "torch")) == []


def test_simulator_never_imports_the_adapters():
    assert _modules_loaded_by_walking("tiersched.sim", ("tiersched.sglang",)) == []
