"""Request-tier benchmark (issue 3). Same as `python -m tiersched.bench request-tier`; kept here so
`python benchmark/request_tier_bench.py --json` works from a checkout."""
import argparse
import sys

from tiersched.bench import request as request_tier

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=request_tier.__doc__.splitlines()[0])
    request_tier.add_arguments(parser)
    sys.exit(request_tier.main(parser.parse_args()))
