"""Measurements on a real forward/backward: FLOPs (torch's flop counter) and activation bytes.

Activation bytes are the tensors autograd saves for the backward, counted once each through
`saved_tensors_hooks` (parameters and the inputs themselves excluded): the memory a micro-batch
holds between its forward and backward, independent of the device.
"""
from __future__ import annotations

from typing import Callable

import torch


def count_flops(step: Callable[[], torch.Tensor]) -> int:
    """FLOPs of `step()` (forward returning a scalar loss) plus its backward, counted as the trainer
    counts them (`train.telemetry.count_flops`)."""
    from rlipv2_scale.train.telemetry import count_flops as count

    return count(lambda: step().backward())


def activation_bytes(step: Callable[[], torch.Tensor], exclude: list[torch.Tensor] | None = None) -> int:
    """Bytes of distinct tensors saved for backward during `step()` (a forward returning a loss)."""
    skip = {t.untyped_storage().data_ptr() for t in (exclude or []) if t.device.type != "meta"}
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor):
        if t.device.type != "meta":
            storage = t.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key[0] not in skip and key not in seen:
                seen[key] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return sum(seen.values())
