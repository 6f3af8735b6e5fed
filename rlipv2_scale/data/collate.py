"""Examples → one `Batch`: padded, normalised images, masks, per-image targets, the label sequence.

The colour jitter and the ImageNet normalisation are applied here, on the output pixels only
(see `transforms.py`); in a loader worker the batch travels packed (`PackedBatch`) and is
finished in the training process. Images are padded to the largest (H, W) of the batch (mask
True on padding, pixels zero after normalisation, as the original's nested tensors). Relations
with the same (subject, object) become one pair with a multi-hot relation vector over the batch's
relation texts (or, with `confidence_weighted`, the highest confidence of each predicate; 1 for
human labels). Boxes become normalised (cx, cy, w, h) of the unpadded transformed image.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from rlipv2_scale.data.batch import Batch, Target
from rlipv2_scale.data.config import DataConfig
from rlipv2_scale.data.labels import LabelSequence, LabelVocabulary, build_label_sequence, fixed_label_sequence
from rlipv2_scale.data.transforms import Color, Example, normalize

_BATCH_STREAM = 1   # keeps the per-batch seeds apart from the per-sample ones


def xyxy_to_cxcywh(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    h, w = size
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / (2 * w), (y1 + y2) / (2 * h), (x2 - x1) / w, (y2 - y1) / h], dim=-1)


def build_target(ex: Example, labels: LabelSequence, confidence_weighted: bool = False) -> Target:
    boxes = xyxy_to_cxcywh(ex.boxes, ex.size)
    obj_labels = torch.tensor([labels.obj_id(n) for n in ex.names], dtype=torch.long)
    pairs: dict[tuple[int, int], int] = {}
    for s, o, _, _ in ex.relations:
        pairs.setdefault((s, o), len(pairs))
    rel = torch.zeros(len(pairs), len(labels.rel_texts))
    for s, o, predicate, conf in ex.relations:
        value = 1.0 if not confidence_weighted or conf is None else float(conf)
        row, col = pairs[(s, o)], labels.rel_id(predicate)
        rel[row, col] = max(float(rel[row, col]), value)
    sub_index = torch.tensor([s for s, _ in pairs], dtype=torch.long)
    obj_index = torch.tensor([o for _, o in pairs], dtype=torch.long)
    return Target(
        image_id=ex.image_id, orig_size=ex.orig_size, size=ex.size,
        boxes=boxes, labels=obj_labels, sub_index=sub_index, obj_index=obj_index,
        sub_boxes=boxes[sub_index].reshape(-1, 4), obj_boxes=boxes[obj_index].reshape(-1, 4),
        sub_labels=obj_labels[sub_index], obj_labels=obj_labels[obj_index], rel_labels=rel,
    )


@dataclass
class PackedBatch:
    """A batch as it leaves a loader worker: uint8 images padded into one tensor, the colour maps
    still to apply, targets as numpy arrays. `unpack` (in the training process) makes the `Batch`.

    Why: a new page of shared memory costs more than the arithmetic written into it, and every
    tensor sent from a worker is a separate shared-memory segment. uint8 is a quarter of the
    pages of the float batch, and the ~12 small tensors of each target pickle inline as numpy.
    """

    images: torch.Tensor                        # uint8 [B, 3, H, W], zero-padded
    sizes: list[tuple[int, int]]                # (h, w) of each image before padding
    colors: list[Color | None]
    targets: list[dict[str, Any]]
    obj_texts: list[str]
    rel_texts: list[str]
    num_obj_pos: int
    num_rel_pos: int
    meta: dict[str, Any]

    @property
    def batch_size(self) -> int:
        return int(self.images.shape[0])

    def unpack(self, pin_memory: bool = False) -> Batch:
        """`pin_memory` (CUDA only): page-locked output for asynchronous copies; CUDA's host allocator
        also reuses its blocks, which spares the page faults of a fresh buffer every step."""
        b, _, height, width = self.images.shape
        images = torch.empty(b, 3, height, width, pin_memory=pin_memory)
        mask = torch.ones(b, height, width, dtype=torch.bool)
        for i, ((h, w), color) in enumerate(zip(self.sizes, self.colors)):
            normalize(self.images[i, :, :h, :w], color, images[i, :, :h, :w])
            images[i, :, h:].zero_()
            images[i, :, :h, w:].zero_()
            mask[i, :h, :w] = False
        targets = [Target(**_tensors_from_numpy(t)) for t in self.targets]
        return Batch(images=images, pixel_mask=mask, targets=targets, obj_texts=self.obj_texts,
                     rel_texts=self.rel_texts, num_obj_pos=self.num_obj_pos, num_rel_pos=self.num_rel_pos,
                     meta=self.meta)


def pack(examples: Sequence[Example], labels: LabelSequence, confidence_weighted: bool = False) -> PackedBatch:
    if not examples:
        raise ValueError("collate needs at least one example")
    sizes = [ex.size for ex in examples]
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    images = _empty_uint8(len(examples), height, width)
    for i, ex in enumerate(examples):
        h, w = ex.size
        images[i, :, :h, :w] = ex.image
        images[i, :, h:].zero_()
        images[i, :, :h, w:].zero_()
    targets = [{k: v.numpy() if isinstance(v, torch.Tensor) else v
                for k, v in vars(build_target(ex, labels, confidence_weighted)).items()} for ex in examples]
    return PackedBatch(
        images=images, sizes=sizes, colors=[ex.color for ex in examples], targets=targets,
        obj_texts=labels.obj_texts, rel_texts=labels.rel_texts,
        num_obj_pos=labels.num_obj_pos, num_rel_pos=labels.num_rel_pos,
        meta={"keys": [ex.key for ex in examples], "sample_ids": [int(ex.sample_id) for ex in examples],
              "epoch": examples[0].epoch},
    )


def collate(examples: Sequence[Example], labels: LabelSequence, confidence_weighted: bool = False) -> Batch:
    return pack(examples, labels, confidence_weighted).unpack()


def _empty_uint8(b: int, h: int, w: int) -> torch.Tensor:
    """In a loader worker, allocate in shared memory directly (as torch's default_collate does),
    so that sending the batch does not copy it once more."""
    if get_worker_info() is None:
        return torch.empty(b, 3, h, w, dtype=torch.uint8)
    storage = torch.empty(0, dtype=torch.uint8)._typed_storage()._new_shared(b * 3 * h * w, device="cpu")
    return torch.empty(0, dtype=torch.uint8).new(storage).view(b, 3, h, w)


def _tensors_from_numpy(fields: dict[str, Any]) -> dict[str, Any]:
    """A packed target's fields with numpy arrays back as tensors (the other fields as they are)."""
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in fields.items()}


