"""Adapters: the only place tiersched touches SGLang. One module per upstream seam; policy stays in tiersched.core."""
