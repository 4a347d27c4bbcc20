"""Where mean TPOT goes: one simulated configuration, several arms, every decode-time second attributed.

    nice -n 10 python benchmark/lockstep_tpot_decomposition.py [--preset qwen3-dp4ep4] [--shape Two-end]
        [--load 1.0] [--seeds 0] [--duration-s 3] [--arm LABEL=SPEC ...] [--json]

Load = rate / the shape's measured capacity (bench/lockstep._capacity, as `tiersched.bench lockstep`). An arm SPEC
is a comma list: ordering=, dispatch=, chunk= (per rank), mixed=0|1, delay= (prefill-delayer max delay passes, 0:
off), queue_ratio=, watermark=, plan=0|1 (the lockstep step plan) and any [request] key for the plan
(e.g. plan_decode_weight=0.2). Default arms: upstream's TPOT-best and TTFT-best of `bench lockstep` on
qwen3-dp4ep4 Two-end (its search at load 1.0, seed 0) and ours as that bench runs it: the plan on fcfs/round_robin
and on the TPOT winner's ordering/dispatch with mixed chunking, with its default settings and with the "hold"
and "hold-tpot" profiles (bench/lockstep.PLAN_PROFILES).

A request's TPOT is (finish - first token) / (output - 1). Between its first token and its finish it is in its
rank's running set (or back in the waiting queue after a retraction), and every lockstep step it sits in is one
of four kinds for it:
  decode          no rank of the group prefills: an all-decode step;
  beside_prefill  its rank decodes while another rank prefills (the step lasts as long as that prefill);
  mixed           its rank prefills and its decodes ride in the same forward (--enable-mixed-chunk);
  own_prefill     its rank prefills without carrying its decodes: the step gives it no token.
  requeued        time back in the waiting queue after a retraction or preemption.
The decomposition is additive: mean TPOT = sum over kinds of mean_i(time_i(kind) / (output_i - 1)) (checked,
`residual_ms`). For the prefill kinds the part of the step above the all-decode counterfactual (the same ranks
decoding the same running sets, nobody prefilling; priced by the simulator's cost model) is the prefill's
stall (`excess_ms`). Step statistics beside it: steps, prefill steps, ranks prefilling per prefill step,
prefill tokens per prefilling rank, the longest rank's prefill tokens, the running batch per rank.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

KINDS = ("decode", "beside_prefill", "mixed", "own_prefill", "requeued")

# `tiersched.bench lockstep`'s winners on qwen3-dp4ep4 Two-end (search at load 1.0, seed 0; its JSON
# upstream_space_searched.per_preset_shape["qwen3-dp4ep4/Two-end"].winners) and ours as that bench runs it.
DEFAULT_ARMS = {
    "upstream_tpot_best": "ordering=shortest-prefill-first,dispatch=total_tokens,chunk=1024,mixed=1,delay=60,"
                          "queue_ratio=0.5",
    "upstream_ttft_best": "ordering=shortest-prefill-first,dispatch=total_requests,chunk=1024",
    "ours_plan_fcfs_rr": "ordering=fcfs,dispatch=round_robin,chunk=8192,plan=1",
    "ours_plan_tpot_flags_mixed": "ordering=shortest-prefill-first,dispatch=total_tokens,chunk=8192,mixed=1,plan=1",
    "ours_plan_hold_tpot_flags_mixed": "ordering=shortest-prefill-first,dispatch=total_tokens,chunk=8192,mixed=1,"
                                       "plan=1,plan_hold_s=0.5,plan_decode_weight=10,plan_align_weight=0",
    "ours_plan_hold_tpot_profile": "ordering=shortest-prefill-first,dispatch=total_tokens,chunk=8192,mixed=1,"
                                   "plan=1,plan_hold_s=0.5,plan_decode_weight=100,plan_align_weight=0",
}
ARM_KEYS = {"ordering", "dispatch", "chunk", "mixed", "delay", "queue_ratio", "watermark", "plan"}


def parse_arm(spec: str) -> dict:
    out: dict = {"ordering": "fcfs", "dispatch": "round_robin", "chunk": 8192, "mixed": 0, "delay": 0, "plan": 0,
                 "request": {}}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        key, _, value = item.partition("=")
        if not _:
            raise ValueError(f"arm item {item!r} is not key=value")
        if key in ("ordering", "dispatch"):
            out[key] = value
        elif key in ("chunk", "mixed", "delay", "plan"):
            out[key] = int(value)
        elif key in ("queue_ratio", "watermark"):
            out[key] = float(value)
        else:  # a [request] tunable for the plan
            out["request"][key] = type(getattr(__import__("tiersched.core.request", fromlist=["x"])
                                               .RequestTierConfig(), key))(value)
    return out


def _scheduler_changes(arm: dict) -> dict:
    changes = {"chunked_prefill_size": arm["chunk"], "enable_mixed_chunk": bool(arm["mixed"])}
    if arm["delay"]:
        changes.update(enable_prefill_delayer=True, prefill_delayer_max_delay_passes=arm["delay"])
        if "queue_ratio" in arm:
            changes["prefill_delayer_queue_min_ratio"] = arm["queue_ratio"]
        if "watermark" in arm:
            changes["prefill_delayer_token_usage_low_watermark"] = arm["watermark"]
    return changes


class Recorder:
    """Wraps a Simulation's cost model and per-iteration hook to attribute every step to its running requests."""

    def __init__(self, sim):
        self.sim = sim
        n = sim.table.n
        self.time = {k: np.zeros(n) for k in KINDS}
        self.excess = {k: np.zeros(n) for k in KINDS}
        self.pending = None
        self.steps = 0
        self.prefill_steps = 0
        self.ranks_prefilling: list[int] = []  # per prefill step
        self.prefill_tokens: list[float] = []  # per prefilling rank-step (prefill tokens only)
        self.max_prefill_tokens: list[float] = []  # per prefill step: the longest rank's
        self.prefill_step_s: list[float] = []
        self.decode_step_s: list[float] = []  # per all-decode step (macro steps expanded by count)
        self.decode_steps = 0
        self.counterfactual_s: list[float] = []  # per prefill step: all-decode step of the same running sets
        self.running_weighted = 0.0  # sum over steps of running requests per busy rank x duration
        self.running_spread = 0.0  # sum over steps of (max - min running over ranks) x duration
        self.busy_time = 0.0
        self.idle_rank_steps = 0  # rank-steps with nothing to run inside a busy step
        self._orig_step_times = sim.cost.step_times
        self._orig_record = sim._record
        sim.cost.step_times = self._step_times
        sim._record = self._record

    def _step_times(self, tokens, pairs, ctx, *args, decode_reqs=None, **kwargs):
        sim = self.sim
        out = self._orig_step_times(tokens, pairs, ctx, *args, decode_reqs=decode_reqs, **kwargs)
        running = [np.fromiter(rs.running, dtype=np.int64, count=len(rs.running)) for rs in sim.ranks]
        prefilling = np.asarray(pairs) > 0
        mixed = (np.zeros(len(running), dtype=bool) if decode_reqs is None else np.asarray(decode_reqs) > 0)
        counterfactual = None
        if prefilling.any():
            t = sim.table
            dtok = np.array([r.size for r in running], dtype=float)
            dctx = np.array([float((t.input[r] + t.generated[r]).sum()) if r.size else 0.0 for r in running])
            counterfactual = float(self._orig_step_times(dtok, np.zeros_like(dtok), dctx)[0][0]) if dtok.any() else 0.0
        self.pending = (sim.now, sim.steps, running, prefilling, mixed, np.asarray(tokens, dtype=float).copy(),
                        counterfactual, decode_reqs)
        return out

    def _record(self):
        self._orig_record()
        sim = self.sim
        if self.pending is None:
            return
        start, steps0, running, prefilling, mixed, tokens, counterfactual, decode_reqs = self.pending
        self.pending = None
        dt, k = sim.now - start, sim.steps - steps0
        self.steps += k
        sizes = np.array([r.size for r in running], dtype=float)
        busy = (sizes > 0) | prefilling
        if busy.any():
            self.running_weighted += dt * float(sizes[busy].mean())
            self.running_spread += dt * float(sizes.max() - sizes.min())
            self.busy_time += dt
        self.idle_rank_steps += k * int((~busy).sum())
        if prefilling.any():
            self.prefill_steps += 1
            self.prefill_step_s.append(dt)
            self.counterfactual_s.append(counterfactual)
            self.ranks_prefilling.append(int(prefilling.sum()))
            rows = np.zeros_like(tokens) if decode_reqs is None else np.asarray(decode_reqs, dtype=float)
            pre = tokens - rows
            self.prefill_tokens.extend(pre[prefilling].tolist())
            self.max_prefill_tokens.append(float(pre[prefilling].max()))
            extra = max(0.0, dt - counterfactual)
            for r, idx in enumerate(running):
                if not idx.size:
                    continue
                kind = ("mixed" if mixed[r] else "own_prefill") if prefilling[r] else "beside_prefill"
                self.time[kind][idx] += dt
                self.excess[kind][idx] += dt if kind == "own_prefill" else extra
        else:
            self.decode_steps += k
            self.decode_step_s.append(dt / max(k, 1))
            for idx in running:
                if idx.size:
                    self.time["decode"][idx] += dt

    def report(self, result) -> dict:
        t = self.sim.table
        rec = result.records
        done = np.isfinite(rec["tpot"])
        den = (t.output - 1).astype(float)[done]
        span = (t.finish - t.first_token)[done]
        attributed = sum(self.time[k] for k in KINDS if k != "requeued")[done]
        self.time["requeued"][done] = np.maximum(0.0, span - attributed)
        ms = lambda x: round(float((x[done] / den).mean()) * 1e3, 3) if done.any() else None
        tpot = float(np.mean(rec["tpot"][done])) * 1e3 if done.any() else None
        parts = {k: ms(self.time[k]) for k in KINDS}
        pf = np.array(self.prefill_tokens) if self.prefill_tokens else np.zeros(1)
        mx = np.array(self.max_prefill_tokens) if self.max_prefill_tokens else np.zeros(1)
        return {
            "metrics": {k: result.metrics[k] for k in ("ttft_mean", "tpot_mean", "throughput", "finished",
                                                       "requests", "retractions", "mixed_steps",
                                                       "prefill_delayed_passes")},
            "tpot_ms": round(tpot, 3) if tpot is not None else None,
            "tpot_ms_by_kind": parts,
            "excess_ms_by_kind": {k: ms(self.excess[k]) for k in KINDS if k not in ("decode", "requeued")},
            "residual_ms": round(tpot - sum(v for v in parts.values() if v is not None), 6) if tpot else None,
            "steps": self.steps, "decode_steps": self.decode_steps, "prefill_steps": self.prefill_steps,
            "mean_decode_step_ms": round(float(np.mean(self.decode_step_s)) * 1e3, 3) if self.decode_step_s else None,
            "mean_prefill_step_ms": round(float(np.mean(self.prefill_step_s)) * 1e3, 3) if self.prefill_step_s else None,
            "mean_prefill_step_counterfactual_ms": (round(float(np.mean(self.counterfactual_s)) * 1e3, 3)
                                                    if self.counterfactual_s else None),
            "ranks_prefilling_per_prefill_step": (
                {int(v): int(c) for v, c in zip(*np.unique(self.ranks_prefilling, return_counts=True))}
                if self.ranks_prefilling else {}),
            "prefill_tokens_per_prefilling_rank": {"mean": round(float(pf.mean()), 1),
                                                   "p50": float(np.percentile(pf, 50)),
                                                   "p90": float(np.percentile(pf, 90))},
            "longest_rank_prefill_tokens_per_step": {"mean": round(float(mx.mean()), 1),
                                                     "p50": float(np.percentile(mx, 50)),
                                                     "p90": float(np.percentile(mx, 90))},
            "running_per_busy_rank_time_weighted": round(self.running_weighted / max(self.busy_time, 1e-12), 2),
            "running_spread_time_weighted": round(self.running_spread / max(self.busy_time, 1e-12), 2),
            "idle_rank_steps": self.idle_rank_steps,
        }


