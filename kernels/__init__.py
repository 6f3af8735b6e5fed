"""Triton kernels and their PyTorch references (import path: rlipv2_scale.kernels).

`ms_deform_attn` and `alif_bi_attention` dispatch to Triton on CUDA tensors and to the PyTorch
references elsewhere; `backend="triton" | "torch"` forces either.
"""
from rlipv2_scale.kernels.alif import alif_bi_attention, attention_core_reference
from rlipv2_scale.kernels.dispatch import resolve_backend
from rlipv2_scale.kernels.ms_deform_attn import ms_deform_attn, ms_deform_attn_reference

__all__ = ["alif_bi_attention", "attention_core_reference", "ms_deform_attn", "ms_deform_attn_reference",
           "resolve_backend"]
