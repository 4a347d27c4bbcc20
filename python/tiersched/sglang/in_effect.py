"""Which tiers act on this server, printed once its flags are known.

The plugin loads (and registers every enabled tier's hooks) in every SGLang process before argument parsing; each
tier's hooks then pass straight through unless the server's own flags select that tier's policy. So what is in
effect is known only after `check_server_args` (run once, in the launcher, on the resolved arguments): this
module's hook prints `[tiersched] active tiers: ...` there, listing the fixes that always act and each loaded tier
whose flag selects it.
"""
from __future__ import annotations

import os
import sys

from tiersched.config import TIER_NAMES

HOOKS = (("sglang.srt.arg_groups.validation_hook.check_server_args", "AFTER", "report_tiers_in_effect"),)


def tier_selected(tier: str, server_args) -> bool:
    """Whether `server_args` (upstream ServerArgs, resolved) select `tier`'s policy."""
    if tier == "request":
        from tiersched.sglang.request.state import POLICY_NAME

        return server_args.schedule_policy == POLICY_NAME
    if tier == "engine":  # score dispatch runs in the DP controller, which exists only with --dp-size > 1
        from tiersched.sglang.engine.hooks import METHOD

        return str(server_args.load_balance_method).lower() == METHOD and (server_args.dp_size or 1) > 1
    if tier == "expert":  # our placement is computed only when EPLB rebalances
        from tiersched.sglang.expert.state import is_ours

        return bool(server_args.enable_eplb) and is_ours(server_args.eplb_algorithm)
    raise ValueError(f"unknown tier {tier!r}")


def in_effect(loaded: tuple[str, ...], server_args) -> list[str]:
    """`loaded` (what the plugin registered: fixes and tiers) less the tiers these flags do not select."""
    return [name for name in loaded if name not in TIER_NAMES or tier_selected(name, server_args)]


def report_tiers_in_effect(result, server_args, *args, **kwargs):
    """AFTER check_server_args: the arguments passed upstream's validation, print what tiersched does with them."""
    from tiersched.sglang.plugin import STATE

    active = in_effect(STATE.active, server_args)
    idle = [t for t in STATE.active if t in TIER_NAMES and t not in active]
    note = f"; loaded but not selected by the server's flags: {', '.join(idle)}" if idle else ""
    print(f"[tiersched] active tiers: {', '.join(active) or 'none'} (pid {os.getpid()}{note})", file=sys.stderr,
          flush=True)
    return None
