"""Box utilities: (cx, cy, w, h) <-> (x1, y1, x2, y2), IoU and generalised IoU.

Pairwise (matrix) versions come from `torchvision.ops`; the element-wise versions are ours because
the losses compare matched boxes row by row, and a full [N, N] matrix only to read its diagonal
would waste memory quadratic in the number of matched pairs.
"""
from __future__ import annotations

import torch
from torchvision.ops import box_convert, box_iou, generalized_box_iou

__all__ = [
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "box_iou",
    "generalized_box_iou",
    "paired_box_iou",
    "paired_generalized_box_iou",
]


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    return box_convert(boxes, "cxcywh", "xyxy")


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    return box_convert(boxes, "xyxy", "cxcywh")


def _paired_inter_union(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter, area_a + area_b - inter


def paired_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of a[i] with b[i] (xyxy, same shape [..., 4]) -> [...]."""
    inter, union = _paired_inter_union(a, b)
    return inter / union


def paired_generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generalised IoU of a[i] with b[i] (xyxy, same shape [..., 4]) -> [...] in [-1, 1]."""
    inter, union = _paired_inter_union(a, b)
    iou = inter / union
    lt = torch.minimum(a[..., :2], b[..., :2])
    rb = torch.maximum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / hull
