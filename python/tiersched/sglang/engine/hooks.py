"""Engine-tier adapter: `--load-balance-method score` in upstream SGLang's DP controller.

Thin shell over tiersched.core.engine.score.ScoreDispatcher. Upstream seams (rows in patches/engine-tier.toml):
- argument parsing: `--load-balance-method` has fixed argparse choices (arg_groups/fields/parallel.py); the
  plugin loads before `prepare_server_args` parses argv (sglang/launch_server.py), so extending the built
  action after `ServerArgs.add_cli_args` is enough. Nothing else validates the value.
- `LoadBalanceMethod.from_str("score")` answers TOTAL_TOKENS, so DataParallelController.__init__ builds its
  load-snapshot reader and DPBudget as for a load-aware method; after __init__ we replace `self.dispatching`
  (looked up per request by `dispatching_with_trace`) with the score dispatch, and read snapshots ourselves.
- each scheduler's `publish_load_snapshot` also writes running decode tokens and expert pressure to a side file
  (loads.py); the controller translates both into RankLoad.
- `send_control_message(FlushCacheReqInput)` also clears the controller's prefix index (caches were flushed);
  `send_control_message(SetInternalStateReq)` carrying `tiersched_drain_dp_rank_<r>` keys drains/undrains DP
  ranks at runtime (upstream's `/set_internal_state` endpoint; drain.py).
Every hook passes straight through unless the server was started with `--load-balance-method score`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Optional

from tiersched.core.engine import DispatchRequest, EngineTierConfig, LockstepGroup
from tiersched.core.engine.prefix_index import page_keys
from tiersched.core.engine.score import ScoreDispatcher
from tiersched.sglang.cli_choices import add_choice
from tiersched.sglang.engine import loads as loads_io
from tiersched.sglang.engine.drain import apply_drain_request
from tiersched.sglang.engine.metrics import DispatchMetrics
from tiersched.sglang.engine.state import STATE

logger = logging.getLogger("tiersched.engine_tier")

METHOD = "score"
DISPATCH_ATTR = "tiersched_dispatch"  # our attribute on upstream's DataParallelController
DPC = "sglang.srt.managers.data_parallel_controller"
HOOKS = (
    ("sglang.srt.server_args.ServerArgs.add_cli_args", "AFTER", "accept_method_choice"),
    (f"{DPC}.LoadBalanceMethod.from_str", "AROUND", "method_from_str"),
    (f"{DPC}.DataParallelController.__init__", "AFTER", "install_on_controller"),
    (f"{DPC}.DataParallelController.send_control_message", "BEFORE", "on_control_message"),
    ("sglang.srt.managers.scheduler.Scheduler.publish_load_snapshot", "AFTER", "publish_extras"),
)


def configure(config: EngineTierConfig) -> None:
    """Set this process's engine-tier config (validated)."""
    config.validate()
    STATE.config = config


def score_method_configured() -> bool:
    """Whether this process's server runs `--load-balance-method score`, read from upstream's resolved config at
    each call (LoadBalanceMethod.from_str answers TOTAL_TOKENS for score, so the controller cannot tell)."""
    from sglang.srt.runtime_context import get_parallel  # deferred: the runtime context imports torch

    return str(get_parallel().load_balance_method).lower() == METHOD


def dispatch_state(controller) -> Optional["ScoreDispatchState"]:
    """The score dispatch installed on `controller`, None for any other method. getattr: a controller built without
    __init__ (upstream's in-process tests) never ran our hook."""
    state = getattr(controller, DISPATCH_ATTR, None)
    return state if isinstance(state, ScoreDispatchState) else None


# ---- argument parsing -----------------------------------------------------------------------------------------


def accept_method_choice(result, parser, *args, **kwargs):
    add_choice(parser, "load_balance_method", METHOD)
    return result


def method_from_str(original_fn, cls, method, *args, **kwargs):
    if str(method).lower() == METHOD:
        return cls.TOTAL_TOKENS  # builds the snapshot reader; the dispatch itself is replaced after __init__
    return original_fn(cls, method, *args, **kwargs)


# ---- controller side ------------------------------------------------------------------------------------------


def install_on_controller(result, controller, *args, **kwargs):
    """AFTER DataParallelController.__init__: with the score method, replace this controller's dispatch."""
    if not score_method_configured():
        setattr(controller, DISPATCH_ATTR, None)
        return result
    state = ScoreDispatchState(controller, STATE.config)
    setattr(controller, DISPATCH_ATTR, state)
    controller.dispatching = state.dispatch
    controller.refresh_load_budget_on_dispatch = False  # we read the snapshot ourselves, same 20 ms throttle
    logger.info("tiersched: DP dispatch by score over %d ranks (weights %s)", state.num_ranks,
                state.dispatcher.config.weights())
    return result


