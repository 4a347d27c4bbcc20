"""Engine tier, Prometheus metrics of the DP controller's score dispatch.

Upstream runs prometheus_client in multiprocess mode: with `--enable-metrics` the launcher sets
PROMETHEUS_MULTIPROC_DIR (sglang.srt.utils.common.set_prometheus_multiproc_dir) before it spawns the DP
controller, and the HTTP server's /metrics merges every process's files (add_prometheus_middleware). We
import prometheus_client only inside the controller, after that variable is inherited, so these series show
up on the same /metrics endpoint. Without --enable-metrics they live in the process's default registry.
"""
from __future__ import annotations

from typing import Sequence


class DispatchMetrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge

        self.chosen = Counter(
            "tiersched_dispatch_requests_total", "Requests sent to each DP rank by the score dispatcher", ["dp_rank"]
        )
        self.expected_hit = Counter(
            "tiersched_dispatch_expected_prefix_hit_tokens_total",
            "Prompt tokens the dispatcher expected to find cached on the chosen rank",
        )
        self.input_tokens = Counter(
            "tiersched_dispatch_input_tokens_total", "Prompt tokens dispatched by the score dispatcher"
        )
        self.imbalance = Gauge(
            "tiersched_dispatch_imbalance",
            "Max over mean of per-rank pending prefill tokens (snapshot + optimistic), active ranks; 1 = balanced",
            multiprocess_mode="mostrecent",
        )

    def observe(self, rank: int, input_tokens: int, expected_hit: int, pending: Sequence[int],
                active: Sequence[bool]) -> None:
        self.chosen.labels(dp_rank=str(rank)).inc()
        self.input_tokens.inc(input_tokens)
        self.expected_hit.inc(expected_hit)
        self.imbalance.set(imbalance(pending, active))


def imbalance(pending: Sequence[int], active: Sequence[bool]) -> float:
    values = [p for p, a in zip(pending, active) if a]
    if not values:
        return 1.0
    mean = sum(values) / len(values)
    return max(values) / mean if mean > 0 else 1.0
