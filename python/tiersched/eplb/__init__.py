"""Offline expert-tier tools: `python -m tiersched.eplb plan|evaluate` (see docs/expert-tier.md).

Unlike tiersched.core, this package may import torch and sglang: `baseline` calls upstream's own DeepSeek EPLB
and `plan --format pt` writes a torch file."""
