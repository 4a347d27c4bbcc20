import subprocess
import sys

import pytest

from tiersched.config import load_config
from tiersched.sglang import plugin


class RecordingRegistry:
    def __init__(self):
        self.calls = []
        self.hooks = []

    def register(self, target, hook, hook_type):
        self.calls.append((target, hook_type))
        self.hooks.append((target, hook, hook_type))


def test_cpu_detection():
    assert plugin.is_cpu_deployment({"SGLANG_USE_CPU_ENGINE": "1"})
    assert not plugin.is_cpu_deployment({"SGLANG_USE_CPU_ENGINE": "1", "TIERSCHED_CPU_FIXES": "0"})
    assert plugin.is_cpu_deployment({"TIERSCHED_CPU_FIXES": "1"})


def test_cpu_fixes_only_on_cpu():
    from sglang.srt.plugins.hook_registry import HookType

    on_cpu, on_gpu = RecordingRegistry(), RecordingRegistry()
    plugin.register_all(load_config({"TIERSCHED_TIERS": "request"}), on_cpu, HookType, cpu=True)
    plugin.register_all(load_config({"TIERSCHED_TIERS": "request"}), on_gpu, HookType, cpu=False)
    fixes = {t for t, _ in on_cpu.calls} - {t for t, _ in on_gpu.calls}
    assert "sglang.srt.layers.moe.fused_moe_native.moe_forward_native" in fixes
    assert not any("fused_moe_native" in t for t, _ in on_gpu.calls)


def test_register_module_import_is_cheap():
    code = "import sys, tiersched.sglang.plugin; print(int('torch' in sys.modules or 'sglang' in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "0"


def test_wrong_sglang_version_is_one_sentence(monkeypatch):
    monkeypatch.setattr(plugin.importlib.metadata, "version", lambda name: "0.4.0")
    with pytest.raises(SystemExit, match=r"found sglang 0.4.0 but tiersched is pinned to sglang==0.5.23"):
        plugin.check_sglang_version()


def test_bad_config_stops_register_with_one_sentence():
    code = "from tiersched.sglang.plugin import register; register()"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**__import__("os").environ, "TIERSCHED_TIERS": "request,warp"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("tiersched: TIERSCHED_TIERS names unknown tier(s) warp")
    assert "Traceback" not in result.stderr


def test_register_is_idempotent(monkeypatch):
    from sglang.srt.plugins.hook_registry import HookRegistry

    monkeypatch.setattr(plugin, "STATE", plugin.PluginState())
    calls = []
    monkeypatch.setattr(HookRegistry, "register", classmethod(lambda cls, *a, **k: calls.append(a[0])))
    monkeypatch.setenv("TIERSCHED_CPU_FIXES", "1")
    plugin.register()
    first = len(calls)
    plugin.register()
    assert first >= 4 and len(calls) == first


def test_every_tier_registers_its_hook_tables_through_the_registry_it_is_given():
    """One helper registers every HOOKS row of each tier's modules with the registry passed in (nothing reaches
    upstream's HookRegistry behind its back), each row's function being the named one of that module."""
    import importlib

    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    recorder = RecordingRegistry()
    before = {target: list(rows) for target, rows in HookRegistry._hooks.items()}
    active = plugin.register_all(load_config({}), recorder, HookType, cpu=False)
    assert active == ["input-validation", *load_config({}).tiers] == ["input-validation", "request", "engine", "expert"]
    want = []
    for name in plugin.ALWAYS:
        module = importlib.import_module(name)
        want += [(t, getattr(module, fn), getattr(HookType, kind)) for t, kind, fn in module.HOOKS]
    for tier in active[1:]:
        for name in plugin.TIER_ADAPTERS[tier].hook_modules:
            module = importlib.import_module(name)
            want += [(t, getattr(module, fn), getattr(HookType, kind)) for t, kind, fn in module.HOOKS]
    assert recorder.hooks == want and len(want) >= 20
    assert {target: list(rows) for target, rows in HookRegistry._hooks.items()} == before
