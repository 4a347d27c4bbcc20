"""Deployments and arms of the live A/B: which server flags each run gets, in ONE place.

Deployments (upstream flags for the parallel layout; CPU flags come from tiersched.rig.server):
  dp2     `--dp-size 2`                                   two DP ranks behind upstream's DataParallelController
  dpattn  `--tp 2 --dp 2 --enable-dp-attention`           DP attention, MoE layers across both ranks
  ep2     `--tp 2 --ep-size 2 --enable-eplb`              expert parallel with upstream's EPLB rebalancer (every 50
                                                          forward passes, so that it acts within a CPU-sized run)

Upstream arms, each upstream's best setting for one goal (there is no single upstream flag set that gets both,
because upstream's check_server_args allows `--enable-priority-scheduling` only with fcfs/lof policies):
  upstream-lpm       `--schedule-policy lpm --load-balance-method total_tokens`: lpm is upstream's prefix-aware
                     order (SchedulePolicy._sort_by_longest_prefix) and the best for shared-prefix sets;
                     total_tokens (DPBudget.dispatch) is the only upstream DP method that looks at token load.
  upstream-priority  `--schedule-policy fcfs --enable-priority-scheduling --load-balance-method total_tokens`:
                     upstream's priority order with priority preemption, the best for a latency-sensitive class.
The tiersched arm turns on every tier (request, engine; expert where the deployment runs EPLB). A ratio is
reported against each upstream arm and, in the headline numbers, against the better of the two per metric.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Sequence

DEPLOYMENTS: dict[str, tuple[str, ...]] = {
    "dp2": ("--dp-size", "2"),
    "dpattn": ("--tp", "2", "--dp", "2", "--enable-dp-attention"),
    # Upstream rebalances every 1000 forward passes by default; a run here lasts a few hundred, so EPLB (and the
    # expert tier) would never act: every 50, for every arm alike.
    "ep2": ("--tp", "2", "--ep-size", "2", "--enable-eplb", "--eplb-rebalance-num-iterations", "50",
            "--dtype", "float32"),
}

UPSTREAM_ARMS: dict[str, tuple[str, ...]] = {
    "upstream-lpm": ("--schedule-policy", "lpm", "--load-balance-method", "total_tokens"),
    "upstream-priority": ("--schedule-policy", "fcfs", "--enable-priority-scheduling",
                          "--load-balance-method", "total_tokens"),
}

# tiersched's flags per tier: the single list every live run, test and doc uses.
TIERSCHED_TIER_FLAGS: dict[str, tuple[str, ...]] = {
    "request": ("--schedule-policy", "prefix-aging", "--enable-priority-scheduling"),
    "engine": ("--load-balance-method", "score"),
    "expert": ("--eplb-algorithm", "source_aware"),
}
TIER_ADAPTER_MODULES = {"request": "tiersched.sglang.request.hooks", "engine": "tiersched.sglang.engine.hooks",
                        "expert": "tiersched.sglang.expert.hooks"}
TIERSCHED = "tiersched"


def tiers_for(deployment: str) -> tuple[str, ...]:
    """Which tiers apply: the engine tier needs a DP controller, the expert tier needs EPLB running."""
    args = DEPLOYMENTS[deployment]
    tiers = ["request"]
    if "--dp-size" in args or "--dp" in args:
        tiers.append("engine")
    if "--enable-eplb" in args:
        tiers.append("expert")
    return tuple(tiers)


def missing_tiers(tiers=tuple(TIERSCHED_TIER_FLAGS)) -> dict[str, str]:
    """tier -> why it cannot run in this build (its adapter module is absent)."""
    out = {}
    for tier in tiers:
        if importlib.util.find_spec(TIER_ADAPTER_MODULES[tier]) is None:
            out[tier] = f"{TIER_ADAPTER_MODULES[tier]} does not exist yet, so {' '.join(TIERSCHED_TIER_FLAGS[tier])} " \
                        f"would not be accepted"
    return out


@dataclass(frozen=True)
class Arm:
    name: str
    args: tuple[str, ...]
    send_priority: bool = True
    tiers: tuple[str, ...] = ()  # tiersched tiers this arm must show active in the server log
    skipped_tiers: dict = field(default_factory=dict)  # tier -> reason it is absent from this arm
    env: dict = field(default_factory=dict)  # extra environment of this arm's server (e.g. TIERSCHED_SET)


def _merge(base: tuple[str, ...], *overrides: tuple[str, ...]) -> tuple[str, ...]:
    """`base` with each override flag replacing the same flag's value (or appended when base lacks it)."""
    out = list(base)
    for extra in overrides:
        i = 0
        while i < len(extra):
            flag = extra[i]
            has_value = i + 1 < len(extra) and not extra[i + 1].startswith("--")
            value = [extra[i + 1]] if has_value else []
            if flag in out:
                at = out.index(flag)
                old_has_value = at + 1 < len(out) and not out[at + 1].startswith("--")
                out[at:at + 1 + old_has_value] = [flag, *value]
            else:
                out.extend([flag, *value])
            i += 1 + has_value
    return tuple(out)


