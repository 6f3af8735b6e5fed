"""COCO-style detection annotations (`instances_*.json`; Objects365 uses the same layout).

Records carry the objects (boxes `bbox` xywh -> xyxy, names from `categories` by id) and no
relations. Crowd regions (`iscrowd` 1) are not single objects: they are left out and counted
(`crowd`). Images with no annotation are kept (a detection source has them). Annotations whose
`image_id` no entry of `images` has are reported first, one `annotation_without_image` skip per
missing image id (its boxes cannot be placed on any image).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from rlipv2_scale.data.schema import ImageInfo, Object, RelationalRecord
from rlipv2_scale.data.sources.base import (
    Dropped,
    Item,
    Skip,
    as_id,
    fit_box,
    guarded,
    load_json,
    read_image,
    xywh_to_xyxy,
)
from rlipv2_scale.errors import DataError, UserError


def read_coco(annotations: Path, images: Path, split: str = "train2017", *, source: str = "coco2017") -> Iterator[Item]:
    annotations = Path(annotations)
    data = load_json(annotations, "COCO instances")
    if not isinstance(data, dict) or not all(k in data for k in ("images", "annotations", "categories")):
        raise UserError(f"{annotations} is not a COCO instances file: it needs `images`, `annotations` and "
                        f"`categories`")
    try:
        names = {as_id(c["id"], "categories", "category id"): str(c["name"]) for c in data["categories"]}
    except (KeyError, TypeError, ValueError, DataError):
        raise UserError(f"{annotations}: every category needs an integer `id` and a `name`") from None
    by_image: dict[object, list[dict]] = defaultdict(list)
    for ann in data["annotations"]:
        by_image[ann.get("image_id") if isinstance(ann, dict) else None].append(ann)
    listed = {info["id"] for info in data["images"] if isinstance(info, dict) and "id" in info}
    for image_id in [i for i in by_image if i not in listed]:
        anns = by_image[image_id]
        ids = [a.get("id") if isinstance(a, dict) else None for a in anns]
        yield Skip(str(image_id), "annotation_without_image",
                   f"{len(anns)} annotation(s) (ids {ids[:5]}) have image_id {image_id!r}, which no entry of "
                   f"`images` has")
    images = Path(images)
    for info in data["images"]:
        sid = str(info.get("id", "?")) if isinstance(info, dict) else "?"

        def build(info: dict = info, sid: str = sid) -> Iterator[Item]:
            file_name = str(info["file_name"])
            width, height = int(info["width"]), int(info["height"])
            image_bytes, _, _ = read_image(images / file_name, sid)
            objects, crowd = [], 0
            for ann in by_image.get(info["id"], []):
                if ann.get("iscrowd", 0):
                    crowd += 1
                    continue
                cat = as_id(ann["category_id"], sid, f"annotation {ann.get('id')} category_id")
                if cat not in names:
                    raise DataError(f"image {sid!r}: annotation {ann.get('id')} has category id {cat}, which "
                                    f"`categories` does not define", sid, "unknown_category")
                box = fit_box(xywh_to_xyxy(*ann["bbox"]), width, height, sid, f"annotation {ann.get('id')}")
                objects.append(Object(box=box, name=names[cat], category_id=cat))
            if crowd:
                yield Dropped(sid, "crowd", crowd)
            record = RelationalRecord(
                image=ImageInfo(id=info["id"], source=source, split=split, width=width, height=height,
                                file_name=file_name),
                objects=objects, provenance={"format": source, "file": annotations.name}, image_bytes=image_bytes)
            record.validate()
            yield record

        yield from guarded(sid, build)


def read_o365(annotations: Path, images: Path, split: str = "train", **kwargs) -> Iterator[Item]:
    return read_coco(annotations, images, split, source="o365", **kwargs)
