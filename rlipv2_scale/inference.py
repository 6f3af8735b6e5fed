"""Run a model over a HICO-DET-format test set and score it: the path behind `eval hico-det --checkpoint`.

`RelationImages` reads a QPIC-style annotation list (`test_hico.json`: entries with `file_name`)
and its images, resized as in the original's evaluation (shorter side 800, longer side <= 1333 by
default). `predict` runs the model batched over it (each rank of an initialised process group takes
a strided slice; rank 0 gathers everything back in file order) against one fixed label list whose
embeddings are computed once, post-processes (`models.postprocess`) and returns predictions in the
community JSON form. `evaluate_checkpoint` loads a model directory (`rlipv2 import-checkpoint`)
and scores the predictions with `eval.hico.evaluate_hico`. The label space and the data paths are
parameters, so the same code scores a synthetic benchmark.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from rlipv2_scale.data.config import TransformConfig
from rlipv2_scale.data.transforms import EvalTransform, decode, normalize
from rlipv2_scale.errors import DataError, UserError
from rlipv2_scale.eval.label_space import LabelSpace, hico_label_space
from rlipv2_scale.models.postprocess import PostProcess, to_hico_json

NO_OBJECT_TEXT = "no objects"
ZERO_SHOT_SETTINGS = ("NF", "UC-RF", "UC-NF", "UO")


def label_texts(space: LabelSpace, no_object: str = NO_OBJECT_TEXT) -> tuple[list[str], list[str]]:
    """(object texts with the "no objects" text last, relation texts) of a label space; the
    original's verb names use spaces where the files use underscores."""
    return list(space.objects) + [no_object], [v.replace("_", " ") for v in space.verbs]


@dataclass
class HicoFiles:
    test: Path          # test annotations (test_hico.json)
    images: Path        # folder of the test images
    train: Path | None  # training annotations, for the rare / non-rare split


def find_hico_files(root: str | Path, test: str | Path | None = None, images: str | Path | None = None,
                    train: str | Path | None = None) -> HicoFiles:
    """The files of a HICO-DET root as laid out by QPIC / RLIPv2 (`annotations/test_hico.json`,
    `images/test2015/`, `annotations/trainval_hico.json`), or the flat variants; explicit paths win."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"HICO-DET root '{root}' is not a directory")

    def first(candidates: list[Path], what: str, required: bool = True) -> Path | None:
        for c in candidates:
            if c.exists():
                return c
        if required:
            raise UserError(f"{what} not found under '{root}' (looked for {', '.join(str(c) for c in candidates)}); "
                            "pass its path explicitly")
        return None

    test_path = Path(test) if test else first([root / "annotations" / "test_hico.json", root / "test_hico.json"],
                                              "test annotations")
    image_dir = Path(images) if images else first([root / "images" / "test2015", root / "test2015", root / "images"],
                                                  "test image folder")
    train_path = Path(train) if train else first(
        [root / "annotations" / "trainval_hico.json", root / "trainval_hico.json"], "training annotations",
        required=False)
    return HicoFiles(test_path, image_dir, train_path)


class RelationImages(Dataset):
    """Images of an annotation list, transformed for evaluation: item = (float image [3,h,w]
    normalised, original (H, W), index)."""

    def __init__(self, entries: Sequence[dict], images: str | Path, eval_size: int = 800, max_size: int = 1333):
        self.entries = list(entries)
        self.images = Path(images)
        if not 0 < eval_size <= max_size:
            raise UserError(f"evaluation size must satisfy 0 < eval_size <= max_size, got {eval_size} / {max_size}")
        # train_scales only to satisfy TransformConfig's validation; evaluation never reads them
        self.transform = EvalTransform(TransformConfig(eval_size=eval_size, max_size=max_size,
                                                       train_scales=[eval_size]))
        for i, e in enumerate(self.entries):
            if not isinstance(e, dict) or not isinstance(e.get("file_name"), str):
                raise DataError(f"annotation entry {i} has no 'file_name' string", sample_id=str(i),
                                reason="malformed_annotation")

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, tuple[int, int], int]:
        name = self.entries[index]["file_name"]
        path = self.images / name
        if not path.is_file():
            raise DataError(f"image '{path}' of annotation entry {index} does not exist", sample_id=name,
                            reason="missing_image")
        image = decode(path.read_bytes(), name)
        h, w = image.shape[-2:]
        image, _, _ = self.transform(image, torch.zeros(0, 4))
        return normalize(image, None, torch.empty(image.shape, dtype=torch.float32)), (int(h), int(w)), index


def collate_images(items: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Zero-pad to the largest image: (images [B,3,H,W], pixel_mask [B,H,W] True = pad, orig sizes [B,2], indices)."""
    h = max(x.shape[1] for x, _, _ in items)
    w = max(x.shape[2] for x, _, _ in items)
    images = torch.zeros(len(items), 3, h, w)
    mask = torch.ones(len(items), h, w, dtype=torch.bool)
    for b, (x, _, _) in enumerate(items):
        images[b, :, : x.shape[1], : x.shape[2]] = x
        mask[b, : x.shape[1], : x.shape[2]] = False
    sizes = torch.tensor([s for _, s, _ in items], dtype=torch.long)
    return images, mask, sizes, [i for _, _, i in items]


