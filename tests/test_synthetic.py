"""The synthetic world: determinism, rules vs. geometry, held-out combinations, both file layouts."""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rlipv2_scale.cli import CommandTree, data_synth
from rlipv2_scale.data import synthetic as sw
from rlipv2_scale.data.synthetic import (
    CLASS_NAMES,
    HELD_OUT,
    PREDICATE_NAMES,
    SyntheticWorld,
    ambiguous,
    relation_between,
    scene_relations,
    write_split,
)
from rlipv2_scale.errors import UserError


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def test_split(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "test"
    write_split(out, 120, seed=7, split="test")
    return out


# -- the rules, on hand-made boxes ------------------------------------------------------------

def test_holding_needs_a_person_hand_inside_the_object_box():
    person = (10, 10, 34, 60)                          # hands at (10, 30) and (33, 30)
    assert sw.hand_points(person) == ((10, 30), (33, 30))
    assert relation_between(person, "person", (2, 22, 20, 40), "ball") == "holding"
    assert relation_between(person, "person", (30, 25, 46, 41), "cup") == "holding"
    assert relation_between(person, "person", (2, 22, 20, 40), "table") is None     # not holdable
    assert relation_between(person, "person", (2, 31, 20, 49), "ball") is None     # below the hand, overlapping
    # 6 px to the right of the person, on its row: not held, "next to".
    assert relation_between(person, "person", (40, 22, 58, 40), "ball") == "next to"


def test_contact_predicates_riding_and_on():
    assert relation_between((20, 0, 44, 50), "person", (10, 50, 70, 80), "car") == "riding"
    assert relation_between((20, 0, 40, 20), "cup", (10, 20, 70, 50), "table") == "on"
    assert relation_between((20, 0, 40, 20), "cup", (10, 20, 30, 40), "ball") is None     # a ball is no support
    assert relation_between((58, 0, 80, 20), "cup", (10, 20, 70, 50), "table") == "on"    # centre x 69 < 70
    assert relation_between((60, 0, 80, 20), "cup", (10, 20, 70, 50), "table") is None   # centre x 70: off
    # 1 px above: neither "on" (no contact) nor "above" (gap < 4); such layouts are never rendered.
    assert relation_between((20, 0, 40, 19), "cup", (10, 20, 70, 50), "table") is None
    assert ambiguous((20, 0, 40, 19), (10, 20, 70, 50))


def test_off_centre_support_is_not_on():
    # The cup's centre x (71) lies right of the table's x-range [10, 70).
    assert relation_between((62, 0, 80, 20), "cup", (10, 20, 70, 50), "table") is None


def test_containment_predicates_inside_and_under():
    assert relation_between((12, 12, 30, 30), "ball", (10, 10, 40, 40), "box") == "inside"
    assert relation_between((11, 12, 29, 30), "ball", (10, 10, 40, 40), "box") is None     # 1 px margin
    assert relation_between((12, 12, 30, 30), "ball", (10, 10, 40, 40), "basket") == "inside"
    assert relation_between((12, 12, 30, 30), "lamp", (10, 10, 40, 40), "box") is None     # lamps never go in
    table = (10, 10, 70, 46)                                  # top 20 % ends at y = 17.2
    assert relation_between((20, 30, 36, 46), "ball", table, "table") == "under"
    assert relation_between((20, 16, 36, 32), "ball", table, "table") is None
    assert relation_between((20, 30, 36, 46), "ball", (10, 10, 70, 46), "box") is None      # touches the bottom


def test_spatial_predicates_with_their_thresholds():
    ball, box = (20, 0, 40, 20), (10, 30, 50, 60)
    assert relation_between(ball, "ball", box, "box") == "above"                 # gap 10
    assert relation_between(box, "box", ball, "ball") is None                    # only one direction
    assert relation_between((20, 0, 40, 20), "ball", (10, 50, 50, 80), "box") is None   # gap 30: too far
    assert ambiguous((20, 0, 40, 20), (10, 50, 50, 80))
    assert not ambiguous((20, 0, 40, 20), (10, 60, 50, 90))                      # gap 40: clearly apart
    assert relation_between((0, 0, 20, 20), "ball", (40, 0, 60, 20), "cup") == "left of"    # gap 20
    assert relation_between((40, 0, 60, 20), "cup", (0, 0, 20, 20), "ball") is None
    assert relation_between((0, 0, 20, 20), "ball", (26, 5, 46, 25), "cup") == "next to"   # gap 6
    assert relation_between((0, 0, 20, 20), "ball", (30, 5, 50, 25), "cup") is None       # gap 10
    assert ambiguous((0, 0, 20, 20), (30, 5, 50, 25))
    assert relation_between((0, 0, 20, 20), "ball", (40, 12, 60, 32), "cup") is None      # 8/20 rows shared
    assert ambiguous((0, 0, 20, 20), (40, 12, 60, 32))


def test_pixel_thresholds_scale_with_the_image_size():
    # A 12 px gap is "next to" at 256 px (6 px at 128) but undecided at 128 px.
    assert relation_between((0, 0, 40, 40), "ball", (52, 0, 92, 40), "cup", size=256) == "next to"
    assert relation_between((0, 0, 40, 40), "ball", (52, 0, 92, 40), "cup", size=128) is None


# -- generated scenes -----------------------------------------------------------------------

def test_scenes_are_random_access_and_deterministic():
    a, b = SyntheticWorld(3), SyntheticWorld(3)
    for i in range(4):
        a.scene(i)
    sa, sb = a.scene(5), b.scene(5)
    assert np.array_equal(sa.image, sb.image) and sa.objects == sb.objects and sa.relations == sb.relations
    other = SyntheticWorld(4).scene(5)
    assert not np.array_equal(sa.image, other.image)
    assert not np.array_equal(sa.image, SyntheticWorld(3, "val").scene(5).image)


def test_same_seed_writes_the_same_bytes(tmp_path):
    write_split(tmp_path / "a", 12, seed=11, split="train")
    write_split(tmp_path / "b", 12, seed=11, split="train")
    write_split(tmp_path / "c", 12, seed=12, split="train")
    da, db, dc = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert da == db and len(da) == 12 + 9
    assert da["images/1.jpg"] != dc["images/1.jpg"]


SMALL = ("ball", "cup", "bottle", "book")          # what a person holds and a container holds


def _geometry_holds(pred: str, s: tuple, sc: str, o: tuple, oc: str) -> bool:
    """Each predicate's definition restated directly on the boxes (independent of the library)."""
    (sx1, sy1, sx2, sy2), (ox1, oy1, ox2, oy2) = s, o
    rows = min(sy2, oy2) - max(sy1, oy1)
    cols = min(sx2, ox2) - max(sx1, ox1)
    if pred == "holding":
        hy = sy1 + round(0.4 * (sy2 - sy1))
        return sc == "person" and oc in SMALL and any(ox1 <= hx < ox2 and oy1 <= hy < oy2 for hx in (sx1, sx2 - 1))
    if pred == "riding":
        return sc == "person" and oc == "car" and sy2 == oy1 and ox1 <= (sx1 + sx2) / 2 < ox2
    if pred == "inside":
        return oc in ("box", "basket") and sc in SMALL and sx1 - ox1 >= 2 and sy1 - oy1 >= 2 and ox2 - sx2 >= 2 and oy2 - sy2 >= 2
    if pred == "under":
        return (oc == "table" and sc in ("ball", "box", "basket", "cup", "bottle") and ox1 <= sx1 and sx2 <= ox2
                and sy2 <= oy2 and sy1 >= oy1 + 0.2 * (oy2 - oy1))
    if pred == "on":
        return oc in ("table", "box", "book") and sc not in ("person", "table", "car") and sy2 == oy1 and ox1 <= (sx1 + sx2) / 2 < ox2
    if pred == "above":
        return 4 <= oy1 - sy2 <= 24 and cols >= 0.5 * min(sx2 - sx1, ox2 - ox1)
    if pred == "next to":
        return 0 <= ox1 - sx2 <= 6 and rows >= 0.5 * min(sy2 - sy1, oy2 - oy1)
    if pred == "left of":
        return ox1 - sx2 >= 14 and rows >= 0.5 * min(sy2 - sy1, oy2 - oy1)
    raise AssertionError(pred)


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_relation_agrees_with_the_rendered_geometry(split):
    world = SyntheticWorld(1, split)
    seen = set()
    for i in range(80):
        scene, masks = world.scene_with_masks(i)
        boxes = [tuple(int(v) for v in o.box) for o in scene.objects]
        names = [o.name for o in scene.objects]
        assert 2 <= len(boxes) <= 5 and scene.relations
        assert scene.image.shape == (128, 128, 3) and scene.image.dtype == np.uint8
        for box, mask in zip(boxes, masks):            # each box is the tight box of what was drawn
            ys, xs = np.nonzero(mask)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == box
            assert min(box[2] - box[0], box[3] - box[1]) >= 16
        pairs = set()
        for r in scene.relations:
            assert _geometry_holds(r.predicate, boxes[r.subject], names[r.subject], boxes[r.object], names[r.object])
            assert (r.subject, r.object) not in pairs           # one predicate per ordered pair
            pairs.add((r.subject, r.object))
            seen.add(r.predicate)
        # No true relation is left unlabelled: every other ordered pair satisfies no definition.
        for a in range(len(boxes)):
            for b in range(len(boxes)):
                if a != b and (a, b) not in pairs:
                    assert not any(_geometry_holds(p, boxes[a], names[a], boxes[b], names[b]) for p in PREDICATE_NAMES)
    assert seen == set(PREDICATE_NAMES)


def test_held_out_combinations_absent_from_train_and_val_present_in_test(test_split):
    for split in ("train", "val"):
        world = SyntheticWorld(2, split)
        for i in range(150):
            scene = world.scene(i)
            for r in scene.relations:
                t = (scene.objects[r.subject].name, r.predicate, scene.objects[r.object].name)
                assert t not in HELD_OUT, (split, i, t)
    triplets = json.loads((test_split / "triplets.json").read_text())
    counts = {(s, o, v): c for s, o, v, c in triplets["counts"]}
    held = [[sw.CLASS_INDEX[s], sw.CLASS_INDEX[o], sw.PREDICATE_INDEX[p]] for s, p, o in HELD_OUT]
    assert triplets["held_out"] == held
    assert all(counts.get(tuple(t), 0) >= 1 for t in held)
    assert not any(t in triplets["seen"] for t in held)
    world_desc = json.loads((test_split / "synthetic_world.json").read_text())
    assert [(h["subject"], h["predicate"], h["object"]) for h in world_desc["held_out"]] == list(HELD_OUT)
    assert world_desc["held_out_relations"] == sum(counts.get(tuple(t), 0) for t in held)


def test_vg_layout_matches_the_scenes(test_split):
    graphs = json.loads((test_split / "scene_graphs.json").read_text())
    image_data = json.loads((test_split / "image_data.json").read_text())
    world = SyntheticWorld(7, "test")
    assert [g["image_id"] for g in graphs] == [e["image_id"] for e in image_data] == \
        [2_000_001 + i for i in range(120)]
    for i in (0, 57, 119):
        g, scene = graphs[i], world.scene(i)
        assert image_data[i] == {"image_id": g["image_id"], "width": 128, "height": 128,
                                 "url": f"images/{g['image_id']}.jpg", "coco_id": None, "flickr_id": None}
        by_id = {o["object_id"]: k for k, o in enumerate(g["objects"])}
        assert len(by_id) == len(g["objects"]) == len(scene.objects)
        for o, ob in zip(g["objects"], scene.objects):
            assert set(o) == {"object_id", "x", "y", "w", "h", "names", "synsets"}
            assert (o["x"], o["y"], o["x"] + o["w"], o["y"] + o["h"]) == ob.box and o["names"] == [ob.name]
        rels = [(by_id[r["subject_id"]], by_id[r["object_id"]], r["predicate"]) for r in g["relationships"]]
        assert rels == [(r.subject, r.object, r.predicate) for r in scene.relations]
        assert len({r["relationship_id"] for r in g["relationships"]}) == len(rels)
    # The file's relations are exactly what the rules say about the file's boxes.
    for g in graphs:
        boxes = [(o["x"], o["y"], o["x"] + o["w"], o["y"] + o["h"]) for o in g["objects"]]
        idx = {o["object_id"]: k for k, o in enumerate(g["objects"])}
        assert scene_relations(boxes, [o["names"][0] for o in g["objects"]]) == \
            [(idx[r["subject_id"]], idx[r["object_id"]], r["predicate"]) for r in g["relationships"]]


def test_hico_layout_and_label_space(test_split):
    hico = json.loads((test_split / "test_hico.json").read_text())
    graphs = json.loads((test_split / "scene_graphs.json").read_text())
    valid = np.load(test_split / "verb_object_valid.npy")
    objects = json.loads((test_split / "objects.json").read_text())
    verbs = json.loads((test_split / "verbs.json").read_text())
    hoi_list = json.loads((test_split / "hoi_list.json").read_text())
    assert [o["name"] for o in objects] == list(CLASS_NAMES) and [o["id"] for o in objects] == list(range(1, 11))
    assert [v["text"] for v in verbs] == list(PREDICATE_NAMES) and verbs[6]["name"] == "next_to"
    assert valid.shape == (len(PREDICATE_NAMES), len(CLASS_NAMES)) and valid.dtype == np.float64
    assert len(hoi_list) == int(valid.sum())
    assert valid[PREDICATE_NAMES.index("riding")].tolist() == [float(n == "car") for n in CLASS_NAMES]
    assert len(hico) == len(graphs) == 120
    for entry, g in zip(hico, graphs):
        assert entry["file_name"] == f"{g['image_id']}.jpg" and (test_split / "images" / entry["file_name"]).is_file()
        for a, o in zip(entry["annotations"], g["objects"]):
            assert a["bbox"] == [o["x"], o["y"], o["x"] + o["w"], o["y"] + o["h"]]
            assert objects[a["category_id"] - 1]["name"] == o["names"][0]
        assert len(entry["hoi_annotation"]) == len(g["relationships"])
        for h, r in zip(entry["hoi_annotation"], g["relationships"]):
            assert 0 <= h["subject_id"] < len(entry["annotations"]) and 0 <= h["object_id"] < len(entry["annotations"])
            assert verbs[h["category_id"] - 1]["text"] == r["predicate"]
            obj_cat = entry["annotations"][h["object_id"]]["category_id"]
            assert valid[h["category_id"] - 1, obj_cat - 1] == 1.0
            hoi = hoi_list[h["hoi_category_id"] - 1]
            assert (hoi["verb_id"], hoi["object_id"]) == (h["category_id"], obj_cat)


def test_jpegs_decode_to_the_rendered_scene(test_split):
    world = SyntheticWorld(7, "test")
    for i in (0, 1, 2):
        with Image.open(test_split / "images" / f"{2_000_001 + i}.jpg") as im:
            assert im.format == "JPEG" and im.size == (128, 128) and im.mode == "RGB"
            decoded = np.asarray(im, dtype=np.float32)
        rendered = world.scene(i).image.astype(np.float32)
        # JPEG smooths the per-pixel background noise; 4x4 block means must agree closely.
        blocks = [x.reshape(32, 4, 32, 4, 3).mean(axis=(1, 3)) for x in (decoded, rendered)]
        assert np.abs(blocks[0] - blocks[1]).mean() < 2.0


def test_the_synthetic_reader_reads_what_was_written(test_split):
    from rlipv2_scale.data.schema import RelationalRecord
    from rlipv2_scale.data.sources import FORMATS

    records = [r for r in FORMATS["synthetic"](test_split / "scene_graphs.json", test_split, "test")
               if isinstance(r, RelationalRecord)]
    assert len(records) == 120
    world = SyntheticWorld(7, "test")
    for i in (0, 60):
        rec, scene = records[i], world.scene(i)
        assert rec.image.source == "synthetic" and rec.image.id == 2_000_001 + i
        assert [(o.box, o.name) for o in rec.objects] == [(o.box, o.name) for o in scene.objects]
        assert [(r.subject, r.object, r.predicate) for r in rec.relations] == \
            [(r.subject, r.object, r.predicate) for r in scene.relations]


def test_cli_writes_a_split(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="rlipv2")
    data_synth.register(CommandTree(parser))
    args = parser.parse_args(["data", "synth", "--out", str(tmp_path / "s"), "--images", "5", "--seed", "2",
                              "--split", "val", "--size", "160", "--objects", "2", "3", "--no-progress"])
    assert args.handler(args) == 0
    assert "synthesised 5 val images" in capsys.readouterr().out
    graphs = json.loads((tmp_path / "s" / "scene_graphs.json").read_text())
    assert [g["image_id"] for g in graphs] == [1_000_001 + i for i in range(5)]
    assert all(2 <= len(g["objects"]) <= 3 for g in graphs)
    assert (tmp_path / "s" / "val_hico.json").is_file()
    with Image.open(tmp_path / "s" / "images" / "1000001.jpg") as im:
        assert im.size == (160, 160)


def _synth(out: Path, *flags: str) -> int:
    parser = argparse.ArgumentParser(prog="rlipv2")
    data_synth.register(CommandTree(parser))
    args = parser.parse_args(["data", "synth", "--out", str(out), "--size", "64", "--no-progress", *flags])
    return args.handler(args)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_cli_never_writes_into_a_folder_of_the_users(tmp_path, overwrite):
    out = tmp_path / "mine"
    (out / "images").mkdir(parents=True)
    (out / "scene_graphs.json").write_text("the user's graphs")
    (out / "images" / "1.jpg").write_bytes(b"the user's photo")
    before = _files(out)
    with pytest.raises(UserError, match=rf"--out {out} is not empty and holds no synthetic_world.json.*new or empty"):
        _synth(out, "--images", "2", *overwrite)
    assert _files(out) == before
    (tmp_path / "empty").mkdir()
    assert _synth(tmp_path / "empty", "--images", "2") == 0          # an empty folder is fine
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        _synth(tmp_path / "a_file", "--images", "2")


def test_cli_overwrites_only_an_earlier_synth_output(tmp_path):
    out = tmp_path / "s"
    assert _synth(out, "--images", "4", "--split", "val") == 0
    (out / "notes.txt").write_text("mine")
    before = _files(out)
    with pytest.raises(UserError, match=rf"--out {out} holds an earlier `rlipv2 data synth` output; pass --overwrite"):
        _synth(out, "--images", "2", "--split", "val")
    assert _files(out) == before
    # fewer scenes of another split: nothing of the earlier output is left beside the new one
    assert _synth(out, "--images", "2", "--split", "test", "--overwrite") == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["2000001.jpg", "2000002.jpg"]
    assert not (out / "val_hico.json").exists() and (out / "test_hico.json").is_file()
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "synthetic_world.json").read_text())["split"] == "test"
    fresh = tmp_path / "fresh"
    assert _synth(fresh, "--images", "2", "--split", "test") == 0
    assert {k: v for k, v in _files(out).items() if k != "notes.txt"} == _files(fresh)   # as if written anew


