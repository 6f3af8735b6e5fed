"""The one batch structure between data and model.

Produced by the collate function (`rlipv2_scale.data.collate`), consumed by the model, the matcher
and the losses. Boxes are normalised (cx, cy, w, h) relative to the *unpadded* transformed image;
labels index into the batch's label sequence (`obj_texts` / `rel_texts`, as the original's `engine.py: merge_batch_data`):
one list of object texts ending with "no objects" and one list of relation texts, shared by all
images of the batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

NO_OBJECTS = "no objects"


@dataclass
class Target:
    """Ground truth of one image.

    Pairs: one row per unique (subject box, object box) with a multi-hot relation vector.
    Objects: every annotated object (the Relation Tagger builds its queries from them).
    """

    image_id: int | str
    orig_size: tuple[int, int]              # (H, W) of the original image
    size: tuple[int, int]                   # (H, W) after transforms, before padding
    boxes: torch.Tensor                     # [N, 4] all objects, cxcywh normalised
    labels: torch.Tensor                    # [N] long, index into obj_texts
    sub_index: torch.Tensor                 # [n] long, object index of each pair's subject
    obj_index: torch.Tensor                 # [n] long, object index of each pair's object
    sub_boxes: torch.Tensor                 # [n, 4]
    obj_boxes: torch.Tensor                 # [n, 4]; all zeros = "no object" (V-COCO)
    sub_labels: torch.Tensor                # [n] long
    obj_labels: torch.Tensor                # [n] long
    rel_labels: torch.Tensor                # [n, len(rel_texts)] float multi-hot (or confidences)

    def to(self, device: torch.device | str) -> "Target":
        moved: dict[str, Any] = {k: v.to(device) for k, v in self.__dict__.items() if isinstance(v, torch.Tensor)}
        return replace(self, **moved)


@dataclass
class Batch:
    images: torch.Tensor                    # [B, 3, H, W] float, normalised, zero-padded
    pixel_mask: torch.Tensor                # [B, H, W] bool, True on padding
    targets: list[Target]
    obj_texts: list[str]                    # object label sequence, last entry is NO_OBJECTS
    rel_texts: list[str]                    # relation label sequence
    num_obj_pos: int = 0                    # leading entries of obj_texts that occur in the batch
    num_rel_pos: int = 0                    # leading entries of rel_texts that occur in the batch
    meta: dict = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return replace(
            self,
            images=self.images.to(device, non_blocking=non_blocking),
            pixel_mask=self.pixel_mask.to(device, non_blocking=non_blocking),
            targets=[t.to(device) for t in self.targets],
        )
