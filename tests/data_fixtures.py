"""Tiny datasets written in the exact layouts of the real formats, with real JPEG files."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image


def jpeg(path: Path, width: int, height: int, color: tuple[int, int, int] = (120, 60, 30)) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), color).save(path, format="JPEG", quality=90)
    return path.read_bytes()


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def vg_raw(root: Path) -> dict:
    """Raw VG: two images; image 1 uses subject_id/object_id, image 2 nested subject/object dicts."""
    images = root / "images"
    jpeg(images / "VG_100K" / "1.jpg", 64, 48)
    jpeg(images / "VG_100K_2" / "2.jpg", 40, 30)
    graphs = [
        {"image_id": 1,
         "objects": [{"object_id": 10, "x": 2, "y": 3, "w": 20, "h": 10, "names": ["Man"], "synsets": ["man.n.01"]},
                     {"object_id": 11, "x": 30, "y": 5, "w": 35, "h": 43, "names": ["horse", "animal"]}],
         "relationships": [{"relationship_id": 100, "predicate": "RIDING", "subject_id": 10, "object_id": 11,
                            "synsets": ["ride.v.01"]},
                           {"relationship_id": 101, "predicate": "next to", "subject_id": 11, "object_id": 10}]},
        {"image_id": 2,
         "objects": [{"object_id": 20, "x": 0, "y": 0, "w": 10, "h": 10, "names": ["cup"]}],
         "relationships": [{"relationship_id": 200, "predicate": "on",
                            "subject": {"object_id": 20, "x": 0, "y": 0, "w": 10, "h": 10, "name": "cup"},
                            "object": {"object_id": 21, "x": 0, "y": 15, "w": 40, "h": 15, "name": "table"}}]},
    ]
    image_data = [
        {"image_id": 1, "width": 64, "height": 48, "url": "https://cs.stanford.edu/people/rak248/VG_100K/1.jpg",
         "coco_id": None, "flickr_id": 1},
        {"image_id": 2, "width": 40, "height": 30, "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/2.jpg",
         "coco_id": None, "flickr_id": 2},
    ]
    ann = write_json(root / "ann" / "scene_graphs.json", graphs)
    write_json(root / "ann" / "image_data.json", image_data)
    return {"annotations": ann, "images": images, "graphs": graphs, "image_data": image_data}


def pseudo_coco(root: Path) -> dict:
    """The original's pseudo-labelled COCO scene graphs (as `generate_relations_using_verb_tagger.py` writes them)."""
    images = root / "coco2017"
    jpeg(images / "train2017" / "000000000139.jpg", 80, 60)
    jpeg(images / "train2017" / "000000000285.jpg", 50, 50)
    entries = [
        {"image_id": 139, "dataset": "coco2017", "data_split": "train2017",
         "objects": [{"object_id": 10000000, "x": 41.5, "y": 15.5, "w": 20.0, "h": 40.0, "names": "person"},
                     {"object_id": 10000001, "x": 5.0, "y": 10.0, "w": 15.0, "h": 30.0, "names": "tv"}],
         "relationships": [{"relationship_id": 10000000, "predicate": "watching", "subject_id": 10000000,
                            "object_id": 10000001, "confidence": 0.31},
                           {"relationship_id": 10000001, "predicate": "holding", "subject_id": 10000000,
                            "object_id": 10000001, "confidence": 0.05},
                           {"relationship_id": 10000002, "predicate": "next to", "subject_id": 10000001,
                            "object_id": 10000000, "confidence": 0.2}]},
        {"image_id": 285, "dataset": "coco2017", "data_split": "train2017",
         "objects": [{"object_id": 10000002, "x": 0, "y": 0, "w": 50, "h": 50, "names": "bear"},
                     {"object_id": 10000003, "x": 10, "y": 30, "w": 10, "h": 10, "names": "grass"}],
         "relationships": [{"relationship_id": 10000003, "predicate": "eating", "subject_id": 10000002,
                            "object_id": 10000003, "confidence": 0.1}]},
    ]
    ann = write_json(root / "coco_pseudo.json", entries)
    return {"annotations": ann, "images": images, "entries": entries}


