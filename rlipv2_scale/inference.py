"""Run a model over a benchmark's test images and score it: the path behind `eval ... --checkpoint`.

`RelationImages` reads an annotation list (entries with `file_name`) and its images, resized as in
the original's evaluation (shorter side 800, longer side <= 1333 by default). `predict` runs the
model batched over it (each rank of an initialised process group takes a strided slice; rank 0
gathers everything back in file order) against one fixed label list whose embeddings are computed
once, post-processes (`models.postprocess`) and converts each image's triplets (the community JSON
form by default). A model directory comes from `rlipv2 import-checkpoint`; three benchmarks:

- HICO-DET (`evaluate_checkpoint`): top-100 triplets + triplet NMS, scored by `eval.hico`;
- V-COCO (`evaluate_vcoco_checkpoint`): every query pair becomes one detection of the official
  format (person box, per-action agent score, per action-role object box + score; an object of the
  "missing objects" class has a NaN box), scored by `eval.vcoco` (role AP, scenarios 1 and 2);
- Open Images v6 SGG (`evaluate_oi_checkpoint`): scene-graph triplets scored by `eval.oi_sgg`.

Each finds its files under a dataset root laid out as the original's (`find_*_files`; explicit
paths win). Label spaces and paths are parameters, so the same code scores a synthetic benchmark.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from rlipv2_scale.data.config import TransformConfig
from rlipv2_scale.data.schema import RelationalRecord
from rlipv2_scale.data.transforms import EvalTransform, decode, normalize
from rlipv2_scale.errors import DataError, UserError
from rlipv2_scale.labels.space import LabelSpace, hico_label_space
from rlipv2_scale.models.artifacts import card_of
from rlipv2_scale.models.outputs import RelationOutput
from rlipv2_scale.models.postprocess import ImageTriplets, PostProcess, to_hico_json

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


def _locate(root: Path, explicit: str | Path | None, candidates: Sequence[str], what: str, flag: str) -> Path | None:
    """`explicit` when given (it must exist), else the first candidate under `root` that exists, else None."""
    if explicit is not None:
        path = Path(explicit)
        if not path.exists():
            raise UserError(f"{what} '{path}' ({flag}) does not exist")
        return path
    return next((root / c for c in candidates if (root / c).exists()), None)


def _find(root: Path, explicit: str | Path | None, candidates: Sequence[str], what: str, flag: str) -> Path:
    """`_locate`, a file that must be there."""
    path = _locate(root, explicit, candidates, what, flag)
    if path is None:
        raise UserError(f"{what} not found under '{root}' (looked for {', '.join(candidates)}); "
                        f"pass its path with {flag}")
    return path


def _root(root: str | Path, benchmark: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{benchmark} root '{root}' is not a directory")
    return root


def find_hico_files(root: str | Path, test: str | Path | None = None, images: str | Path | None = None,
                    train: str | Path | None = None) -> HicoFiles:
    """The files of a HICO-DET root as laid out by QPIC / RLIPv2 (`annotations/test_hico.json`,
    `images/test2015/`, `annotations/trainval_hico.json`), or the flat variants; explicit paths win."""
    root = _root(root, "HICO-DET")
    return HicoFiles(
        _find(root, test, ["annotations/test_hico.json", "test_hico.json"], "test annotations", "--gt"),
        _find(root, images, ["images/test2015", "test2015", "images"], "test image folder", "--images"),
        _locate(root, train, ["annotations/trainval_hico.json", "trainval_hico.json"], "training annotations",
                "--train"))


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


def ground_truth_entry(record: RelationalRecord, space: LabelSpace) -> dict:
    """A shard record in the HICO-DET ground-truth form (absolute xyxy boxes, the space's ids), as
    the annotation file it was converted from. Names outside the space are errors that name them."""
    objects = {n: i for i, n in enumerate(space.objects)}
    verbs = {v.replace("_", " "): i for i, v in enumerate(space.verbs)}
    unknown = sorted({o.name for o in record.objects if o.name not in objects}
                     | {r.predicate for r in record.relations if r.predicate.replace("_", " ") not in verbs})
    if unknown:
        raise UserError(f"validation image {record.image.id!r} has labels {unknown[:5]} outside the evaluation "
                        f"label lists (eval.data.fixed_obj_labels / fixed_rel_labels); list every class and "
                        "predicate of the validation shards there")
    return {"file_name": record.key,
            "annotations": [{"bbox": [float(v) for v in o.box], "category_id": space.object_ids[objects[o.name]]}
                            for o in record.objects],
            "hoi_annotation": [{"subject_id": r.subject, "object_id": r.object,
                                "category_id": space.verb_ids[verbs[r.predicate.replace("_", " ")]]}
                               for r in record.relations]}


class ShardImages(Dataset):
    """The images of MDS shard directories (`rlipv2 data convert`) for evaluation: items as
    `RelationImages`', and `entries` = their ground truth in the HICO-DET form (from the records'
    absolute boxes, as the converted annotation file holds them)."""

    def __init__(self, shard_dirs: Sequence[str | Path], space: LabelSpace, eval_size: int = 800,
                 max_size: int = 1333, limit: int | None = None):
        from rlipv2_scale.data.shards import iter_records

        if any(d is None for d in shard_dirs):
            raise UserError("evaluation reads local shard directories: give every eval.data source a 'local' path")
        self.records = [r for d in shard_dirs for r in iter_records(d)][:limit]
        if not self.records:
            raise UserError(f"the validation shards {[str(d) for d in shard_dirs]} hold no image")
        self.entries = [ground_truth_entry(r, space) for r in self.records]
        self.transform = EvalTransform(TransformConfig(eval_size=eval_size, max_size=max_size,
                                                       train_scales=[eval_size]))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, tuple[int, int], int]:
        record = self.records[index]
        image = decode(record.image_bytes, record.key)
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
                 rel_texts: list[str], label_embeds: torch.Tensor | None = None) -> RelationOutput:
    """One evaluation forward through the model's own forward (so a DeepSpeed engine, ZeRO-3 included,
    gathers its weights), images in the weights' dtype. Pass `label_embeds` (encoded once per label
    list) to match the original's evaluation engines exactly: pre-encoded labels carry no label
    padding mask."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return model(images.to(dtype), pixel_mask, obj_texts, rel_texts, label_embeds)


