"""Engine tier, runtime drain of DP ranks over HTTP (upstream's own `/set_internal_state` endpoint).

    curl -X POST $URL/set_internal_state -H 'Content-Type: application/json' \
         -d '{"server_args": {"tiersched_drain_dp_rank_1": 1}}'     # 1 = drain rank 1, 0 = take it back

Why this seam: `/set_internal_state` (http_server.set_internal_state -> TokenizerManager.set_internal_state)
sends a `SetInternalStateReq` to the scheduler input socket, which the DP controller reads; its request
dispatcher has no handler for that type, so the fallback `DataParallelController.send_control_message`
forwards it to the schedulers, whose replies the HTTP call waits for. Our BEFORE hook on
`send_control_message` sees it first, applies our keys and removes them, so the schedulers receive only
upstream's own keys (an empty dict is accepted as `updated: true`). A key we cannot apply (bad rank or value,
or draining every rank) is left in: the schedulers then reject it and the endpoint answers `false`.
Ordering guarantee: the controller applies the drain before forwarding, and reads its input in order, so every
request the tokenizer sends after the HTTP call returns is dispatched under the new drain set.

The drain itself is upstream's status path: `DataParallelController.update_active_ranks(ActiveRanksOutput)`
(what elastic EP sends when a rank dies). Requests already queued on a drained rank stay there and finish:
nothing is moved or aborted. Upstream's non-elastic branch does not refresh `_active_workers`; we leave it so
on purpose: control messages (`send_control_message`, whose replies the tokenizer counts per DP rank) and
health checks (`dispatch_health_check`) must still reach a drained rank, which is alive and serving its queue.
(One consequence: a request carrying an explicit `routed_dp_rank` may still be sent to a drained rank.)
"""
from __future__ import annotations

import logging
import re

logger = logging.getLogger("tiersched.engine_tier")

KEY = re.compile(r"^tiersched_drain_dp_rank_(\d+)$")


def drain_key(rank: int) -> str:
    return f"tiersched_drain_dp_rank_{rank}"


def parse_drain_request(server_args: dict, num_ranks: int) -> tuple[dict[int, bool], list[str], list[str]]:
    """Our keys in a SetInternalStateReq's `server_args` -> ({rank: drain?}, accepted keys, rejected keys)."""
    wanted: dict[int, bool] = {}
    accepted, rejected = [], []
    for key, value in server_args.items():
        match = KEY.match(str(key))
        if match is None:
            continue
        rank = int(match.group(1))
        if rank < num_ranks and value in (0, 1) and not isinstance(value, bool | str):
            wanted[rank] = bool(value)
            accepted.append(key)
        else:
            rejected.append(key)
    return wanted, accepted, rejected


def new_status(current: list[bool], wanted: dict[int, bool]) -> list[bool]:
    """Status list after draining/undraining the ranks in `wanted` (True = drain)."""
    return [(not wanted[i]) if i in wanted else bool(up) for i, up in enumerate(current)]


def apply_drain_request(controller, obj, num_ranks: int) -> bool:
    """Apply our keys of a SetInternalStateReq to the controller's status; True if the status changed."""
    from sglang.srt.managers.io_struct import ActiveRanksOutput

    wanted, accepted, rejected = parse_drain_request(obj.server_args, num_ranks)
    if rejected:
        logger.warning("tiersched: ignoring drain keys %s (ranks are 0..%d, values 0 or 1)", rejected, num_ranks - 1)
    if not wanted:
        return False
    status = new_status(list(controller.status), wanted)
    if not any(status[:num_ranks]):
        logger.warning("tiersched: refusing to drain every DP rank (%s); status unchanged", accepted)
        return False
    for key in accepted:
        del obj.server_args[key]
    if status == list(controller.status):
        return False
    controller.update_active_ranks(ActiveRanksOutput(status=status))
    drained = [i for i in range(num_ranks) if not controller.status[i]]
    logger.info("tiersched: DP ranks drained now: %s (runtime request %s)", drained, accepted)
    return True
