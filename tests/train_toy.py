"""A small model + resumable synthetic loader with the RLIPv2 call contracts, for the trainer's tests.

Engine mechanics (exact resume, ZeRO partitioning, parameter groups, preemption, non-finite
losses) are tested with this instead of the full model so that a 2-rank launch takes seconds. It
has what those mechanics need: named `backbone` / `text_encoder` modules (parameter groups), a
frozen module (export), dropout (the RNG state must resume) and a per-rank deterministic loader
with `state_dict()` (data order must resume).

Run as a script (under torchrun) it trains: `train_toy.py RUN_DIR [key=value ...] [--resume R]`.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import zlib

import torch
from torch import nn

from rlipv2_scale.data.batch import NO_OBJECTS, Batch, Target
from rlipv2_scale.errors import UserError
from rlipv2_scale.train.config import RunConfig, run_config_from_dict

OBJ_TEXTS = ["person", "cup", "dog", NO_OBJECTS]
REL_TEXTS = ["hold", "ride", "look at"]


def toy_config(run_dir: str, overrides: dict | None = None) -> RunConfig:
    from rlipv2_scale.config import deep_merge

    base = {
        "run": {"name": "toy", "dir": run_dir},
        "model": {"name": "tiny"},   # not built: the toy model replaces it
        "data": {"sources": [{"name": "toy", "local": "unused"}], "batch_size": 2},
        "train": {"max_steps": 6, "zero_stage": 2, "zero3_persistence_threshold": 0},
        "optim": {"lr": 1e-2, "groups": [{"name": "backbone", "patterns": ["backbone.*"], "lr": 1e-3},
                                          {"name": "text_encoder", "patterns": ["text_encoder.*"], "lr": 5e-3}]},
        "checkpoint": {"every_steps": 3, "keep_last": 5},
        "logging": {"every_steps": 1, "progress": False, "wandb": False},
    }
    return run_config_from_dict(deep_merge(base, overrides or {}))


def _text_ids(texts: list[str]) -> torch.Tensor:
    return torch.tensor([zlib.crc32(t.encode()) % 64 for t in texts])


class ToyRelModel(nn.Module):
    def __init__(self, width: int = 16, dropout: float = 0.2):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, width))
        self.text_encoder = nn.Embedding(64, width)
        self.frozen = nn.Linear(width, width)
        self.frozen.requires_grad_(False)
        self.dropout = nn.Dropout(dropout)
        self.box_head = nn.Linear(width, 8)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, images, pixel_mask, obj_texts, rel_texts):
        feat = self.dropout(self.frozen(self.backbone(images)))                    # [B, W]
        if pixel_mask.all():   # ToyLoader's mark of a batch whose gradients overflow (finite loss)
            feat.register_hook(lambda grad: grad * float("inf"))
        obj = self.text_encoder(_text_ids(obj_texts).to(images.device))            # [Lo, W]
        rel = self.text_encoder(_text_ids(rel_texts).to(images.device))            # [Lr, W]
        return {"pred_boxes": self.box_head(feat).sigmoid().view(-1, 2, 4),
                "pred_obj_logits": feat @ obj.t(), "pred_rel_logits": feat @ rel.t()}


class ToyCriterion(nn.Module):
    def forward(self, outputs, targets):
        boxes = torch.stack([torch.cat([t.sub_boxes[:1], t.obj_boxes[:1]]) for t in targets])
        obj = torch.stack([t.obj_labels[0] for t in targets])
        rel = torch.stack([t.rel_labels[0] for t in targets])
        terms = {
            "loss_bbox": (outputs["pred_boxes"] - boxes).abs().mean(),
            "loss_ce": nn.functional.cross_entropy(outputs["pred_obj_logits"], obj),
            "loss_rel": nn.functional.binary_cross_entropy_with_logits(outputs["pred_rel_logits"], rel),
        }
        terms["loss"] = terms["loss_bbox"] * 2.5 + terms["loss_ce"] + terms["loss_rel"]
        return terms


class ToyLoader:
    """Per-rank deterministic batches; resumes mid-epoch from `state_dict()` like the streaming loader.
    Batches whose global index is in `nan_batches` carry NaN images (non-finite loss); those in
    `inf_grad_batches` an all-True pixel mask, on which the model makes its gradients infinite."""

    def __init__(self, rank: int, batch_size: int = 2, batches_per_epoch: int = 4, seed: int = 0,
                 nan_batches: frozenset[int] = frozenset(), world_size: int = 1, delay: float = 0.0,
                 inf_grad_batches: frozenset[int] = frozenset()):
        self.rank, self.batch_size, self.n, self.seed = rank, batch_size, batches_per_epoch, seed
        self.nan_batches, self.world_size, self.delay = nan_batches, world_size, delay
        self.inf_grad_batches = inf_grad_batches
        self.epoch, self.index = 0, 0

    def __len__(self) -> int:
        return self.n

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]

    def _batch(self) -> Batch:
        g = torch.Generator().manual_seed(hash((self.seed, self.epoch, self.index, self.rank)) % 2**31)
        b = self.batch_size
        images = torch.randn(b, 3, 16, 16, generator=g)
        if self.epoch * self.n + self.index in self.nan_batches:
            images = torch.full_like(images, float("nan"))
        targets = []
        for i in range(b):
            boxes = torch.rand(2, 4, generator=g) * 0.5 + 0.25
            labels = torch.randint(0, len(OBJ_TEXTS) - 1, (2,), generator=g)
            rel = torch.zeros(1, len(REL_TEXTS))
            rel[0, int(torch.randint(0, len(REL_TEXTS), (1,), generator=g))] = 1.0
            one = torch.zeros(1, dtype=torch.long)
            targets.append(Target(image_id=f"{self.rank}-{self.index}-{i}", orig_size=(16, 16), size=(16, 16),
                                  boxes=boxes, labels=labels, sub_index=one * 0, obj_index=one + 1,
                                  sub_boxes=boxes[:1], obj_boxes=boxes[1:], sub_labels=labels[:1],
                                  obj_labels=labels[1:], rel_labels=rel))
        overflow = self.epoch * self.n + self.index in self.inf_grad_batches
        return Batch(images=images, pixel_mask=torch.full((b, 16, 16), overflow), targets=targets,
                     obj_texts=list(OBJ_TEXTS), rel_texts=list(REL_TEXTS))

    def __iter__(self):
        while self.index < self.n:
            time.sleep(self.delay)   # stands for data loading (lets a test signal a run mid-way)
            batch = self._batch()
            self.index += 1
            yield batch
        self.epoch, self.index = self.epoch + 1, 0


class RecordingLoader:
    """The real streaming loader, appending the sample ids of each batch it yields to
    RUN_DIR/seen_rank<r>.jsonl (which samples each rank trained on, step by step)."""

    def __init__(self, loader, path: str):
        self.loader, self.path = loader, path

    def __len__(self) -> int:
        return len(self.loader)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    def __iter__(self):
        for batch in self.loader:
            with open(self.path, "a") as f:
                f.write(json.dumps([str(t.image_id) for t in batch.targets]) + "\n")
            yield batch


def toy_builder(nan_batches: frozenset[int] = frozenset(), delay: float = 0.0, signal_in_build: bool = False,
                inf_grad_batches: frozenset[int] = frozenset(), dropout: float = 0.2, streaming: bool = False):
    from rlipv2_scale.train.engine import Parts

    def build(cfg, info):
        if signal_in_build:   # SLURM's time-limit warning may arrive while the run is starting
            os.kill(os.getpid(), signal.SIGUSR1)
        # model.d_model sizes it (the tiny config's 64 → width 16), so a resume can meet another shape
        model = ToyRelModel(width=cfg.model.d_model // 4, dropout=dropout)
        if streaming:
            from rlipv2_scale.data.streaming import build_train_loader

            loader = RecordingLoader(build_train_loader(cfg.data), f"{cfg.run.dir}/seen_rank{info.rank}.jsonl")
        else:
            loader = ToyLoader(info.rank, cfg.data.batch_size, seed=cfg.data.seed, nan_batches=nan_batches,
                               world_size=info.world_size, delay=delay, inf_grad_batches=inf_grad_batches)
        return Parts(model, ToyCriterion(), loader)

    return build


def streaming_data(shards: str) -> dict:
    """Recipe keys for the real streaming loader over synthetic-world `shards` (no worker processes).
    Every image the same size and every batch the same label lists: a sample's loss does not depend
    on which samples share its batch, so runs on different numbers of ranks compute the same steps."""
    from rlipv2_scale.data.synthetic import CLASS_NAMES, PREDICATE_NAMES

    return {"data": {"sources": [{"name": "toy", "local": shards}], "num_workers": 0,
                     "fixed_obj_labels": list(CLASS_NAMES), "fixed_rel_labels": list(PREDICATE_NAMES),
                     "transforms": {"train_scales": [48], "max_size": 64, "crop_prob": 0.0, "crop_scales": [40],
                                    "crop_min": 32, "crop_max": 48, "eval_size": 48}}}


def main(argv: list[str]) -> int:
    from rlipv2_scale.config import deep_merge, parse_overrides
    from rlipv2_scale.train.engine import run

    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--resume")
    p.add_argument("--nan-batches", default="", help="comma-separated global batch indices with NaN images")
    p.add_argument("--inf-grad-batches", default="", help="comma-separated global batch indices with infinite gradients")
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--shards", help="train on these MDS shards through the real streaming loader")
    p.add_argument("--delay", type=float, default=0.0, help="seconds per batch")
    p.add_argument("--signal-in-build", action="store_true", help="SIGUSR1 to itself while building")
    args = p.parse_args(argv)
    overrides = parse_overrides(args.overrides)
    if args.shards:
        overrides = deep_merge(streaming_data(args.shards), overrides)
    cfg = toy_config(args.run_dir, overrides)
    nan = frozenset(int(x) for x in args.nan_batches.split(",") if x)
    inf_grad = frozenset(int(x) for x in args.inf_grad_batches.split(",") if x)
    try:
        return run(cfg, resume=args.resume, build=toy_builder(nan, args.delay, args.signal_in_build, inf_grad,
                                                              args.dropout, streaming=bool(args.shards)))
    except UserError as exc:   # as the CLI does
        print(f"rlipv2: error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
