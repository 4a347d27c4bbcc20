"""tiersched: request-, engine- and expert-tier scheduling for SGLang MoE serving, as an SGLang plugin.

Layout: `core` (pure policies over small snapshots; imports neither sglang nor torch), `sglang` (adapters,
one module per upstream seam, loaded through SGLang's plugin entry point), `sim` (cluster simulator that
runs the core policies), `bench` (CLI), `eplb` (offline expert-placement planner CLI), `patches` (manifest
check of every upstream target we hook).
"""
__version__ = "0.1.0"
SGLANG_PIN = "0.5.23"
