"""A minimal single-server queue that runs an OrderingPolicy: the model behind the wait-bound proof.

One server, non-preemptive: whenever it is idle it asks the policy to order the waiting set at that instant
and serves the head for the job's service time. Used by the property test of the wait bound and by the
docs; the full DP-attention simulator lives in tiersched.sim.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from tiersched.core.request import OrderingPolicy, WaitingRequest


@dataclass(frozen=True, slots=True)
class Job:
    rid: str
    priority: int
    arrival_s: float
    service_s: float
    input_tokens: int = 1


@dataclass(frozen=True, slots=True)
class Served:
    rid: str
    priority: int
    arrival_s: float
    start_s: float
    end_s: float

    @property
    def wait_s(self) -> float:
        return self.start_s - self.arrival_s


def run_single_server(jobs: Sequence[Job], policy: OrderingPolicy) -> list[Served]:
    """Serve every job; returns them in service order."""
    pending = sorted(jobs, key=lambda j: j.arrival_s)
    waiting: list[Job] = []
    served: list[Served] = []
    now = 0.0
    i = 0
    while i < len(pending) or waiting:
        if not waiting and i < len(pending):
            now = max(now, pending[i].arrival_s)
        while i < len(pending) and pending[i].arrival_s <= now:
            waiting.append(pending[i])
            i += 1
        snapshot = [WaitingRequest(j.rid, j.priority, j.arrival_s, j.input_tokens) for j in waiting]
        head = waiting.pop(policy.order(snapshot, now)[0])
        served.append(Served(head.rid, head.priority, head.arrival_s, now, now + head.service_s))
        now += head.service_s
    return served
