"""The simulator applies `max_preemptions_per_request` as the real server does: a BE request that every new LS
request would preempt (newest-first victims, one running slot) is preempted at most that many times, then runs
to the end while the LS requests wait; everything finishes."""
from __future__ import annotations

import numpy as np

from tiersched.core.request import RequestTierConfig
from tiersched.core.request.ordering import AgingPrefixOrdering
from tiersched.core.request.preemption import LatencySensitivePreemption
from tiersched.sim import PolicySet
from tiersched.sim.workloads import Workload

from test_sim_mechanics import preset, run


def preempted_times(bound: int, ls_requests: int = 6):
    config = RequestTierConfig(max_preemptions_per_request=bound)
    arrivals = np.array([0.0] + [0.6 * (i + 1) for i in range(ls_requests)])
    n = len(arrivals)
    w = Workload("bound", arrivals, np.full(n, 100), np.array([1000] + [5] * ls_requests),
                 priority=np.array([0] + [20] * ls_requests), class_of=np.array([1] + [0] * ls_requests),
                 class_names=("LS", "BE"))
    r = run(preset(dp=1, max_running_requests=1), w,
            PolicySet(ordering=AgingPrefixOrdering(config), preemption=LatencySensitivePreemption(config)))
    assert r.metrics["finished"] == n
    return int(r.records["preemptions"][0])


def test_be_request_is_preempted_at_most_the_bound():
    unbounded = preempted_times(100)
    assert unbounded > 2  # without the bound every LS arrival preempts the same BE request
    assert preempted_times(2) == 2
    assert preempted_times(0) == 0