def on_control_message(controller, obj, *args, **kwargs):
    """BEFORE send_control_message: a cache flush clears our prefix index; a drain request changes the status; a
    state read (`GET /server_info`) logs the sizes of the dispatcher's per-request state (sglang/state_report.py)."""
    from sglang.srt.managers.io_struct import GetInternalStateReq, SetInternalStateReq  # deferred: imports torch

    forget_flushed_cache(controller, obj)
    state = dispatch_state(controller)
    if state is not None and isinstance(obj, SetInternalStateReq):
        apply_drain_request(controller, obj, state.num_ranks)  # removes the keys it applied
    if state is not None and isinstance(obj, GetInternalStateReq):
        logger.info("tiersched engine state: %s", json.dumps(state.dispatcher.state_sizes()))
    return None


def forget_flushed_cache(controller, obj, *args, **kwargs):
    from sglang.srt.managers.io_struct import FlushCacheReqInput  # deferred: io_struct imports torch

    state = dispatch_state(controller)
    if state is not None and isinstance(obj, FlushCacheReqInput):
        state.dispatcher.forget_cache()
    return None


def session_key(req) -> str | None:
    """Upstream's routing_key, else the session id. getattr: TokenizedGenerateReqInput has these fields,
    TokenizedEmbeddingReqInput (the controller dispatches both) has neither."""
    key = getattr(req, "routing_key", None)
    if key:
        return str(key)
    params = getattr(req, "session_params", None)
    sid = params.id if params is not None else None
    return str(sid) if sid else None


def to_dispatch_request(req, block_tokens: int) -> DispatchRequest:
    ids = req.input_ids if req.input_ids is not None else ()
    return DispatchRequest(rid=str(req.rid), input_tokens=len(ids), prefix_blocks=page_keys(ids, block_tokens),
                           session_key=session_key(req), priority=int(req.priority or 0))


def format_scores(decision) -> str:
    parts = []
    for rank, terms in sorted(decision.scores.items()):
        body = " ".join(f"{n}={v:.4g}" for n, v in terms.items() if n != "total" and v)
        parts.append(f"r{rank}: total={terms['total']:.6g} {body}".rstrip())
    parts += [f"r{rank}: {why}" for rank, why in sorted(decision.filtered.items())]
    return " | ".join(parts)


def lockstep_group(server_args, num_ranks: int) -> Optional[LockstepGroup]:
    """The lockstep group the dispatcher's stall term prices (None: no term): DP attention over more than one rank,
    priced with the step planner's prior model of the deployment (sglang/request/step_plan.simulator_prior: the
    calibrated cpu-tiny preset at this DP size, so CPU servers only) at the server's chunk size. The controller
    does not see the schedulers' measured steps, so the model is the prior, not their fit."""
    if not (server_args.enable_dp_attention and num_ranks > 1):
        return None
    if not str(server_args.device).startswith("cpu"):
        logger.info("tiersched: lockstep stall term off (no step-time prior for a %s deployment)", server_args.device)
        return None
    from tiersched.sglang.request.step_plan import simulator_prior  # deferred: fits the prior (~0.1 s)

    model = simulator_prior(num_ranks)
    if model is None:
        logger.info("tiersched: lockstep stall term off (no calibrated cpu-tiny preset)")
        return None
    cps = server_args.chunked_prefill_size
    chunk = cps if cps and cps > 0 else server_args.max_prefill_tokens
    group = LockstepGroup(model, int(chunk), bool(server_args.enable_mixed_chunk))
    logger.info("tiersched: lockstep stall term on: chunk %d, mixed chunk %s, model %s", group.chunk_tokens,
                group.mixed_chunk, model.as_dict())
    return group


