"""Real-server rig: a tiny Qwen3-MoE generated offline and a bounded upstream `sglang.launch_server` on CPU."""
