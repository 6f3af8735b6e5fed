"""The periodic evaluation hook: relation-detection mAP on a validation set, HICO-DET protocol.

Every rank runs the model over its share of the validation shards (`eval.data`, the benchmark's
fixed label lists); the outputs are post-processed into the community prediction form
(`models/postprocess.py`), the ground truth is rebuilt from the batch targets in the same form,
both are gathered on rank 0 and scored by `rlipv2_scale.eval.hico.evaluate_hico`. The label space
is HICO-DET's when the label lists are HICO-DET's, otherwise one built from the lists (every
verb-object combination valid; the subject is the person class if there is one, or any class with
`eval.subject: any`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from rlipv2_scale.data.batch import Target
from rlipv2_scale.eval.label_space import LabelSpace, hico_label_space
from rlipv2_scale.models.box_ops import box_cxcywh_to_xyxy
from rlipv2_scale.train.config import RunConfig
from rlipv2_scale.train.launch import DistInfo

SCALARS = ("mAP", "mAP_rare", "mAP_non_rare", "mean_max_recall", "mAP_unseen", "mAP_seen")


def label_space_for(objects: list[str], verbs: list[str], subject: str = "auto") -> LabelSpace:
    hico = hico_label_space()
    if list(hico.objects) == list(objects) and list(hico.verbs) == list(verbs) and subject == "auto":
        return hico
    subject_index = objects.index("person") if subject == "auto" and "person" in objects else None
    return LabelSpace(objects=tuple(objects), verbs=tuple(verbs), valid=np.ones((len(verbs), len(objects))),
                      subject_index=subject_index, name="validation")


def ground_truth_entry(target: Target, space: LabelSpace) -> dict[str, Any]:
    """A batch target in the HICO-DET ground-truth form (absolute xyxy boxes of the original image)."""
    h, w = target.orig_size
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    boxes = (box_cxcywh_to_xyxy(target.boxes.float().cpu()) * scale).tolist()
    labels = target.labels.cpu().tolist()
    hois = []
    for s, o, rel in zip(target.sub_index.tolist(), target.obj_index.tolist(), target.rel_labels.cpu()):
        for v in torch.nonzero(rel > 0).flatten().tolist():
            hois.append({"subject_id": s, "object_id": o, "category_id": space.verb_ids[v]})
    return {"file_name": str(target.image_id),
            "annotations": [{"bbox": [round(x, 2) for x in b], "category_id": space.object_ids[c]}
                            for b, c in zip(boxes, labels)],
            "hoi_annotation": hois}


class HicoValidation:
    """`hook(model, step) -> {"mAP": ..., ...}` (percent) on rank 0, `{}` on the other ranks."""

    def __init__(self, cfg: RunConfig, info: DistInfo):
        from rlipv2_scale.eval.triplet_nms import TripletNMS
        from rlipv2_scale.models.postprocess import PostProcess

        self.cfg, self.info = cfg.eval, info
        data = cfg.eval.data
        assert data is not None and data.fixed_obj_labels is not None and data.fixed_rel_labels is not None
        self.space = label_space_for(data.fixed_obj_labels, data.fixed_rel_labels, cfg.eval.subject)
        # any-subject scoring ranks by subject x object x relation confidence, as scene-graph evaluators do
        mode = "hoi" if self.space.subject_index is not None else "sgg"
        self.post = PostProcess.for_label_space(self.space, mode=mode, nms=TripletNMS() if cfg.eval.nms else None)
        self.loader = None

    def _loader(self):
        if self.loader is None:
            from rlipv2_scale.data.streaming import build_train_loader

            self.loader = build_train_loader(self.cfg.data, train=False)
        return self.loader

    @torch.no_grad()
    def __call__(self, model: nn.Module, step: int) -> dict[str, float]:
        from rlipv2_scale.eval.hico import evaluate_hico
        from rlipv2_scale.models.postprocess import to_hico_json

        preds: list[dict] = []
        gts: list[dict] = []
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        for i, batch in enumerate(self._loader()):
            if self.cfg.max_batches is not None and i >= self.cfg.max_batches:
                break
            batch = batch.to(self.info.device)
            outputs = model(batch.images.to(dtype), batch.pixel_mask, batch.obj_texts, batch.rel_texts)
            outputs = {k: v.float().cpu() for k, v in outputs.items() if k.startswith("pred_")}
            results = self.post(outputs, [t.orig_size for t in batch.targets])
            preds += to_hico_json(results, [str(t.image_id) for t in batch.targets], self.space)
            gts += [ground_truth_entry(t, self.space) for t in batch.targets]
        gathered: list[Any] = [None] * self.info.world_size
        dist.all_gather_object(gathered, (gts, preds))
        if self.info.rank != 0:
            return {}
        # Streaming pads the last per-rank share by repeating images: keep each image once.
        gt_by_name: dict[str, dict] = {}
        pred_by_name: dict[str, dict] = {}
        for g, p in gathered:
            for entry in g:
                gt_by_name.setdefault(entry["file_name"], entry)
            for entry in p:
                pred_by_name.setdefault(entry["file_name"], entry)
        zero_shot: Any = self.cfg.zero_shot
        if zero_shot is not None and zero_shot.endswith(".json"):   # explicit unseen (sub, obj, verb) triplets
            zero_shot = json.loads(Path(zero_shot).read_text())
        result = evaluate_hico(list(gt_by_name.values()), list(pred_by_name.values()), label_space=self.space,
                               zero_shot=zero_shot)
        out = {k: 100.0 * float(result[k]) for k in SCALARS if result.get(k) is not None}
        out["images"] = float(len(gt_by_name))
        return out
