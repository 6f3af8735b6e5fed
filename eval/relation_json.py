"""Ground truth and predictions in the QPIC-family JSON form, validated and flattened to arrays.

Ground truth (one entry per image, e.g. `test_hico.json`):
    {"file_name", "annotations": [{"bbox": [x1, y1, x2, y2], "category_id"}],
     "hoi_annotation": [{"subject_id", "object_id", "category_id"}]}
(Open Images uses `rel_annotations` for the relation list.)

Predictions, matched to ground truth by `file_name`, in either form:
  * community form: {"file_name", "predictions": [{"bbox", "category_id"}],
    "hoi_prediction": [{"subject_id", "object_id", "category_id", "score"}]}
  * per-query form (what a DETR-style post-processor emits): {"file_name",
    "predictions": [...] or "boxes" [N, 4] + "labels" [N] (object *indices*), "verb_scores" [Q, V],
    "sub_ids" [Q], "obj_ids" [Q]}; its candidates are every (query, verb), query-major.
`category_id`s are the label space's ids (COCO ids and verb ids 1..117 for HICO-DET).

Every malformed value raises `UserError` naming the image and the field.

From a file, `decode_listed` (through `eval.files.read_relations`) decodes the listed form with msgspec
into typed structs and then columns (`RelationFile`), never building a dict per box; a file it does
not accept goes through json.load and the list-of-dicts checks, which accept the other forms or name
the malformed entry, so that both paths score alike and a malformed file never scores.
"""
from __future__ import annotations

import difflib
import gc
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain
from operator import attrgetter, itemgetter

import msgspec
import numpy as np

from rlipv2_scale.errors import UserError
from rlipv2_scale.labels.space import LabelSpace


@dataclass
class GroundTruth:
    file_names: list[str]
    box_offset: np.ndarray  # [n_img + 1]: boxes of image i are box_offset[i]:box_offset[i+1]
    boxes: np.ndarray  # [N, 4] float64
    box_cat: np.ndarray  # [N] object index
    rel_img: np.ndarray  # [H] image of each relation, in file then annotation order
    rel_sub: np.ndarray  # [H] global box index
    rel_obj: np.ndarray
    rel_verb: np.ndarray  # [H] verb index

    @property
    def n_images(self) -> int:
        return len(self.file_names)


@dataclass
class Candidates:
    """Scored (subject, object, verb) candidates, per image in ranking order (image-major)."""
    img: np.ndarray  # [C] ground-truth image index
    sub: np.ndarray  # [C] global predicted-box index
    obj: np.ndarray
    verb: np.ndarray
    score: np.ndarray  # float64
    boxes: np.ndarray  # [M, 4] predicted boxes
    box_cat: np.ndarray  # [M] object index
    n_listed: int = 0  # ground-truth images that the predictions list (with or without candidates)


def _where(file_name: str, role: str) -> str:
    return f"{role} for image {file_name!r}"


# The relation lists of the supported datasets, ground truth and predictions, and their plural / singular
# slips: one of these in place of the key expected is a near miss (see `_missing_key`).
RELATION_KEYS = ("hoi_annotation", "hoi_annotations", "rel_annotations", "rel_annotation", "hoi_prediction",
                 "hoi_predictions", "rel_predictions", "rel_prediction")


def _near_miss(entry: dict, key: str, present: tuple[str, ...] = (), fuzzy: bool = True) -> str | None:
    """A key of `entry` (not one of `present`, the keys it has rightly) that looks like a misspelt `key`:
    another relation list's name, or (`fuzzy`) a close spelling."""
    others = [k for k in entry if isinstance(k, str) and k != key and k not in present]
    if key in RELATION_KEYS:
        known = [k for k in others if k in RELATION_KEYS]
        if known:
            return known[0]
    close = difflib.get_close_matches(key, others, n=1, cutoff=0.75) if fuzzy else []
    return close[0] if close else None


def _missing_key(entry: dict, key: str, name: str, role: str, present: tuple[str, ...] = (),
                 fuzzy: bool = True) -> UserError:
    found = _near_miss(entry, key, present, fuzzy)
    hint = f"; it has {found!r} instead: rename it to {key!r}" if found else ""
    return UserError(f"{_where(name, role)}: the entry has no {key!r} key{hint}")


