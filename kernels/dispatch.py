"""One dispatch point for every kernel: which implementation runs a call.

`backend="auto"` runs the PyTorch paths on CPU tensors; on CUDA tensors it runs the choice that
the benchmark measured fastest on this kind of GPU for the call's compute dtype and size, read
from `dispatch_table.json` (written by `rlipv2 bench kernels --write-table`, see `table_choice`;
the environment variable RLIPV2_DISPATCH_TABLE names another table, as benchmarks/gpu/run_all.sh
does with the one it has just measured), or `DEFAULT_CHOICES` for a GPU the table does not name.
`"torch"` forces the PyTorch path; `"triton"` forces the kernels (on CPU only under
`TRITON_INTERPRET=1`, the Triton interpreter the tests use) and fails loudly when they cannot run.
`override` forces what "auto" picks (the training-step benchmark runs the same model on the
references that way).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import math
import os
from pathlib import Path

import torch

from rlipv2_scale.errors import UserError

BACKENDS = ("auto", "triton", "torch")
TABLE_PATH = Path(__file__).with_name("dispatch_table.json")
TABLE_ENV = "RLIPV2_DISPATCH_TABLE"
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}

# What "auto" picks on a GPU the table does not name, per op and compute dtype, as
# ((largest token count, choice), ...) in increasing order (the last bound is open). They follow
# the one H100 run that timed every path (benchmarks/results/gpu/README.md, run 2): ALIF in 16-bit
# ran fastest on SDPA at the original's 273 image tokens and on the fused block over all levels
# (22,223); in fp32 the fused block was 7x slower than eager PyTorch over all levels and SDPA 2x,
# so fp32 stays eager. ms_deform_attn: Triton with the atomic backward, the one measured.
DEFAULT_CHOICES = {
    "alif_bi_attention": {"fp16": ((2048, "torch"), (math.inf, "triton")),
                          "bf16": ((2048, "torch"), (math.inf, "triton")),
                          "fp32": ((math.inf, "eager"),), "fp64": ((math.inf, "eager"),)},
    "ms_deform_attn": {dt: ((math.inf, "atomic"),) for dt in ("fp16", "bf16", "fp32", "fp64")},
}

_overrides: dict[str, str] = {}


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


@functools.lru_cache(maxsize=None)
def device_keys(index: int) -> tuple[str, str]:
    """(device name, capability class such as "sm_90") of a CUDA device: the table's two key kinds."""
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), f"sm_{major}{minor}"


@functools.lru_cache(maxsize=4)
def load_table(path: str | None = None) -> dict:
    """The dispatch table: {"devices": {NAME_OR_CLASS: {op: {dtype: {tokens: choice}}}}}; empty if absent."""
    p = Path(path or os.environ.get(TABLE_ENV) or TABLE_PATH)
    if not p.is_file():
        return {"devices": {}}
    return json.loads(p.read_text())


def _nearest(entry: dict[str, str], tokens: int) -> str:
    """The choice measured at the token count nearest to `tokens` on a log scale."""
    key = min(entry, key=lambda k: abs(math.log(max(int(k), 1)) - math.log(max(tokens, 1))))
    return entry[key]


def table_choice(op: str, t: torch.Tensor, tokens: int) -> str:
    """What "auto" runs for `op` on `t`'s CUDA device at `tokens` (the size the table is keyed by:
    image tokens for ALIF, queries for ms_deform_attn): an `override`, else the table's entry for
    the device name, else for its capability class, else `DEFAULT_CHOICES`."""
    if op in _overrides:
        return _overrides[op]
    dtype = DTYPE_NAMES.get(compute_dtype(t), "fp32")
    devices = load_table()["devices"]
    for key in device_keys(t.device.index if t.device.index is not None else torch.cuda.current_device()):
        entry = devices.get(key, {}).get(op, {}).get(dtype)
        if entry:
            return _nearest(entry, tokens)
    return next(choice for bound, choice in DEFAULT_CHOICES[op][dtype] if tokens <= bound)


def forced_choice(op: str) -> str | None:
    """The choice an `override` forces for `op` (on any device), or None."""
    return _overrides.get(op)


@contextlib.contextmanager
def override(**choices: str):
    """Force what "auto" picks per op, on every device, e.g.
    `override(alif_bi_attention="eager", ms_deform_attn="torch")` (the PyTorch references)."""
    saved = dict(_overrides)
    _overrides.update(choices)
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Return "triton" or "torch" for `backend` and the tensors' device, or raise a UserError.
    "auto" here means Triton on CUDA (the ops refine it with `table_choice`)."""
    if backend not in BACKENDS:
        raise UserError(f"kernel backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}")
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if on_cuda and triton_importable() else "torch"
    if not triton_importable():
        raise UserError("backend='triton' was requested but the `triton` package is not installed; "
                        "install it (pip install triton) or use backend='torch'")
    if not (on_cuda or interpreter_enabled()):
        raise UserError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before Triton "
                        "is imported, for the CPU interpreter); use backend='torch' or 'auto' on CPU")
    return "triton"
