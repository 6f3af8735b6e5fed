"""Readers of the real formats, on fixtures written in their exact layouts."""
from __future__ import annotations

import pytest

from rlipv2_scale.data.schema import RelationalRecord
from rlipv2_scale.data.sources import (
    Dropped,
    Skip,
    read_coco,
    read_hico_det,
    read_o365,
    read_oi_sgg,
    read_pseudo,
    read_synthetic,
    read_vcoco,
    read_vg,
)
from rlipv2_scale.errors import UserError

from data_fixtures import coco_instances, hico, jpeg, oi_sgg, pseudo_coco, vcoco, vg_raw, write_json


def split_items(items):
    items = list(items)
    return ([i for i in items if isinstance(i, RelationalRecord)], [i for i in items if isinstance(i, Skip)],
            [i for i in items if isinstance(i, Dropped)])


def boxes(record):
    return [list(o.box) for o in record.objects]


def triples(record):
    return [(r.subject, r.object, r.predicate, r.confidence) for r in record.relations]


# -- Visual Genome -------------------------------------------------------------------------------

def test_vg_raw_objects_relations_and_files(tmp_path):
    fx = vg_raw(tmp_path)
    records, skips, _ = split_items(read_vg(fx["annotations"], fx["images"], "train"))
    assert skips == []
    r1, r2 = records
    assert (r1.image.id, r1.image.source, r1.image.split, r1.image.width, r1.image.height) == (1, "vg", "train", 64, 48)
    assert r1.image.file_name == "VG_100K/1.jpg"
    assert r1.image_bytes == (fx["images"] / "VG_100K" / "1.jpg").read_bytes()   # stored untouched
    assert boxes(r1) == [[2, 3, 22, 13], [30, 5, 64, 48]]      # second overshoots by 1 px: clamped
    assert [o.name for o in r1.objects] == ["man", "horse"]      # first name, lower-cased
    assert triples(r1) == [(0, 1, "riding", None), (1, 0, "next to", None)]
    # nested subject/object dicts: the object missing from the list is added from its own box
    assert r2.image.file_name == "VG_100K_2/2.jpg"
    assert [o.name for o in r2.objects] == ["cup", "table"]
    assert boxes(r2) == [[0, 0, 10, 10], [0, 15, 40, 30]]
    assert triples(r2) == [(0, 1, "on", None)]


def test_vg_annotations_may_be_the_folder_and_flat_image_names(tmp_path):
    fx = vg_raw(tmp_path)
    flat = tmp_path / "flat"
    jpeg(flat / "1.jpg", 64, 48)
    jpeg(flat / "2.jpg", 40, 30)
    records, skips, _ = split_items(read_vg(fx["annotations"].parent, flat))
    assert [r.image.file_name for r in records] == ["1.jpg", "2.jpg"] and skips == []


def test_vg_preprocessed_form_reads_sizes_from_the_image(tmp_path):
    images = tmp_path / "VG" / "images"
    jpeg(images / "7.jpg", 50, 40)
    entries = [{"image_id": 7,
                "objects": [{"object_id": 1, "x": 1, "y": 1, "w": 10, "h": 10, "names": "shirt"},
                            {"object_id": 2, "x": 5, "y": 5, "w": 40, "h": 30, "names": "man"}],
                "relationships": [{"relationship_id": 3, "predicate": "wearing", "subject_id": 2, "object_id": 1},
                                  {"relationship_id": 4, "predicate": "wearing", "subject_id": 2, "object_id": 1}]},
               {"image_id": 8, "objects": [{"object_id": 5, "x": 0, "y": 0, "w": 4, "h": 4, "names": "sky"}],
                "relationships": []}]
    ann = write_json(tmp_path / "scene_graphs_preprocessv1.json", entries)
    jpeg(images / "8.jpg", 10, 10)
    records, skips, _ = split_items(read_vg(ann, images))
    (rec,) = records
    assert (rec.image.width, rec.image.height) == (50, 40)
    assert [o.name for o in rec.objects] == ["shirt", "man"]
    assert triples(rec) == [(1, 0, "wearing", None)] * 2          # duplicates kept as the source has them
    assert [(s.sample_id, s.reason, s.error) for s in skips] == [("8", "no_relations", False)]
    kept = split_items(read_vg(ann, images, keep_empty=True))[0]
    assert [r.image.id for r in kept] == [7, 8] and kept[1].relations == []