def _rank_slice(n: int) -> range:
    if dist.is_available() and dist.is_initialized():
        return range(dist.get_rank(), n, dist.get_world_size())
    return range(n)


Convert = Callable[[Sequence[ImageTriplets], Sequence[dict]], list]


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: RelationImages | ShardImages, space: LabelSpace, post: PostProcess, *,
            batch_size: int = 2, num_workers: int = 0, device: str | torch.device | None = None,
            progress: bool = True, relation_key: str = "hoi_prediction", convert: Convert | None = None,
            ) -> list | None:
    """Predictions of `model` on every image of `dataset`, one per image in dataset order: by
    default the community JSON form {"file_name", "predictions", relation_key: [...]}
    ("rel_predictions" for Open Images); `convert(triplets, entries)` makes any other form from a
    batch's post-processed triplets and annotation entries.
    Distributed: every rank runs its slice; rank 0 returns all, the others None."""
    module: Any = getattr(model, "module", model)   # a DeepSpeed engine wraps the model
    if getattr(module.cfg, "tagger", False):
        raise UserError("the Relation Tagger scores given pairs; it cannot detect relations on a test set")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    obj_texts, rel_texts = label_texts(space)
    label_embeds = module.encode_labels(obj_texts, rel_texts)   # once: the label list is fixed
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
        if convert is not None:
            entries = convert(results, [dataset.entries[i] for i in idx])
        else:
            entries = to_hico_json(results, [dataset.entries[i]["file_name"] for i in idx], space)
            if relation_key != "hoi_prediction":
                entries = [{"file_name": e["file_name"], "predictions": e["predictions"],
                            relation_key: e["hoi_prediction"]} for e in entries]
        mine += list(zip(idx, entries))
        bar.update(min(len(idx) * world, len(dataset) - bar.n))   # ranks advance at the same pace
    bar.close()
    if world > 1:
        gathered: list | None = [None] * world if rank0 else None
        dist.gather_object(mine, gathered, dst=0)
        if gathered is None:      # not rank 0
            return None
        mine = [p for part in gathered for p in part]
    return [p for _, p in sorted(mine, key=lambda ip: ip[0])]


