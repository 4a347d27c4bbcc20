"""The bound beside a live A/B: each request's lowest TTFT over every arm and repeat of a run, and how much of the
best upstream arm's headroom above that floor each arm captures.

Every arm sends the same requests (same prompts, same arrival times) at the same load, so the lowest TTFT a request
got in any of the runs is what this server on this machine can do for it with the queue it met at its luckiest:
a practical floor, an upper bound on its idle-server TTFT (an LS request alone on an idle rank). The floor of a
set is the mean over its requests (and over its LS requests); an arm's capture is (best upstream mean - arm
mean) / (best upstream mean - floor): 0 = no better than the best upstream arm, 1 = at the floor.

    .venv/bin/python benchmark/live_floor.py RECORD_DIR --deployment dp2 [--json]

RECORD_DIR: what `python -m tiersched.bench live ... --record DIR` wrote (one JSONL per deployment, set, load,
arm and repeat). Runs with a failed request are left out of the arm's means but their successes still count
towards the floor.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

UPSTREAM = ("upstream-lpm", "upstream-priority")


def _name(deployment: str) -> re.Pattern:
    return re.compile(rf"^{re.escape(deployment)}-(?P<set>.+)-(?P<arm>upstream-[a-z]+|tiersched(?:-[a-z0-9-]+)?)"
                      rf"-r(?P<rep>\d+)\.jsonl$")


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return [r for r in (json.loads(line) for line in f if line.strip()) if r.get("type") != "meta"]


def floors(record_dir: str, deployment: str) -> dict:
    name = _name(deployment)
    runs: dict[str, dict[str, list[list[dict]]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(Path(record_dir).glob(f"{deployment}-*.jsonl")):
        m = name.match(path.name)
        if m:
            runs[m["set"]][m["arm"]].append(_rows(path))
    if not runs:
        raise SystemExit(f"no {deployment} records in {record_dir}")
    out = {}
    for set_name, arms in sorted(runs.items()):
        best: dict[str, float] = {}
        cls: dict[str, str] = {}
        for arm_runs in arms.values():
            for rows in arm_runs:
                for r in rows:
                    if r["success"] and r["ttft_s"] is not None:
                        best[r["rid"]] = min(best.get(r["rid"], float("inf")), r["ttft_s"])
                        cls[r["rid"]] = r["cls"]
        floor = {"all": statistics.fmean(best.values()),
                 "ls": statistics.fmean(v for k, v in best.items() if cls[k] == "ls")}
        means = {}
        for arm, arm_runs in sorted(arms.items()):
            ok = [rows for rows in arm_runs if all(r["success"] for r in rows)]
            means[arm] = {"all": statistics.fmean(r["ttft_s"] for rows in ok for r in rows),
                          "ls": statistics.fmean(r["ttft_s"] for rows in ok for r in rows if r["cls"] == "ls"),
                          "runs": len(ok)}
        entry = {"floor_ttft_mean_s": round(floor["all"], 4), "floor_ls_ttft_mean_s": round(floor["ls"], 4),
                 "arms": {}}
        for key in ("all", "ls"):
            upstream = [a for a in UPSTREAM if a in means]
            base = min(upstream, key=lambda a: means[a][key]) if upstream else None
            entry[f"best_upstream_{key}"] = base
            for arm, m in means.items():
                a = entry["arms"].setdefault(arm, {"runs": m["runs"]})
                a["ttft_mean_s" if key == "all" else "ls_ttft_mean_s"] = round(m[key], 4)
                if base is not None and means[base][key] > floor[key]:
                    a["capture" if key == "all" else "ls_capture"] = round(
                        (means[base][key] - m[key]) / (means[base][key] - floor[key]), 3)
        out[set_name] = entry
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("record_dir")
    ap.add_argument("--deployment", default="dp2")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    result = floors(args.record_dir, args.deployment)
    if args.json:
        print(json.dumps(result))
        return 0
    print("| set | floor mean TTFT s (LS) | arm: mean TTFT s (LS), capture of the best upstream arm's headroom (LS) |")
    print("|---|---|---|")
    for set_name, e in result.items():
        arms = "; ".join(f"{arm} {a['ttft_mean_s']:.3f} ({a['ls_ttft_mean_s']:.3f})"
                         + (f", {a['capture']:.2f} ({a['ls_capture']:.2f})" if "capture" in a and "ls_capture" in a
                            else "") for arm, a in e["arms"].items())
        print(f"| {set_name} | {e['floor_ttft_mean_s']:.3f} ({e['floor_ls_ttft_mean_s']:.3f}) | {arms} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
