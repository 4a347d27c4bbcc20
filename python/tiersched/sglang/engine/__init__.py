"""Engine-tier adapter: `--load-balance-method score` in upstream's DP controller."""
