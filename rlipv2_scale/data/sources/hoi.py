"""The HOI JSON family of the QPIC conversions: HICO-DET and V-COCO.

Entries `{file_name, annotations: [{bbox (xyxy), category_id (COCO id)}], hoi_annotation:
[{subject_id, object_id, category_id (verb)}]}`; `subject_id` / `object_id` index `annotations`.
Image sizes are not in the file: they are read from the image header. The image id is the file
name (V-COCO's COCO `img_id`, when present, is kept in the provenance).

HICO-DET verbs are ids 1..117, V-COCO verbs are 0..28 (action-role classes, e.g. "sit on/at").
V-COCO marks a role without an object (agent-only actions such as "stand") with `object_id` -1;
a relation must point at an object of the record, so such roles are left out and counted
(`no_object_role`).

Names come from the benchmark's label lists (`rlipv2_scale.labels.metadata`). A dataset in this
layout with its own label space (e.g. the synthetic world's `*_hico.json`) ships `objects.json`
and `verbs.json` (entries with `id` or `coco_id` and `name`; `id` and `text`) beside the file, or
in `label_dir`: those are used instead.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from rlipv2_scale.data.schema import ImageInfo, Relation, RelationalRecord
from rlipv2_scale.data.sources.base import (
    Dropped,
    Item,
    as_id,
    expect_list,
    guarded,
    load_json,
    qpic_objects,
    read_image,
)
from rlipv2_scale.errors import DataError, UserError
from rlipv2_scale.labels import metadata

NO_OBJECT = -1


def _own_labels(annotations: Path, label_dir: Path | None) -> tuple[dict[int, str], dict[int, str]] | None:
    label_dir = Path(label_dir) if label_dir else Path(annotations).parent
    objects_path, verbs_path = label_dir / "objects.json", label_dir / "verbs.json"
    if not (objects_path.is_file() and verbs_path.is_file()):
        return None
    try:
        objects = {as_id(o.get("coco_id", o.get("id")), objects_path.name, "object id"): str(o["name"])
                   for o in expect_list(load_json(objects_path, "object labels"), objects_path, "objects")}
        verbs = {as_id(v["id"], verbs_path.name, "verb id"): str(v["text"])
                 for v in expect_list(load_json(verbs_path, "verb labels"), verbs_path, "verbs")}
    except (KeyError, TypeError, ValueError, AttributeError, DataError):
        raise UserError(f"{objects_path} / {verbs_path}: objects need `id` (or `coco_id`) and `name`, verbs "
                        f"need `id` and `text`, ids being integers") from None
    return objects, verbs


def _read_hoi(annotations: Path, images: Path, split: str, *, source: str, object_names: dict[int, str],
              verb_name: Callable[[int], str | None], no_object_roles: bool = False) -> Iterator[Item]:
    annotations = Path(annotations)
    entries = expect_list(load_json(annotations, f"{source} HOI"), annotations, "image entries")
    images = Path(images)
    for entry in entries:
        sid = str(entry.get("file_name", "?")) if isinstance(entry, dict) else "?"

        def build(entry: dict = entry, sid: str = sid) -> Iterator[Item]:
            file_name = str(entry["file_name"])
            image_bytes, width, height = read_image(images / file_name, sid)
            objects = qpic_objects(entry, width, height, sid, object_names.get,
                                   f"which is not one of the {len(object_names)} {source} objects")
            relations, no_object = [], 0
            for j, hoi in enumerate(entry.get("hoi_annotation") or []):
                sub, obj, verb = (as_id(hoi[k], sid, f"interaction {j} {k}")
                                  for k in ("subject_id", "object_id", "category_id"))
                predicate = verb_name(verb)
                if predicate is None:
                    raise DataError(f"image {sid!r}: interaction {j} has verb category id {verb}, which is not a "
                                    f"{source} verb", sid, "unknown_category")
                if obj == NO_OBJECT and no_object_roles:
                    no_object += 1
                    continue
                for role, idx in (("subject", sub), ("object", obj)):
                    if not 0 <= idx < len(objects):
                        raise DataError(f"image {sid!r}: interaction {j} ('{predicate}') points at {role} box "
                                        f"{idx}, but the image has {len(objects)} boxes", sid, "missing_object")
                relations.append(Relation(subject=sub, object=obj, predicate=predicate))
            if no_object:
                yield Dropped(sid, "no_object_role", no_object)
            provenance = {"format": source, "file": annotations.name}
            if "img_id" in entry:
                provenance["img_id"] = entry["img_id"]
            record = RelationalRecord(image=ImageInfo(id=file_name, source=source, split=split, width=width,
                                                      height=height, file_name=file_name),
                                      objects=objects, relations=relations, provenance=provenance,
                                      image_bytes=image_bytes)
            record.validate()
            yield record

        yield from guarded(sid, build)


def read_hico_det(annotations: Path, images: Path, split: str = "train", *,
                  label_dir: Path | None = None) -> Iterator[Item]:
    """`trainval_hico.json` / `test_hico.json`; `images` is the folder holding the files
    (`train2015/` or `test2015/`)."""
    own = _own_labels(annotations, label_dir)
    if own is not None:
        objects, verbs = own
    else:
        objects = {o["coco_id"]: o["name"] for o in metadata.hico_objects()}
        verbs = {v["id"]: v["text"] for v in metadata.hico_verbs()}
    return _read_hoi(annotations, images, split, source="hico-det", object_names=objects, verb_name=verbs.get)


def read_vcoco(annotations: Path, images: Path, split: str = "train") -> Iterator[Item]:
    """`trainval_vcoco.json` / `test_vcoco.json` of the QPIC conversion."""
    objects = {o["coco_id"]: o["name"] for o in metadata.vcoco_objects()["objects"]}
    verbs = {v["index"]: v["text"] for v in metadata.vcoco_verbs()}
    return _read_hoi(annotations, images, split, source="vcoco", object_names=objects, verb_name=verbs.get,
                     no_object_roles=True)
