"""Readers of the real annotation formats, one per format, all yielding `RelationalRecord`s.

`FORMATS` maps the `rlipv2 data convert --format` names to readers
`read(annotations, images, split, **options) -> Iterator[RelationalRecord | Skip | Dropped]`.
Objects and relations keep the source's order; relations index the record's object list.

Why an image is skipped (`Skip.reason`; data errors stop a `--strict` run):
  missing_image, corrupt_image (unreadable header or, in `convert`, failed full decode),
  image_size_mismatch (decoded size differs from the annotation's), box_out_of_image (more than
  1 px outside; up to 1 px is clamped), degenerate_box (no area after clamping), missing_object
  (a relation points at an object the image does not have), unknown_category (object or predicate
  id not in the label list), non_integer_id (an id or index such as `object_id` 1.7: `int()` would
  silently point at another object), malformed_annotation (an entry lacks a key or has a wrong
  type), empty_name / empty_predicate / bad_confidence (schema checks), annotation_without_image
  (COCO / Objects365 annotations whose `image_id` no image has; one per missing id),
  duplicate_image (a second record with the same source/split/id: `write_shards` keeps the first).
Policy filters (counted, never stop `--strict`): below_threshold, no_relations (scene graphs).
Parts of kept images left out (`Dropped`): below_threshold relations, crowd boxes (COCO),
no_object_role (V-COCO roles without an object). Duplicate relations are kept as the source has
them. A whole annotation file that is missing or not valid JSON is a UserError naming the file
and the position.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

from rlipv2_scale.data.sources.base import Dropped, Item, Skip
from rlipv2_scale.data.sources.coco import read_coco, read_o365
from rlipv2_scale.data.sources.hoi import read_hico_det, read_vcoco
from rlipv2_scale.data.sources.oi_sgg import read_oi_sgg
from rlipv2_scale.data.sources.pseudo import read_pseudo
from rlipv2_scale.data.sources.visual_genome import read_synthetic, read_vg

FORMATS: dict[str, Callable[..., Iterator[Item]]] = {
    "vg": read_vg,
    "pseudo": read_pseudo,
    "coco": read_coco,
    "o365": read_o365,
    "hico-det": read_hico_det,
    "vcoco": read_vcoco,
    "oi-sgg": read_oi_sgg,
    "synthetic": read_synthetic,
}

__all__ = ["FORMATS", "Dropped", "Item", "Skip", "read_coco", "read_hico_det", "read_o365", "read_oi_sgg",
           "read_pseudo", "read_synthetic", "read_vcoco", "read_vg"]
