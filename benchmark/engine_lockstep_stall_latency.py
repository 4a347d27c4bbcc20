"""ScoreDispatcher.pick() and update_loads() latency with the engine tier's lockstep stall term on vs off: wall and
thread-CPU percentiles, the same snapshots and requests, interleaved.

    nice -n 10 python benchmark/engine_lockstep_stall_latency.py

32 ranks (deepseek-v3-32's step-time prior, chunk 8192), 20,000 prompts of one of 40 shared 1k-6k-token prefixes
plus a 16-2k-token suffix (page keys computed before timing), a fresh random snapshot of every rank every 20
picks; the two dispatchers (weight_stall 0, and 4 with a LockstepGroup) take the same snapshots and requests in
alternating order. The first 10% of samples are dropped (warm-up). Prints p50 / p99 in microseconds.
"""
import json, random, time
import numpy as np
from tiersched.core.engine import DispatchRequest, EngineTierConfig, LockstepGroup, RankLoad
from tiersched.core.engine.prefix_index import chained_block_hashes
from tiersched.core.engine.score import ScoreDispatcher
from tiersched.sim import get_preset
from tiersched.sim.cost_model import StepCostModel
from tiersched.sim.lockstep import prior_model
from tiersched.sim.moe_routing import make_routing, token_probs

R, N = 32, 20000
p = get_preset("deepseek-v3-32")
model = prior_model(StepCostModel(p, token_probs(make_routing(p, 0), p.dp)))
rng = random.Random(0)
off = ScoreDispatcher(R, EngineTierConfig(weight_stall=0.0))
on = ScoreDispatcher(R, EngineTierConfig(weight_stall=4.0))
on.set_lockstep(LockstepGroup(model, 8192))
assert on.lockstep is not None and off.lockstep is None
bases = [[rng.randrange(0, 30000) for _ in range(rng.randrange(1024, 6144))] for _ in range(40)]
reqs = []
for i in range(N):
    toks = bases[rng.randrange(40)] + [rng.randrange(0, 30000) for _ in range(rng.randrange(16, 2048))]
    reqs.append(DispatchRequest(str(i), len(toks), tuple(chained_block_hashes(toks, 32))))
times = {k: [] for k in ("off", "on", "off_cpu", "on_cpu", "upd_off", "upd_on")}
now = 1.0
for i, req in enumerate(reqs):
    if i % 20 == 0:
        now += 0.02
        loads = [RankLoad(rank=r, kv_capacity_tokens=400_000, kv_used_tokens=rng.randint(0, 300_000),
                          remaining_prefill_tokens=rng.randint(0, 30_000), queue_len=rng.randint(0, 8),
                          running_reqs=rng.randint(0, 64), running_decode_tokens=rng.randint(0, 200_000),
                          timestamp_s=now) for r in range(R)]
        for name, d in (("off", off), ("on", on)) if i % 40 else (("on", on), ("off", off)):
            t0 = time.perf_counter_ns(); d.update_loads(loads, now); times["upd_" + name].append(time.perf_counter_ns() - t0)
    order = (("off", off), ("on", on)) if i % 2 else (("on", on), ("off", off))
    for name, d in order:
        c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
        d.pick(req, now)
        times[name].append(time.perf_counter_ns() - t0); times[name + "_cpu"].append(time.thread_time_ns() - c0)
out = {}
for k, v in times.items():
    v = np.array(v[len(v) // 10:]) / 1000.0  # drop warm-up
    out[k] = {"p50_us": round(float(np.percentile(v, 50)), 2), "p99_us": round(float(np.percentile(v, 99)), 2), "n": len(v)}
import os
out["load_average_1m"] = os.getloadavg()[0]
print(json.dumps(out))
