"""The periodic validation hook: relation-detection mAP on validation shards, HICO-DET protocol.

It calls the very function `rlipv2 eval hico-det --checkpoint` calls (`inference.evaluate_relations`:
the fixed label list encoded once, the same post-processing, triplet NMS and evaluator), on the
images and ground truth of the validation shards (`inference.ShardImages`: the records' absolute
boxes, as the annotation file they were converted from). Every rank runs its share; rank 0 scores.
The label space follows `inference.label_space_for`, as for `eval --checkpoint` (the subject is the
person class if there is one, or any class with `eval.subject: any`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlipv2_scale.errors import ConfigError
from rlipv2_scale.inference import ShardImages, evaluate_relations, label_space_for
from rlipv2_scale.train.config import RunConfig
from rlipv2_scale.train.launch import DistInfo

SCALARS = ("mAP", "mAP_rare", "mAP_non_rare", "mean_max_recall", "mAP_unseen", "mAP_seen")


class RelationValidation:
    """`hook(model, step) -> {"mAP": ..., ...}` (percent) on rank 0, `{}` on the other ranks."""

    def __init__(self, cfg: RunConfig, info: DistInfo):
        self.cfg, self.info = cfg.eval, info
        data = cfg.eval.data
        assert data is not None and data.fixed_obj_labels is not None and data.fixed_rel_labels is not None
        self.space = label_space_for(data.fixed_obj_labels, data.fixed_rel_labels, cfg.eval.subject)
        self.dataset: ShardImages | None = None

    def _dataset(self) -> ShardImages:
        if self.dataset is None:   # read when first needed: a run may never validate
            data = self.cfg.data
            assert data is not None
            limit = None if self.cfg.max_batches is None else \
                self.cfg.max_batches * data.batch_size * self.info.world_size
            shard_dirs = []
            for s in data.sources:
                if s.local is None:
                    raise ConfigError(f"eval.data source '{s.name}': validation reads local shard directories; "
                                      "set its 'local'")
                shard_dirs.append(s.local)
            self.dataset = ShardImages(shard_dirs, self.space, data.transforms.eval_size,
                                       data.transforms.max_size, limit=limit)
        return self.dataset

    @torch.no_grad()
    def __call__(self, model: nn.Module, step: int) -> dict[str, float]:
        zero_shot: Any = self.cfg.zero_shot
        if zero_shot is not None and zero_shot.endswith(".json"):   # explicit unseen (sub, obj, verb) triplets
            zero_shot = json.loads(Path(zero_shot).read_text())
        data = self.cfg.data
        assert data is not None
        result = evaluate_relations(model, self._dataset(), self.space, zero_shot=zero_shot, nms=self.cfg.nms,
                                    batch_size=data.batch_size, device=self.info.device, progress=False)
        if result is None:
            return {}
        out = {k: 100.0 * float(result[k]) for k in SCALARS if result.get(k) is not None}
        out["images"] = float(len(self._dataset()))
        return out
