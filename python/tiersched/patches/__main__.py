"""`python -m tiersched.patches {check,list,fingerprint TARGET...,update} [--patches-dir DIR]` — see tiersched.patches
and docs/rebase.md."""
from __future__ import annotations

import argparse
import glob
import os
import re
import sys

from tiersched.patches import ManifestError, check, fingerprint, load_manifest, patches_dir


def _update(write: bool, directory: str) -> int:
    """Print (or with --write, apply) new fingerprints for rows whose upstream source changed."""
    rows = load_manifest(directory)
    changed = 0
    for path in sorted(glob.glob(os.path.join(directory, "*.toml"))):
        text = open(path).read()
        for row in [r for r in rows if r.source_file == os.path.basename(path)]:
            try:
                new = fingerprint(row.target)
            except Exception as exc:
                print(f"MISSING  {row.target}: {exc}")
                continue
            if new != row.fingerprint:
                changed += 1
                print(f"{row.target}: {row.fingerprint or '(empty)'} -> {new}")
                pattern = re.compile(r'(target\s*=\s*"' + re.escape(row.target) + r'"[^\[]*?fingerprint\s*=\s*)"[^"]*"', re.S)
                text = pattern.sub(lambda m: m.group(1) + f'"{new}"', text, count=1)
        if write:
            open(path, "w").write(text)
    print(f"{changed} fingerprint(s) {'updated' if write else 'differ (use --write to apply)'}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tiersched.patches", description=__doc__)
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--patches-dir", metavar="DIR",
                       help="the repository's patches/ folder (default: $TIERSCHED_PATCHES_DIR, else the source "
                            "checkout this package is imported from)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", parents=[where],
                   help="verify every manifest target exists with its fingerprint; exit 1 otherwise")
    sub.add_parser("list", parents=[where], help="print the manifest")
    fp = sub.add_parser("fingerprint", help="print the fingerprint of upstream targets")
    fp.add_argument("targets", nargs="+")
    up = sub.add_parser("update", parents=[where], help="recompute fingerprints after a reviewed pin bump")
    up.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "fingerprint":
            for t in args.targets:
                print(f"{t} {fingerprint(t)}")
            return 0
        directory = patches_dir(args.patches_dir)
        if args.cmd == "list":
            for r in load_manifest(directory):
                print(f"{r.hook:8s} {r.target}  [{r.source_file}] {r.purpose}")
            return 0
        if args.cmd == "update":
            return _update(args.write, directory)
        result = check(directory=directory)
    except ManifestError as exc:
        print(f"patches: {exc}", file=sys.stderr)
        return 2
    for line in result.problems:
        print(line)
    print(f"patches check: {len(result.ok)} target(s) match, {len(result.problems)} problem(s)")
    return 1 if result.problems else 0


if __name__ == "__main__":
    sys.exit(main())
