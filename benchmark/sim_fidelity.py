"""Fidelity of the simulator's `cpu-tiny` preset against the real CPU server on the same request set.

    .venv/bin/python benchmark/sim_fidelity.py [--json] [--requests 30] [--rate 0.5] [--seed 0] [--url URL]
                                               [--save out/fidelity-run.json]
    .venv/bin/python benchmark/sim_fidelity.py --replay out/fidelity-run.json [--json]   # no server

Starts the tiny Qwen3-MoE (`tiersched.rig`, `--dp-size 2`, tp1; or uses --url), sends a seeded request set
(Poisson arrivals, prompt 32-768 tokens as input_ids, 8-48 output tokens with ignore_eos), measures mean TTFT,
TPOT and output throughput, then simulates the same requests (actual send times as arrivals, same lengths,
the server's dispatch and ordering policies) on the calibrated `cpu-tiny` preset and prints both with the
relative errors |sim - real| / real. Goal: <= 10% each. With --calibrate-first the same server is
profiled (reduced set) right before the requests, so calibration and check see the same machine load. The load average is printed with the result:
the real server shares this machine, the simulator does not model other processes. --save writes the report with
every real request (send time, lengths, DP rank, TTFT, TPOT, finish); --replay re-simulates such a saved run with
the committed calibration (to compare model changes on the same real measurements, without a server).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict

import numpy as np

from tiersched.live import fidelity
from tiersched.sim.presets.cpu_tiny import calibration_path

SIM_DISPATCH = {"round_robin": "round_robin", "total_requests": "total_requests", "total_tokens": "total_tokens"}
SIM_ORDERING = {"fcfs": "fcfs", "lpm": "lpm", "lof": "fcfs", "random": "fcfs"}


QUICK_PREFILL = (16, 384, 1152, 2048)
QUICK_DECODE = ((1, 64), (8, 64), (8, 384), (16, 256))


def calibrate_in_situ(url: str, calibration: dict, seen: dict) -> dict:
    """A reduced profile of the same server, right before the fidelity requests (same load): the committed
    calibration with its measurements, fits and coefficients replaced."""
    chunk = int(calibration.get("scheduler", {}).get("chunked_prefill_size", 4096))
    prof = fidelity.profile(url, 1, chunk, QUICK_PREFILL, QUICK_DECODE, seen_lengths=seen.get(0, []))
    for rank, lengths in fidelity.profile_lengths(prof["measurements"]).items():
        seen.setdefault(rank, []).extend(lengths)
    return {**calibration, **prof, "date": None, "load_average_before": fidelity.load_average(),
            "in_situ": True}


def compare(url: str, n: int, rate: float, seed: int, calibration: dict, seen: dict | None = None) -> dict:
    arrivals, inputs, outputs = fidelity.request_set(n, rate, seed)
    load_before = fidelity.load_average()
    start = time.time()
    results = fidelity.run_request_set(url, arrivals, inputs, outputs, seed=seed)
    real_wall = round(time.time() - start, 1)
    report = compare_results(results, calibration, seen)
    report.update({"requests": n, "rate_req_s": rate, "seed": seed, "real_wall_s": real_wall,
                   "load_average_before": load_before, "load_average_after": fidelity.load_average()})
    return report


def compare_results(results: list, calibration: dict, seen: dict | None = None) -> dict:
    """Simulate the real run's requests (as sent) on the preset of `calibration`; real vs sim and the errors."""
    real = fidelity.summarize(results)
    settings = calibration.get("server", {}).get("settings", {})
    dispatch = SIM_DISPATCH.get(settings.get("load_balance_method") or "round_robin", "round_robin")
    ordering = SIM_ORDERING.get(settings.get("schedule_policy") or "fcfs", "fcfs")
    from tiersched.sim.presets.cpu_tiny import preset as cpu_tiny_preset

    preset = cpu_tiny_preset(calibration=calibration)
    order = np.argsort([r.arrival_s for r in results], kind="stable")
    sent = np.array([results[i].arrival_s for i in order])
    lengths = ([results[i].input_tokens for i in order], [results[i].output_tokens for i in order])
    ranks = [results[i].dp_rank for i in order]
    # The real dp2 server runs its ranks independently: replay each rank's requests on its own (primary);
    # the lockstep multi-rank model with the server's dispatch policy is reported beside it.
    sim = fidelity.simulate_request_set(sent - sent[0], *lengths, dispatch, ordering, preset,
                                        ranks=ranks if None not in ranks else None, seen_lengths=seen)
    lockstep = fidelity.simulate_request_set(sent - sent[0], *lengths, dispatch, ordering, preset,
                                             seen_lengths=seen)
    errors = {f"{k}_rel_error": abs(sim[k] - real[k]) / real[k] for k in ("ttft_mean", "tpot_mean", "throughput")}
    return {"real": real, "sim": sim, "sim_lockstep": lockstep,
            "real_tpot_by_other_rank": fidelity.tpot_by_other_rank(results),
            "lockstep_rel_errors": {k: abs(lockstep[k] - real[k]) / real[k]
                                    for k in ("ttft_mean", "tpot_mean", "throughput")}, **errors,
            "max_rel_error": max(errors.values()), "goal_rel_error": 0.10, "sim_policies": [dispatch, ordering],
            "calibration": {"date": calibration.get("date"), "load_average": calibration.get("load_average_before"),
                            "in_situ": bool(calibration.get("in_situ")),
                            "coefficients": calibration.get("coefficients")},
            "real_requests": [asdict(r) for r in results], "warm_up_lengths": seen or {}}


