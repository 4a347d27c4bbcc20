"""The simulator's twin of a recorded live A/B: what cpu-tiny expected for each arm on the very requests each run saw.

Reads the replay records `python -m tiersched.bench live ... --record DIR` wrote (one JSONL per deployment, set,
load, arm and repeat), replays each tiersched record through `tiersched.live.replay.replay` (same arrivals,
lengths, priorities and prefix blocks on the `cpu-tiny` preset, every arm's policies as counterfactuals) and
prints, per set/load, the live per-arm means over repeats (runs with a failed or lost request left out) next to
the simulated ones, and the simulated ratios
tiersched vs each upstream arm (> 1 = tiersched better) that the live ratios can be held against.

    .venv/bin/python benchmark/live_twin.py DIR [--deployment dpattn] [--repeats 2] [--json]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

from tiersched.live.replay import ARM_POLICIES, live_metrics, read_record, replay

METRICS = ("ttft_mean_s", "ls_ttft_mean_s", "be_ttft_mean_s", "tpot_mean_s", "cached_fraction")
HIGHER_IS_BETTER = {"cached_fraction"}
NAME = re.compile(r"^(?P<dep>[^-]+)-(?P<set>.+)-(?P<arm>upstream-lpm|upstream-priority|tiersched)-r(?P<rep>\d+)\.jsonl$")


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _ratio(ours, base, metric):
    if ours is None or base is None or ours == 0 or base == 0:
        return None
    return round(ours / base if metric in HIGHER_IS_BETTER else base / ours, 4)


def twin(record_dir: str, deployment: str, repeats: int) -> dict:
    records: dict[str, dict[str, list[Path]]] = defaultdict(lambda: defaultdict(list))
    skipped: list[str] = []  # runs with a failed or lost request (e.g. the server died): not a fair comparison
    for path in sorted(Path(record_dir).glob(f"{deployment}-*.jsonl")):
        m = NAME.match(path.name)
        if m and all(r["success"] for r in read_record(path)[1]):
            records[m["set"]][m["arm"]].append(path)
        elif m:
            skipped.append(path.name)
    if not records:
        raise SystemExit(f"no {deployment} records in {record_dir}")
    out = {}
    for set_name, arms in sorted(records.items()):
        live = {arm: {k: _mean([live_metrics(read_record(p)[1]).get(k) for p in paths]) for k in METRICS}
                for arm, paths in arms.items()}
        sims = [replay(p) for p in arms.get("tiersched", [])[:repeats]]
        sims = [s for s in sims if s.get("status") == "ok"]
        simulated = {arm: {k: _mean([s["simulated"][arm].get(k) for s in sims]) for k in METRICS}
                     for arm in ARM_POLICIES} if sims else {}
        entry = {"live": live, "simulated": simulated, "replayed_records": len(sims), "skipped_records": skipped,
                 "live_records": {arm: len(paths) for arm, paths in arms.items()},
                 "ratios": {}}
        for base in (a for a in ARM_POLICIES if a != "tiersched"):
            entry["ratios"][base] = {
                k: {"live": _ratio(live.get("tiersched", {}).get(k), live.get(base, {}).get(k), k),
                    "simulated": _ratio(simulated.get("tiersched", {}).get(k), simulated.get(base, {}).get(k), k)}
                for k in METRICS}
        out[set_name] = entry
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("record_dir")
    ap.add_argument("--deployment", default="dpattn")
    ap.add_argument("--repeats", type=int, default=2, help="tiersched records replayed per set (each is a run)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    result = twin(args.record_dir, args.deployment, args.repeats)
    if args.json:
        print(json.dumps(result))
        return 0
    for set_name, entry in result.items():
        print(f"{args.deployment} {set_name} (simulated from {entry['replayed_records']} tiersched record(s))")
        for base, ratios in entry["ratios"].items():
            cells = ", ".join(f"{k} live {v['live']} sim {v['simulated']}" for k, v in ratios.items())
            print(f"  tiersched vs {base}: {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
