"""Layering rules: the core imports neither sglang nor torch; the simulator never imports the adapters or the live
tools; no two tiersched modules depend on each other, not even through imports inside functions."""
import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "tiersched"


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


def _module_files() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the tiersched package."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every dotted name the module imports, anywhere in its body (top level, functions, branches).

    `from a.b import c` yields `a.b.c` (a submodule or an attribute of a.b; the caller decides which); relative
    imports are resolved against the module's package; `importlib.import_module("literal")` counts as an import.
    """
    package = module.split(".") if is_package else module.split(".")[:-1]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            base = ".".join(base + ([node.module] if node.module else []))
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value)
    return names


def import_graph() -> dict[str, set[str]]:
    """tiersched module -> the tiersched modules it imports.

    A name resolves to the longest module it starts with: `from tiersched.sim import loop` is an edge to
    tiersched.sim.loop, `from tiersched.sim import Preset` one to tiersched.sim (its __init__). The parent packages
    Python initialises on the way are not edges: a package's __init__ importing its own submodules is no cycle.
    """
    modules = _module_files()
    graph = {}
    for module, path in modules.items():
        edges = set()
        for name in _imported_names(ast.parse(path.read_text()), module, path.name == "__init__.py"):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                edges.add(name)
        graph[module] = edges
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for child in graph[todo.pop()] - seen:
            seen.add(child)
            todo.append(child)
    return seen


def test_importing_core_pulls_neither_sglang_nor_torch():
    assert _modules_loaded_by_walking("tiersched.core", ("sglang", "torch")) == []


def test_simulator_never_imports_the_adapters():
    assert _modules_loaded_by_walking("tiersched.sim", ("tiersched.sglang",)) == []


def test_cycle_finder_sees_function_local_and_submodule_imports():
    """The checker itself: a cycle closed by an import inside a function, through `from pkg import submodule`."""
    graph = {"p": set(), "p.a": set(), "p.b": set(), "p.c": set()}
    modules = {m: None for m in graph}
    code = {"p.a": "from p import b\n", "p.b": "def f():\n    from . import c\n", "p.c": "import p.a\n"}
    for module, text in code.items():
        for name in _imported_names(ast.parse(text), module, is_package=False):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            graph[module].add(name)
    assert graph == {"p": set(), "p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}}
    assert import_cycles(graph) == [["p.a", "p.b", "p.c"]]
    assert import_cycles({**graph, "p.c": set()}) == []
    assert reachable({**graph, "p.c": set()}, "p.a") == {"p.b", "p.c"}


def test_no_import_cycle_among_tiersched_modules():
    graph = import_graph()
    assert len(graph) > 50  # the walk found the package
    assert import_cycles(graph) == []


def test_simulator_reaches_neither_adapters_nor_live_tools():
    graph = import_graph()
    for module in [m for m in graph if m == "tiersched.sim" or m.startswith("tiersched.sim.")]:
        bad = sorted(m for m in reachable(graph, module) if m.startswith(("tiersched.sglang", "tiersched.live")))
        assert bad == [], f"{module} imports {bad}"
