"""The patch manifest: every upstream SGLang target tiersched hooks, with a fingerprint of its source.

Rows live in the repository's `patches/*.toml` (one file per patch group, next to that group's PR write-up):

    [[patch]]
    target = "sglang.srt.layers.moe.fused_moe_native.moe_forward_native"  # dotted path given to HookRegistry
    hook = "around"                 # before | after | around | replace
    adapter = "tiersched.sglang.cpu_fixes"
    purpose = "why we hook it"
    fingerprint = "sha256:..."      # of the upstream object's source (see fingerprint())

`check()` proves each target still exists in the installed sglang with the recorded fingerprint, and that the rows
and the hooks the plugin registers are the same set. docs/rebase.md is the pin-bump procedure built on it.

The manifests are not package data: they are reviewed with their write-ups and `update --write` edits them, so they
stay in the checkout. `patches_dir()` finds them there; an installed wheel must be told where they are
(`--patches-dir` or $TIERSCHED_PATCHES_DIR).
"""
from __future__ import annotations

import glob
import hashlib
import inspect
import os
import pkgutil
import textwrap
import tomllib
from dataclasses import dataclass

HOOK_TYPES = ("before", "after", "around", "replace")


@dataclass(frozen=True)
class PatchRow:
    target: str
    hook: str
    adapter: str
    purpose: str
    fingerprint: str
    source_file: str


class ManifestError(ValueError):
    pass


def patches_dir(directory: str | None = None) -> str:
    """The manifest folder: `directory` if given, else $TIERSCHED_PATCHES_DIR, else the source checkout's
    `patches/` (this package imported from `<repo>/python/tiersched`, with `<repo>/pyproject.toml` beside it)."""
    chosen = directory or os.environ.get("TIERSCHED_PATCHES_DIR")
    if chosen:
        if not os.path.isdir(chosen):
            raise ManifestError(f"patch manifest folder {chosen} does not exist.")
        return chosen
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../tiersched
    root = os.path.dirname(os.path.dirname(package))  # <repo> when imported from <repo>/python/tiersched
    candidate = os.path.join(root, "patches")
    if os.path.isfile(os.path.join(root, "pyproject.toml")) and os.path.isdir(candidate):
        return candidate
    raise ManifestError(
        f"tiersched is imported from {package}, not from a source checkout, so there is no {candidate}; the patch "
        "manifests live in the repository's patches/ folder: pass --patches-dir DIR or set TIERSCHED_PATCHES_DIR."
    )


def load_manifest(directory: str | None = None) -> list[PatchRow]:
    directory = patches_dir(directory)
    files = sorted(glob.glob(os.path.join(directory, "*.toml")))
    if not files:
        raise ManifestError(f"no patch manifest (*.toml) found in {directory}.")
    rows, seen = [], {}
    for path in files:
        with open(path, "rb") as f:
            data = tomllib.load(f)
        for i, raw in enumerate(data.get("patch", [])):
            missing = [k for k in ("target", "hook", "adapter", "purpose", "fingerprint") if k not in raw]
            if missing:
                raise ManifestError(f"{os.path.basename(path)} row {i + 1} lacks {', '.join(missing)}.")
            if raw["hook"] not in HOOK_TYPES:
                raise ManifestError(f"{os.path.basename(path)} row {i + 1}: hook must be one of {HOOK_TYPES}.")
            key = (raw["target"], raw["hook"])
            if key in seen:
                raise ManifestError(f"{raw['target']} ({raw['hook']}) is listed twice ({seen[key]} and {os.path.basename(path)}).")
            seen[key] = os.path.basename(path)
            rows.append(PatchRow(raw["target"], raw["hook"], raw["adapter"], raw["purpose"].strip(),
                                 raw["fingerprint"], os.path.basename(path)))
    return rows


def resolve_target(target: str):
    """The upstream object a dotted target names (module attribute or class attribute), unwrapped."""
    obj_path, _, attr = target.rpartition(".")
    if not obj_path:
        raise ManifestError(f"target {target!r} needs at least module.attr")
    owner = pkgutil.resolve_name(obj_path)
    if isinstance(owner, type) and attr in owner.__dict__:
        obj = owner.__dict__[attr]
        obj = getattr(obj, "__func__", obj)  # classmethod / staticmethod
    else:
        obj = getattr(owner, attr)
    return inspect.unwrap(obj)


def fingerprint(target: str) -> str:
    """sha256 over the dedented source of the target with trailing whitespace stripped per line."""
    source = textwrap.dedent(inspect.getsource(resolve_target(target)))
    normal = "\n".join(line.rstrip() for line in source.splitlines()).strip() + "\n"
    return "sha256:" + hashlib.sha256(normal.encode()).hexdigest()[:24]


@dataclass
class CheckResult:
    ok: list[str]
    problems: list[str]


def registered_hooks() -> set[tuple[str, str]]:
    """(target, hook type) for every hook the plugin registers with all tiers active (CPU fixes included),
    collected with a recording registry: nothing is patched."""
    from tiersched.config import load_config
    from tiersched.sglang import plugin
    from sglang.srt.plugins.hook_registry import HookType

    recorded: set[tuple[str, str]] = set()

    class Recorder:
        @staticmethod
        def register(target, hook, hook_type=HookType.AFTER, **_):
            recorded.add((target, hook_type.value))

    plugin.register_all(load_config({}), Recorder, HookType, cpu=True)  # every hook goes through `registry`
    return recorded


def check(rows: list[PatchRow] | None = None, with_registry: bool = True, directory: str | None = None) -> CheckResult:
    rows = load_manifest(directory) if rows is None else rows
    ok, problems = [], []
    for row in rows:
        try:
            current = fingerprint(row.target)
        except Exception as exc:  # the target moved or was renamed: that is what this check exists to find
            problems.append(f"MISSING  {row.target} ({row.source_file}): {type(exc).__name__}: {exc}")
            continue
        if current != row.fingerprint:
            problems.append(
                f"CHANGED  {row.target} ({row.source_file}): manifest {row.fingerprint or '(empty)'} != installed {current}; "
                f"re-read the upstream source, re-validate {row.adapter}, then update the fingerprint"
            )
        else:
            ok.append(row.target)
    if with_registry:
        listed = {(r.target, r.hook) for r in rows}
        hooked = registered_hooks()
        for target, hook in sorted(hooked - listed):
            problems.append(f"UNLISTED {target} ({hook}) is hooked by the plugin but has no row in patches/*.toml")
        for target, hook in sorted(listed - hooked):
            problems.append(f"STALE    {target} ({hook}) is in patches/ but the plugin no longer hooks it")
    return CheckResult(ok, problems)