def postprocess_for(space: LabelSpace, zero_shot_nf: bool = False, top_k: int | None = 100) -> PostProcess:
    """HOI scoring (the subject is the person class) when the space has a subject class, else
    scene-graph scoring (each subject keeps its own class; subject x object x relation confidence)."""
    mode = "hoi" if space.subject_index is not None else "sgg"
    return PostProcess.for_label_space(space, mode=mode, zero_shot_nf=zero_shot_nf, top_k=top_k)


def evaluate_relations(model: torch.nn.Module, dataset: RelationImages | ShardImages, space: LabelSpace, *,
                       zero_shot: str | list | None = None, zero_shot_nf: bool = False,
                       train: list[dict] | None = None, nms: bool = True, top_k: int = 100, batch_size: int = 2,
                       num_workers: int = 0, device: str | torch.device | None = None, progress: bool = True,
                       predictions_out: str | Path | None = None) -> dict | None:
    """Relation detection with the HICO-DET protocol: the model over `dataset` (the label list encoded
    once; distributed when a process group is up), post-processed, scored against `dataset.entries`.
    The one path of `rlipv2 eval hico-det --checkpoint` and of the trainer's validation hook.
    Returns `evaluate_hico`'s numbers on rank 0, None on the other ranks."""
    from rlipv2_scale.eval.hico import evaluate_hico
    from rlipv2_scale.eval.triplet_nms import TripletNMS

    post = postprocess_for(space, zero_shot_nf, top_k)
    preds = predict(model, dataset, space, post, batch_size=batch_size, num_workers=num_workers, device=device,
                    progress=progress)
    if preds is None:
        return None
    _write(predictions_out, preds)
    return evaluate_hico(dataset.entries, preds, train=train, zero_shot=zero_shot, label_space=space,
                         nms=TripletNMS() if nms else None, top_k=top_k)


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


def load_for_scoring(checkpoint_dir: str | Path, device: str | None, space: LabelSpace) -> tuple[torch.nn.Module, str]:
    """The model of a model directory on `device` (default: this rank's GPU when there is one), checked
    against the label space it is about to be scored in."""
    from rlipv2_scale.models.build import load_pretrained

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and dist.is_available() and dist.is_initialized() and ":" not in device:
        device = f"cuda:{torch.cuda.current_device()}"
    model = load_pretrained(str(checkpoint_dir), device)
    if getattr(model.cfg, "tagger", False):
        raise UserError(f"'{checkpoint_dir}' is a Relation Tagger: it scores given pairs and cannot detect "
                        f"relations on the {space.name} test set; evaluate a detection model (r50, swin_t, swin_l)")
    check_labels(card_of(model), space, str(checkpoint_dir))
    return model, device


def _sizes(model: torch.nn.Module, eval_size: int | None, max_size: int | None) -> tuple[int, int]:
    """(shorter side, longer-side cap) of evaluation: as given, else the model card's."""
    card = card_of(model)
    eval_size = eval_size or card.eval_size
    return eval_size, max_size or max(card.max_size, eval_size)