@torch.no_grad()
def forward_eval(model: torch.nn.Module, images: torch.Tensor, pixel_mask: torch.Tensor, obj_texts: list[str],
                 rel_texts: list[str], label_embeds: torch.Tensor | None = None) -> dict:
    """One evaluation forward (eval mode: no label padding mask, as the original evaluates)."""
    return model.decode(model.encode(images, pixel_mask, obj_texts, rel_texts, label_embeds))


def _rank_slice(n: int) -> range:
    if dist.is_available() and dist.is_initialized():
        return range(dist.get_rank(), n, dist.get_world_size())
    return range(n)


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: RelationImages, space: LabelSpace, post: PostProcess, *,
            batch_size: int = 2, num_workers: int = 0, device: str | torch.device | None = None,
            progress: bool = True, relation_key: str = "hoi_prediction") -> list[dict] | None:
    """Predictions of `model` on every image of `dataset`, in the community JSON form and dataset
    order: {"file_name", "predictions", relation_key: [...]} ("rel_predictions" for Open Images).
    Distributed: every rank runs its slice; rank 0 returns all, the others None."""
    if getattr(model.cfg, "tagger", False):
        raise UserError("the Relation Tagger scores given pairs; it cannot detect relations on a test set")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    obj_texts, rel_texts = label_texts(space)
    label_embeds = model.encode_labels(obj_texts, rel_texts)   # once: the label list is fixed
    indices = list(_rank_slice(len(dataset)))
    loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=collate_images)
    rank0 = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    mine: list[tuple[int, dict]] = []
    bar = tqdm(total=len(dataset), desc="inference", unit="img", disable=not (progress and rank0))
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    for images, mask, sizes, idx in loader:
        out = forward_eval(model, images.to(device), mask.to(device), obj_texts, rel_texts, label_embeds)
        results = post(out, sizes)
        names = [dataset.entries[i]["file_name"] for i in idx]
        entries = to_hico_json(results, names, space)
        if relation_key != "hoi_prediction":
            entries = [{"file_name": e["file_name"], "predictions": e["predictions"],
                        relation_key: e["hoi_prediction"]} for e in entries]
        mine += list(zip(idx, entries))
        bar.update(min(len(idx) * world, len(dataset) - bar.n))   # ranks advance at the same pace
    bar.close()
    if world > 1:
        gathered: list | None = [None] * world if rank0 else None
        dist.gather_object(mine, gathered, dst=0)
        if not rank0:
            return None
        mine = [p for part in gathered for p in part]
    return [p for _, p in sorted(mine, key=lambda ip: ip[0])]


def _zero_shot(setting: str | None, space: LabelSpace) -> tuple[bool, str | list | None]:
    """(NF subject filter on, evaluator's zero-shot argument) of a setting name or unseen-triplet file."""
    if setting is None:
        return False, None
    if setting == "NF":   # no fine-tuning: full mAP, pairs whose subject is not a person dropped
        return True, None
    if setting in space.zero_shot_splits:
        return False, setting
    path = Path(setting)
    if path.is_file():
        from rlipv2_scale.eval.files import read_unseen_triplets

        return False, list(read_unseen_triplets(path, space))
    raise UserError(f"zero-shot setting '{setting}' is none of NF, {', '.join(space.zero_shot_splits)} "
                    "and not a file of unseen triplets")


