"""Hand-written kernels for the fast paths the profile points at (cpu.py: fused float32 CPU ops)."""
