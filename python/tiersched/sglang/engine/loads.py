"""Engine tier, load plumbing: what each DP rank publishes beyond upstream's load snapshot, and the translation
of both into tiersched.core.engine.RankLoad.

Upstream (sglang/srt/managers/load_snapshot.py) already publishes per rank, through a /dev/shm file, most of
what the score needs: `num_waiting_uncached_tokens` (LoadInquirer.get_num_waiting_uncached_tokens: uncached
waiting work plus the rest of a chunked prefill, i.e. our remaining prefill), `num_used_tokens`,
`max_total_num_tokens`, `num_waiting_reqs`, `num_running_reqs`, and cumulative/rate counters. It lacks the
context tokens of running decodes and any expert pressure, so each rank's scheduler also writes a small
side file next to upstream's (same name with `tiersched_engine_` instead of `sglang_loads_`), one fixed
slot per DP rank, guarded by a sequence number so a reader never takes a torn slot.

Expert pressure interface (explicit, for the expert tier): `set_expert_pressure_provider(fn)` in the
scheduler process, `fn(scheduler) -> float | None` = the MoE load this rank's tokens put on experts relative
to the mean (1.0 neutral). Until a provider is set (or when it returns None) the controller computes a fallback
with the same definition (core.expert.metrics.expert_pressure) from what it knows without expert statistics
(`RoutedTokenShare`): each rank's tokens per second through the MoE layers, served where the deployment's layout
puts them.
"""
from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from tiersched.core.engine import RankLoad
from tiersched.core.expert.metrics import expert_pressure
from tiersched.sglang.engine.state import STATE, ExpertPressureProvider

SLOT = struct.Struct("<Qddd")  # sequence, snapshot timestamp, running decode context tokens, expert pressure (NaN: none)
PUBLISHER_ATTR = "tiersched_load_side"  # our attribute on upstream's Scheduler


def set_expert_pressure_provider(fn: Optional[ExpertPressureProvider]) -> None:
    """Expert tier: supply this rank's expert pressure (called in the scheduler at each load publish)."""
    STATE.expert_pressure_provider = fn


def expert_pressure_of(scheduler) -> float:
    fn = STATE.expert_pressure_provider
    if fn is None:
        return math.nan
    value = fn(scheduler)
    return math.nan if value is None else float(value)


def side_path(upstream_shm_path: str) -> str:
    head, name = os.path.split(upstream_shm_path)
    return os.path.join(head, name.replace("sglang_loads_", "tiersched_engine_", 1))


class SideChannel:
    """One mmap'd file of `dp_size` fixed slots; each scheduler writes its own, the controller reads all."""

    def __init__(self, path: str, dp_size: int, writable: bool) -> None:
        self.path, self.dp_size, self.writable = path, dp_size, writable
        self._map: mmap.mmap | None = None
        self._seq = 0
        size = SLOT.size * dp_size
        if writable:
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
            try:
                if os.fstat(fd).st_size < size:
                    os.ftruncate(fd, size)
                self._map = mmap.mmap(fd, size, access=mmap.ACCESS_WRITE)
            finally:
                os.close(fd)

    def _attach(self) -> bool:
        if self._map is not None:
            return True
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            if os.fstat(fd).st_size < SLOT.size * self.dp_size:
                return False
            self._map = mmap.mmap(fd, SLOT.size * self.dp_size, access=mmap.ACCESS_READ)
            return True
        finally:
            os.close(fd)

    def write(self, dp_rank: int, timestamp: float, running_decode_tokens: int, expert_pressure: float) -> None:
        offset = dp_rank * SLOT.size
        self._seq += 2
        SLOT.pack_into(self._map, offset, self._seq - 1, timestamp, running_decode_tokens, expert_pressure)
        SLOT.pack_into(self._map, offset, self._seq, timestamp, running_decode_tokens, expert_pressure)

    def read(self, dp_rank: int) -> tuple[float, int, float] | None:
        """(timestamp, running decode tokens, expert pressure or NaN), or None if absent/being written."""
        if not self._attach() or not 0 <= dp_rank < self.dp_size:
            return None
        offset = dp_rank * SLOT.size
        for _ in range(3):
            seq, ts, decode, pressure = SLOT.unpack_from(self._map, offset)
            if seq == 0:
                return None
            if seq % 2 == 0 and SLOT.unpack_from(self._map, offset)[0] == seq:
                return ts, int(decode), pressure
        return None

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None


def running_decode_tokens(scheduler) -> int:
    """Context tokens of the rank's running batch (the KV every decode step reads)."""
    return int(sum(req.seqlen for req in scheduler.running_batch.reqs))


