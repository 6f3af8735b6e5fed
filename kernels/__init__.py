"""Triton kernels and their PyTorch references (import path: rlipv2_scale.kernels)."""
