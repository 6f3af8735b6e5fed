"""One dispatch point for every kernel: Triton on CUDA tensors, the PyTorch reference elsewhere.

`backend="auto"` picks Triton when the inputs live on a CUDA device and Triton imports (and, for a
kernel that names them, the compute dtype is one it is faster in); `"torch"`
forces the reference; `"triton"` forces the kernels (on CPU only under `TRITON_INTERPRET=1`, the
Triton interpreter the tests use) and fails loudly when they cannot run.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

from rlipv2_scale.errors import UserError

BACKENDS = ("auto", "triton", "torch")


@functools.lru_cache(maxsize=1)
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype `t`'s products run in: autocast's on CUDA where it is on, else `t`'s own."""
    if t.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return t.dtype


def resolve_backend(backend: str, *tensors: torch.Tensor, auto_dtypes: tuple[torch.dtype, ...] | None = None) -> str:
    """Return "triton" or "torch" for `backend` and the tensors' device, or raise a UserError.
    `auto_dtypes`: the compute dtypes for which "auto" picks Triton (None: every dtype)."""
    if backend not in BACKENDS:
        raise UserError(f"kernel backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}")
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if auto_dtypes is not None and tensors and compute_dtype(tensors[0]) not in auto_dtypes:
            return "torch"
        return "triton" if on_cuda and triton_importable() else "torch"
    if not triton_importable():
        raise UserError("backend='triton' was requested but the `triton` package is not installed; "
                        "install it (pip install triton) or use backend='torch'")
    if not (on_cuda or interpreter_enabled()):
        raise UserError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before Triton "
                        "is imported, for the CPU interpreter); use backend='torch' or 'auto' on CPU")
    return "triton"
