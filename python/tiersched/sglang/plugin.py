"""SGLang plugin entry point (group `sglang.srt.plugins`): runs in every SGLang process.

`register()` is cheap and idempotent: it reads tiersched's configuration, checks the upstream pin, and registers
hooks (strings naming upstream targets; upstream imports and patches them in `HookRegistry.apply_hooks()`). Bad
configuration or a wrong sglang version stops the process with one sentence saying what to do.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import json
import logging
import os
import sys

from tiersched import SGLANG_PIN

logger = logging.getLogger("tiersched")

TIER_ADAPTERS = {"request": "tiersched.sglang.request.hooks", "engine": "tiersched.sglang.engine.hooks",
                 "expert": "tiersched.sglang.expert.hooks"}
_state: dict = {}


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


def register_all(config, registry, hook_types, cpu: bool) -> list[str]:
    """Register every hook for the active tiers (and the CPU fixes) with `registry`; returns what was activated."""
    from tiersched.sglang import cpu_fixes

    active = []
    if cpu:
        cpu_fixes.register_hooks(registry, hook_types)
        active.append("cpu-fixes")
    for tier in config.tiers:
        try:
            adapter = importlib.import_module(TIER_ADAPTERS[tier])
        except ModuleNotFoundError as exc:
            if exc.name != TIER_ADAPTERS[tier]:
                raise
            logger.warning("tiersched: tier %r has no adapter in this build; skipped", tier)
            continue
        adapter.register_hooks(config)
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
    if _state.get("registered"):
        return
    from tiersched.config import ConfigError, load_config

    check_sglang_version()
    try:
        config = load_config()
    except ConfigError as exc:
        raise SystemExit(f"tiersched: {exc}") from None
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    active = register_all(config, HookRegistry, HookType, cpu=is_cpu_deployment())
    _state.update(registered=True, config=config, active=active)
    print(f"[tiersched] active tiers: {', '.join(active) or 'none'} (pid {os.getpid()})", file=sys.stderr, flush=True)
    _trace(active)
