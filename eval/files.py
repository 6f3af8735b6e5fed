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
                   with_score: bool = False, optional: tuple[str, ...] = (), check_order: bool = True
                   ) -> RelationFile | Any:
    """A file in the listed form decoded straight into columns (`relation_json.decode_listed`: no dict
    per box, which is most of the time and memory of json.load here); any other file, the objects
    json.load makes of it, for the list-of-dicts path to accept (another form) or to reject naming the
    malformed entry."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file {str(path)!r} does not exist")
    fast = decode_listed(path.read_bytes(), space, box_key, rel_key, with_score=with_score, optional=optional,
                         what=what, check_order=check_order)
    return fast if fast is not None else read_json(path, what)


def read_ground_truth(path: str | Path, space: LabelSpace, rel_key: str, what: str = "ground truth", *,
                      required: bool = False) -> RelationFile | Any:
    """Ground truth (or training annotations, `required`: only their labels are counted, so their boxes
    are not checked) {file_name, annotations, `rel_key`}; both lists are required in every entry (the
    reference evaluators index them), and an entry without one is refused naming it."""
    return read_relations(path, what, space, "annotations", rel_key, check_order=not required)


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


def _split_name_hint(value: str, space: LabelSpace) -> str | None:
    """The error for a --zero-shot value that is no file but looks like a split name (no folder, no
    suffix), listing the label space's split names; None when it looks like a path."""
    if "/" in value or "\\" in value or Path(value).suffix:
        return None
    names = sorted(space.zero_shot_splits)
    if not names:
        return (f"zero-shot split {value!r} is not a file, and label space {space.name!r} has no built-in splits: "
                f"pass a JSON file of unseen [subject, object, verb] index triplets")
    same = [n for n in names if n.lower() == value.lower()]
    hint = f" (split names are case-sensitive: did you mean {same[0]!r}?)" if same else ""
    return (f"zero-shot split {value!r} is neither a split name of {space.name!r} ({', '.join(names)}) nor an "
            f"existing file{hint}")


def _index(v, n: int) -> bool:
    """A JSON integer (not a boolean, float or string) in [0, n)."""
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n


def read_unseen_triplets(path: str | Path, space: LabelSpace) -> tuple[Triplet, ...]:
    """A zero-shot split file: a list of [subject, object, verb] index triplets, or an object with
    "unseen_triplets" (the same) or, for HICO-DET, "unseen_hoi_index" (0-based positions in the
    official 600-HOI list). Every index must be a JSON integer in range, and the list not empty."""
    if not Path(path).exists():
        hint = _split_name_hint(str(path), space)
        if hint is not None:
            raise UserError(hint)
    data = read_json(path, "zero-shot split")
    where = f"zero-shot split {str(path)!r}"
    key = ""
    if isinstance(data, dict) and "unseen_triplets" in data:
        data, key = data["unseen_triplets"], "unseen_triplets"
    elif isinstance(data, dict) and "unseen_hoi_index" in data:
        from rlipv2_scale.labels.metadata import hico_hoi_list

        if space.name != "hico-det":
            raise UserError(f"{where}: 'unseen_hoi_index' is only defined for HICO-DET; "
                            f"give 'unseen_triplets' instead")
        hois = hico_hoi_list()
        index = data["unseen_hoi_index"]
        if not isinstance(index, list) or not index:
            raise UserError(f"{where}: unseen_hoi_index must be a non-empty list of integers in [0, {len(hois)}), "
                            f"got {index!r}")
        for j, i in enumerate(index):
            if not _index(i, len(hois)):
                raise UserError(f"{where}: unseen_hoi_index[{j}] = {i!r} is not an integer in [0, {len(hois)}) "
                                f"(0-based positions in the official 600-HOI list)")
        data = [[space.subject_index, hois[i]["object_index"], hois[i]["verb_index"]] for i in index]
    if not isinstance(data, list):
        raise UserError(f"{where}: expected a list of [subject, object, verb] index triplets")
    if not data:
        raise UserError(f"{where}: {key or 'the list'} is empty; list the unseen [subject, object, verb] index triplets (an "
                        f"empty split has no unseen mAP)")
    limits = (space.n_objects, space.n_objects, space.n_verbs)
    for j, t in enumerate(data):
        if not (isinstance(t, list) and len(t) == 3 and all(_index(x, n) for x, n in zip(t, limits))):
            raise UserError(f"{where}: {f'{key}[{j}]' if key else f'entry {j}'} = {t!r} is not (subject index, "
                            f"object index, verb index) as integers within {space.n_objects} objects and "
                            f"{space.n_verbs} verbs")
    try:
        return space.unseen_triplets(data)
    except (TypeError, ValueError):
        raise UserError(f"{where}: expected a list of [subject, object, verb] index triplets") from None