def evaluate_checkpoint(checkpoint_dir: str | Path, data_root: str | Path | None = None, zero_shot: str | None = None,
                        *, test: str | Path | None = None, images: str | Path | None = None,
                        train: str | Path | None = None, label_space: LabelSpace | None = None,
                        batch_size: int = 2, num_workers: int = 0, device: str | None = None,
                        eval_size: int = 800, max_size: int = 1333, nms: bool = True, top_k: int = 100,
                        predictions_out: str | Path | None = None, progress: bool = True) -> dict | None:
    """Load a model directory, predict on a HICO-DET-format test set and return `evaluate_hico`'s
    numbers (rank 0; other ranks None). `zero_shot`: NF (no fine-tuning: subject must be the person
    class), a split of the label space (UC-RF, UC-NF, UO) or a file of unseen triplets."""
    from rlipv2_scale.eval.files import read_json
    from rlipv2_scale.eval.hico import evaluate_hico
    from rlipv2_scale.eval.triplet_nms import TripletNMS
    from rlipv2_scale.models.original import load_model_dir

    space = label_space or hico_label_space()
    if data_root is None and (test is None or images is None):
        raise UserError("give the dataset root (--data) or both the test annotations and the image folder")
    files = find_hico_files(data_root, test, images, train) if data_root is not None else \
        HicoFiles(Path(test), Path(images), Path(train) if train else None)
    nf_filter, split = _zero_shot(zero_shot, space)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and dist.is_available() and dist.is_initialized():
        device = f"cuda:{torch.cuda.current_device()}"
    model = load_model_dir(checkpoint_dir, device)
    gt = read_json(files.test, "test annotations")
    dataset = RelationImages(gt, files.images, eval_size=eval_size, max_size=max_size)
    post = PostProcess.for_label_space(space, zero_shot_nf=nf_filter, top_k=top_k)
    preds = predict(model, dataset, space, post, batch_size=batch_size, num_workers=num_workers, device=device,
                    progress=progress)
    if preds is None:
        return None
    if predictions_out is not None:
        out = Path(predictions_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(preds))
    train_entries = read_json(files.train, "training annotations") if files.train else None
    res = evaluate_hico(gt, preds, train=train_entries, zero_shot=split, label_space=space,
                        nms=TripletNMS() if nms else None, top_k=top_k)
    res["setting"] = zero_shot or "default"
    res["checkpoint"] = str(checkpoint_dir)
    return res


def evaluate_oi_checkpoint(checkpoint_dir: str | Path, test: str | Path, images: str | Path, label_space: LabelSpace,
                           *, batch_size: int = 2, num_workers: int = 0, device: str | None = None,
                           eval_size: int = 800, max_size: int = 1333, nms: bool = True,
                           predictions_out: str | Path | None = None, progress: bool = True) -> dict | None:
    """Open Images v6 SGG (`OI_SGG_test.json` + images): scene-graph post-processing (the subject
    keeps its own class, score s_rel * s_obj * s_sub) scored with `eval.oi_sgg.evaluate_oi_sgg`.
    `label_space` carries the category *names* (the model reads them) with 0-based ids, e.g.
    `LabelSpace(objects, predicates, numpy.ones((len(predicates), len(objects))))`."""
    from rlipv2_scale.eval.files import read_json
    from rlipv2_scale.eval.oi_sgg import evaluate_oi_sgg
    from rlipv2_scale.models.original import load_model_dir

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model_dir(checkpoint_dir, device)
    gt = read_json(test, "test annotations")
    dataset = RelationImages(gt, images, eval_size=eval_size, max_size=max_size)
    post = PostProcess(mode="sgg", top_k=100)   # the evaluator keeps at most the top 100, then applies NMS
    preds = predict(model, dataset, label_space, post, batch_size=batch_size, num_workers=num_workers,
                    device=device, progress=progress, relation_key="rel_predictions")
    if preds is None:
        return None
    if predictions_out is not None:
        Path(predictions_out).write_text(json.dumps(preds))
    return evaluate_oi_sgg(gt, preds, nms=nms, label_space=label_space)
