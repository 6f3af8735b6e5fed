"""Box overlap as the community relation evaluators compute it (numpy, float64, xyxy pixels).

`pixel_iou` is the QPIC-family `compute_IOU`: areas use the +1-pixel convention
(`(x2 - x1 + 1) * (y2 - y1 + 1)`), but the "do they intersect" test has no +1, so boxes that only
touch, and zero-width boxes, overlap 0 rather than a small positive value. The arithmetic is done
in the reference's order so the values are bit-identical. `continuous_iou` is the plain IoU of real
coordinates used by the strict protocol.
"""
from __future__ import annotations

import numpy as np


def pixel_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise IoU of a[..., 4] (ground truth) and b[..., 4] (prediction)."""
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    y1 = np.maximum(a[..., 1], b[..., 1])
    y2 = np.minimum(a[..., 3], b[..., 3])
    x1 = np.maximum(a[..., 0], b[..., 0])
    x2 = np.minimum(a[..., 2], b[..., 2])
    hit = (y1 < y2) & (x1 < x2)
    inter = (y2 - y1 + 1) * (x2 - x1 + 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / ((area_a + area_b) - inter)
    return np.where(hit, iou, 0.0)


def continuous_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    area_a = np.clip(a[..., 2] - a[..., 0], 0, None) * np.clip(a[..., 3] - a[..., 1], 0, None)
    area_b = np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)
    w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = w * h
    union = area_a + area_b - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def pairwise_pixel_iou(boxes: np.ndarray) -> np.ndarray:
    """[n, n] IoU with the +1 convention on every term (the NMS of the same evaluators); element
    [i, j] is computed exactly as the original computes box i against box j."""
    x1, y1, x2, y2 = (boxes[:, k] for k in range(4))
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    w = np.maximum(0.0, np.minimum(x2[:, None], x2[None]) - np.maximum(x1[:, None], x1[None]) + 1)
    h = np.maximum(0.0, np.minimum(y2[:, None], y2[None]) - np.maximum(y1[:, None], y1[None]) + 1)
    inter = w * h
    with np.errstate(divide="ignore", invalid="ignore"):  # inverted boxes give NaN, as in the original
        return inter / (area[:, None] + area[None] - inter)