def hico(root: Path) -> dict:
    images = root / "train2015"
    jpeg(images / "HICO_train2015_00000001.jpg", 64, 48)
    entries = [{"file_name": "HICO_train2015_00000001.jpg", "img_id": 1,
                "annotations": [{"bbox": [1, 2, 30, 40], "category_id": 1},
                                {"bbox": [20, 10, 60, 45], "category_id": 4}],
                "hoi_annotation": [{"subject_id": 0, "object_id": 1, "category_id": 88, "hoi_category_id": 153},
                                   {"subject_id": 0, "object_id": 1, "category_id": 37, "hoi_category_id": 154}]}]
    ann = write_json(root / "annotations" / "trainval_hico.json", entries)
    return {"annotations": ann, "images": images, "entries": entries}


def coco_instances(root: Path) -> dict:
    images = root / "train2017"
    jpeg(images / "000000000009.jpg", 64, 48)
    jpeg(images / "000000000025.jpg", 32, 32)
    data = {"info": {}, "licenses": [],
            "images": [{"id": 9, "file_name": "000000000009.jpg", "width": 64, "height": 48},
                       {"id": 25, "file_name": "000000000025.jpg", "width": 32, "height": 32}],
            "annotations": [{"id": 1, "image_id": 9, "bbox": [1.0, 2.0, 10.0, 20.0], "category_id": 51,
                             "iscrowd": 0, "area": 200.0},
                            {"id": 2, "image_id": 25, "bbox": [0, 0, 5, 5], "category_id": 1, "iscrowd": 0},
                            {"id": 3, "image_id": 9, "bbox": [30, 4, 34, 44], "category_id": 1, "iscrowd": 0},
                            {"id": 4, "image_id": 9, "bbox": [0, 0, 64, 48], "category_id": 1, "iscrowd": 1}],
            "categories": [{"id": 1, "name": "person", "supercategory": "person"},
                           {"id": 51, "name": "bowl", "supercategory": "kitchen"}]}
    ann = write_json(root / "annotations" / "instances_train2017.json", data)
    return {"annotations": ann, "images": images, "data": data}


def vcoco(root: Path) -> dict:
    images = root / "train2014"
    jpeg(images / "COCO_train2014_000000000064.jpg", 64, 48)
    entries = [{"file_name": "COCO_train2014_000000000064.jpg", "img_id": 64,
                "annotations": [{"bbox": [1, 1, 30, 47], "category_id": 1},
                                {"bbox": [20, 20, 50, 40], "category_id": 62}],
                "hoi_annotation": [{"subject_id": 0, "object_id": 1, "category_id": 2},
                                   {"subject_id": 0, "object_id": -1, "category_id": 1}]}]
    ann = write_json(root / "annotations" / "trainval_vcoco.json", entries)
    return {"annotations": ann, "images": images, "entries": entries}


def oi_sgg(root: Path) -> dict:
    images = root / "images"
    jpeg(images / "0a1b2c.jpg", 64, 48)
    categories = {"obj": ["Man", "Guitar", "Table"], "rel": ["at", "holds", "plays"]}
    entries = [{"file_name": "0a1b2c.jpg", "img_id": 0,
                "annotations": [{"bbox": [0, 0, 30, 48], "category_id": 0},
                                {"bbox": [10, 20, 40, 40], "category_id": 1}],
                "rel_annotations": [{"subject_id": 0, "object_id": 1, "category_id": 2},
                                    {"subject_id": 0, "object_id": 1, "category_id": 1}]}]
    ann = write_json(root / "annotations" / "OI_SGG_train_finetuning.json", entries)
    write_json(root / "annotations" / "OI_SGG_trainval_test_categories_dict.json", categories)
    return {"annotations": ann, "images": images, "entries": entries, "categories": categories}