def test_synthetic_is_vg_with_its_own_source(tmp_path):
    fx = vg_raw(tmp_path)
    records = split_items(read_synthetic(fx["annotations"], fx["images"], "val"))[0]
    assert [r.key for r in records] == ["synthetic/val/1", "synthetic/val/2"]


# -- pseudo labels ------------------------------------------------------------------------------

def test_pseudo_threshold_filters_relations_and_images(tmp_path):
    fx = pseudo_coco(tmp_path)
    records, skips, dropped = split_items(read_pseudo(fx["annotations"], fx["images"]))
    (rec,) = records
    assert (rec.image.source, rec.image.split, rec.image.file_name) == ("coco2017", "train2017",
                                                                         "train2017/000000000139.jpg")
    assert (rec.image.width, rec.image.height) == (80, 60)
    assert boxes(rec) == [[41.5, 15.5, 61.5, 55.5], [5, 10, 20, 40]]
    # 0.05 < 0.2 dropped; 0.2 itself kept (the original filters confidence < threshold)
    assert triples(rec) == [(0, 1, "watching", 0.31), (1, 0, "next to", 0.2)]
    assert dropped == [Dropped("139", "below_threshold", 1)]
    assert [(s.sample_id, s.reason, s.error) for s in skips] == [("285", "below_threshold", False)]
    # a lower threshold keeps both images and all relations
    records = split_items(read_pseudo(fx["annotations"], fx["images"], threshold=0.01))[0]
    assert [len(r.relations) for r in records] == [3, 1]


def test_pseudo_o365_paths_from_the_id_map_and_file_name(tmp_path):
    images = tmp_path / "o365"
    jpeg(images / "patch0" / "objects365_v1_00000001.jpg", 30, 20)
    jpeg(images / "patch1" / "b.jpg", 30, 20)
    obj = [{"object_id": 1, "x": 0, "y": 0, "w": 10, "h": 10, "names": "Person"},
           {"object_id": 2, "x": 10, "y": 5, "w": 10, "h": 10, "names": "Hat"}]
    rel = [{"relationship_id": 1, "predicate": "wearing", "subject_id": 1, "object_id": 2, "confidence": 0.9}]
    entries = [{"image_id": 1, "dataset": "o365", "data_split": "train", "objects": obj, "relationships": rel},
               {"image_id": 2, "dataset": "o365", "data_split": "train", "file_name": "patch1/b.jpg",
                "objects": obj, "relationships": rel},
               {"image_id": 3, "dataset": "o365", "data_split": "train", "objects": obj, "relationships": rel}]
    ann = write_json(tmp_path / "o365_pseudo.json", entries)
    paths = write_json(tmp_path / "image_id_to_filepath.json", {"1": "patch0/objects365_v1_00000001.jpg"})
    records, skips, _ = split_items(read_pseudo(ann, images, image_paths=paths))
    assert [(r.image.source, r.image.file_name) for r in records] == [
        ("o365", "patch0/objects365_v1_00000001.jpg"), ("o365", "patch1/b.jpg")]
    assert [o.name for o in records[0].objects] == ["Person", "Hat"]   # pseudo names kept as written
    assert [(s.sample_id, s.reason) for s in skips] == [("3", "malformed_annotation")]


# -- COCO / Objects365 detection ----------------------------------------------------------------

def test_coco_instances(tmp_path):
    fx = coco_instances(tmp_path)
    records, skips, dropped = split_items(read_coco(fx["annotations"], fx["images"], "train2017"))
    assert skips == []
    r9, r25 = records
    assert (r9.key, r9.image.width, r9.image.height) == ("coco2017/train2017/9", 64, 48)
    assert boxes(r9) == [[1, 2, 11, 22], [30, 4, 64, 48]]
    assert [(o.name, o.category_id) for o in r9.objects] == [("bowl", 51), ("person", 1)]
    assert r9.relations == [] and [o.name for o in r25.objects] == ["person"]
    assert dropped == [Dropped("9", "crowd", 1)]
    o365 = split_items(read_o365(fx["annotations"], fx["images"]))[0]
    assert [r.key for r in o365] == ["o365/train/9", "o365/train/25"]


# -- HICO-DET / V-COCO ---------------------------------------------------------------------------

