"""Multi-scale deformable attention (Deformable-DETR) and the encoder / decoder layers built on it.

The sampling itself is `rlipv2_scale.kernels.ms_deform_attn` (Triton on CUDA, `grid_sample`
reference elsewhere); this module owns the projections. Layers are post-norm, as the original.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from rlipv2_scale.kernels import ms_deform_attn


class MSDeformAttn(nn.Module):
    """Per query, head, level: `n_points` sampling offsets and softmaxed weights predicted from the query.

    Reference points are 2-d (x, y) — offsets are in pixels of each level — or 4-d boxes
    (cx, cy, w, h) — offsets are fractions of half the box.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.sampling_offsets.weight)
        # initial offsets point radially outwards, one direction per head, growing with the point index
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, value_in: torch.Tensor,
                spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """query [N,Lq,C]; reference_points [N,Lq,L,2|4] in [0,1]; value_in [N,S,C]; padding_mask [N,S] (True = pad)."""
        n, lq, _ = query.shape
        s = value_in.shape[1]
        value = self.value_proj(value_in)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(n, s, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(n, lq, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(n, lq, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(n, lq, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:
            normaliser = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1).to(offsets.dtype)
            locations = reference_points[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"reference_points must end in 2 or 4, got {tuple(reference_points.shape)}")
        with record_function("ms_deform_attn"):
            out = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
        return self.output_proj(out)


class DeformableEncoderLayer(nn.Module):
    """x = LN(x + MSDA(x + pos)); x = LN(x + FFN(x))."""

    def __init__(self, d_model: int, ffn_dim: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        for lin in (self.linear1, self.linear2):
            nn.init.xavier_uniform_(lin.weight)

    @staticmethod
    def reference_points(spatial_shapes: torch.Tensor, valid_ratios: torch.Tensor) -> torch.Tensor:
        """Pixel centres of every level, normalised by the valid extent, seen on every level: [B,S,L,2]."""
        refs = []
        device = valid_ratios.device
        for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
            ys, xs = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, dtype=valid_ratios.dtype, device=device),
                                    torch.linspace(0.5, w - 0.5, w, dtype=valid_ratios.dtype, device=device),
                                    indexing="ij")
            ys = ys.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
            xs = xs.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            refs.append(torch.stack((xs, ys), -1))
        ref = torch.cat(refs, 1)
        return ref[:, :, None] * valid_ratios[:, None]

    def forward(self, src: torch.Tensor, pos: torch.Tensor, reference_points: torch.Tensor,
                spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                padding_mask: torch.Tensor | None) -> torch.Tensor:
        src = self.norm1(src + self.dropout1(self.self_attn(src + pos, reference_points, src, spatial_shapes,
                                                            level_start_index, padding_mask)))
        return self.norm2(src + self.dropout3(self.linear2(self.dropout2(F.relu(self.linear1(src))))))


class DeformableDecoderLayer(nn.Module):
    """h = LN2(h + SelfAttn(h + pos)); h = LN1(h + MSDA(h + pos, memory)); h = LN3(h + FFN(h))."""

    def __init__(self, d_model: int, ffn_dim: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)
        for lin in (self.linear1, self.linear2):
            nn.init.xavier_uniform_(lin.weight)

    def forward(self, tgt: torch.Tensor, pos: torch.Tensor, reference_points: torch.Tensor, memory: torch.Tensor,
                spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                memory_padding_mask: torch.Tensor | None, self_attn_mask: torch.Tensor | None = None,
                query_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`self_attn_mask` [Nq,Nq] or [B*heads,Nq,Nq] bool (True = blocked); `query_padding_mask` [B,Nq]."""
        q = k = tgt + pos
        attn = self.self_attn(q, k, tgt, attn_mask=self_attn_mask, key_padding_mask=query_padding_mask,
                              need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attn))
        attn = self.cross_attn(tgt + pos, reference_points, memory, spatial_shapes, level_start_index,
                               memory_padding_mask)
        tgt = self.norm1(tgt + self.dropout1(attn))
        return self.norm3(tgt + self.dropout4(self.linear2(self.dropout3(F.relu(self.linear1(tgt))))))
