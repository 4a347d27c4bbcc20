"""Expert tier (EPLB): where each MoE expert's replicas live, knowing which DP rank sends tokens to which expert."""
