"""`python -m tiersched.patches {check,list,fingerprint TARGET...,update}` — see tiersched.patches and docs/rebase.md."""
from __future__ import annotations

import argparse
import re
import sys

from tiersched.patches import ManifestError, check, fingerprint, load_manifest, patches_dir


def _update(write: bool) -> int:
    """Print (or with --write, apply) new fingerprints for rows whose upstream source changed."""
    import glob
    import os

    changed = 0
    for path in sorted(glob.glob(os.path.join(patches_dir(), "*.toml"))):
        text = open(path).read()
        for row in [r for r in load_manifest() if r.source_file == os.path.basename(path)]:
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
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", help="verify every manifest target exists with its fingerprint; exit 1 otherwise")
    sub.add_parser("list", help="print the manifest")
    fp = sub.add_parser("fingerprint", help="print the fingerprint of upstream targets")
    fp.add_argument("targets", nargs="+")
    up = sub.add_parser("update", help="recompute fingerprints after a reviewed pin bump")
    up.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "fingerprint":
            for t in args.targets:
                print(f"{t} {fingerprint(t)}")
            return 0
        if args.cmd == "list":
            for r in load_manifest():
                print(f"{r.hook:8s} {r.target}  [{r.source_file}] {r.purpose}")
            return 0
        if args.cmd == "update":
            return _update(args.write)
        result = check()
    except ManifestError as exc:
        print(f"patches: {exc}", file=sys.stderr)
        return 2
    for line in result.problems:
        print(line)
    print(f"patches check: {len(result.ok)} target(s) match, {len(result.problems)} problem(s)")
    return 1 if result.problems else 0


if __name__ == "__main__":
    sys.exit(main())