def batch_generator(seed: int, examples: Sequence[Example]) -> torch.Generator:
    """Seeded by the batch's own sample ids and epoch: the same batch draws the same negatives,
    whichever worker builds it and whether or not the run was resumed."""
    entropy = [seed, _BATCH_STREAM, examples[0].epoch] + [ex.sample_id + 1 for ex in examples]
    state = np.random.SeedSequence(entropy).generate_state(1, np.uint64)
    return torch.Generator().manual_seed(int(state[0]) & ((1 << 63) - 1))


class Collator:
    """The loader's `collate_fn`: label sequence for the batch (the original's `engine.py: merge_batch_data`), then `collate`."""

    def __init__(self, cfg: DataConfig, vocab: LabelVocabulary | None):
        if not cfg.fixed_labels and cfg.negative_sampling and vocab is None:
            raise ValueError("negative sampling needs a LabelVocabulary")
        self.cfg = cfg
        self.vocab = vocab if cfg.negative_sampling else None
        # cfg.fixed_labels: both lists set (DataConfig checks that they go together)
        obj, rel = cfg.fixed_obj_labels, cfg.fixed_rel_labels
        self.fixed = fixed_label_sequence(obj, rel) if obj is not None and rel is not None else None

    def labels_for(self, examples: Sequence[Example]) -> LabelSequence:
        if self.fixed is not None:
            return self.fixed
        g = batch_generator(self.cfg.seed, examples) if self.vocab is not None else None
        return build_label_sequence((ex.names for ex in examples),
                                    ([p for _, _, p, _ in ex.relations] for ex in examples),
                                    self.vocab, self.cfg.num_obj_labels, self.cfg.num_rel_labels, g)

    def __call__(self, examples: Sequence[Example]) -> Batch | PackedBatch:
        """In a loader worker: a `PackedBatch` (the loader unpacks it); in-process: the `Batch`."""
        packed = pack(examples, self.labels_for(examples), self.cfg.confidence_weighted)
        return packed if get_worker_info() is not None else packed.unpack()