def check_labels(card, space: LabelSpace, where: str) -> None:
    """A model fine-tuned on fixed label lists must be scored in that label space: any other gives a
    meaningless (often zero) mAP without an error from the evaluator."""
    if card.objects is None:
        return    # open vocabulary: any label texts
    texts = label_texts(space)
    if list(card.objects) != texts[0][:-1] or [r.replace("_", " ") for r in card.relations] != texts[1]:
        theirs = [o for o in card.objects if o not in space.objects][:3]
        raise UserError(f"'{where}' was trained with {len(card.objects)} object / {len(card.relations)} relation "
                        f"labels ({', '.join(card.objects[:3])}, ...) but the data is scored in the "
                        f"'{space.name}' label space ({', '.join(space.objects[:3])}, ...; e.g. {theirs} differ): "
                        "put the dataset's objects.json / verbs.json beside its annotations, or evaluate a model "
                        "trained on this label space")


def label_space_for(objects: Sequence[str], verbs: Sequence[str], subject: str = "auto", *,
                    object_ids: Sequence[int] = (), verb_ids: Sequence[int] = (), name: str = "custom") -> LabelSpace:
    """HICO-DET's label space when the lists are HICO-DET's; otherwise one built from the lists, every
    verb-object combination valid, the subject the person class if there is one ("auto") or any
    class ("any"). The one rule of the validation hook and of `eval hico-det --checkpoint`."""
    hico = hico_label_space()
    verbs = [v.replace("_", " ") for v in verbs]
    if list(hico.objects) == list(objects) and list(hico.verbs) == verbs and subject == "auto":
        return hico
    subject_index = list(objects).index("person") if subject == "auto" and "person" in objects else None
    return LabelSpace(objects=tuple(objects), verbs=tuple(verbs), valid=np.ones((len(verbs), len(objects))),
                      object_ids=tuple(object_ids), verb_ids=tuple(verb_ids), subject_index=subject_index, name=name)


def data_label_space(*folders: Path | None) -> LabelSpace | None:
    """The label space a HICO-DET-format dataset describes itself with (`objects.json` and `verbs.json`
    beside its annotations, as the HICO-DET metadata and `rlipv2 data synth` write them: entries with
    an id, or COCO's `coco_id`, and a name), from the first folder that has both; None when none has."""
    from rlipv2_scale.eval.files import read_json

    for folder in folders:
        if folder is None or not ((folder / "objects.json").is_file() and (folder / "verbs.json").is_file()):
            continue
        objects, verbs = read_json(folder / "objects.json", "object list"), read_json(folder / "verbs.json",
                                                                                      "verb list")
        try:
            return label_space_for([o["name"] for o in objects], [v.get("text", v["name"]) for v in verbs],
                                   object_ids=[int(o.get("coco_id", o.get("id"))) for o in objects],
                                   verb_ids=[int(v["id"]) for v in verbs], name=folder.name)
        except (KeyError, TypeError, ValueError):
            raise UserError(f"'{folder}/objects.json' / 'verbs.json' should list {{id (or coco_id), name}} entries") \
                from None
    return None


def _write(path: str | Path | None, data: list) -> None:
    if path is not None:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data))   # NaN boxes (V-COCO) are written as NaN, which json reads back


def evaluate_checkpoint(checkpoint_dir: str | Path, data_root: str | Path | None = None, zero_shot: str | None = None,
                        *, test: str | Path | None = None, images: str | Path | None = None,
                        train: str | Path | None = None, label_space: LabelSpace | None = None,
                        batch_size: int = 2, num_workers: int = 0, device: str | None = None,
                        eval_size: int | None = None, max_size: int | None = None, nms: bool = True, top_k: int = 100,
                        predictions_out: str | Path | None = None, progress: bool = True) -> dict | None:
    """Load a model directory, predict on a HICO-DET-format test set and return `evaluate_hico`'s
    numbers (rank 0; other ranks None). `zero_shot`: NF (no fine-tuning: subject must be the person
    class), a split of the label space (UC-RF, UC-NF, UO) or a file of unseen triplets."""
    from rlipv2_scale.eval.files import read_json

    if data_root is not None:
        files = find_hico_files(data_root, test, images, train)
    elif test is not None and images is not None:
        files = HicoFiles(Path(test), Path(images), Path(train) if train else None)
    else:
        raise UserError("give the dataset root (--data) or both the test annotations and the image folder")
    space = (label_space or data_label_space(files.test.parent, Path(data_root) if data_root else None)
             or hico_label_space())
    nf_filter, split = _zero_shot(zero_shot, space)
    model, device = load_for_scoring(checkpoint_dir, device, space)
    gt = read_json(files.test, "test annotations")
    dataset = RelationImages(gt, files.images, *_sizes(model, eval_size, max_size))
    train_entries = read_json(files.train, "training annotations") if files.train else None
    res = evaluate_relations(model, dataset, space, zero_shot=split, zero_shot_nf=nf_filter, train=train_entries,
                             nms=nms, top_k=top_k, batch_size=batch_size, num_workers=num_workers, device=device,
                             progress=progress, predictions_out=predictions_out)
    if res is None:
        return None
    res["setting"] = zero_shot or "default"
    res["checkpoint"] = str(checkpoint_dir)
    return res




