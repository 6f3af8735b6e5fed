"""Multi-scale deformable attention (Deformable-DETR argument convention and semantics).

Each query, per head, bilinearly samples `P` points on each of `L` feature levels of `value`
(`align_corners=False`: pixel = loc * W - 0.5; corners outside a map read zero) and returns the
attention-weighted sum of the samples. The PyTorch reference uses `F.grid_sample` per level; the
Triton kernels (`ms_deform_attn_triton.py`) compute the same thing with fp32 accumulation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rlipv2_scale.errors import UserError
from rlipv2_scale.kernels.dispatch import forced_choice, resolve_backend, table_choice

MSDA_BACKWARDS = ("atomic", "dense_coarse")  # the Triton backward variants (ms_deform_attn_triton.py)


def _check_shapes(value: torch.Tensor, value_spatial_shapes: torch.Tensor, value_level_start_index: torch.Tensor,
                  sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> None:
    if value.dim() != 4:
        raise UserError(f"ms_deform_attn: value must be [N, S, M, D], got shape {tuple(value.shape)}")
    n, s, m, _ = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise UserError("ms_deform_attn: sampling_locations must be [N, Lq, M, L, P, 2], "
                        f"got shape {tuple(sampling_locations.shape)}")
    nl, lq, ml, levels, points, _ = sampling_locations.shape
    if (nl, ml) != (n, m):
        raise UserError(f"ms_deform_attn: sampling_locations batch/heads {(nl, ml)} do not match value's {(n, m)}")
    if tuple(attention_weights.shape) != (n, lq, m, levels, points):
        raise UserError(f"ms_deform_attn: attention_weights must be {(n, lq, m, levels, points)}, "
                        f"got {tuple(attention_weights.shape)}")
    if tuple(value_spatial_shapes.shape) != (levels, 2) or tuple(value_level_start_index.shape) != (levels,):
        raise UserError(f"ms_deform_attn: value_spatial_shapes must be [{levels}, 2] and value_level_start_index "
                        f"[{levels}], got {tuple(value_spatial_shapes.shape)} and "
                        f"{tuple(value_level_start_index.shape)}")
    if value_spatial_shapes.is_cuda:  # the sum below would cost a device sync on every call
        return
    total = int((value_spatial_shapes[:, 0] * value_spatial_shapes[:, 1]).sum())
    if total != s:
        raise UserError(f"ms_deform_attn: the levels hold sum(H*W) = {total} tokens but value has S = {s}")


def ms_deform_attn_reference(value: torch.Tensor, value_spatial_shapes: torch.Tensor,
                             value_level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
                             attention_weights: torch.Tensor) -> torch.Tensor:
    """PyTorch reference: `F.grid_sample` per level, then the weighted sum. Returns [N, Lq, M*D].

    Mixed dtypes (e.g. bf16 values with fp32 locations under autocast) are computed in the
    promoted dtype, so locations never lose precision, and returned in value's dtype.
    """
    n, _, m, d = value.shape
    _, lq, _, levels, points, _ = sampling_locations.shape
    dtype = torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype), attention_weights.dtype)
    out_dtype = value.dtype
    value, sampling_locations, attention_weights = (t.to(dtype) for t in (value, sampling_locations,
                                                                          attention_weights))
    grids = 2 * sampling_locations - 1  # grid_sample's [-1, 1] convention
    samples = []
    for lvl, ((h, w), start) in enumerate(zip(value_spatial_shapes.tolist(), value_level_start_index.tolist())):
        value_l = value[:, start:start + h * w].permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        grid_l = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # [N*M, Lq, P, 2]
        samples.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, levels * points)
    out = (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1)  # [N*M, D, Lq]
    return out.view(n, m * d, lq).transpose(1, 2).contiguous().to(out_dtype)


def ms_deform_attn(value: torch.Tensor, value_spatial_shapes: torch.Tensor, value_level_start_index: torch.Tensor,
                   sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                   backend: str = "auto", backward: str | None = None) -> torch.Tensor:
    """Multi-scale deformable attention.

    value [N, S, M, D]; value_spatial_shapes [L, 2] long (H, W); value_level_start_index [L] long;
    sampling_locations [N, Lq, M, L, P, 2] in [0, 1] (x, y); attention_weights [N, Lq, M, L, P].
    Returns [N, Lq, M*D] in value's dtype. `backend`: "auto" | "triton" | "torch" (see dispatch.py).
    `backward`: the Triton backward variant, "atomic" | "dense_coarse" (None: the dispatch
    table's choice on CUDA, "atomic" elsewhere).
    """
    _check_shapes(value, value_spatial_shapes, value_level_start_index, sampling_locations, attention_weights)
    if backward is not None and backward not in MSDA_BACKWARDS:
        raise UserError(f"ms_deform_attn: backward {backward!r} is unknown; use one of {', '.join(MSDA_BACKWARDS)}")
    if backend == "auto" and forced_choice("ms_deform_attn") == "torch":  # an `override` to the reference
        backend = "torch"
    resolved = resolve_backend(backend, value, sampling_locations, attention_weights)
    if resolved == "triton" and backward is None:
        choice = table_choice("ms_deform_attn", value, sampling_locations.shape[1]) if value.is_cuda else "atomic"
        backward = choice if choice in MSDA_BACKWARDS else "atomic"
    if resolved == "torch":
        return ms_deform_attn_reference(value, value_spatial_shapes, value_level_start_index,
                                        sampling_locations, attention_weights)
    from rlipv2_scale.kernels.ms_deform_attn_triton import MSDeformAttnFunction
    return MSDeformAttnFunction.apply(value, value_spatial_shapes, value_level_start_index,
                                      sampling_locations, attention_weights, backward)
