"""`python -m tiersched.live.bench_serving_gate GATE ARGS...`: upstream's `sglang.bench_serving` CLI behind a start gate.

Importing SGLang takes a bench_serving process tens of seconds on a loaded 2-core machine, longer than a small
run lasts, so two streams started together would measure different windows. This runs the same CLI
(`sglang.benchmark.serving.cli_main`, what `python -m sglang.bench_serving` calls) with ARGS as its command line,
after its imports are done and the file GATE exists: it writes `GATE.ready.<pid>` once imported and waits (at most
GATE_TIMEOUT_S) for the caller to create GATE, which the caller does when every stream is ready.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

GATE_TIMEOUT_S = 600.0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    gate, args = Path(argv[0]), argv[1:]
    from sglang.benchmark.serving import cli_main

    Path(f"{gate}.ready.{os.getpid()}").touch()
    deadline = time.monotonic() + GATE_TIMEOUT_S
    while not gate.exists():
        if time.monotonic() > deadline:
            print(f"start gate {gate} not opened within {GATE_TIMEOUT_S:.0f} s", file=sys.stderr)
            return 3
        time.sleep(0.01)
    sys.argv = ["sglang.bench_serving", *args]
    cli_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
