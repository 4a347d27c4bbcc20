"""SGLang plugin entry point (group `sglang.srt.plugins`): runs in every SGLang process.

`register()` is cheap and idempotent: it reads tiersched's configuration, checks the upstream pin, and registers
hooks (strings naming upstream targets; upstream imports and patches them in `HookRegistry.apply_hooks()`). Bad
configuration or a wrong sglang version stops the process with one sentence saying what to do.

Every adapter module lists its hooks in a `HOOKS` table of (upstream target, HookType name, function name in
that module); `register_hooks` is the one place they reach upstream's HookRegistry.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import json
import logging
import os
import sys
from dataclasses import dataclass

from tiersched import SGLANG_PIN
from tiersched.config import ConfigError, load_config

logger = logging.getLogger("tiersched")


@dataclass(frozen=True)
class TierAdapter:
    """A tier's adapter: `configure` (module.function) receives the tier's config section; `hook_modules` hold the
    HOOKS tables registered for it."""

    configure: str
    hook_modules: tuple[str, ...]


TIER_ADAPTERS: dict[str, TierAdapter] = {
    "request": TierAdapter("tiersched.sglang.request.hooks.configure",
                           ("tiersched.sglang.request.hooks", "tiersched.sglang.request.lockstep",
                            "tiersched.sglang.request.step_plan")),
    "engine": TierAdapter("tiersched.sglang.engine.hooks.configure", ("tiersched.sglang.engine.hooks",)),
    "expert": TierAdapter("tiersched.sglang.expert.hooks.configure",
                          ("tiersched.sglang.expert.hooks", "tiersched.sglang.expert.capture")),
}
CPU_FIXES = "tiersched.sglang.cpu_fixes"
# Registered whatever tiers are on: bug fixes for every deployment, and the start-up report of what is in effect.
ALWAYS = ("tiersched.sglang.input_validation", "tiersched.sglang.in_effect", "tiersched.sglang.state_report")
INPUT_VALIDATION = "input-validation"


@dataclass
class PluginState:
    """What `register()` did in this process (it runs once per process)."""

    registered: bool = False
    config: object = None
    active: tuple[str, ...] = ()


STATE = PluginState()


def is_cpu_deployment(env=None) -> bool:
    """CPU fixes apply when SGLang runs its CPU engine; TIERSCHED_CPU_FIXES=0/1 overrides the detection."""
    env = os.environ if env is None else env
    forced = env.get("TIERSCHED_CPU_FIXES")
    if forced in ("0", "1"):
        return forced == "1"
    if env.get("SGLANG_USE_CPU_ENGINE") == "1":
        return True
    torch = sys.modules.get("torch")  # only if already imported: never import torch just to ask
    return bool(torch is not None and not torch.cuda.is_available())


def check_sglang_version() -> str:
    try:
        version = importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"tiersched: sglang is not installed; install sglang=={SGLANG_PIN} (see README.md).") from None
    if version != SGLANG_PIN:
        raise SystemExit(
            f"tiersched: found sglang {version} but tiersched is pinned to sglang=={SGLANG_PIN}; install that version "
            f"or set SGLANG_PLUGINS to exclude tiersched."
        )
    return version


def register_hooks(registry, hook_types, module) -> None:
    """Register every row of `module.HOOKS` with `registry` (upstream's HookRegistry, or a recorder)."""
    for target, type_name, fn_name in module.HOOKS:
        registry.register(target, getattr(module, fn_name), getattr(hook_types, type_name))


def _resolve(dotted: str):
    # By name, imported only when the tier is active: adapter modules import numpy/torch, and importing this
    # module must stay cheap (it runs in every SGLang process, before argument parsing).
    module, _, attr = dotted.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def register_all(config, registry, hook_types, cpu: bool) -> list[str]:
    """Configure each active tier's adapter and register its hooks (and the CPU fixes, the input validation and the
    start-up report) with `registry`; returns what was loaded."""
    active = []
    if cpu:
        register_hooks(registry, hook_types, importlib.import_module(CPU_FIXES))
        active.append("cpu-fixes")
    for name in ALWAYS:
        register_hooks(registry, hook_types, importlib.import_module(name))
    active.append(INPUT_VALIDATION)
    for tier in config.tiers:
        adapter = TIER_ADAPTERS[tier]
        _resolve(adapter.configure)(config.tier(tier))
        for name in adapter.hook_modules:
            register_hooks(registry, hook_types, importlib.import_module(name))
        active.append(tier)
    return active


def _trace(active: list[str]) -> None:
    """TIERSCHED_PLUGIN_TRACE=path appends one JSON line per process that loaded us (used by the server tests)."""
    path = os.environ.get("TIERSCHED_PLUGIN_TRACE")
    if not path:
        return
    try:
        import setproctitle

        title = setproctitle.getproctitle()
    except Exception:  # setproctitle is optional for this diagnostic
        title = " ".join(sys.argv[:2])
    with open(path, "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "title": title, "active": active}) + "\n")


def register() -> None:
    if STATE.registered:
        return
    check_sglang_version()
    try:
        config = load_config()
    except ConfigError as exc:
        raise SystemExit(f"tiersched: {exc}") from None
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType  # deferred: importing sglang is heavy

    active = register_all(config, HookRegistry, HookType, cpu=is_cpu_deployment())
    STATE.registered, STATE.config, STATE.active = True, config, tuple(active)
    # Which tiers act depends on the server's flags, parsed later: the launcher prints "[tiersched] active tiers:"
    # once they are known (tiersched.sglang.in_effect).
    print(f"[tiersched] plugin loaded: {', '.join(active) or 'nothing'} (pid {os.getpid()})", file=sys.stderr,
          flush=True)
    _trace(active)
