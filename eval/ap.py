"""Average precision as the community evaluators compute it.

`eleven_point_ap` is the VOC2007 11-point interpolation of the QPIC-family HICO-DET and the
RLIPv2 Open Images evaluators. Their thresholds are `numpy.arange(0, 1.1, 0.1)`, which are not the
decimals they print as (0.30000000000000004, 0.6000000000000001, 0.7000000000000001): a recall of
exactly 3/10 does *not* reach the "0.3" point. The default keeps that, because published numbers
were computed with it; `exact_thresholds=True` (the strict protocol) uses k/10.

`area_ap` is the VOC2010+ area under the interpolated precision envelope used by the official
V-COCO toolkit.
"""
from __future__ import annotations

import numpy as np

ARANGE_THRESHOLDS = np.arange(0.0, 1.1, 0.1)
EXACT_THRESHOLDS = np.arange(11) / 10.0


def eleven_point_ap(rec: np.ndarray, prec: np.ndarray, *, exact_thresholds: bool = False) -> float:
    """rec must be non-decreasing (a cumulative recall curve)."""
    thresholds = EXACT_THRESHOLDS if exact_thresholds else ARANGE_THRESHOLDS
    if len(rec) == 0:
        return 0.0
    # max precision over {rec >= t} is a suffix maximum because rec is sorted
    suffix_max = np.maximum.accumulate(prec[::-1])[::-1]
    first = np.searchsorted(rec, thresholds, side="left")
    ap = 0.0
    for i in first.tolist():  # sequential sum, in the reference's order, for bit-equal results
        ap = ap + (suffix_max[i] if i < len(rec) else 0) / 11.0
    return float(ap)


def area_ap(rec: np.ndarray, prec: np.ndarray) -> float:
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))
