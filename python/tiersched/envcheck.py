"""`python -m tiersched.envcheck [--cpu]`: is this environment what tiersched needs? One sentence per problem.

Used by scripts/setup.sh after installing (a CPU install must not have pulled any CUDA package) and by users
debugging a GPU install.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import sys

from tiersched import SGLANG_PIN

CUDA_PREFIXES = ("nvidia-", "triton", "flashinfer", "sglang-kernel", "cuda-")


def problems(installed: dict[str, str], cpu: bool) -> list[str]:
    """installed: distribution name (lower case) -> version."""
    found = []
    sglang = installed.get("sglang")
    if sglang is None:
        found.append(f"sglang is not installed; run `bash scripts/setup.sh` (CPU) or `pip install -e .` (GPU).")
    elif sglang != SGLANG_PIN:
        found.append(f"sglang {sglang} is installed but tiersched is pinned to {SGLANG_PIN}; reinstall sglang=={SGLANG_PIN}.")
    if cpu:
        cuda = sorted(n for n in installed if n.startswith(CUDA_PREFIXES))
        if cuda:
            found.append(f"this CPU environment contains CUDA packages ({', '.join(cuda)}); delete .venv and run "
                         f"`bash scripts/setup.sh`, which pins the CPU torch with a constraints file.")
        torch = installed.get("torch")
        if torch is not None and not torch.endswith("+cpu"):
            found.append(f"torch {torch} is not a CPU build; delete .venv and run `bash scripts/setup.sh`.")
    return found


def installed_distributions() -> dict[str, str]:
    return {d.metadata["Name"].lower(): d.version for d in md.distributions() if d.metadata["Name"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tiersched.envcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="also require a CPU-only environment")
    args = parser.parse_args(argv)
    found = problems(installed_distributions(), cpu=args.cpu)
    for line in found:
        print(f"tiersched: {line}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
