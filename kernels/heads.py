"""Head split / merge of attention inputs, shared by the PyTorch (`alif.py`) and Triton
(`alif_triton.py`) ALIF paths."""
from __future__ import annotations

import torch


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, N, H*hd] -> [B, H, N, hd] (a view)."""
    b, n, c = x.shape
    return x.view(b, n, num_heads, c // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, hd] -> [B, N, H*hd]."""
    b, h, n, hd = x.shape
    return x.transpose(1, 2).reshape(b, n, h * hd)
