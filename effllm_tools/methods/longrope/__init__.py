"""LongRoPE2 context extension and its baselines (PI, NTK, YaRN, LongRoPE v1)."""
