"""Single-class ordering check: prefix-aging vs upstream shortest-prefill-first on the Mooncake trace (60 s),
round_robin dispatch, one run each. Reproduces "Single-class ordering" in docs/request-tier.md:
    .venv/bin/python benchmark/request_tier_single_class.py
"""
from dataclasses import replace

from tiersched.core.request import RequestTierConfig
from tiersched.core.request.ordering import AgingPrefixOrdering
from tiersched.sim import PolicySet, simulate, workloads

work = workloads.mooncake(duration_s=60.0)
arms = {
    "shortest-prefill-first": "shortest-prefill-first",
    "prefix-aging (defaults)": "tiersched",
    "prefix-aging, token_credit_per_s=0": AgingPrefixOrdering(replace(RequestTierConfig(), token_credit_per_s=0.0)),
}
for name, ordering in arms.items():
    metrics = simulate("qwen3", work, PolicySet(ordering=ordering, dispatch="round_robin"), 0).metrics
    print(f"{name:38s} ttft_mean {metrics['ttft_mean']:.3f}  ttft_p99 {metrics['ttft_p99']:.3f}")
