"""The Relation Tagger as a `PairScorer`: confidences for every (candidate pair, relation text).

The image is decoded and resized as for evaluation (shorter side 800, max 1333 by default); the
object texts are the dataset's class names (80 COCO / 365 Objects365 / the synthetic classes) plus
"no objects"; the boxes and labels are the image's ground truth.
"""
from __future__ import annotations

import numpy as np
import torch

from rlipv2_scale.data.batch import NO_OBJECTS
from rlipv2_scale.data.config import TransformConfig
from rlipv2_scale.data.pseudo.candidates import CandidateChunk
from rlipv2_scale.data.schema import RelationalRecord
from rlipv2_scale.data.transforms import EvalTransform, decode, normalize
from rlipv2_scale.errors import UserError


class TaggerScorer:
    def __init__(self, tagger: torch.nn.Module, class_names: list[str], eval_size: int = 800,
                 max_size: int = 1333, device: str | torch.device = "cpu"):
        self.tagger = tagger.eval().to(device)
        self.obj_texts = list(class_names) + [NO_OBJECTS]
        self.index = {n: i for i, n in enumerate(class_names)}
        self.transform = EvalTransform(TransformConfig(eval_size=eval_size, max_size=max(max_size, eval_size),
                                                       train_scales=[eval_size]))
        self.device = torch.device(device)

    @torch.no_grad()
    def score(self, record: RelationalRecord, chunk: CandidateChunk) -> np.ndarray:
        unknown = sorted({o.name for o in record.objects} - set(self.index))
        if unknown:
            raise UserError(f"image {record.image.id!r}: object classes {unknown} are not in the tagger's class "
                            f"list; pass the dataset's class names with `rlipv2 data tag --classes` (coco80, o365, synthetic "
                            f"or a file of names; coco80 when not given)")
        image = decode(record.image_bytes, record.key)
        h, w = image.shape[-2:]
        boxes = torch.tensor([o.box for o in record.objects], dtype=torch.float32)
        image, _, _ = self.transform(image, boxes)
        pixels = normalize(image, None, torch.empty(image.shape, dtype=torch.float32))[None].to(self.device)
        mask = torch.zeros(1, *pixels.shape[-2:], dtype=torch.bool, device=self.device)
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        xyxy = boxes / scale
        cxcywh = torch.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2,
                              xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]], dim=1).to(self.device)
        labels = torch.tensor([self.index[o.name] for o in record.objects], device=self.device)
        pairs = torch.tensor(chunk.pairs, dtype=torch.long).reshape(-1, 2)
        # The tagger is a RelationTagger, whose class data/ cannot import (models/ is above it).
        scores = self.tagger.score_candidates(pixels, mask, self.obj_texts,  # type: ignore[operator]
                                              list(chunk.texts), [pairs], [cxcywh], [labels])
        return scores.float().cpu().numpy()
