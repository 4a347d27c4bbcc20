"""Pure policies over small typed snapshots. Nothing here imports sglang or torch (a test enforces it), so
the simulator and the SGLang adapters run exactly the same objects."""
