"""Post-processing (the original's `models/hoi.py: PostProcessHOI`, `PostProcessSGG`): model outputs -> ranked triplets -> community prediction JSON.

Per predicted pair i and relation text r:

- HOI (human-object interaction): `score = s_rel[i, r] · s_obj[i]`, the subject is the person class;
- SGG (scene graph): `score = s_rel[i, r] · s_obj[i] · s_sub[i]`, the subject keeps its own class,

with `s_rel = sigmoid(rel logits)` and `(s, class) = max(softmax(logits)[..., :-1])` (the last class,
"no objects", is never predicted). Boxes go from normalised cxcywh to absolute xyxy in the
original image. Options: the NF zero-shot filter (keep pairs whose subject is the person class),
a validity mask over (relation, object class) pairs, top-k, and the triplet NMS of the original's
`--use_nms_filter`.

The label space (which object text is which benchmark category, which relation text which verb id,
which (relation, object) combinations are legal, which class is the person) is the evaluators'
`rlipv2_scale.labels.space.LabelSpace`: `hico_label_space()` by default, any other (e.g. a
synthetic one) by constructing it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch

from rlipv2_scale.errors import UserError
from rlipv2_scale.eval.triplet_nms import TripletNMS
from rlipv2_scale.labels.space import LabelSpace, hico_label_space
from rlipv2_scale.models.box_ops import box_cxcywh_to_xyxy
from rlipv2_scale.models.outputs import RelationPredictions


@dataclass
class ImageTriplets:
    """Ranked triplets of one image. Pair i = (sub_boxes[i], obj_boxes[i]); triplet t = (pair
    `pair_index[t]`, relation `rel_index[t]`) with `scores[t]`, sorted by decreasing score."""

    sub_boxes: torch.Tensor     # [P, 4] xyxy, absolute pixels of the original image
    obj_boxes: torch.Tensor     # [P, 4]
    sub_labels: torch.Tensor    # [P] object-text index
    obj_labels: torch.Tensor    # [P]
    sub_scores: torch.Tensor    # [P]
    obj_scores: torch.Tensor    # [P]
    pair_index: torch.Tensor    # [T]
    rel_index: torch.Tensor     # [T]
    scores: torch.Tensor        # [T]

    def __len__(self) -> int:
        return int(self.scores.numel())


def triplet_nms(triplets: ImageTriplets, nms: TripletNMS | None = None) -> ImageTriplets:
    """Within each (subject class, object class, relation) group, drop a triplet when
    IoU_sub^alpha · IoU_obj^beta with a higher-scored kept one exceeds the threshold (the
    evaluators' `TripletNMS`, defaults 0.7 / 1 / 0.5); the survivors stay ranked by score."""
    nms = nms or TripletNMS()
    p, r, s = triplets.pair_index, triplets.rel_index, triplets.scores
    group = np.stack([triplets.sub_labels[p].numpy(), triplets.obj_labels[p].numpy(), r.numpy()], 1)
    group_code = np.unique(group, axis=0, return_inverse=True)[1].reshape(-1)
    keep = nms.keep(group_code, triplets.sub_boxes[p].double().numpy(), triplets.obj_boxes[p].double().numpy(),
                    s.double().numpy())
    order = torch.as_tensor(np.sort(keep), dtype=torch.long)   # back to score order (the input's)
    return ImageTriplets(
        triplets.sub_boxes, triplets.obj_boxes, triplets.sub_labels, triplets.obj_labels,
        triplets.sub_scores, triplets.obj_scores, p[order], r[order], s[order],
    )


class PostProcess:
    """`PostProcess(...)(outputs, orig_sizes) -> list[ImageTriplets]`.

    outputs: the model's last-layer predictions (or a dict with their field names);
    orig_sizes: [B, 2] (H, W) of the original images (`Target.orig_size`).
    """

    def __init__(
        self,
        mode: Literal["hoi", "sgg"] = "hoi",
        person_index: int = 0,
        zero_shot_nf: bool = False,
        valid: np.ndarray | torch.Tensor | None = None,
        top_k: int | None = None,
        nms: TripletNMS | None = None,
    ):
        if mode not in ("hoi", "sgg"):
            raise UserError(f"post-processing mode must be 'hoi' or 'sgg', got {mode!r}")
        self.mode = mode
        self.person_index = person_index
        self.zero_shot_nf = zero_shot_nf
        self.valid = None if valid is None else torch.as_tensor(np.asarray(valid), dtype=torch.float32)
        self.top_k = top_k
        self.nms = nms

    @classmethod
    def for_label_space(cls, space: LabelSpace | None = None, **kwargs) -> "PostProcess":
        """Person class and validity mask from `space` (HICO-DET by default)."""
        space = space or hico_label_space()
        kwargs.setdefault("person_index", space.subject_index)
        kwargs.setdefault("valid", space.valid)
        return cls(**kwargs)

    @torch.no_grad()
    def __call__(self, outputs: RelationPredictions | dict,
                 orig_sizes: torch.Tensor | Sequence[Sequence[int]]) -> list[ImageTriplets]:
        outputs = RelationPredictions.of(outputs)
        sizes = torch.as_tensor(orig_sizes, dtype=torch.float32)
        obj_prob = outputs.pred_obj_logits.float().softmax(-1)[..., :-1]
        sub_prob = outputs.pred_sub_logits.float().softmax(-1)[..., :-1]
        rel_prob = outputs.pred_rel_logits.float().sigmoid()
        obj_scores, obj_labels = obj_prob.max(-1)
        sub_scores, sub_labels = sub_prob.max(-1)
        if self.valid is not None and self.valid.shape != (rel_prob.shape[-1], obj_prob.shape[-1]):
            raise UserError(
                f"validity mask has shape {tuple(self.valid.shape)} but the outputs score "
                f"{rel_prob.shape[-1]} relations x {obj_prob.shape[-1]} objects; use the label space "
                "the model was evaluated with"
            )

        results = []
        for b in range(rel_prob.shape[0]):
            h, w = sizes[b].tolist()
            scale = torch.tensor([w, h, w, h])
            sub_boxes = box_cxcywh_to_xyxy(outputs.pred_sub_boxes[b].float()).cpu() * scale
            obj_boxes = box_cxcywh_to_xyxy(outputs.pred_obj_boxes[b].float()).cpu() * scale
            scores = rel_prob[b] * obj_scores[b][:, None]
            b_sub_labels = sub_labels[b]
            if self.mode == "sgg":
                scores = scores * sub_scores[b][:, None]
            else:
                b_sub_labels = torch.full_like(b_sub_labels, self.person_index)
            if self.zero_shot_nf:
                scores = scores * (sub_labels[b] == self.person_index)[:, None]
            if self.valid is not None:
                scores = scores * self.valid.to(scores.device)[:, obj_labels[b]].T
            scores = scores.cpu()
            flat = scores.flatten()
            # Filtered entries score exactly 0 and are dropped; the rest are ranked.
            order = torch.argsort(flat, descending=True, stable=True)
            order = order[flat[order] > 0] if (self.zero_shot_nf or self.valid is not None) else order
            if self.top_k is not None:
                order = order[: self.top_k]
            num_rel = scores.shape[1]
            triplets = ImageTriplets(
                sub_boxes, obj_boxes, b_sub_labels.cpu(), obj_labels[b].cpu(),
                sub_scores[b].cpu(), obj_scores[b].cpu(),
                order // num_rel, order % num_rel, flat[order],
            )
            if self.nms is not None:
                triplets = triplet_nms(triplets, self.nms)
            results.append(triplets)
        return results


def to_hico_json(
    results: Sequence[ImageTriplets], file_names: Sequence[str], space: LabelSpace | None = None
) -> list[dict]:
    """Community HICO-DET prediction format, one dict per image:
    {"file_name", "predictions": [{"bbox": [x1, y1, x2, y2], "category_id"}],
     "hoi_prediction": [{"subject_id", "object_id", "category_id", "score"}]}
    where subject_id / object_id index "predictions" and category_id is the verb id. Only boxes
    used by a triplet are written. Ids come from `space` (HICO-DET by default)."""
    space = space or hico_label_space()
    if len(results) != len(file_names):
        raise UserError(f"{len(results)} post-processed images but {len(file_names)} file names")
    images = []
    for res, name in zip(results, file_names):
        boxes: list[dict] = []
        box_ids: dict[tuple[str, int], int] = {}

        def box_id(kind: str, i: int) -> int:
            key = (kind, i)
            if key not in box_ids:
                box = res.sub_boxes[i] if kind == "sub" else res.obj_boxes[i]
                label = res.sub_labels[i] if kind == "sub" else res.obj_labels[i]
                box_ids[key] = len(boxes)
                boxes.append({"bbox": [round(float(v), 2) for v in box],
                              "category_id": space.object_ids[int(label)]})
            return box_ids[key]

        hois = []
        for p, r, s in zip(res.pair_index.tolist(), res.rel_index.tolist(), res.scores.tolist()):
            hois.append({"subject_id": box_id("sub", p), "object_id": box_id("obj", p),
                         "category_id": space.verb_ids[r], "score": float(s)})
        images.append({"file_name": name, "predictions": boxes, "hoi_prediction": hois})
    return images
