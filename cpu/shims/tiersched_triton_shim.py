"""Provide `triton` on a CPU-only machine by reusing SGLang's own Triton mock.

SGLang imports triton unconditionally, and real triton is ~1 GB. SGLang ships a Triton mock for Apple
Silicon (`sglang/_platform_stubs.py`) but installs it only on darwin/arm64 with MPS. We load that file by
path (importing the `sglang` package would itself import triton) and install the same mock here, with
the few attributes that need real behaviour (numeric helpers, `tl.constexpr`, exception classes).
Only active when no real triton is installed; set SGLANG_CPU_TRITON_STUB=0 to disable.
"""
import importlib.util
import os
import sys


def _load_sglang_stubs():
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "_platform_stubs.py")
    file_spec = importlib.util.spec_from_file_location("_tiersched_sglang_platform_stubs", path)
    module = importlib.util.module_from_spec(file_spec)
    sys.modules[file_spec.name] = module
    file_spec.loader.exec_module(module)
    return module


class _Constexpr:
    def __init__(self, value=None):
        self.value = value


class _JITFunction:  # used only in isinstance checks
    pass


def _install_mock():
    stubs = _load_sglang_stubs()
    if stubs is None:
        return None
    sys.meta_path.insert(0, stubs._TritonFinder())  # any `import triton.x.y` gets a mock module
    mock = stubs._make_mock
    triton = mock("triton")
    triton.__version__ = "3.0.0"
    triton.cdiv, triton.next_power_of_2, triton.Config = stubs._cdiv, stubs._next_power_of_2, stubs._Config
    # Attributes whose *kind* matters (a class for annotations/isinstance, an Exception for `except`).
    specials = {
        "triton.language": {"constexpr": _Constexpr},
        "triton.runtime.jit": {"JITFunction": _JITFunction},
        "triton.runtime.cache": {"triton_key": stubs._triton_key},
        "triton.compiler.compiler": {"triton_key": stubs._triton_key},
        # torch's has_triton() asks `"cpu" in triton.backends.backends` (dynamo reads the module __dict__, so the
        # catch-all __getattr__ is not enough): a real, empty registry says "no triton backend for this device".
        "triton.backends": {"backends": {}},
        "triton.runtime.autotuner": {
            "OutOfResources": type("OutOfResources", (Exception,), {}),
            "PTXASError": type("PTXASError", (Exception,), {}),
        },
    }
    for module_name, attrs in specials.items():
        parent = triton
        for part in module_name.split(".")[1:]:
            parent = getattr(parent, part)  # creates and registers the mock submodule
        for attr, value in attrs.items():
            setattr(parent, attr, value)
    return triton


class _LazyTritonFinder:
    """Cheap at interpreter start; builds the mock only when `import triton` happens and no real
    triton was found by the normal finders (this finder is appended, so a real triton wins)."""

    def find_spec(self, name, path=None, target=None):
        if name != "triton":
            return None
        sys.meta_path.remove(self)
        module = _install_mock()
        if module is None:
            return None
        module.__spec__ = importlib.util.spec_from_loader("triton", _AlreadyLoaded(module), is_package=True)
        return module.__spec__


class _AlreadyLoaded:
    def __init__(self, module):
        self.module = module

    def create_module(self, spec):
        return self.module

    def exec_module(self, module):
        pass


if os.environ.get("SGLANG_CPU_TRITON_STUB", "1") == "1":
    sys.meta_path.append(_LazyTritonFinder())