def test_cli_refuses_an_unreadable_world_file(tmp_path):
    out = tmp_path / "s"
    assert _synth(out, "--images", "1") == 0
    (out / "synthetic_world.json").write_text('{"split": "../x", "images": 3}')
    with pytest.raises(UserError, match="cannot be read as a `data synth` world description.*yourself"):
        _synth(out, "--images", "1", "--overwrite")


@pytest.mark.parametrize("kwargs, match", [({"split": "dev"}, "unknown split"), ({"size": 32}, "too small"),
                                           ({"seed": -1}, "non-negative"),
                                           ({"objects_per_image": (1, 3)}, "objects per image")])
def test_bad_arguments_are_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        SyntheticWorld(**{"seed": 0, **kwargs})


def test_demo_data_steps(tmp_path):
    from rlipv2_scale.data.shards import iter_records
    from rlipv2_scale.demo import DemoPlan, prepare_data

    lines: list[str] = []
    plan = DemoPlan(train_images=6, val_images=3, test_images=5, steps=1, eval_every=1)
    summary = prepare_data(tmp_path / "demo", plan, log=lines.append, workers=1)
    for split, n in (("train", 6), ("val", 3), ("test", 5)):
        assert summary["shards"][split]["images"] == n and summary["shards"][split]["skipped"] == {}
        records = list(iter_records(tmp_path / "demo" / "shards" / split))
        scene = SyntheticWorld(0, split).scene(0)
        assert len(records) == n and records[0].image.split == split
        assert [o.box for o in records[0].objects] == [o.box for o in scene.objects]
    assert any(line.startswith("[2/5]") for line in lines) and (tmp_path / "demo" / "tokenizer").is_dir()
    assert json.loads((tmp_path / "demo" / "data_summary.json").read_text())["plan"]["train_images"] == 6