def tiersched_arm(deployment: str) -> Arm:
    wanted = tiers_for(deployment)
    missing = missing_tiers(wanted)
    active = tuple(t for t in wanted if t not in missing)
    base = UPSTREAM_ARMS["upstream-lpm"]  # whatever a tier does not replace stays at upstream's best
    return Arm(TIERSCHED, _merge(base, *(TIERSCHED_TIER_FLAGS[t] for t in active)), True, active, missing)


def single_tier_arms(deployment: str) -> list[Arm]:
    """Ablation: one arm per available tier, that tier's flags alone over upstream-lpm (which tier does what)."""
    full = tiersched_arm(deployment)
    base = UPSTREAM_ARMS["upstream-lpm"]
    return [Arm(f"{TIERSCHED}-{tier}-only", _merge(base, TIERSCHED_TIER_FLAGS[tier]), True, (tier,))
            for tier in full.tiers] if len(full.tiers) > 1 else []


# Ablation of the request tier's lockstep machinery (DP attention only): the tiersched arm with one tunable changed,
# as TIERSCHED_SET gives it to the server. Name -> setting.
LOCKSTEP_VARIANTS: dict[str, str] = {
    # no group signal at all: no same-step all-reduce, no MLP-sync column; BE capped only by this rank's LS waiters
    "nogroup": "request.lockstep_chunk_cap=false",
    # the group cap from upstream's MLP-sync row (one step late) only: no extra collective per step
    "lagsignal": "request.same_step_signal=false",
    # the cap only while LS work is seen waiting (no hold after it)
    "nohold": "request.ls_hold_s=0",
}


def variant_arm(deployment: str, name: str, setting: str, base: str = TIERSCHED) -> Arm:
    """Arm `base` (tiersched or an upstream arm) with `setting` applied, named `base`-`name`. `setting` is a comma
    list: items starting with `--` are server flags (`--flag` or `--flag=value`, replacing the base's value),
    the others TIERSCHED_SET items (tier.key=value)."""
    flags: list[str] = []
    tiersched_set: list[str] = []
    for item in (x.strip() for x in setting.split(",") if x.strip()):
        if item.startswith("--"):
            flags.extend(item.split("=", 1))
        else:
            tiersched_set.append(item)
    env = {"TIERSCHED_SET": ",".join(tiersched_set)} if tiersched_set else {}
    if base == TIERSCHED:
        full = tiersched_arm(deployment)
        return Arm(f"{base}-{name}", _merge(full.args, tuple(flags)), True, full.tiers, full.skipped_tiers, env)
    if base not in UPSTREAM_ARMS:
        raise ValueError(f"variant base {base!r} is not {TIERSCHED} or one of {list(UPSTREAM_ARMS)}")
    if tiersched_set:
        raise ValueError(f"variant {base}-{name}: an upstream arm takes server flags only, got {tiersched_set}")
    return Arm(f"{base}-{name}", _merge(UPSTREAM_ARMS[base], tuple(flags)), True)


def lockstep_variant_arms(deployment: str) -> list[Arm]:
    """Ablation arms of the request tier's lockstep signal and cap; none without DP attention (no lockstep)."""
    if "--enable-dp-attention" not in DEPLOYMENTS[deployment]:
        return []
    return [variant_arm(deployment, name, setting) for name, setting in LOCKSTEP_VARIANTS.items()]


def arms_for(deployment: str, upstream: tuple[str, ...] = tuple(UPSTREAM_ARMS), ablate: bool = False,
             variants: Sequence[tuple[str, str, str]] = (), only: tuple[str, ...] | None = None) -> list[Arm]:
    """Upstream arms, then (with `ablate`) one arm per tier alone and the lockstep variants, then `variants`
    ((base arm, name, setting): `variant_arm`), then the tiersched arm (always last). `only`: keep just these
    arm names (the tiersched arm is always kept)."""
    arms = [Arm(name, UPSTREAM_ARMS[name], True) for name in upstream]
    if ablate:
        arms.extend(single_tier_arms(deployment))
        arms.extend(lockstep_variant_arms(deployment))
    arms.extend(variant_arm(deployment, name, setting, base) for base, name, setting in variants)
    arms.append(tiersched_arm(deployment))
    if only is not None:
        unknown = set(only) - {a.name for a in arms}
        if unknown:
            raise ValueError(f"unknown arm(s) {sorted(unknown)}; this run has {[a.name for a in arms]}")
        arms = [a for a in arms if a.name in only or a.name == TIERSCHED]
    return arms


def server_args(deployment: str, arm: Arm) -> list[str]:
    return [*DEPLOYMENTS[deployment], *arm.args]


def active_tiers_in_log(log_text: str) -> set[str]:
    """Tiers the plugin reported active (`[tiersched] active tiers: ...`) in any process of the server."""
    active: set[str] = set()
    for line in log_text.splitlines():
        if "[tiersched] active tiers:" in line:
            names = line.split("active tiers:", 1)[1].split("(pid", 1)[0]
            active.update(n.strip() for n in names.split(",") if n.strip())
    return active