def _check_box_order(arr: np.ndarray, file_name: str, role: str, field_name: str, key: str = "bbox") -> None:
    """x2 >= x1 and y2 >= y1 (a box of negative size never overlaps anything: it is a mistake, such as
    [x, y, w, h] or a swapped corner). Zero-size boxes occur in the datasets and stay valid."""
    bad = (arr[:, 2] < arr[:, 0]) | (arr[:, 3] < arr[:, 1])
    if bad.any():
        j = int(np.argmax(bad))
        where = f"{field_name}[{j}].{key}" if key else f"{field_name}[{j}]"
        raise UserError(f"{_where(file_name, role)}: {where} = {arr[j].tolist()} has x2 < x1 or y2 < y1; boxes "
                        f"are [x1, y1, x2, y2] with x2 >= x1 and y2 >= y1")


def _boxes(items: list, file_name: str, role: str, field_name: str, check_order: bool = True) -> np.ndarray:
    if not isinstance(items, list):
        raise UserError(f"{_where(file_name, role)}: {field_name!r} must be a list")
    if not items:
        return np.zeros((0, 4))
    try:
        arr = np.asarray([it["bbox"] for it in items], dtype=np.float64).reshape(len(items), -1)
    except (KeyError, TypeError, ValueError):
        arr = None
    if arr is None or arr.shape[1:] != (4,):
        for j, it in enumerate(items):
            box = it.get("bbox") if isinstance(it, dict) else None
            ok = isinstance(box, (list, tuple)) and len(box) == 4 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in box)
            if not ok:
                raise UserError(f"{_where(file_name, role)}: {field_name}[{j}].bbox must be 4 numbers "
                                f"[x1, y1, x2, y2], got {box!r}")
        raise UserError(f"{_where(file_name, role)}: {field_name} has malformed boxes")
    arr = arr.reshape(len(items), 4)
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        j = int(np.argmax(bad))
        raise UserError(f"{_where(file_name, role)}: {field_name}[{j}].bbox has a non-finite value {arr[j].tolist()}")
    if check_order:
        _check_box_order(arr, file_name, role, field_name)
    return arr


def _ids_to_index(ids: np.ndarray, table: np.ndarray, file_name: str, role: str, field_name: str,
                  what: str) -> np.ndarray:
    ok = (ids >= 0) & (ids < len(table))
    idx = np.where(ok, table[np.where(ok, ids, 0)], -1)
    if (idx < 0).any():
        j = int(np.argmax(idx < 0))
        raise UserError(f"{_where(file_name, role)}: {field_name}[{j}].category_id = {ids[j]} is not a "
                        f"{what} id of the label space")
    return idx


