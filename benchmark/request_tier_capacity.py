"""What "1.5x overload" means: offer the mixed-priority scenario at multiples of the closed-form capacity estimate
(`capacity.nominal_capacity_req_s`, capacity="analytic") and print what upstream FCFS actually completes.

Reproduces the table in docs/request-tier.md ("What 1.5x overload means"):
    .venv/bin/python benchmark/request_tier_capacity.py
"""
import numpy as np

from tiersched.sim import PolicySet, capacity, simulate
from tiersched.sim.presets import get_preset

preset = get_preset("qwen3").with_scheduler(max_running_requests=2048)  # upstream's default max running requests
for overload in (1.0, 1.5, 3.0):
    for seed in (0, 1):
        work = capacity.mixed_priority_at_overload(ls_fraction=0.2, overload=overload, preset=preset, duration_s=60.0,
                                                   seed=seed, capacity="analytic")
        rec = simulate(preset, work, PolicySet(ordering="fcfs"), seed).records
        finish = work.arrival_s + rec["e2e"]
        window = np.isfinite(finish) & (finish >= 20.0) & (finish < 60.0)
        print(f"overload {overload} seed {seed}: offered {work.meta['rate']:.2f} req/s; completed in [20 s, 60 s) "
              f"{window.sum() / 40.0:.2f} req/s; TTFT max {np.nanmax(rec['ttft']):.1f} s")