def test_hico_det(tmp_path):
    fx = hico(tmp_path)
    (rec,) = split_items(read_hico_det(fx["annotations"], fx["images"], "train"))[0]
    assert (rec.image.id, rec.image.source, rec.image.width, rec.image.height) == (
        "HICO_train2015_00000001.jpg", "hico-det", 64, 48)
    assert boxes(rec) == [[1, 2, 30, 40], [20, 10, 60, 45]]
    assert [(o.name, o.category_id) for o in rec.objects] == [("person", 1), ("motorcycle", 4)]
    assert triples(rec) == [(0, 1, "sit on", None), (0, 1, "hold", None)]   # verb ids 88, 37
    assert rec.provenance["img_id"] == 1


def test_vcoco_no_object_roles_are_counted(tmp_path):
    fx = vcoco(tmp_path)
    records, _, dropped = split_items(read_vcoco(fx["annotations"], fx["images"]))
    (rec,) = records
    assert [(o.name, o.category_id) for o in rec.objects] == [("person", 1), ("chair", 62)]
    assert triples(rec) == [(0, 1, "sit on/at", None)]     # verb index 2
    assert dropped == [Dropped("COCO_train2014_000000000064.jpg", "no_object_role", 1)]


# -- Open Images SGG -----------------------------------------------------------------------------

def test_oi_sgg(tmp_path):
    fx = oi_sgg(tmp_path)
    (rec,) = split_items(read_oi_sgg(fx["annotations"], fx["images"], "train"))[0]
    assert (rec.image.source, rec.image.width, rec.image.height) == ("oi-sgg", 64, 48)
    assert [(o.name, o.category_id) for o in rec.objects] == [("Man", 0), ("Guitar", 1)]
    assert triples(rec) == [(0, 1, "plays", None), (0, 1, "holds", None)]
    # with the full categories_dict.json beside it, object ids index that list instead
    write_json(fx["annotations"].parent / "categories_dict.json", {"obj": ["Guitar", "Man"], "rel": []})
    (rec,) = split_items(read_oi_sgg(fx["annotations"], fx["images"]))[0]
    assert [o.name for o in rec.objects] == ["Guitar", "Man"]


# -- bad input, one test per reason ------------------------------------------------------------

def only_skip(items):
    records, skips, _ = split_items(items)
    assert len(skips) == 1, skips
    return records, skips[0]


def test_missing_image(tmp_path):
    fx = hico(tmp_path)
    (fx["images"] / "HICO_train2015_00000001.jpg").unlink()
    records, skip = only_skip(read_hico_det(fx["annotations"], fx["images"]))
    assert records == [] and skip.reason == "missing_image" and skip.error
    assert skip.sample_id == "HICO_train2015_00000001.jpg" and "missing" in skip.message


def test_unreadable_image_header(tmp_path):
    fx = vg_raw(tmp_path)
    (fx["images"] / "VG_100K" / "1.jpg").write_bytes(b"not a jpeg at all")
    records, skip = only_skip(read_vg(fx["annotations"], fx["images"]))
    assert (skip.sample_id, skip.reason) == ("1", "corrupt_image") and [r.image.id for r in records] == [2]


def test_box_out_of_image_beyond_tolerance(tmp_path):
    fx = vg_raw(tmp_path)
    fx["graphs"][0]["objects"][1]["w"] = 37          # x2 = 67 > 64 + 1
    write_json(fx["annotations"], fx["graphs"])
    records, skip = only_skip(read_vg(fx["annotations"], fx["images"]))
    assert (skip.sample_id, skip.reason) == ("1", "box_out_of_image") and "64x48" in skip.message


def test_negative_overshoot_within_tolerance_is_clamped(tmp_path):
    fx = coco_instances(tmp_path)
    fx["data"]["annotations"][0]["bbox"] = [-0.8, -1.0, 10, 10]
    write_json(fx["annotations"], fx["data"])
    records = split_items(read_coco(fx["annotations"], fx["images"]))[0]
    assert boxes(records[0])[0] == [0, 0, 9.2, 9.0]


def test_degenerate_box(tmp_path):
    fx = hico(tmp_path)
    fx["entries"][0]["annotations"][1]["bbox"] = [20, 10, 20, 45]
    write_json(fx["annotations"], fx["entries"])
    _, skip = only_skip(read_hico_det(fx["annotations"], fx["images"]))
    assert skip.reason == "degenerate_box"