@dataclass
class LoadSidePublisher:
    """One scheduler's side of the channel (attribute `tiersched_load_side` of that scheduler): its side file once
    opened; `failed` when it cannot have one (zmq snapshot transport) or a write failed, after which it stops
    (a scheduler is never taken down for a load estimate)."""

    side: Optional[SideChannel] = None
    failed: bool = False

    @classmethod
    def of(cls, scheduler) -> "LoadSidePublisher":
        """This scheduler's publisher (attached at its first publish: getattr, upstream's Scheduler has no such
        attribute until then)."""
        publisher = getattr(scheduler, PUBLISHER_ATTR, None)
        if publisher is None:
            publisher = cls()
            setattr(scheduler, PUBLISHER_ATTR, publisher)
        return publisher


class RoutedTokenShare:
    """Fallback expert pressure per rank, used while no provider publishes one: core.expert.metrics.expert_pressure,
    the definition the simulator and the expert tier use, over what the DP controller knows without expert
    statistics.

    Load: each rank's recent tokens/s through the MoE layers, rate = d(total_prefill_uncached_tokens)/dt +
    gen_throughput from upstream's snapshot, smoothed. Destinations (where a source's tokens are served, per token):
    without routing statistics nobody knows which experts a rank's tokens pick, so only the deployment's layout
    places them:
    - `moe_shared` (DP attention: the MoE layers are split over the whole DP group, by EP or by tensor parallelism):
      each rank's tokens spread evenly over the group, every rank serves the same load, and the pressure is 1.0 for
      every rank whatever the rates (the rates say who sends tokens, not which experts are hot);
    - otherwise (independent DP replicas): a rank's tokens are served on that rank, and its pressure is its rate over
      the ranks' mean, the routed-token share.
    While no rank has moved a token yet every rank's load counts as equal (neutral 1.0), as the simulator starts its
    load average."""

    def __init__(self, dp_size: int, moe_shared: bool, smoothing: float = 0.5) -> None:
        self.rates = [0.0] * dp_size
        self._last: list[tuple[float, int] | None] = [None] * dp_size
        self.smoothing = smoothing
        self.moe_shared = moe_shared

    def observe(self, dp_rank: int, timestamp: float, prefill_tokens_total: int, gen_throughput: float) -> None:
        last = self._last[dp_rank]
        self._last[dp_rank] = (timestamp, prefill_tokens_total)
        if last is None or timestamp <= last[0]:
            return
        rate = max(0, prefill_tokens_total - last[1]) / (timestamp - last[0]) + max(0.0, gen_throughput)
        a = self.smoothing
        self.rates[dp_rank] = a * rate + (1 - a) * self.rates[dp_rank]

    def destinations(self) -> np.ndarray:
        """float [1, S, R]: share of a token of source rank s served on rank r (one layer: the layout is the same
        in every MoE layer)."""
        n = len(self.rates)
        dest = np.full((n, n), 1.0 / n) if self.moe_shared else np.eye(n)
        return dest[None]

    def pressures(self) -> np.ndarray:
        """float [R]: each rank's fallback expert pressure."""
        dest = self.destinations()
        load = np.einsum("lsg,s->lg", dest, np.asarray(self.rates, dtype=np.float64))  # tokens/s each rank serves
        if not load.any():
            load = np.ones_like(load)
        return expert_pressure(dest, load)

    def pressure(self, dp_rank: int) -> float:
        return float(self.pressures()[dp_rank])


def to_rank_loads(snapshots: Sequence[Any], status: Sequence[bool], side: SideChannel | None,
                  share: RoutedTokenShare) -> list[RankLoad]:
    """Upstream LoadSnapshot structs (+ side-channel extras, + controller status) -> RankLoad per rank.

    A rank without a snapshot yet still gets a RankLoad carrying its status (an empty rank is a fine target)."""
    by_rank = {snap.dp_rank: snap for snap in snapshots}
    for snap in by_rank.values():
        if 0 <= snap.dp_rank < len(share.rates):
            share.observe(snap.dp_rank, snap.timestamp, snap.total_prefill_uncached_tokens, snap.gen_throughput)
    fallback = share.pressures().tolist()
    loads = []
    for rank, up in enumerate(status):
        snap = by_rank.get(rank)
        if snap is None:
            loads.append(RankLoad(rank=rank, active=bool(up)))
            continue
        extra = side.read(rank) if side is not None else None
        decode = extra[1] if extra is not None else 0
        pressure = extra[2] if extra is not None and not math.isnan(extra[2]) else fallback[rank]
        loads.append(RankLoad(
            rank=rank,
            active=bool(up),
            kv_capacity_tokens=int(snap.max_total_num_tokens),
            kv_used_tokens=int(snap.num_used_tokens),
            remaining_prefill_tokens=int(snap.num_waiting_uncached_tokens),
            queue_len=int(snap.num_waiting_reqs),
            running_reqs=int(snap.num_running_reqs),
            running_decode_tokens=int(decode),
            expert_pressure=float(pressure),
            timestamp_s=float(snap.timestamp),
            waiting_tokens=max(0, int(snap.num_total_tokens) - int(snap.num_used_tokens)),
        ))
    return loads
