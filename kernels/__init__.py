"""Triton kernels, installed as `neon_scale.kernels`. Each has a pure-torch reference beside it."""
