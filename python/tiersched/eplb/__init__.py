"""Offline expert-tier tools: `python -m tiersched.eplb plan|evaluate` (see docs/expert-tier.md).

Unlike tiersched.core, this package may import torch and sglang: `evaluate` runs upstream's own DeepSeek EPLB
(tiersched.sim.upstream_eplb) next to ours, and `plan` writes a torch file when the output ends in .pt."""
