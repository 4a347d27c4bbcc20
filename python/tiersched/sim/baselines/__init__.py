"""Faithful re-implementations of upstream's policies over tiersched's snapshots, one module per tier.

Each class names the upstream function it mirrors (SGLang 0.5.23, vLLM for its DP balancer); they implement the
same protocols as tiersched's own policies (tiersched.core.*), so the simulator swaps them freely.
"""