def run_arm(preset: str, shape: str, rate: float, duration_s: float, seed: int, arm: dict) -> dict:
    from tiersched.core.request import RequestTierConfig
    from tiersched.sim import PolicySet, get_preset, workloads
    from tiersched.sim.loop import Simulation
    from tiersched.sim.metrics import build_result

    p = get_preset(preset).with_scheduler(**_scheduler_changes(arm))
    work = workloads.synthetic(shape, rate=rate, duration_s=duration_s, seed=seed)
    policies = PolicySet(ordering=arm["ordering"], dispatch=arm["dispatch"],
                         step_plan=RequestTierConfig(**arm["request"]) if arm["plan"] else "none")
    sim = Simulation(p, work, policies, seed, record_timeline=False)
    rec = Recorder(sim)
    sim.run()
    res = build_result(sim, 0.0)
    out = rec.report(res)
    out["plans"] = sim.plans
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="qwen3-dp4ep4")
    ap.add_argument("--shape", default="Two-end")
    ap.add_argument("--load", type=float, default=1.0)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--duration-s", type=float, default=0.0, help="0: bench lockstep's duration for the preset")
    ap.add_argument("--arm", action="append", default=[], help="LABEL=SPEC (repeatable; default: the four arms)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from tiersched.bench.lockstep import DURATION_S, _capacity

    arms = dict(DEFAULT_ARMS)
    if args.arm:
        arms = {}
        for a in args.arm:
            label, _, spec = a.partition("=")
            arms[label] = spec
    parsed = {k: parse_arm(v) for k, v in arms.items()}
    _, _, cap = _capacity((args.preset, args.shape))
    rate = args.load * cap
    dur = args.duration_s or DURATION_S.get(args.preset, 3.0)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    out = {"preset": args.preset, "shape": args.shape, "load": args.load, "rate_req_s": round(rate, 3),
           "duration_s": dur, "seeds": seeds, "arms": {}}
    for label, arm in parsed.items():
        per_seed = [run_arm(args.preset, args.shape, rate, dur, s, arm) for s in seeds]
        out["arms"][label] = {"spec": arms[label], "per_seed": per_seed}
        if not args.json:
            for s, r in zip(seeds, per_seed):
                m = r["metrics"]
                print(f"{label} seed {s}: TTFT {m['ttft_mean']:.4f} s  TPOT {r['tpot_ms']:.2f} ms  "
                      f"thr {m['throughput']:.0f} tok/s")
                print(f"   TPOT by kind (ms): {r['tpot_ms_by_kind']}  excess: {r['excess_ms_by_kind']}  "
                      f"residual {r['residual_ms']}")
                print(f"   steps {r['steps']} (decode {r['decode_steps']}, prefill {r['prefill_steps']}); "
                      f"step ms decode {r['mean_decode_step_ms']} prefill {r['mean_prefill_step_ms']} "
                      f"(all-decode counterfactual {r['mean_prefill_step_counterfactual_ms']})")
                print(f"   ranks prefilling/step {r['ranks_prefilling_per_prefill_step']}; prefill tok/rank "
                      f"{r['prefill_tokens_per_prefilling_rank']}; longest {r['longest_rank_prefill_tokens_per_step']}")
                print(f"   running/busy rank {r['running_per_busy_rank_time_weighted']}, spread "
                      f"{r['running_spread_time_weighted']}, idle rank-steps {r['idle_rank_steps']}, "
                      f"mixed {m['mixed_steps']}, delayed {m['prefill_delayed_passes']}, plans {r['plans']}")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
