"""Entry point: `python -m tiersched.bench {compare,sweep,speed,request,engine,expert,plots,live} [--json] ...`.

Each subcommand lives in its own module tiersched.bench.<module> exposing
`add_arguments(parser)` and `main(args) -> int`; modules are imported only when their subcommand runs, so a
slow import (torch, sglang) never taxes the others.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "compare": ("compare", "simulate one scenario under every policy combination (the main job)"),
    "sweep": ("sweep", "simulate a grid of scenarios; resumable; win-share summary"),
    "speed": ("speed", "simulator speed: simulated seconds per wall second"),
    "request": ("request", "request tier: ordering overhead and the mixed-priority scenario"),
    "engine": ("engine", "engine tier: dispatch decision latency and burst balance"),
    "expert": ("expert_recorder", "expert tier: per-source recorder cost per forward pass against upstream's gatherer"),
    "plots": ("plots", "PNG plots: TTFT/TPOT CDFs, per-rank load over time, expert-load heatmap"),
    "live": ("live", "A/B runs on real upstream SGLang servers on this CPU"),
    "serving-ab": ("serving_ab", "A/B table (ratios, bootstrap CIs) from sglang.bench_serving --output-file results"),
    "lockstep": ("lockstep", "lockstep step plan vs upstream's best chunk size, perfect-balance and lockstep-free bounds"),
}
# Earlier names of the tier subcommands, kept so scripts and documented checks keep working.
ALIASES = {"request-tier": "request", "dispatch": "engine"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m tiersched.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    name, rest = ALIASES.get(argv[0], argv[0]), argv[1:]
    if name not in SUBCOMMANDS:
        parser.error(f"unknown subcommand {name!r}; choose one of {', '.join(SUBCOMMANDS)}")
    module = importlib.import_module(f"tiersched.bench.{SUBCOMMANDS[name][0]}")
    sub_parser = argparse.ArgumentParser(prog=f"python -m tiersched.bench {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(sub_parser)
    try:
        return int(module.main(sub_parser.parse_args(rest)) or 0)
    except ValueError as exc:
        from tiersched.traces import TraceError

        if not isinstance(exc, TraceError):
            raise
        # a user's trace file is malformed: one line naming file, line and field, before anything is simulated
        print(f"python -m tiersched.bench {name}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