def test_relation_pointing_at_a_missing_object(tmp_path):
    fx = pseudo_coco(tmp_path)
    fx["entries"][0]["relationships"][0]["object_id"] = 999
    write_json(fx["annotations"], fx["entries"])
    _, skip = only_skip(read_pseudo(fx["annotations"], fx["images"], threshold=0.01))
    assert (skip.sample_id, skip.reason) == ("139", "missing_object") and "999" in skip.message
    fx = oi_sgg(tmp_path / "oi")
    fx["entries"][0]["rel_annotations"][1]["object_id"] = 2
    write_json(fx["annotations"], fx["entries"])
    _, skip = only_skip(read_oi_sgg(fx["annotations"], fx["images"]))
    assert skip.reason == "missing_object"


@pytest.mark.parametrize("where", ["object", "verb"])
def test_unknown_category(tmp_path, where):
    fx = hico(tmp_path)
    if where == "object":
        fx["entries"][0]["annotations"][1]["category_id"] = 12      # COCO id 12 is unused
    else:
        fx["entries"][0]["hoi_annotation"][0]["category_id"] = 118
    write_json(fx["annotations"], fx["entries"])
    _, skip = only_skip(read_hico_det(fx["annotations"], fx["images"]))
    assert skip.reason == "unknown_category"


def test_unknown_coco_category(tmp_path):
    fx = coco_instances(tmp_path)
    fx["data"]["annotations"][1]["category_id"] = 7
    write_json(fx["annotations"], fx["data"])
    records, skip = only_skip(read_coco(fx["annotations"], fx["images"]))
    assert (skip.sample_id, skip.reason) == ("25", "unknown_category") and [r.image.id for r in records] == [9]


def test_malformed_entry(tmp_path):
    fx = hico(tmp_path)
    del fx["entries"][0]["annotations"][0]["bbox"]
    write_json(fx["annotations"], fx["entries"])
    _, skip = only_skip(read_hico_det(fx["annotations"], fx["images"]))
    assert skip.reason == "malformed_annotation" and "bbox" in skip.message


@pytest.mark.parametrize("reader", [read_vg, read_pseudo, read_hico_det, read_vcoco, read_oi_sgg, read_coco])
def test_malformed_json_file_names_file_and_position(tmp_path, reader):
    fx = oi_sgg(tmp_path)                             # provides a categories dict for read_oi_sgg
    bad = fx["annotations"]
    bad.write_text('[{"file_name": "a.jpg",\n  "annotations": [}]')
    with pytest.raises(UserError, match=r"OI_SGG_train_finetuning.json is not valid JSON: .* line 2, column 19"):
        list(reader(bad, fx["images"]))


def test_missing_annotation_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        list(read_hico_det(tmp_path / "nope.json", tmp_path))


def test_hico_layout_with_its_own_label_space(tmp_path):
    fx = hico(tmp_path)
    labels = tmp_path / "labels"
    write_json(labels / "objects.json", [{"index": 0, "id": 1, "name": "robot"}, {"index": 1, "id": 4, "name": "crate"}])
    write_json(labels / "verbs.json", [{"index": 0, "id": 37, "name": "push", "text": "push"},
                                       {"index": 1, "id": 88, "name": "lift_up", "text": "lift up"}])
    (rec,) = split_items(read_hico_det(fx["annotations"], fx["images"], label_dir=labels))[0]
    assert [o.name for o in rec.objects] == ["robot", "crate"]
    assert [r.predicate for r in rec.relations] == ["lift up", "push"]
    # beside the annotation file, the lists are picked up without an option
    for name in ("objects.json", "verbs.json"):
        (fx["annotations"].parent / name).write_text((labels / name).read_text())
    (rec,) = split_items(read_hico_det(fx["annotations"], fx["images"]))[0]
    assert [o.name for o in rec.objects] == ["robot", "crate"]


@pytest.mark.parametrize("field,value,reason", [
    ("name", "  ", "empty_name"),
    ("predicate", "", "empty_predicate"),
    ("confidence", 1.5, "bad_confidence"),
])
def test_schema_checks_become_skips(tmp_path, field, value, reason):
    fx = pseudo_coco(tmp_path)
    entry = fx["entries"][0]
    if field == "name":
        entry["objects"][1]["names"] = value
    else:
        entry["relationships"][0][field] = value
    write_json(fx["annotations"], fx["entries"])
    records, skips, _ = split_items(read_pseudo(fx["annotations"], fx["images"], threshold=0.0))
    assert [(s.sample_id, s.reason) for s in skips] == [("139", reason)] and len(records) == 1