# ------------------------------------------------------------------------------------------ V-COCO
@dataclass
class VcocoFiles:
    test: Path          # images to run: test_vcoco.json of the QPIC conversion (entries with file_name)
    images: Path        # folder of those images (COCO val2014)
    correct_mat: Path   # corre_vcoco.npy: valid (action-role, object) combinations
    vcoco: Path         # official V-COCO annotations (vcoco_test.json)
    coco: Path          # COCO instances of V-COCO (instances_vcoco_all_2014.json)
    image_ids: Path     # image ids of the split (vcoco_test.ids)


def find_vcoco_files(root: str | Path, *, test: str | Path | None = None, images: str | Path | None = None,
                     correct_mat: str | Path | None = None, vcoco: str | Path | None = None,
                     coco: str | Path | None = None, image_ids: str | Path | None = None) -> VcocoFiles:
    """The files of a V-COCO root as laid out by QPIC / RLIPv2 (`annotations/test_vcoco.json`,
    `annotations/corre_vcoco.npy`, `images/val2014/`) with the official toolkit's `data/` folder
    (`data/vcoco/vcoco_test.json`, `data/instances_vcoco_all_2014.json`, `data/splits/vcoco_test.ids`),
    or flat variants; explicit paths win."""
    root = _root(root, "V-COCO")
    return VcocoFiles(
        _find(root, test, ["annotations/test_vcoco.json", "test_vcoco.json"], "test image list", "--test"),
        _find(root, images, ["images/val2014", "val2014", "images"], "test image folder", "--images"),
        _find(root, correct_mat, ["annotations/corre_vcoco.npy", "corre_vcoco.npy"],
              "valid action-object matrix", "--correct-mat"),
        _find(root, vcoco, ["data/vcoco/vcoco_test.json", "vcoco/vcoco_test.json", "vcoco_test.json"],
              "official V-COCO annotations", "--vcoco"),
        _find(root, coco, ["data/instances_vcoco_all_2014.json", "instances_vcoco_all_2014.json"],
              "COCO instances", "--coco"),
        _find(root, image_ids, ["data/splits/vcoco_test.ids", "splits/vcoco_test.ids", "vcoco_test.ids"],
              "image-id list", "--image-ids"))


def vcoco_label_space(correct_mat: np.ndarray | None = None) -> LabelSpace:
    """V-COCO as the original evaluates it: 80 COCO objects + "missing objects" (index 80, the object
    of role-less actions), the 29 action-role texts, person = 0. `correct_mat` ([29, 80] or [29, 81],
    `corre_vcoco.npy`) masks invalid combinations; the original appends a column of ones, which makes
    "missing objects" always valid for a [29, 80] file (a [29, 81] one keeps its own last column)."""
    from rlipv2_scale.labels import metadata as md

    objects = [o["name"] for o in md.vcoco_objects()["objects"]] + ["missing objects"]
    verbs = [v["text"] for v in md.vcoco_verbs()]
    if correct_mat is None:
        valid = np.ones((len(verbs), len(objects)))
    else:
        mat = np.asarray(correct_mat, dtype=np.float64)
        if mat.ndim != 2 or mat.shape[0] != len(verbs) or mat.shape[1] not in (len(objects) - 1, len(objects)):
            raise UserError(f"V-COCO valid action-object matrix has shape {mat.shape}, expected "
                            f"({len(verbs)}, {len(objects) - 1}) as corre_vcoco.npy")
        valid = np.concatenate([mat, np.ones((len(verbs), 1))], axis=1)[:, : len(objects)]
    return LabelSpace(objects=tuple(objects), verbs=tuple(verbs), valid=valid, subject_index=0, name="v-coco")


