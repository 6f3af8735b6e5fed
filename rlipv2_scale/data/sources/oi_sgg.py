"""Open Images v6 scene-graph benchmark (`OI_SGG_*.json` + categories dict, the original's `datasets/oi_sgg.py`).

Entries `{file_name, annotations: [{bbox (xyxy), category_id}], rel_annotations: [{subject_id,
object_id, category_id (0..29)}]}`. Predicate names are the `rel` list of
`OI_SGG_trainval_test_categories_dict.json`. Object `category_id`s index the `obj` list of the
full `categories_dict.json` when that file is given or lies beside the annotations (as in the
original's layout), otherwise the `obj` list of the SGG categories dict. Image sizes come from the
image header.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from rlipv2_scale.data.schema import ImageInfo, Relation, RelationalRecord
from rlipv2_scale.data.sources.base import Item, as_id, expect_list, guarded, load_json, qpic_objects, read_image
from rlipv2_scale.errors import DataError, UserError

CATEGORIES = "OI_SGG_trainval_test_categories_dict.json"
ALL_OBJECT_CATEGORIES = "categories_dict.json"


def _names(path: Path, key: str) -> list[str]:
    data = load_json(path, "Open Images categories")
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise UserError(f"{path} needs a `{key}` list of names")
    return [str(n) for n in data[key]]


def read_oi_sgg(annotations: Path, images: Path, split: str = "train", *, categories: Path | None = None,
                object_categories: Path | None = None) -> Iterator[Item]:
    annotations = Path(annotations)
    categories = Path(categories) if categories else annotations.parent / CATEGORIES
    if object_categories is None and (annotations.parent / ALL_OBJECT_CATEGORIES).is_file():
        object_categories = annotations.parent / ALL_OBJECT_CATEGORIES
    predicates = _names(categories, "rel")
    object_names = _names(Path(object_categories) if object_categories else categories, "obj")
    entries = expect_list(load_json(annotations, "Open Images SGG"), annotations, "image entries")
    images = Path(images)
    for entry in entries:
        sid = str(entry.get("file_name", "?")) if isinstance(entry, dict) else "?"

        def build(entry: dict = entry, sid: str = sid) -> Iterator[Item]:
            file_name = str(entry["file_name"])
            image_bytes, width, height = read_image(images / file_name, sid)
            objects = qpic_objects(entry, width, height, sid,
                                   lambda c: object_names[c] if 0 <= c < len(object_names) else None,
                                   f"but the categories list has {len(object_names)}")
            relations = []
            for j, rel in enumerate(entry.get("rel_annotations") or []):
                sub, obj, cat = (as_id(rel[k], sid, f"relation {j} {k}")
                                 for k in ("subject_id", "object_id", "category_id"))
                if not 0 <= cat < len(predicates):
                    raise DataError(f"image {sid!r}: relation {j} has predicate id {cat}; there are "
                                    f"{len(predicates)} predicates", sid, "unknown_category")
                for role, idx in (("subject", sub), ("object", obj)):
                    if not 0 <= idx < len(objects):
                        raise DataError(f"image {sid!r}: relation {j} ('{predicates[cat]}') points at {role} box "
                                        f"{idx}, but the image has {len(objects)} boxes", sid, "missing_object")
                relations.append(Relation(subject=sub, object=obj, predicate=predicates[cat]))
            record = RelationalRecord(image=ImageInfo(id=file_name, source="oi-sgg", split=split, width=width,
                                                      height=height, file_name=file_name),
                                      objects=objects, relations=relations,
                                      provenance={"format": "oi-sgg", "file": annotations.name},
                                      image_bytes=image_bytes)
            record.validate()
            yield record

        yield from guarded(sid, build)
