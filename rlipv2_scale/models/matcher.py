"""Hungarian matching between predicted (subject, object, relation) pairs and ground-truth pairs.

Per image, a [P, n] cost matrix between the P predicted pairs and the n ground-truth pairs is
solved with `scipy.optimize.linear_sum_assignment` (the original's `models/matcher.py: HungarianMatcherHOI`):

    C = w_cls·(-p_sub[gt_sub]) + w_cls·(-p_obj[gt_obj]) + w_rel·C_rel + w_bbox·C_L1 + w_giou·C_GIoU

C_rel is the QPIC-style relation cost (mean of the positive-recall and negative-recall of the
sigmoid probabilities); the box costs take the worse of the subject and the object box. An
all-zero ground-truth object box means "no object" (V-COCO): its L1 term is dropped and its GIoU
term becomes -GIoU(b_obj, 0) - GIoU(b_sub, g_sub), as in the original.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from rlipv2_scale.data.batch import Target
from rlipv2_scale.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from rlipv2_scale.models.outputs import RelationPredictions

# Stands in for non-finite costs so that scipy still returns an assignment; the loss of such a
# step is non-finite anyway and the trainer skips it.
_NON_FINITE_COST = 1e8

Indices = list[tuple[torch.Tensor, torch.Tensor]]


def relation_cost(prob: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """QPIC relation cost: -(recall of positives + recall of negatives) / 2.

    prob [P, L] sigmoid probabilities, labels [n, L] multi-hot -> [P, n].
    """
    pos = prob @ labels.T / (labels.sum(dim=1)[None, :] + 1e-4)
    neg = (1 - prob) @ (1 - labels).T / ((1 - labels).sum(dim=1)[None, :] + 1e-4)
    return -(pos + neg) / 2


class HungarianMatcher(nn.Module):
    """One-to-one assignment of predicted pairs to ground-truth pairs, image by image, in fp32."""

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_rel: float = 1.0,
        cost_bbox: float = 2.5,
        cost_giou: float = 1.0,
        subject_class: bool = True,
    ):
        super().__init__()
        if cost_class == 0 and cost_rel == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all cost weights are 0; at least one must be non-zero")
        self.cost_class = cost_class
        self.cost_rel = cost_rel
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.subject_class = subject_class

    @torch.no_grad()
    def costs(self, outputs: RelationPredictions | dict, b: int, target: Target) -> dict[str, torch.Tensor]:
        """Every cost term of image b as [P, n] fp32 tensors, plus the total under "total"."""
        outputs = RelationPredictions.of(outputs)
        sub_boxes = outputs.pred_sub_boxes[b].float()
        obj_boxes = outputs.pred_obj_boxes[b].float()
        rel_logits = outputs.pred_rel_logits[b].float()
        labels = target.rel_labels.to(rel_logits)
        if labels.shape[-1] != rel_logits.shape[-1]:
            raise ValueError(
                f"image {target.image_id}: rel_labels has {labels.shape[-1]} relation columns but the "
                f"model scored {rel_logits.shape[-1]} relation texts; targets and outputs must use the "
                "same batch label sequence"
            )
        gt_sub = target.sub_boxes.to(sub_boxes)
        gt_obj = target.obj_boxes.to(obj_boxes)
        has_obj = (gt_obj != 0).any(dim=1)[None, :]

        c = {}
        c["class_obj"] = -outputs.pred_obj_logits[b].float().softmax(-1)[:, target.obj_labels]
        if self.subject_class:
            c["class_sub"] = -outputs.pred_sub_logits[b].float().softmax(-1)[:, target.sub_labels]
        c["rel"] = relation_cost(rel_logits.sigmoid(), labels)
        c["bbox_sub"] = torch.cdist(sub_boxes, gt_sub, p=1)
        c["bbox_obj"] = torch.cdist(obj_boxes, gt_obj, p=1) * has_obj
        c["bbox"] = torch.maximum(c["bbox_sub"], c["bbox_obj"])
        c["giou_sub"] = generalized_box_iou(box_cxcywh_to_xyxy(sub_boxes), box_cxcywh_to_xyxy(gt_sub))
        c["giou_obj"] = generalized_box_iou(box_cxcywh_to_xyxy(obj_boxes), box_cxcywh_to_xyxy(gt_obj))
        # The original's form: without an object box, the object term is -GIoU(b_obj, 0) - GIoU_sub,
        # which is never below the subject term.
        c["giou"] = torch.maximum(-c["giou_sub"], -c["giou_obj"] - c["giou_sub"] * ~has_obj)
        total = (
            self.cost_class * c["class_obj"]
            + self.cost_rel * c["rel"]
            + self.cost_bbox * c["bbox"]
            + self.cost_giou * c["giou"]
        )
        if self.subject_class:
            total = total + self.cost_class * c["class_sub"]
        c["total"] = total
        return c

    @torch.no_grad()
    def forward(
        self, outputs: RelationPredictions | dict, targets: list[Target], return_costs: bool = False
    ) -> Indices | tuple[Indices, list[dict[str, torch.Tensor]]]:
        """-> per image (pred_idx, tgt_idx) int64 CPU tensors, sorted by pred_idx.

        `outputs`: one decoder layer's predictions (or a dict with their field names). With
        `return_costs`, also the per-image cost terms of `costs`.
        """
        outputs = RelationPredictions.of(outputs)
        if len(targets) != outputs.pred_sub_boxes.shape[0]:
            raise ValueError(
                f"{len(targets)} targets for a batch of {outputs.pred_sub_boxes.shape[0]} images"
            )
        all_costs = [self.costs(outputs, b, t) for b, t in enumerate(targets)]
        # One device->host copy for the whole batch instead of one per image.
        totals = torch.cat([c["total"] for c in all_costs], dim=1).cpu().numpy()
        totals = np.nan_to_num(totals, nan=_NON_FINITE_COST, posinf=_NON_FINITE_COST, neginf=-_NON_FINITE_COST)
        indices: Indices = []
        start = 0
        for t in targets:
            n = t.sub_boxes.shape[0]
            rows, cols = linear_sum_assignment(totals[:, start:start + n])
            start += n
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return (indices, all_costs) if return_costs else indices