def replay(path: str, calibration: dict) -> dict:
    """A saved run (--save) re-simulated with `calibration`; the saved run's own fields kept."""
    saved = json.loads(open(path).read())
    results = [fidelity.RequestResult(**r) for r in saved["real_requests"]]
    keep = {k: saved[k] for k in ("requests", "rate_req_s", "seed", "real_wall_s", "load_average_before",
                                  "load_average_after") if k in saved}
    return {**keep, **compare_results(results, calibration, saved.get("warm_up_lengths")), "replay_of": path}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--rate", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--url", default=None, help="an already running server (default: start one)")
    ap.add_argument("--calibrate-first", action="store_true",
                    help="profile the same server (reduced set) right before the requests and use that fit")
    ap.add_argument("--save", default=None, help="write the JSON report with every real request here")
    ap.add_argument("--replay", default=None, help="re-simulate a saved run (no server)")
    args = ap.parse_args()
    path = calibration_path()
    if not path.exists():
        print(f"no calibration at {path}; run benchmark/sim_cpu_tiny_calibrate.py first", file=sys.stderr)
        return 2
    calibration = json.loads(path.read_text())
    if args.replay:
        report = replay(args.replay, calibration)
    elif args.url:
        seen: dict = {}  # a running server: what it prefilled before is unknown
        if args.calibrate_first:
            calibration = calibrate_in_situ(args.url, calibration, seen)
        report = compare(args.url, args.requests, args.rate, args.seed, calibration, seen)
    else:
        from tiersched.rig.server import launch_server
        from tiersched.rig.tiny_model import make_tiny_moe

        model = make_tiny_moe(tempfile.mkdtemp(prefix="tiny-moe-fid-"))
        max_total = int(calibration.get("server", {}).get("settings", {}).get("max_total_tokens") or 16384)
        with launch_server(model, extra_args=list(fidelity.SERVER_ARGS), timeout_s=480,
                           max_total_tokens=max_total) as srv:
            seen = fidelity.warm_up(srv.url, max_total)
            if args.calibrate_first:
                calibration = calibrate_in_situ(srv.url, calibration, seen)
            report = compare(srv.url, args.requests, args.rate, args.seed, calibration, seen)
    if args.save:
        with open(args.save, "w") as f:
            json.dump(report, f)
    printed = {k: v for k, v in report.items() if k != "real_requests"}
    if args.json:
        print(json.dumps(printed))
    else:
        print(f"{'metric':<12}{'real':>12}{'sim':>12}{'rel.err':>10}")
        for k in ("ttft_mean", "tpot_mean", "throughput"):
            print(f"{k:<12}{report['real'][k]:>12.4f}{report['sim'][k]:>12.4f}{report[k + '_rel_error']:>10.1%}")
        print(f"load average before/after: {report.get('load_average_before')} / {report.get('load_average_after')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