def vcoco_image_id(entry: dict) -> int:
    """COCO image id of a test entry: from the file name (COCO_val2014_000000000042.jpg -> 42), as the
    original, else the entry's `img_id`."""
    name = str(entry.get("file_name", ""))
    match = re.fullmatch(r"COCO_[a-z]+\d*_0*(\d+)\.\w+", Path(name).name)
    if match:
        return int(match.group(1))
    if isinstance(entry.get("img_id"), int):
        return entry["img_id"]
    raise DataError(f"V-COCO test entry '{name}' has neither a COCO file name (COCO_val2014_<id>.jpg) nor an "
                    "integer 'img_id'", sample_id=name, reason="malformed_annotation")


def vcoco_detections(triplets: ImageTriplets, image_id: int, missing_index: int = 80) -> list[dict]:
    """One image's detections in the official format, one per query pair (no top-k, no NMS, as the
    original's export): `person_box`, `{action}_agent` = the highest score over the action's roles
    (role-less actions: their own score), `{action}_{role}` = object box + [score]; an object
    classified "missing objects" has a NaN box. Scores are s_rel · s_obj · valid (post-processing
    with `top_k=None`, no NMS: every non-zero score is among the triplets, the rest are 0)."""
    from rlipv2_scale.labels.metadata import vcoco_verbs

    verbs = vcoco_verbs()
    n_pairs = triplets.sub_boxes.shape[0]
    scores = torch.zeros(n_pairs, len(verbs))
    scores[triplets.pair_index, triplets.rel_index] = triplets.scores.float()
    nan_box = [float("nan")] * 4
    out = []
    for p, (person, obj, label, row) in enumerate(zip(triplets.sub_boxes.tolist(), triplets.obj_boxes.tolist(),
                                                      triplets.obj_labels.tolist(), scores.tolist())):
        det: dict = {"image_id": image_id, "person_box": person}
        obj_box = nan_box if label == missing_index else obj
        agents: dict[str, float] = {}
        for v, s in zip(verbs, row):
            if v["role"] == "agent":
                det[f"{v['action']}_agent"] = s
            else:
                det[v["name"]] = obj_box + [s]
                agents[v["action"]] = max(agents.get(v["action"], 0.0), s)
        det.update({f"{a}_agent": s for a, s in agents.items()})
        out.append(det)
    return out