def _int_column(items: list, key: str, file_name: str, role: str, field_name: str) -> np.ndarray:
    try:
        col = np.asarray([it[key] for it in items], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        for j, it in enumerate(items):
            v = it.get(key) if isinstance(it, dict) else None
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise UserError(f"{_where(file_name, role)}: {field_name}[{j}].{key} must be a number, got {v!r}")
        raise
    if len(col) and (~np.isfinite(col) | (col != np.round(col))).any():
        j = int(np.argmax(~np.isfinite(col) | (col != np.round(col))))
        raise UserError(f"{_where(file_name, role)}: {field_name}[{j}].{key} must be an integer, got {col[j]}")
    return col.astype(np.int64)


def _check_range(ids: np.ndarray, n: int, file_name: str, role: str, field_name: str, key: str) -> None:
    bad = (ids < 0) | (ids >= n)
    if bad.any():
        j = int(np.argmax(bad))
        raise UserError(f"{_where(file_name, role)}: {field_name}[{j}].{key} = {ids[j]} is out of range "
                        f"(the image has {n} boxes)")


def _columns(items, keys: tuple[str, ...], n: int, getter=itemgetter) -> np.ndarray:
    """[n, len(keys)] float64 of the listed dicts' fields (or, with `getter=attrgetter`, the decoded
    structs' attributes), in one pass at C speed (raises KeyError / TypeError / ValueError on anything
    malformed; the slow checks then name the culprit)."""
    get = getter(*keys)
    values = map(get, items) if len(keys) == 1 else chain.from_iterable(map(get, items))
    return np.fromiter(values, dtype=np.float64, count=n * len(keys)).reshape(n, len(keys))


def _box_column(items, n: int, getter=itemgetter) -> np.ndarray:
    bboxes = list(map(getter("bbox"), items))
    if n and set(map(len, bboxes)) != {4}:  # (a set is the cheapest all-equal test here)
        raise ValueError("a bbox is not 4 numbers")
    return np.fromiter(chain.from_iterable(bboxes), dtype=np.float64, count=4 * n).reshape(n, 4)


def _whole(x: np.ndarray) -> np.ndarray | None:
    """`x` as int64 if it holds only whole numbers within int64, else None (NaN, inf and huge values
    fail the round trip)."""
    with np.errstate(invalid="ignore"):  # (the cast warns on NaN / inf)
        ints = x.astype(np.int64)
    return ints if (ints == x).all() else None


@dataclass
class FlatRelations:
    """Boxes and relations of many images as flat arrays (relation box ids made global)."""
    n_box: np.ndarray  # [n_entries]
    n_rel: np.ndarray  # [n_entries]
    boxes: np.ndarray  # [N, 4]
    box_cat: np.ndarray  # [N] object index
    sub: np.ndarray  # [R] global box index
    obj: np.ndarray
    verb: np.ndarray  # [R] verb index
    score: np.ndarray | None  # [R]


def _flatten(boxes_of: list, rels_of: list, space: LabelSpace, with_score: bool, getter=itemgetter,
             check_order: bool = True) -> FlatRelations:
    """One pass per field over every image's dicts, then one vectorised validation. Raises KeyError /
    TypeError / ValueError / AttributeError on anything malformed; the slow per-entry checks then name
    the culprit. (The listed dicts are read once each: that reading is most of the evaluator's time.)"""
    n_box = np.fromiter(map(len, boxes_of), dtype=np.int64, count=len(boxes_of))
    n_rel = np.fromiter(map(len, rels_of), dtype=np.int64, count=len(rels_of))
    n, r = int(n_box.sum()), int(n_rel.sum())
    boxes = _box_column(chain.from_iterable(boxes_of), n, getter)
    cat_ids = _columns(chain.from_iterable(boxes_of), ("category_id",), n, getter)[:, 0]
    keys = ("subject_id", "object_id", "category_id") + (("score",) if with_score else ())
    rel = _columns(chain.from_iterable(rels_of), keys, r, getter)
    cat_ids, ids = _whole(cat_ids), _whole(rel[:, :3])
    obj_table, verb_table = space.id_lookup("object"), space.id_lookup("verb")
    if cat_ids is None or ids is None or not (np.isfinite(boxes).all() and np.isfinite(rel[:, 3:]).all()):
        raise ValueError("invalid value")
    if check_order and ((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).any():
        raise ValueError("a box of negative size")
    sub, obj, verb_ids = ids.T
    rel_boxes = np.repeat(n_box, n_rel)  # boxes of each relation's image
    if not (((cat_ids >= 0) & (cat_ids < len(obj_table))).all()
            and ((verb_ids >= 0) & (verb_ids < len(verb_table))).all()
            and ((sub >= 0) & (sub < rel_boxes) & (obj >= 0) & (obj < rel_boxes)).all()):
        raise ValueError("id out of range")
    box_cat, verb = obj_table[cat_ids], verb_table[verb_ids]
    if (box_cat < 0).any() or (verb < 0).any():
        raise ValueError("unknown id")
    start = np.repeat(np.cumsum(n_box) - n_box, n_rel)
    return FlatRelations(n_box, n_rel, boxes, box_cat, sub + start, obj + start, verb,
                         rel[:, 3].copy() if with_score else None)


def flatten_relations(entries: list[dict], space: LabelSpace, box_key: str, rel_key: str) -> FlatRelations:
    """Fast path for a whole annotation file: raises KeyError / TypeError / ValueError / AttributeError
    on anything malformed, for the caller's slow path to name it."""
    if not isinstance(entries, list):
        raise TypeError("not a list of images")
    return _flatten([e[box_key] for e in entries], [e[rel_key] for e in entries], space, with_score=False,
                    check_order=False)  # (training annotations: only their labels are counted)


class _Box(msgspec.Struct, gc=False):
    bbox: tuple[float, float, float, float]
    category_id: int


class _Rel(msgspec.Struct, gc=False):
    subject_id: int
    object_id: int
    category_id: int


class _ScoredRel(_Rel, gc=False):
    score: float


@lru_cache(maxsize=None)
def _listed_decoder(box_key: str, rel_key: str, with_score: bool,
                    optional: frozenset) -> tuple[msgspec.json.Decoder, tuple[str, ...]]:
    """Decoder of one image's entry. An optional relation list's near misses (`RELATION_KEYS`) are
    kept as raw text (`near_misses`): an entry that has one goes to the checks of the list-of-dicts path."""
    def field(key: str):
        return msgspec.field(name=key, default_factory=list) if key in optional else msgspec.field(name=key)
    near = [k for k in RELATION_KEYS if k != rel_key and rel_key in optional and rel_key in RELATION_KEYS]
    image = msgspec.defstruct("ListedImage", [
        ("file_name", str), ("verb_scores", msgspec.Raw, msgspec.field(default_factory=msgspec.Raw)),
        ("boxes", list[_Box], field(box_key)),
        ("rels", list[_ScoredRel if with_score else _Rel], field(rel_key))]
        + [(f"near_{i}", msgspec.Raw, msgspec.field(name=k, default_factory=msgspec.Raw)) for i, k in enumerate(near)],
        kw_only=True, gc=False)
    return msgspec.json.Decoder(image), tuple(f"near_{i}" for i in range(len(near)))


_RAW_LIST = msgspec.json.Decoder(list[msgspec.Raw])
CHUNK = 128  # images decoded into Python objects at a time (their columns are kept, the objects dropped)


@dataclass
class RelationFile:
    """A whole file in the listed form (ground truth, or predictions in the community form), decoded by
    `decode_listed` straight into columns; the evaluators take it wherever they take the list of dicts."""
    file_names: list[str]
    flat: FlatRelations


_WRONG_TYPE = re.compile(r"Expected `(int|float|str)`, got `(bool|str)` - at `\$\.(.+)`")
_EXPECTED = {"int": "an integer", "float": "a number", "str": "a string"}


def _refuse_wrong_type(exc: msgspec.ValidationError, raws: list, decode, what: str) -> None:
    """A boolean or a string where a number belongs: a UserError naming the entry. (json.load's path
    would read true as 1 and "3" as 3, numpy's conversions, and score the file.)"""
    m = _WRONG_TYPE.fullmatch(str(exc))
    if m is None:
        return
    for raw in raws:  # the first entry that fails is the one the message is about
        try:
            decode(raw)
        except msgspec.ValidationError:
            name = msgspec.json.decode(raw).get("file_name")
            raise UserError(f"{what} for image {name!r}: {m[3]} must be {_EXPECTED[m[1]]}, got a "
                            f"{'boolean' if m[2] == 'bool' else 'string'}") from None


def decode_listed(data: bytes, space: LabelSpace, box_key: str, rel_key: str, *, with_score: bool = False,
                  optional: tuple[str, ...] = (), what: str = "predictions",
                  check_order: bool = True) -> RelationFile | None:
    """JSON text of a list of images with `box_key` boxes and `rel_key` relations (`optional` ones may be
    absent: no boxes / no relations) decoded into typed structs, never a dict per box, then columns, a
    chunk of images at a time (the objects of a whole file would take several times its size). None
    when the text is anything else: not JSON, another form (per-query entries: `verb_scores`), a value
    of the wrong type, an id out of range; the caller then reads the file as plain JSON and the checks
    of the list-of-dicts path name the entry or accept the other form. A boolean or string where a
    number belongs raises the `UserError` (naming the `what` entry) here."""
    decoder, near_misses = _listed_decoder(box_key, rel_key, with_score, frozenset(optional))
    decode = decoder.decode
    gc_was_enabled = gc.isenabled()
    gc.disable()  # (millions of new acyclic objects: the collector's passes over them would cost a quarter)
    try:
        raws = _RAW_LIST.decode(data)  # each image's text, not yet decoded
        names, parts = [], []
        for start in range(0, len(raws), CHUNK):
            try:
                entries = list(map(decode, raws[start:start + CHUNK]))
            except msgspec.ValidationError as exc:
                _refuse_wrong_type(exc, raws[start:start + CHUNK], decode, what)
                raise
            if with_score and any(map(len, map(attrgetter("verb_scores"), entries))):
                return None
            if any(len(getattr(e, k)) for k in near_misses for e in entries):
                return None
            parts.append(_flatten([e.boxes for e in entries], [e.rels for e in entries], space, with_score,
                                  attrgetter, check_order))
            names += [e.file_name for e in entries]
    except (msgspec.ValidationError, msgspec.DecodeError, ValueError):
        return None
    finally:
        if gc_was_enabled:
            gc.enable()
    if len(parts) <= 1:
        return RelationFile(names, parts[0] if parts else _flatten([], [], space, with_score))
    offset = np.repeat(np.cumsum([0] + [len(p.boxes) for p in parts[:-1]]), [len(p.sub) for p in parts])
    n_box, n_rel, boxes, box_cat, sub, obj, verb = (np.concatenate([getattr(p, k) for p in parts]) for k in
                                                    ("n_box", "n_rel", "boxes", "box_cat", "sub", "obj", "verb"))
    score = np.concatenate([p.score for p in parts]) if with_score else None
    return RelationFile(names, FlatRelations(n_box, n_rel, boxes, box_cat, sub + offset, obj + offset, verb, score))


def _validate_relations(entry: dict, name: str, role: str, rel_key: str, n_boxes: int, space: LabelSpace) -> list:
    """Per-field checks of an entry's relation list (subject / object ids, verb ids); returns it."""
    rels = entry.get(rel_key, [])
    if not isinstance(rels, list):
        raise UserError(f"{role} for image {name!r}: {rel_key!r} must be a list")
    for key in ("subject_id", "object_id"):
        _check_range(_int_column(rels, key, name, role, rel_key), n_boxes, name, role, rel_key, key)
    _ids_to_index(_int_column(rels, "category_id", name, role, rel_key), space.id_lookup("verb"),
                  name, role, rel_key, "verb")
    return rels


def _validate_gt_entry(i: int, entry, space: LabelSpace, rel_key: str) -> None:
    """Slow, per-field checks: run only to name the culprit once the fast path has failed."""
    name = entry.get("file_name") if isinstance(entry, dict) else None
    if not isinstance(name, str):
        raise UserError(f"ground truth entry {i} has no 'file_name' string")
    for key in ("annotations", rel_key):  # (both required, as the reference evaluators index them)
        if key not in entry:
            raise _missing_key(entry, key, name, "ground truth", ("file_name", "annotations", rel_key))
    anns = entry["annotations"]
    _boxes(anns, name, "ground truth", "annotations")
    _ids_to_index(_int_column(anns, "category_id", name, "ground truth", "annotations"), space.id_lookup("object"),
                  name, "ground truth", "annotations", "object")
    _validate_relations(entry, name, "ground truth", rel_key, len(anns), space)


def load_ground_truth(entries: list[dict] | RelationFile, space: LabelSpace,
                      rel_key: str = "hoi_annotation") -> GroundTruth:
    if isinstance(entries, RelationFile):
        return _ground_truth(entries.file_names, entries.flat)
    if not isinstance(entries, list):
        raise UserError("ground truth must be a JSON list of images")
    try:
        names = [e["file_name"] for e in entries]
        if not all(isinstance(n, str) for n in names):
            raise TypeError("file_name")
        return _ground_truth(names, _flatten([e["annotations"] for e in entries], [e[rel_key] for e in entries],
                                             space, with_score=False))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):
        for i, entry in enumerate(entries):
            _validate_gt_entry(i, entry, space, rel_key)
        raise UserError("ground truth is not in the expected form (file_name, annotations, "
                        f"{rel_key})") from None


def _ground_truth(names: list[str], f: FlatRelations) -> GroundTruth:
    if len(set(names)) != len(names):
        dup = next(n for n, c in Counter(names).items() if c > 1)
        raise UserError(f"ground truth lists image {dup!r} twice")
    box_offset = np.concatenate([[0], np.cumsum(f.n_box)])
    rel_img = np.repeat(np.arange(len(names)), f.n_rel)
    return GroundTruth(names, box_offset, f.boxes, f.box_cat, rel_img, f.sub, f.obj, f.verb)


_NUMBER_TYPES = (int, float, np.integer, np.floating)


def _is_number(v) -> bool:
    return isinstance(v, _NUMBER_TYPES) and not isinstance(v, (bool, np.bool_))


def _query_array(entry: dict, key: str, name: str, *, rows: bool = False, integer: bool = False) -> np.ndarray:
    """A per-query field (`rows`: a list of equal-length lists of numbers, else a list of numbers; `integer`:
    whole numbers) as float64, with a `UserError` naming the first malformed element: numpy would read
    "1" and true as numbers, cut 1.5 to 1, or fail with its own error on ragged rows."""
    where = f"predictions for image {name!r}"
    value = entry[key]
    what = "an integer" if integer else "a number"
    if isinstance(value, (list, tuple)):
        if rows:
            for j, row in enumerate(value):
                if not isinstance(row, (list, tuple, np.ndarray)):
                    raise UserError(f"{where}: {key}[{j}] must be a list of numbers, got {row!r}")
            lengths = set(map(len, value))
            if len(lengths) > 1:
                j = next(j for j, row in enumerate(value) if len(row) != len(value[0]))
                raise UserError(f"{where}: {key} rows differ in length ({key}[0] has {len(value[0])} values, "
                                f"{key}[{j}] has {len(value[j])}); give one row per query, all of the same length")
            flat = list(chain.from_iterable(value))
        else:
            flat = list(value)
        if not set(map(type, flat)) <= {int, float}:  # (the common case at C speed; then the exact test)
            for k, v in enumerate(flat):
                if not _is_number(v):
                    at = f"{key}[{k // len(value[0])}][{k % len(value[0])}]" if rows else f"{key}[{k}]"
                    raise UserError(f"{where}: {at} must be {what}, got {v!r}")
        arr = np.asarray(value, dtype=np.float64)
    else:  # an array (the Python API)
        try:
            arr = np.asarray(value)
        except (TypeError, ValueError):
            arr = np.asarray(None)
        if arr.dtype.kind not in "iuf" or arr.ndim != (2 if rows else 1):
            raise UserError(f"{where}: {key!r} must be a list of {'lists of numbers' if rows else 'numbers'}, "
                            f"got {type(value).__name__} of {arr.dtype} with shape {arr.shape}")
        arr = arr.astype(np.float64)
    if integer and len(arr):
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            j = int(np.argmax(bad))
            raise UserError(f"{where}: {key}[{j}] must be an integer, got {arr[j]}")
    return arr


def _pred_boxes(entry: dict, name: str, space: LabelSpace) -> tuple[np.ndarray, np.ndarray]:
    if "predictions" in entry:
        preds = entry["predictions"]
        b = _boxes(preds, name, "predictions", "predictions")
        c = _ids_to_index(_int_column(preds, "category_id", name, "predictions", "predictions"),
                          space.id_lookup("object"), name, "predictions", "predictions", "object")
        return b, c
    if "boxes" in entry and "labels" in entry:
        b = _query_array(entry, "boxes", name, rows=True)
        c = _query_array(entry, "labels", name, integer=True)
        if b.ndim != 2 or b.shape[1] != 4 or not np.isfinite(b).all():
            raise UserError(f"predictions for image {name!r}: 'boxes' must be N x 4 finite numbers, got shape {b.shape}")
        _check_box_order(b, name, "predictions", "boxes", key="")
        if c.shape != (len(b),) or (len(c) and ((c < 0) | (c >= space.n_objects)).any()):
            raise UserError(f"predictions for image {name!r}: 'labels' must be {len(b)} object indices "
                            f"in [0, {space.n_objects})")
        return b, c.astype(np.int64)
    found = _near_miss(entry, "predictions", ("boxes", "labels", "verb_scores", "sub_ids", "obj_ids"))
    hint = f"; it has {found!r} instead: rename it to 'predictions'" if found else ""
    raise UserError(f"predictions for image {name!r}: need 'predictions' (boxes with category_id) "
                    f"or 'boxes' + 'labels'{hint}")


def _raw_candidates(entry: dict, name: str, cats: np.ndarray, space: LabelSpace, use_valid: bool,
                    top_k: int | None):
    """Per-query form: every (query, verb) is a candidate, query-major. Only the image's top_k by
    (masked) score are returned, in their listed order, so that nothing of size Q x V piles up."""
    n_verbs = space.n_verbs
    scores = _query_array(entry, "verb_scores", name, rows=True)
    if scores.ndim != 2 or scores.shape[1] != n_verbs:
        raise UserError(f"predictions for image {name!r}: 'verb_scores' must be Q x {n_verbs}, got shape {scores.shape}")
    q = scores.shape[0]
    sub, obj = (_query_array(entry, key, name, integer=True) if key in entry else np.zeros(0)
                for key in ("sub_ids", "obj_ids"))
    for key, ids in (("sub_ids", sub), ("obj_ids", obj)):
        if ids.shape != (q,):
            raise UserError(f"predictions for image {name!r}: {key!r} must have one id per query ({q})")
        if q and ((ids < 0) | (ids >= len(cats)) | (ids != np.round(ids))).any():
            raise UserError(f"predictions for image {name!r}: {key} has an id out of range (the image has {len(cats)} boxes)")
    if not np.isfinite(scores).all():
        r, c = np.argwhere(~np.isfinite(scores))[0]
        raise UserError(f"predictions for image {name!r}: verb_scores[{r}][{c}] is {scores[r, c]}")
    sub, obj = sub.astype(np.int64), obj.astype(np.int64)
    flat = scores.ravel()
    masked = (scores * space.valid[:, cats[obj]].T).ravel() if use_valid else flat
    if top_k is not None and len(masked) > top_k:
        kth = np.sort(masked)[len(masked) - top_k]  # (np.partition degrades on the many masked zeros)
        pool = np.flatnonzero(masked >= kth)  # ties at the cut stay, in listed order
        keep = np.sort(pool[np.argsort(-masked[pool], kind="stable")[:top_k]])
    else:
        keep = np.arange(len(flat))
    return sub[keep // n_verbs], obj[keep // n_verbs], keep % n_verbs, flat[keep]


def _validate_pred_entry(entry: dict, name: str, space: LabelSpace, rel_key: str) -> None:
    """Slow, per-field checks of one community-form entry, to name the culprit."""
    boxes, _ = _pred_boxes(entry, name, space)
    rels = _validate_relations(entry, name, "predictions", rel_key, len(boxes), space)
    for j, r in enumerate(rels):
        v = r.get("score")
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not np.isfinite(v):
            raise UserError(f"predictions for image {name!r}: {rel_key}[{j}].score must be a finite number, got {v!r}")


def _community_candidates(entries: list[dict], img: list[int], space: LabelSpace, rel_key: str):
    """All community-form entries at once: flat columns, one vectorised validation."""
    f = _flatten([e["predictions"] for e in entries], [e.get(rel_key, []) for e in entries], space,
                 with_score=True)
    return np.asarray(img, np.int64), f.n_rel, f.sub, f.obj, f.verb, f.score, f.boxes, f.box_cat


def missing_predictions(g: GroundTruth, cand: Candidates) -> tuple[int, list[str]]:
    """Ground-truth images that the predictions do not list, and the warning about them. (The protocol
    scores such an image as one without detections, so it is no error; but a file of predictions for
    part of the test set, or for none of it, is worth a word.)"""
    missing = g.n_images - cand.n_listed
    if not missing:
        return 0, []
    if not cand.n_listed:
        return missing, [f"the predictions list no image: {missing} of {g.n_images} ground-truth images have no "
                         f"predictions (scored as no detections)"]
    return missing, [f"{missing} of {g.n_images} ground-truth images have no predictions (scored as no "
                     f"detections); give every test image an entry, even one without candidates"]


def rank_within_images(seg_img: np.ndarray, seg_len: np.ndarray, score: np.ndarray,
                       top_k: int | None) -> np.ndarray:
    """Candidates come in contiguous segments, one per image (`seg_len` each, image `seg_img`, each
    image at most once). Return the indices of each image's `top_k` best by descending score, stable
    (equal scores keep their listed order), images in ascending order."""
    n_seg, total = len(seg_len), len(score)
    width = int(seg_len.max()) if n_seg else 0
    starts = np.cumsum(seg_len) - seg_len
    rows = np.argsort(seg_img, kind="stable")
    if n_seg * width <= 2 * total:  # (nearly) equal lengths: sort the rows of a padded matrix
        seg = np.repeat(np.arange(n_seg), seg_len)
        m = np.full((n_seg, width), np.inf)
        m[seg, np.arange(total) - starts[seg]] = -score
        k = width if top_k is None else min(top_k, width)
        rank = np.argsort(m[rows], axis=1, kind="stable")[:, :k]  # the +inf padding sorts last
        kept = np.arange(k) < np.minimum(seg_len[rows], k)[:, None]
        return (starts[rows][:, None] + rank)[kept]
    # very uneven lengths: one global sort by score, then a stable one by image
    order = np.argsort(-score, kind="stable")
    seg_rank = np.empty(n_seg, np.int64)
    seg_rank[rows] = np.arange(n_seg)
    cand_rank = np.repeat(seg_rank, seg_len)[order]
    by_image = np.argsort(cand_rank, kind="stable")
    order, cand_rank = order[by_image], cand_rank[by_image]
    within = np.arange(total) - np.searchsorted(cand_rank, cand_rank, "left")
    return order if top_k is None else order[within < top_k]


def _image_of(name, k: int, index: dict[str, int], seen: set[str]) -> int:
    """The ground-truth image of prediction entry `k`, or a one-line error naming it."""
    if not isinstance(name, str):
        raise UserError(f"prediction entry {k} has no 'file_name' string")
    if name not in index:
        raise UserError(f"predictions name image {name!r}, which is not in the ground truth")
    if name in seen:
        raise UserError(f"predictions list image {name!r} twice")
    seen.add(name)
    return index[name]


def load_candidates(preds: list[dict] | RelationFile, gt: GroundTruth, space: LabelSpace, *, top_k: int | None,
                    use_valid: bool = True, rel_key: str = "hoi_prediction") -> Candidates:
    """Validate predictions and keep, per image, the `top_k` candidates by score after multiplying it
    by the valid verb-object matrix; the sort is stable (ties keep their listed order)."""
    index = {n: i for i, n in enumerate(gt.file_names)}
    seen: set[str] = set()
    parts = []  # (segment images, segment lengths, sub, obj, verb, score, boxes, box_cat)
    raw = []
    if isinstance(preds, RelationFile):
        f = preds.flat
        img = np.fromiter((_image_of(n, k, index, seen) for k, n in enumerate(preds.file_names)), np.int64,
                          count=len(preds.file_names))
        parts.append((img, f.n_rel, f.sub, f.obj, f.verb, f.score, f.boxes, f.box_cat))
    elif not isinstance(preds, list):
        raise UserError("predictions must be a JSON list of images")
    else:
        community, community_img = [], []
        for k, entry in enumerate(preds):
            i = _image_of(entry.get("file_name") if isinstance(entry, dict) else None, k, index, seen)
            if rel_key not in entry and "verb_scores" not in entry and _near_miss(entry, rel_key, fuzzy=False):
                raise _missing_key(entry, rel_key, entry["file_name"], "predictions", fuzzy=False)
            if "verb_scores" in entry or "predictions" not in entry:
                raw.append((i, entry, entry["file_name"]))
            else:
                community.append(entry)
                community_img.append(i)
        if community:
            try:
                parts.append(_community_candidates(community, community_img, space, rel_key))
            except (KeyError, TypeError, ValueError, AttributeError, IndexError):
                for entry in community:
                    _validate_pred_entry(entry, entry["file_name"], space, rel_key)
                raise UserError(f"predictions are not in the expected form (file_name, predictions, "
                                f"{rel_key})") from None
    for i, entry, name in raw:
        boxes, cats = _pred_boxes(entry, name, space)
        if "verb_scores" not in entry:
            raise UserError(f"predictions for image {name!r}: need {rel_key!r} or 'verb_scores'")
        sub, obj, verb, score = _raw_candidates(entry, name, cats, space, use_valid, top_k)
        parts.append((np.array([i]), np.array([len(score)]), sub, obj, verb, score, boxes, cats))
    if not parts:
        z = np.zeros(0, np.int64)
        return Candidates(z, z, z, z, np.zeros(0), np.zeros((0, 4)), z, len(seen))
    if len(parts) == 1:  # (a whole community file: no copies of its large arrays)
        seg_img, seg_len, sub, obj, verb, score, boxes, box_cat = parts[0]
    else:
        box_offsets = np.cumsum([0] + [len(p[6]) for p in parts[:-1]])
        seg_img, seg_len, verb, score, boxes, box_cat = (np.concatenate([p[k] for p in parts])
                                                         for k in (0, 1, 4, 5, 6, 7))
        sub = np.concatenate([p[2] + off for p, off in zip(parts, box_offsets)])
        obj = np.concatenate([p[3] + off for p, off in zip(parts, box_offsets)])
    if use_valid:
        score = score * space.valid[verb, box_cat[obj]]
    keep = rank_within_images(seg_img, seg_len, score, top_k)
    img = np.repeat(seg_img.astype(np.int64, copy=False), seg_len)
    return Candidates(img[keep], sub[keep], obj[keep], verb[keep], score[keep], boxes.reshape(-1, 4),
                      box_cat.astype(np.int64, copy=False), len(seen))
