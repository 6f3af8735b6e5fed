"""The original's pseudo-labelled scene graphs (COCO / Objects365, written by `generate_relations_using_verb_tagger.py: verb_tagger_with_text`).

The layout is the pre-processed VG one plus `dataset`, `data_split` and a per-relation
`confidence`. Relations below `threshold` (0.20 by default, as in the original) are dropped and
counted; an image left with no relation is skipped (`below_threshold`). Entries without
`confidence` (VG rows of a merged file) are always kept. Image files: COCO
`{data_split}/{id:012d}.jpg`, Objects365 through an id -> path JSON (`image_paths`) or the entry's
`file_name`, VG `{id}.jpg`.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlipv2_scale.data.sources.base import Item, as_id, expect_list, guarded, load_json, read_image
from rlipv2_scale.data.sources.visual_genome import image_candidates, locate, parse_scene_graph
from rlipv2_scale.errors import UserError

DEFAULT_THRESHOLD = 0.2


def image_file(entry: dict, images: Path, id_to_path: dict[str, str]) -> str:
    image_id = entry["image_id"]
    if entry.get("file_name"):
        return str(entry["file_name"])
    dataset = entry.get("dataset")
    if dataset == "coco2017":
        return f"{entry['data_split']}/{as_id(image_id, str(image_id), 'image_id'):012d}.jpg"
    if str(image_id) in id_to_path:
        return id_to_path[str(image_id)]
    if dataset == "o365":
        raise ValueError(f"Objects365 image {image_id} has no file_name and is not in the id -> path file "
                         f"(pass --image-paths image_id_to_filepath.json)")
    return locate(images, image_candidates(image_id))


def read_pseudo(annotations: Path, images: Path, split: str = "train", *, threshold: float = DEFAULT_THRESHOLD,
                image_paths: Path | None = None, keep_empty: bool = False) -> Iterator[Item]:
    annotations = Path(annotations)
    entries = expect_list(load_json(annotations, "pseudo-label scene graph"), annotations, "scene graphs")
    id_to_path: dict[str, Any] = {}
    if image_paths is not None:
        mapping = load_json(Path(image_paths), "image id -> path")
        if not isinstance(mapping, dict):
            raise UserError(f"{image_paths} should map image ids to file paths (a JSON object)")
        id_to_path = {str(k): str(v) for k, v in mapping.items()}
    images = Path(images)
    for entry in entries:
        sid = str(entry.get("image_id", "?")) if isinstance(entry, dict) else "?"

        def build(entry: dict = entry, sid: str = sid) -> Iterator[Item]:
            file_name = image_file(entry, images, id_to_path)
            data, width, height = read_image(images / file_name, sid)
            source = entry.get("dataset", "vg")
            yield from parse_scene_graph(entry, source=source, split=entry.get("data_split", split),
                                         width=width, height=height, file_name=file_name, image_bytes=data,
                                         threshold=threshold, lower=False, keep_empty=keep_empty,
                                         provenance={"format": "pseudo", "file": annotations.name})

        yield from guarded(sid, build)
