"""One relational record: an image, its objects and the relations between them.

Every reader (`rlipv2_scale.data.sources.*`) produces `RelationalRecord`s; shards store them
(annotation as JSON, the original encoded image bytes untouched); the streaming dataset turns them
back into records. Boxes are absolute pixel (x1, y1, x2, y2) in the original image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from rlipv2_scale.errors import DataError


@dataclass
class ImageInfo:
    id: int | str                 # the source's own image id (VG/COCO integer id, HICO file name, ...)
    source: str                   # dataset name: vg, coco2017, o365, hico-det, vcoco, oi-sgg, synthetic
    split: str                    # train, val, test, train2017, ...
    width: int
    height: int
    file_name: str | None = None  # path relative to the images root, as the source names it


@dataclass
class Object:
    box: tuple[float, float, float, float]   # absolute pixel x1, y1, x2, y2
    name: str
    category_id: int | None = None           # the source's category id, when it has one


@dataclass
class Relation:
    subject: int                  # index into objects
    object: int                   # index into objects
    predicate: str
    confidence: float | None = None   # pseudo-labels carry one; human annotations do not


@dataclass
class RelationalRecord:
    image: ImageInfo
    objects: list[Object] = field(default_factory=list)
    relations: list[Relation] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)   # e.g. {"format": "vg", "file": ...}
    image_bytes: bytes | None = None                           # original encoded bytes (JPEG, PNG)

    @property
    def key(self) -> str:
        return f"{self.image.source}/{self.image.split}/{self.image.id}"

    def validate(self) -> None:
        """Raise DataError naming the record and the first problem found."""
        img = self.image

        def fail(reason: str, detail: str) -> None:
            raise DataError(f"image {img.id!r} ({img.source}): {detail}", sample_id=str(img.id), reason=reason)

        if not (isinstance(img.width, int) and isinstance(img.height, int)) or img.width <= 0 or img.height <= 0:
            fail("bad_image_size", f"image size must be positive integers, got {img.width}x{img.height}")
        for i, obj in enumerate(self.objects):
            if len(obj.box) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in obj.box):
                fail("bad_box", f"object {i} ('{obj.name}') box must be 4 finite numbers, got {list(obj.box)}")
            x1, y1, x2, y2 = obj.box
            if x2 <= x1 or y2 <= y1:
                fail("degenerate_box", f"object {i} ('{obj.name}') box {list(obj.box)} has no area")
            if x1 < 0 or y1 < 0 or x2 > img.width or y2 > img.height:
                fail("box_out_of_image",
                     f"object {i} ('{obj.name}') box {list(obj.box)} lies outside the {img.width}x{img.height} image")
            if not isinstance(obj.name, str) or not obj.name.strip():
                fail("empty_name", f"object {i} has an empty name")
        n = len(self.objects)
        for j, rel in enumerate(self.relations):
            for role, idx in (("subject", rel.subject), ("object", rel.object)):
                if not isinstance(idx, int) or not 0 <= idx < n:
                    fail("missing_object", f"relation {j} ('{rel.predicate}') points at {role} {idx}, "
                                           f"but the image has {n} objects")
            if not isinstance(rel.predicate, str) or not rel.predicate.strip():
                fail("empty_predicate", f"relation {j} has an empty predicate")
            if rel.confidence is not None and not (math.isfinite(rel.confidence) and 0.0 <= rel.confidence <= 1.0):
                fail("bad_confidence", f"relation {j} confidence {rel.confidence} is not in [0, 1]")

    # -- serialisation (the annotation column of a shard; the image bytes are a separate column) --
    def annotation(self) -> dict[str, Any]:
        img = self.image
        return {
            "image": {"id": img.id, "source": img.source, "split": img.split, "width": img.width,
                      "height": img.height, "file_name": img.file_name},
            "objects": [{"box": [float(v) for v in o.box], "name": o.name, "category_id": o.category_id}
                        for o in self.objects],
            "relations": [{"subject": r.subject, "object": r.object, "predicate": r.predicate,
                           "confidence": r.confidence} for r in self.relations],
            "provenance": self.provenance,
        }

    @classmethod
    def from_annotation(cls, ann: dict[str, Any], image_bytes: bytes | None = None) -> "RelationalRecord":
        return cls(
            image=ImageInfo(**ann["image"]),
            objects=[Object(box=tuple(o["box"]), name=o["name"], category_id=o.get("category_id"))
                     for o in ann["objects"]],
            relations=[Relation(subject=r["subject"], object=r["object"], predicate=r["predicate"],
                                confidence=r.get("confidence")) for r in ann["relations"]],
            provenance=ann.get("provenance", {}),
            image_bytes=image_bytes,
        )

    def inspect_line(self) -> dict[str, Any]:
        """The `rlipv2 data inspect` form: one JSON object per image, source order kept."""
        return {
            "image_id": self.image.id,
            "source": self.image.source,
            "width": self.image.width,
            "height": self.image.height,
            "objects": [{"box": [float(v) for v in o.box], "name": o.name} for o in self.objects],
            "relations": [{"subject": r.subject, "object": r.object, "predicate": r.predicate,
                           "confidence": r.confidence} for r in self.relations],
        }