def evaluate_vcoco_checkpoint(checkpoint_dir: str | Path, data_root: str | Path | None = None, *,
                              test: str | Path | None = None, images: str | Path | None = None,
                              correct_mat: str | Path | None = None, vcoco: str | Path | None = None,
                              coco: str | Path | None = None, image_ids: str | Path | None = None,
                              batch_size: int = 2, num_workers: int = 0, device: str | None = None,
                              eval_size: int | None = None, max_size: int | None = None,
                              predictions_out: str | Path | None = None, progress: bool = True) -> dict | None:
    """Load a model directory, run it over the V-COCO test images and return `evaluate_vcoco`'s role
    AP (scenarios 1 and 2; rank 0, other ranks None). `predictions_out`: the detections as JSON."""
    from rlipv2_scale.eval.files import read_json
    from rlipv2_scale.eval.vcoco import evaluate_vcoco, read_image_ids

    if data_root is None:
        given = dict(test=test, images=images, correct_mat=correct_mat, vcoco=vcoco, coco=coco, image_ids=image_ids)
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise UserError("give the V-COCO root (--data) or every file: missing "
                            + ", ".join("--" + k.replace("_", "-") for k in missing))
        files = VcocoFiles(*(Path(v) for v in given.values() if v is not None))   # none is, after the check
    else:
        files = find_vcoco_files(data_root, test=test, images=images, correct_mat=correct_mat, vcoco=vcoco,
                                 coco=coco, image_ids=image_ids)
    try:
        mat = np.load(files.correct_mat)
    except (OSError, ValueError) as exc:
        raise UserError(f"valid action-object matrix '{files.correct_mat}' is not a readable .npy file ({exc})") \
            from None
    space = vcoco_label_space(mat)
    entries = read_json(files.test, "V-COCO test image list")
    if not isinstance(entries, list):
        raise UserError(f"V-COCO test image list '{files.test}' should be a JSON list of entries with 'file_name'")
    ids = [vcoco_image_id(e) if isinstance(e, dict) else None for e in entries]
    split_ids = read_image_ids(files.image_ids)
    split = set(split_ids)
    outside = sorted({i for i in ids if i is not None and i not in split})
    if outside:
        raise UserError(f"{len(outside)} image(s) of '{files.test}' are not in the split '{files.image_ids}' "
                        f"(e.g. {outside[:3]}): the test list and the official files are of different splits")
    model, device = load_for_scoring(checkpoint_dir, device, space)
    dataset = RelationImages(entries, files.images, *_sizes(model, eval_size, max_size))
    post = PostProcess.for_label_space(space, top_k=None)   # every pair x verb, no NMS (the official export)
    missing_object = space.objects.index("missing objects")

    def convert(results: Sequence[ImageTriplets], batch: Sequence[dict]) -> list:
        return [vcoco_detections(r, vcoco_image_id(e), missing_object) for r, e in zip(results, batch)]

    per_image = predict(model, dataset, space, post, batch_size=batch_size, num_workers=num_workers, device=device,
                        progress=progress, convert=convert)
    if per_image is None:
        return None
    detections = [d for image in per_image for d in image]
    _write(predictions_out, detections)
    res = evaluate_vcoco(read_json(files.vcoco, "V-COCO annotations"), read_json(files.coco, "COCO instances"),
                         split_ids, detections)
    res["n_images"] = len(entries)
    res["checkpoint"] = str(checkpoint_dir)
    return res


# ------------------------------------------------------------------------------------------ Open Images
@dataclass
class OiFiles:
    test: Path                       # OI_SGG_test.json
    images: Path                     # image folder
    categories: Path | None          # OI_SGG_trainval_test_categories_dict.json: "obj" (288) and "rel" (30) names
    object_categories: Path | None   # categories_dict.json: all object names, which test category_ids index


def find_oi_files(root: str | Path, *, test: str | Path | None = None, images: str | Path | None = None,
                  categories: str | Path | None = None, object_categories: str | Path | None = None) -> OiFiles:
    """The files of an Open Images v6 SGG root as laid out by RLIPv2 (`annotations/OI_SGG_test.json`,
    `annotations/OI_SGG_trainval_test_categories_dict.json`, `annotations/categories_dict.json`,
    `images/`), or flat; explicit paths win."""
    from rlipv2_scale.data.sources.oi_sgg import ALL_OBJECT_CATEGORIES, CATEGORIES

    root = _root(root, "Open Images")
    return OiFiles(
        _find(root, test, ["annotations/OI_SGG_test.json", "OI_SGG_test.json"], "test annotations", "--gt"),
        _find(root, images, ["images"], "image folder", "--images"),
        _find(root, categories, [f"annotations/{CATEGORIES}", CATEGORIES], "category names", "--categories"),
        _locate(root, object_categories, [f"annotations/{ALL_OBJECT_CATEGORIES}", ALL_OBJECT_CATEGORIES],
                "all object names", "--object-categories"))


