"""Reading evaluation inputs from disk with errors that name the file and the fix."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec

from rlipv2_scale.errors import UserError
from rlipv2_scale.eval.relation_json import RelationFile, decode_listed
from rlipv2_scale.labels.space import LabelSpace, Triplet


def read_json(path: str | Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file {str(path)!r} does not exist")
    try:
        with path.open() as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{what} file {str(path)!r} is not valid JSON ({exc})") from None


def read_relations(path: str | Path, what: str, space: LabelSpace, box_key: str, rel_key: str, *,
                   with_score: bool = False, optional: tuple[str, ...] = ()) -> RelationFile | Any:
    """A file in the listed form decoded straight into columns (`relation_json.decode_listed`: no dict
    per box, which is most of the time and memory of json.load here); any other file, the objects
    json.load makes of it, for the list-of-dicts path to accept (another form) or to reject naming the
    malformed entry."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file {str(path)!r} does not exist")
    fast = decode_listed(path.read_bytes(), space, box_key, rel_key, with_score=with_score, optional=optional,
                         what=what)
    return fast if fast is not None else read_json(path, what)


def read_ground_truth(path: str | Path, space: LabelSpace, rel_key: str, what: str = "ground truth", *,
                      required: bool = False) -> RelationFile | Any:
    """Ground truth (or training annotations: `required` keys) {file_name, annotations, `rel_key`}."""
    keys = ("annotations", rel_key)
    return read_relations(path, what, space, *keys, optional=() if required else keys)


def read_predictions(path: str | Path, space: LabelSpace, rel_key: str) -> RelationFile | Any:
    """Predictions {file_name, predictions, `rel_key` with scores}, or the per-query form."""
    return read_relations(path, "predictions", space, "predictions", rel_key, with_score=True, optional=(rel_key,))


class _CocoImage(msgspec.Struct, gc=False):
    id: int
    width: float
    height: float


class _CocoAnnotation(msgspec.Struct, gc=False):
    id: int
    image_id: int
    category_id: int
    bbox: tuple[float, float, float, float]
    area: float
    ignore: int = 0


class _CocoCategory(msgspec.Struct, gc=False):
    id: int


class _CocoInstances(msgspec.Struct, gc=False):
    images: list[_CocoImage]
    annotations: list[_CocoAnnotation]
    categories: list[_CocoCategory]


def read_coco_instances(path: str | Path) -> Any:
    """A COCO instances file as the dicts pycocotools indexes, with only the fields the V-COCO toolkit
    reads (`eval.vcoco._Annotations`): the segmentation polygons, most of the file, are skipped rather
    than built by json.load. Any other file: read_json's objects (and errors)."""
    path = Path(path)
    if path.is_file():
        try:
            return msgspec.to_builtins(msgspec.json.decode(path.read_bytes(), type=_CocoInstances))
        except (msgspec.ValidationError, msgspec.DecodeError):
            pass
    return read_json(path, "COCO instances")


def read_unseen_triplets(path: str | Path, space: LabelSpace) -> tuple[Triplet, ...]:
    """A zero-shot split file: a list of [subject, object, verb] index triplets, or an object with
    "unseen_triplets" (the same) or, for HICO-DET, "unseen_hoi_index" (0-based positions in the
    official 600-HOI list)."""
    data = read_json(path, "zero-shot split")
    if isinstance(data, dict) and "unseen_triplets" in data:
        data = data["unseen_triplets"]
    elif isinstance(data, dict) and "unseen_hoi_index" in data:
        from rlipv2_scale.labels.metadata import hico_hoi_list

        if space.name != "hico-det":
            raise UserError(f"zero-shot split {str(path)!r}: 'unseen_hoi_index' is only defined for HICO-DET; "
                            f"give 'unseen_triplets' instead")
        hois = hico_hoi_list()
        try:
            data = [[space.subject_index, hois[i]["object_index"], hois[i]["verb_index"]] for i in data["unseen_hoi_index"]]
        except (IndexError, TypeError):
            raise UserError(f"zero-shot split {str(path)!r}: unseen_hoi_index must be integers in [0, {len(hois)})") from None
    if not isinstance(data, list):
        raise UserError(f"zero-shot split {str(path)!r}: expected a list of [subject, object, verb] index triplets")
    try:
        return space.unseen_triplets(data)
    except (TypeError, ValueError):
        raise UserError(f"zero-shot split {str(path)!r}: expected a list of [subject, object, verb] index triplets") from None
