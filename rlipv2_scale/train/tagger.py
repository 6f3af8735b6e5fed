"""The Relation Tagger as a task of the one trainer (`task: tagger` in a run config).

The Tagger needs the given pairs at forward time: its forward passes the batch's targets as
`pairs`. `TaggerLoader` wraps the streaming loader and fills every image's pair slots (annotated
pairs first, then random unannotated ordered pairs with all-zero relation targets, as the
original's `VGRelTagger` dataset). The criterion is `SetCriterion` with identity matching (query
pair i <-> the i-th given pair) and the hard focal loss; the box / label noise of the denoising
training comes from the run config's `tagger:` section. Everything else - resume, checkpoints,
telemetry, SLURM, `rlipv2 export` - is the trainer's, as for RLIPv2 runs.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterator

import torch

from rlipv2_scale.data.batch import Batch, Target
from rlipv2_scale.data.streaming import build_train_loader
from rlipv2_scale.models.artifacts import load_state
from rlipv2_scale.models.losses import SetCriterion
from rlipv2_scale.models.tagger import TaggerNoise, add_negative_pairs, build_tagger
from rlipv2_scale.train.config import RunConfig
from rlipv2_scale.train.export import init_weights
from rlipv2_scale.train.launch import DistInfo
from rlipv2_scale.train.parts import Parts

# Layers a detector or RLIPv2 checkpoint does not have: the Tagger's own query layers, and the
# label-text encoder when the checkpoint is a plain detector (it then keeps its roberta-base weights).
TAGGER_ONLY = ("coord_proj.*", "verb_tgt.*", "text_encoder.*")


def tagger_forward(engine: torch.nn.Module, images: torch.Tensor, batch: Batch) -> dict:
    """The trainer's forward for a Tagger: the batch's (slot-filled) targets are the given pairs."""
    return engine(images, batch.pixel_mask, batch.obj_texts, batch.rel_texts, batch.targets)


class TaggerLoader:
    """The Tagger's batches: the inner loader's, each image's pair slots filled (annotated pairs,
    then negatives). Resumes exactly (the negatives' RNG is part of the state)."""

    def __init__(self, inner, num_slots: int, negative_pairs: bool = True, seed: int = 0):
        self.inner, self.num_slots, self.negative_pairs = inner, num_slots, negative_pairs
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.inner)

    def fill(self, target: Target) -> Target:
        if self.negative_pairs or target.sub_index.numel() > self.num_slots:   # the latter samples num_slots
            return add_negative_pairs(target, self.num_slots, self.generator)
        return target

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.inner:
            yield replace(batch, targets=[self.fill(t) for t in batch.targets])

    def state_dict(self) -> dict:
        return {"loader": self.inner.state_dict(), "negatives_rng": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["loader"])
        self.generator.set_state(state["negatives_rng"])


def build_tagger_parts(cfg: RunConfig, info: DistInfo) -> Parts:
    """The trainer's parts for `task: tagger`."""
    noise = TaggerNoise(box=cfg.tagger.box_noise, label=cfg.tagger.label_noise)
    model = build_tagger(cfg.model, pretrained=True, noise=noise)
    if cfg.train.init_from:
        # Initialise from a detector or RLIPv2 checkpoint: every key must fit; only the Tagger's own
        # layers (and the text encoder) may be missing.
        load_state(model, init_weights(cfg.train.init_from), cfg.train.init_from, reinit=TAGGER_ONLY)
    loader = TaggerLoader(build_train_loader(cfg.data), cfg.model.num_pairs, cfg.tagger.negative_pairs,
                          seed=cfg.data.seed + info.rank)
    return Parts(model, SetCriterion(cfg.loss), loader, forward=tagger_forward)