def oi_label_space_from_files(categories: str | Path, object_categories: str | Path | None = None) -> LabelSpace:
    """Open Images v6 SGG as the original reads it: the SGG "obj" / "rel" names (the model reads them);
    object ids are positions in the full object list when `object_categories` is given (what the
    annotation files' category_ids index), else in the SGG list; predicate ids 0..29."""
    from rlipv2_scale.data.sources.base import load_json

    def names(path: str | Path, key: str) -> list[str]:
        data = load_json(Path(path), "Open Images categories")
        if not isinstance(data, dict) or not isinstance(data.get(key), list) or not data[key]:
            raise UserError(f"'{path}' needs a non-empty '{key}' list of names")
        return [str(n) for n in data[key]]

    objects, predicates = names(categories, "obj"), names(categories, "rel")
    object_ids: list[int] = []
    if object_categories is not None:
        everything = {n: i for i, n in reversed(list(enumerate(names(object_categories, "obj"))))}
        unknown = [o for o in objects if o not in everything]
        if unknown:
            raise UserError(f"'{categories}' names objects that '{object_categories}' lacks ({unknown[:3]}); "
                            "the two category files must come from the same release")
        object_ids = [everything[o] for o in objects]
    return LabelSpace(objects=tuple(objects), verbs=tuple(predicates), valid=np.ones((len(predicates), len(objects))),
                      object_ids=tuple(object_ids), subject_index=None, name="open-images-v6")


def evaluate_oi_checkpoint(checkpoint_dir: str | Path, data_root: str | Path | None = None, *,
                           test: str | Path | None = None, images: str | Path | None = None,
                           categories: str | Path | None = None, object_categories: str | Path | None = None,
                           label_space: LabelSpace | None = None, batch_size: int = 2, num_workers: int = 0,
                           device: str | None = None, eval_size: int | None = None, max_size: int | None = None,
                           nms: bool = True,
                           predictions_out: str | Path | None = None, progress: bool = True) -> dict | None:
    """Open Images v6 SGG: scene-graph post-processing (the subject keeps its own class, score
    s_rel · s_obj · s_sub) scored with `eval.oi_sgg.evaluate_oi_sgg` (rank 0; other ranks None).
    The label space comes from the category files (`oi_label_space_from_files`) unless given."""
    from rlipv2_scale.eval.files import read_json
    from rlipv2_scale.eval.oi_sgg import evaluate_oi_sgg

    if data_root is not None:
        files = find_oi_files(data_root, test=test, images=images, categories=categories,
                              object_categories=object_categories)
    elif test is None or images is None or (categories is None and label_space is None):
        raise UserError("give the Open Images root (--data) or the test annotations (--gt), the image folder "
                        "(--images) and the category names (--categories)")
    else:
        files = OiFiles(Path(test), Path(images), Path(categories) if categories else None,
                        Path(object_categories) if object_categories else None)
    if label_space is None:
        assert files.categories is not None
        label_space = oi_label_space_from_files(files.categories, files.object_categories)
    space = label_space
    model, device = load_for_scoring(checkpoint_dir, device, space)
    gt = read_json(files.test, "test annotations")
    if not isinstance(gt, list):
        raise UserError(f"Open Images test annotations '{files.test}' should be a JSON list of images")
    dataset = RelationImages(gt, files.images, *_sizes(model, eval_size, max_size))
    post = PostProcess(mode="sgg", top_k=100)   # the evaluator keeps at most the top 100, then applies NMS
    preds = predict(model, dataset, space, post, batch_size=batch_size, num_workers=num_workers,
                    device=device, progress=progress, relation_key="rel_predictions")
    if preds is None:
        return None
    _write(predictions_out, preds)
    res = evaluate_oi_sgg(gt, preds, nms=nms, label_space=space)
    res["n_images"] = len(gt)
    res["checkpoint"] = str(checkpoint_dir)
    return res
