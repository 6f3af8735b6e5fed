"""Open-vocabulary relation detection on any images: load a trained model, run it against label
texts the caller chooses, draw what it finds (`rlipv2 predict`).

A model comes from a model directory (`rlipv2 export`, `rlipv2 demo`, `rlipv2 import-checkpoint`)
or a training run / checkpoint, exported on the fly (`train.export.open_model`); its card gives the
input size and, for fine-tuned models, the label lists.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from rlipv2_scale.errors import UserError
from rlipv2_scale.labels.space import LabelSpace
from rlipv2_scale.models.postprocess import PostProcess


def parse_labels(text: str, what: str) -> list[str]:
    """"a, b ,c" -> ["a", "b", "c"]; empty or repeated labels are errors."""
    labels = [t.strip() for t in text.split(",")]
    if not all(labels):
        raise UserError(f"--{what}: empty label in {text!r}; give comma-separated texts like 'person,cup'")
    if len(set(labels)) != len(labels):
        raise UserError(f"--{what}: repeated label in {text!r}")
    return labels


def open_label_space(objects: Sequence[str], relations: Sequence[str]) -> LabelSpace:
    """Any subject, every relation allowed with every object (nothing known about the texts)."""
    return LabelSpace(objects=tuple(objects), verbs=tuple(relations), valid=np.ones((len(relations), len(objects))),
                      subject_index=None, name="open")


@dataclass
class ImagePrediction:
    path: Path
    prediction: dict          # community HICO-DET prediction form


def predict_images(model: torch.nn.Module, paths: Sequence[str | Path], objects: Sequence[str],
                   relations: Sequence[str], *, eval_size: int = 800, max_size: int = 1333,
                   batch_size: int = 4, device: str | torch.device | None = None) -> list[ImagePrediction]:
    """Relations among `objects` (any subject class) on each image, ranked by score."""
    from rlipv2_scale.eval.triplet_nms import TripletNMS
    from rlipv2_scale.inference import RelationImages, predict

    files = [Path(p) for p in paths]
    for p in files:
        if not p.is_file():
            raise UserError(f"image '{p}' does not exist")
        try:
            with Image.open(p) as im:
                im.verify()
        except Exception as exc:  # PIL raises many types for unreadable files
            raise UserError(f"image '{p}' cannot be read ({exc}); give JPEG or PNG files") from None
    space = open_label_space(objects, relations)
    post = PostProcess(mode="sgg", valid=space.valid, top_k=100, nms=TripletNMS())
    entries = [{"file_name": p.name} for p in files]
    by_dir: dict[Path, list[int]] = {}
    for i, p in enumerate(files):
        by_dir.setdefault(p.parent, []).append(i)
    results: list[ImagePrediction | None] = [None] * len(files)
    for folder, idx in by_dir.items():
        dataset = RelationImages([entries[i] for i in idx], folder, eval_size=eval_size, max_size=max_size)
        preds = predict(model, dataset, space, post, batch_size=batch_size, device=device, progress=False)
        assert preds is not None
        for i, pred in zip(idx, preds):
            results[i] = ImagePrediction(files[i], pred)
    return [r for r in results if r is not None]


def drawing_names(paths: Sequence[str | Path]) -> list[str]:
    """`<stem>.png` per image, in input order; a name already taken gets `-2`, `-3`, ... (`a/1.jpg`
    and `b/1.jpg` would otherwise draw over each other). Compared without case: some file systems
    hold `A.png` and `a.png` as one file."""
    taken: set[str] = set()
    names = []
    for path in paths:
        stem = Path(path).stem
        name, k = f"{stem}.png", 1
        while name.lower() in taken:
            k += 1
            name = f"{stem}-{k}.png"
        taken.add(name.lower())
        names.append(name)
    return names


def draw_predictions(preds: Sequence[ImagePrediction], objects: Sequence[str], relations: Sequence[str],
                     out_dir: str | Path, *, threshold: float = 0.3, top: int = 5, scale: int = 4) -> list[Path]:
    """One drawing per image in `out_dir` (named by `drawing_names`) with its top triplets drawn;
    returns the files, in the order of `preds`."""
    from rlipv2_scale.visualize import draw_relations, top_triplets

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    space = open_label_space(objects, relations)
    written = []
    for p, name in zip(preds, drawing_names([p.path for p in preds])):
        triplets = top_triplets(p.prediction, space.objects, space.verbs, object_ids=space.object_ids,
                                verb_ids=space.verb_ids, threshold=threshold, top=top)
        with Image.open(p.path) as im:
            picture = draw_relations(im, triplets, scale=scale)
        target = out_dir / name
        picture.save(target)
        written.append(target)
    return written