def test_hico_files_score_with_the_evaluator(test_split):
    from rlipv2_scale.eval.hico import evaluate_hico

    gt = json.loads((test_split / "test_hico.json").read_text())
    space = sw.eval_label_space()
    perfect = [{"file_name": e["file_name"], "predictions": e["annotations"],
                "hoi_prediction": [dict(h, score=0.9) for h in e["hoi_annotation"]]} for e in gt]
    result = evaluate_hico(gt, perfect, zero_shot="held-out", label_space=space)
    assert result["mAP"] == pytest.approx(1.0) and result["mAP_unseen"] == pytest.approx(1.0)
    assert result["n_unseen"] == len(HELD_OUT)
    # Every relation given the wrong predicate: nothing matches.
    wrong = [{"file_name": e["file_name"], "predictions": e["annotations"],
              "hoi_prediction": [dict(h, category_id=h["category_id"] % 8 + 1, score=0.9)
                                 for h in e["hoi_annotation"]]} for e in gt]
    assert evaluate_hico(gt, wrong, label_space=space)["mAP"] == 0.0


def test_other_image_sizes_keep_boxes_tight_and_objects_large():
    world = SyntheticWorld(5, "train", size=192)
    for i in range(20):
        scene, masks = world.scene_with_masks(i)
        assert scene.image.shape == (192, 192, 3)
        boxes = [tuple(int(v) for v in o.box) for o in scene.objects]
        for box, mask in zip(boxes, masks):
            ys, xs = np.nonzero(mask)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == box
            assert min(box[2] - box[0], box[3] - box[1]) >= 24           # 16 px at 128, scaled
        assert [(r.subject, r.object, r.predicate) for r in scene.relations] == \
            scene_relations(boxes, [o.name for o in scene.objects], size=192)
