"""Visual Genome scene graphs, raw and pre-processed; also the synthetic world (written as raw VG).

Raw VG (`scene_graphs.json` + `image_data.json`): objects carry a `names` list, relationships
reference objects by `subject_id` / `object_id` or by nested `subject` / `object` dicts; image
sizes come from `image_data.json`, files are `VG_100K/{id}.jpg`, `VG_100K_2/{id}.jpg` or
`{id}.jpg`. The original's pre-processed file has the same layout with `names` a single string
and no image sizes (read from the image header then). Raw VG text mixes case ("ON" / "on"):
names and predicates are lower-cased and stripped.

Images without any relationship are skipped with the non-error reason `no_relations`, as the
original's pre-training loader drops them (pass `keep_empty=True` to keep them).
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlipv2_scale.data.schema import ImageInfo, Object, Relation, RelationalRecord
from rlipv2_scale.data.sources.base import (
    Dropped,
    Item,
    Skip,
    expect_list,
    fit_box,
    guarded,
    load_json,
    read_image,
    xywh_to_xyxy,
)
from rlipv2_scale.errors import DataError, UserError

SCENE_GRAPHS = "scene_graphs.json"
IMAGE_DATA = "image_data.json"


def _image_id(entry: dict) -> int | str:
    return entry["image_id"] if "image_id" in entry else entry["id"]


def _object_name(obj: dict, lower: bool) -> str:
    names = obj.get("names", obj.get("name"))
    if isinstance(names, list):
        names = names[0] if names else ""
    if not isinstance(names, str):
        raise ValueError(f"object {obj.get('object_id')} has no name")
    name = " ".join(names.split())
    return name.lower() if lower else name


def parse_scene_graph(entry: dict, *, source: str, split: str, width: int, height: int, file_name: str,
                      image_bytes: bytes, threshold: float, lower: bool, keep_empty: bool,
                      provenance: dict[str, Any]) -> Iterator[Item]:
    """One scene-graph entry (layout read by the original's `datasets/mixed_dataset.py:
    MixedRelDetection`) -> a record; relations below `threshold` are dropped."""
    sid = str(_image_id(entry))
    objects: list[Object] = []
    index: dict[Any, int] = {}

    def add(obj: dict) -> int:
        box = fit_box(xywh_to_xyxy(obj["x"], obj["y"], obj["w"], obj["h"]), width, height, sid,
                      f"object {obj.get('object_id')}")
        objects.append(Object(box=box, name=_object_name(obj, lower)))
        # A repeated object id keeps pointing at its first occurrence.
        index.setdefault(obj.get("object_id"), len(objects) - 1)
        return len(objects) - 1

    for obj in entry.get("objects") or []:
        add(obj)

    def resolve(rel: dict, role: str) -> int:
        ref = rel.get(role)
        oid = ref.get("object_id") if isinstance(ref, dict) else rel[f"{role}_id"]
        if oid in index:
            return index[oid]
        if isinstance(ref, dict) and all(k in ref for k in ("x", "y", "w", "h")):
            return add(ref)   # relationships.json-style nested objects declare their own box
        raise DataError(f"image {sid!r}: relationship {rel.get('relationship_id')} ('{rel.get('predicate')}') "
                        f"points at {role} object {oid}, which the image does not list", sid, "missing_object")

    source_rels = entry.get("relationships") or []
    relations: list[Relation] = []
    below = 0
    for rel in source_rels:
        conf = rel.get("confidence")
        if conf is not None and float(conf) < threshold:
            below += 1
            continue
        predicate = " ".join(str(rel["predicate"]).split())
        relations.append(Relation(subject=resolve(rel, "subject"), object=resolve(rel, "object"),
                                  predicate=predicate.lower() if lower else predicate,
                                  confidence=None if conf is None else float(conf)))
    if not relations and not keep_empty:
        if source_rels:
            yield Skip(sid, "below_threshold", f"image {sid!r}: all {len(source_rels)} relations have "
                                               f"confidence below {threshold:g}", error=False)
        else:
            yield Skip(sid, "no_relations", f"image {sid!r}: no relationships", error=False)
        return
    if below:
        yield Dropped(sid, "below_threshold", below)
    record = RelationalRecord(image=ImageInfo(id=_image_id(entry), source=source, split=split, width=width,
                                              height=height, file_name=file_name),
                              objects=objects, relations=relations, provenance=provenance,
                              image_bytes=image_bytes)
    record.validate()
    yield record


def image_candidates(image_id: int | str, url: str | None = None) -> list[str]:
    """Where VG-style images live relative to the images root, most specific first."""
    names = []
    if url:
        parts = url.rstrip("/").split("/")
        names.append("/".join(parts[-2:]))
    names += [f"{image_id}.jpg", f"VG_100K/{image_id}.jpg", f"VG_100K_2/{image_id}.jpg"]
    return list(dict.fromkeys(names))


def locate(images: Path, candidates: list[str]) -> str:
    for rel in candidates:
        if (images / rel).is_file():
            return rel
    return candidates[0]   # none exists: named in the missing_image message


def scene_graph_files(annotations: Path, image_data: Path | None) -> tuple[Path, Path | None]:
    annotations = Path(annotations)
    if annotations.is_dir():
        annotations = annotations / SCENE_GRAPHS
    if image_data is None and (annotations.parent / IMAGE_DATA).is_file():
        image_data = annotations.parent / IMAGE_DATA
    return annotations, image_data


def image_sizes(image_data: Path | None) -> dict[Any, dict]:
    if image_data is None:
        return {}
    entries = expect_list(load_json(image_data, "VG image_data"), image_data, "image entries")
    try:
        return {_image_id(e): e for e in entries}
    except (KeyError, TypeError):
        raise UserError(f"{image_data}: every entry needs an `image_id` (or `id`)") from None


def read_vg(annotations: Path, images: Path, split: str = "train", *, image_data: Path | None = None,
            threshold: float = 0.2, keep_empty: bool = False, source: str = "vg") -> Iterator[Item]:
    """Raw or pre-processed VG scene graphs. `annotations` is `scene_graphs.json` (or its folder;
    `image_data.json` beside it is used for image sizes and URLs)."""
    sg_path, image_data = scene_graph_files(annotations, image_data)
    entries = expect_list(load_json(sg_path, "VG scene graph"), sg_path, "scene graphs")
    meta = image_sizes(image_data)
    images = Path(images)
    for entry in entries:
        sid = str(_image_id(entry)) if isinstance(entry, dict) and ("image_id" in entry or "id" in entry) else "?"

        def build(entry: dict = entry, sid: str = sid) -> Iterator[Item]:
            if sid == "?":
                raise ValueError("entry has no image_id")
            image_id = _image_id(entry)
            info = meta.get(image_id, {})
            file_name = locate(images, image_candidates(image_id, info.get("url")))
            data, width, height = read_image(images / file_name, sid)
            if "width" in info and "height" in info:
                width, height = int(info["width"]), int(info["height"])   # checked against the decode later
            yield from parse_scene_graph(entry, source=source, split=split, width=width, height=height,
                                         file_name=file_name, image_bytes=data, threshold=threshold,
                                         lower=True, keep_empty=keep_empty,
                                         provenance={"format": source, "file": sg_path.name})

        yield from guarded(sid, build)


def read_synthetic(annotations: Path, images: Path, split: str = "train", **kwargs: Any) -> Iterator[Item]:
    """The synthetic world is written as raw VG; only the source name differs."""
    return read_vg(annotations, images, split, source="synthetic", **kwargs)