class ScoreDispatchState:
    """The score dispatch of one DataParallelController (its attribute `tiersched_dispatch`): which DP rank each
    request goes to, from the ranks' load snapshots and the controller's status."""

    def __init__(self, controller, config: EngineTierConfig) -> None:
        self.controller = controller
        self.config = config
        self.num_ranks = len(controller.workers)
        self.dispatcher = ScoreDispatcher(self.num_ranks, config)
        if self.dispatcher.wants_lockstep():
            self.dispatcher.set_lockstep(lockstep_group(controller.server_args, self.num_ranks))
        reader = controller.load_snapshot_reader
        # getattr: ShmLoadSnapshotReader names its file `path`, ZmqShmLoadSnapshotReader `_shm_path`
        shm_path = getattr(reader, "path", None) or getattr(reader, "_shm_path", None)
        self.side = loads_io.SideChannel(loads_io.side_path(shm_path), reader.dp_size, writable=False) if shm_path else None
        # DP attention: the ranks share the MoE layers (fallback expert pressure, loads.RoutedTokenShare)
        self.share = loads_io.RoutedTokenShare(self.num_ranks,
                                               moe_shared=bool(controller.server_args.enable_dp_attention))
        self._last_refresh = float("-inf")
        self._status: list[bool] = []
        try:
            self.metrics: Optional[DispatchMetrics] = DispatchMetrics()
        except Exception as exc:  # noqa: BLE001 - metrics are optional; dispatch must still work
            logger.warning("tiersched: dispatch metrics disabled (%s)", exc)
            self.metrics = None
        drained = [r for r in config.drained() if r < self.num_ranks]
        if drained:
            from sglang.srt.managers.io_struct import ActiveRanksOutput

            # upstream's own status path (what elastic EP uses to take ranks out)
            controller.update_active_ranks(
                ActiveRanksOutput(status=[r not in drained for r in range(len(controller.status))]))
            logger.info("tiersched: DP ranks %s drained (marked inactive)", drained)

    def status(self) -> list[bool]:
        c = self.controller
        return [bool(c.status[i] and c.dp_active[i] and c.workers[i] is not None) for i in range(self.num_ranks)]

    def refresh(self, now: float) -> None:
        status = self.status()
        fresh = time.perf_counter()
        if fresh - self._last_refresh >= self.config.snapshot_refresh_s:
            self._last_refresh = fresh
            snapshots = self.controller.load_snapshot_reader.read_all()
            self.dispatcher.update_loads(loads_io.to_rank_loads(snapshots, status, self.side, self.share), now)
            self._status = status
        elif status != self._status:  # a status change applies at once, not at the next snapshot read
            self.dispatcher.update_loads(
                [dataclasses.replace(self.dispatcher.loads[r], active=status[r]) for r in range(self.num_ranks)], now)
            self._status = status

    def dispatch(self, req) -> None:
        from sglang.srt.managers.io_struct import sock_send

        controller = self.controller
        now = time.time()  # same clock as the schedulers' snapshot timestamps
        dreq = to_dispatch_request(req, self.config.block_tokens)
        if controller.maybe_external_dp_rank_routing(req):  # explicit routed_dp_rank: upstream sent it
            if 0 <= req.routed_dp_rank < self.num_ranks:
                self.dispatcher.record(req.routed_dp_rank, dreq, now)
            return
        self.refresh(now)
        # the request goes out first; the prefix-index insert (and the hashing of the prompt's pages the match did
        # not need) follows it, before this controller reads its next request
        decision = self.dispatcher.decide(dreq, now)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("tiersched dispatch rid=%s tokens=%d -> dp_rank=%d expected_cached=%d | %s", dreq.rid,
                         dreq.input_tokens, decision.rank, decision.expected_cached_tokens, format_scores(decision))
        if self.metrics is not None:
            self.metrics.observe(decision.rank, dreq.input_tokens, decision.expected_cached_tokens,
                                 self.dispatcher.pending_work(), self._status or self.status())
        sock_send(controller.workers[decision.rank], req)
        self.dispatcher.settle()


# ---- scheduler side -------------------------------------------------------------------------------------------


def publish_extras(result, scheduler, *args, **kwargs):
    """After upstream published this rank's LoadSnapshot, write what the score adds (side channel)."""
    if result is None or not score_method_configured():
        return None
    publisher = loads_io.LoadSidePublisher.of(scheduler)
    if publisher.failed:
        return None
    try:
        if publisher.side is None:
            from sglang.srt.runtime_context import get_parallel  # deferred: the runtime context imports torch

            # getattr: only the shm writer has a file; ZmqLoadSnapshotWriter (multi-node) has none
            path = getattr(scheduler.load_snapshot_writer, "path", None)
            if path is None:
                publisher.failed = True
                logger.warning("tiersched: load snapshots go over zmq; score dispatch runs on upstream fields only")
                return None
            publisher.side = loads_io.SideChannel(loads_io.side_path(path), get_parallel().num_dp_ranks, True)
        publisher.side.write(result.dp_rank, result.timestamp, loads_io.running_decode_tokens(scheduler),
                             loads_io.expert_pressure_of(scheduler))
    except Exception:  # noqa: BLE001 - never take a scheduler down for a load estimate
        publisher.failed = True
        logger.exception("tiersched: engine-tier load publishing disabled")
    return None
