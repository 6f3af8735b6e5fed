"""Triplet (pairwise) NMS of the QPIC-family post-processing (`--use_nms_filter`).

Within one image, candidates are grouped by (subject category, object category, verb) in order of
first appearance; inside a group, going down the scores, a candidate is suppressed when
`IoU_sub ** alpha * IoU_obj ** beta > threshold` against a kept one (IoUs with the +1-pixel
convention). Defaults 0.7 / 1 / 0.5 are the original's. The returned order is the original's too:
groups one after the other, each in its suppression order, which decides ties later on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from rlipv2_scale.eval.boxes import pairwise_pixel_iou


def grouped_nms(group: np.ndarray, overlap: Callable[[np.ndarray], np.ndarray], scores: np.ndarray,
                threshold: float) -> np.ndarray:
    """Greedy NMS inside each group; `overlap(members)[i, j]` is how much member i suppresses member
    j. Returns the kept indices, groups in first-appearance order, each in suppression order (the
    original's)."""
    _, first, inverse = np.unique(group, return_index=True, return_inverse=True)
    by_group = np.argsort(inverse, kind="stable")  # members of a group stay in listed order
    bounds = np.searchsorted(inverse[by_group], np.arange(len(first) + 1))
    kept: list[np.ndarray] = []
    for g in np.argsort(first, kind="stable"):
        members = by_group[bounds[g]:bounds[g + 1]]
        if len(members) == 1:
            kept.append(members)
            continue
        order = scores[members].argsort()[::-1]  # the original's (unstable) order decides equal scores
        ovr = overlap(members)
        keep = []
        while order.size > 0:
            i, rest = order[0], order[1:]
            keep.append(i)
            order = rest[ovr[i, rest] <= threshold]
        kept.append(members[np.asarray(keep, dtype=np.int64)])
    return np.concatenate(kept) if kept else np.zeros(0, np.int64)


@dataclass(frozen=True)
class TripletNMS:
    threshold: float = 0.7
    alpha: float = 1.0
    beta: float = 0.5

    def keep(self, group: np.ndarray, sub_boxes: np.ndarray, obj_boxes: np.ndarray,
             scores: np.ndarray) -> np.ndarray:
        """Indices of the kept candidates, groups in first-appearance order."""
        def overlap(m: np.ndarray) -> np.ndarray:
            return (np.power(pairwise_pixel_iou(sub_boxes[m]), self.alpha)
                    * np.power(pairwise_pixel_iou(obj_boxes[m]), self.beta))
        return grouped_nms(group, overlap, scores, self.threshold)
