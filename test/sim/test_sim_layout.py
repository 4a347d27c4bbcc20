"""What the simulator's modules may import: workload generation runs no simulation, and no module of the package
imports the package itself (only sim/__init__.py re-exports)."""
from __future__ import annotations

import ast
from pathlib import Path

SIM = Path(__file__).resolve().parents[2] / "python" / "tiersched" / "sim"


def _tiersched_imports(path: Path) -> set[str]:
    """Every tiersched name `path` imports, anywhere in its body; `from a import b` gives `a.b`."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if n.startswith("tiersched.")}


def test_workloads_import_no_simulator_module():
    assert _tiersched_imports(SIM / "workloads.py") == {"tiersched.data"}


def test_no_sim_module_imports_the_sim_package():
    for path in SIM.rglob("*.py"):
        if path == SIM / "__init__.py":
            continue
        for name in _tiersched_imports(path):
            head = name.rpartition(".")[0]
            # `from tiersched.sim import x` runs the package's __init__, which imports loop, capacity, ...
            assert head != "tiersched.sim" and name != "tiersched.sim", (path.name, name)
