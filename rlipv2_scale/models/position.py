"""Sine position encodings: 2-D maps for the encoder, 4-D boxes for the DAB decoders."""
from __future__ import annotations

import math

import torch
from torch import nn


class SinePositionEncoding(nn.Module):
    """DETR's 2-D sine encoding of a padded feature map, normalised by the valid (unpadded) extent.

    `offset` is added to the cumulative pixel index before normalising (the Swin runs use -0.5,
    the ResNet runs 0). Output: [B, 2*num_feats, H, W] (y features first, then x).
    """

    def __init__(self, num_feats: int, temperature: float = 10000.0, offset: float = 0.0, eps: float = 1e-6):
        super().__init__()
        self.num_feats = num_feats
        self.temperature = temperature
        self.offset = offset
        self.eps = eps

    def forward(self, mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        not_mask = (~mask).to(dtype)
        y = not_mask.cumsum(1)
        x = not_mask.cumsum(2)
        scale = 2 * math.pi
        y = (y + self.offset) / (y[:, -1:, :] + self.eps) * scale
        x = (x + self.offset) / (x[:, :, -1:] + self.eps) * scale
        dim_t = torch.arange(self.num_feats, dtype=dtype, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_feats)
        pos_x = x[..., None] / dim_t
        pos_y = y[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def box_sine_embedding(boxes: torch.Tensor, num_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """DAB-DETR's encoding of (cx, cy, w, h) boxes in [0, 1]: `num_feats` per coordinate, order (y, x, w, h).

    boxes [..., 4] (or [..., 2] for points: then only (y, x)) -> [..., num_feats * boxes.shape[-1]].
    """
    scale = 2 * math.pi
    dim_t = torch.arange(num_feats, dtype=boxes.dtype, device=boxes.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)

    def embed(coord: torch.Tensor) -> torch.Tensor:
        pos = coord[..., None] * scale / dim_t
        return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)

    parts = [embed(boxes[..., 1]), embed(boxes[..., 0])]
    if boxes.shape[-1] == 4:
        parts += [embed(boxes[..., 2]), embed(boxes[..., 3])]
    return torch.cat(parts, dim=-1)
