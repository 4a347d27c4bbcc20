"""`python -m tiersched.bench SUBCOMMAND`: simulator comparisons and sweeps, micro-benchmarks, live runs."""
