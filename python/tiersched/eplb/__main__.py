"""CLI: `python -m tiersched.eplb plan|evaluate` (run with --help)."""
from __future__ import annotations

import argparse
import json
import sys

from tiersched.config import ConfigError, load_config
from tiersched.eplb.evaluate import evaluate
from tiersched.eplb.plan import plan
from tiersched.eplb.stats_io import load_window
from tiersched.sim.moe_routing import deepseek_count_files


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-ranks", type=int, default=32, help="EP ranks (GPUs), default 32")
    p.add_argument("--redundant", type=int, default=32, help="redundant slots over the logical experts, default 32")
    p.add_argument("--num-nodes", type=int, default=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tiersched.eplb")
    sub = parser.add_subparsers(dest="cmd", required=True)
    pe = sub.add_parser("evaluate", help="compare our placement with upstream deepseek in the same run")
    pe.add_argument("--plan-stats", nargs="+", default=None,
                    help="logical_count files (.json/.pt) or ours (.npz); default: shared DeepSeek-V3 counts")
    pe.add_argument("--eval-stats", nargs="+", default=None, help="held-out files; default leave-one-window-out")
    pe.add_argument("--source-skew", type=float, default=0.5, help="routing model source skew (0..1)")
    pe.add_argument("--tokens-per-source", type=float, default=20000.0, help="tokens per source per sampled window")
    pe.add_argument("--seed", type=int, default=0)
    pe.add_argument("--lift", type=float, default=None,
                    help="routing model inter-layer lift on preferred successors (default 1.6, Mixtral-calibrated)")
    pe.add_argument("--json", action="store_true", help="print one JSON object")
    _common(pe)
    pp = sub.add_parser("plan", help="write a placement file for upstream --init-expert-location")
    pp.add_argument("--stats", nargs="+", required=True, help="statistics files, oldest first")
    pp.add_argument("--out", required=True, help=".json or .pt with physical_to_logical_map")
    pp.add_argument("--prev", default=None, help="current placement file (keeps migration low)")
    _common(pp)
    args = parser.parse_args(argv)
    try:
        config = load_config().tier("expert")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.cmd == "plan":
        num_logical = load_window(args.stats[0]).source_counts.shape[3]
        placement = plan(args.stats, args.out, num_logical + args.redundant, args.num_ranks, args.num_nodes,
                         config, args.prev)
        print(json.dumps({"out": args.out, "layers": int(placement.phy2log.shape[0]),
                          "num_physical_experts": int(placement.phy2log.shape[1])}))
        return 0
    files = args.plan_stats or deepseek_count_files()
    if not files:
        print("error: no statistics: pass --plan-stats FILES (../shared/data or TIERSCHED_SHARED_DATA not found).",
              file=sys.stderr)
        return 2
    num_logical = load_window(files[0]).source_counts.shape[3]
    result = evaluate(files, args.eval_stats, num_logical + args.redundant, args.num_ranks, args.num_nodes, config,
                      args.source_skew, args.seed, args.tokens_per_source, args.lift)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
