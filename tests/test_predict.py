"""`rlipv2 predict`: open-vocabulary relation detection drawn on any images, from a model directory."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from rlipv2_scale.cli import main
from rlipv2_scale.errors import UserError
from rlipv2_scale.models.build import load_pretrained
from rlipv2_scale.predict import draw_predictions, drawing_names, open_label_space, parse_labels, predict_images
from rlipv2_scale.visualize import DrawnTriplet, draw_relations, top_triplets


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random model written as a model directory by `save_pretrained`, input size 64 in its card."""
    from rlipv2_scale.models.artifacts import ModelCard
    from rlipv2_scale.models.build import build_model
    from rlipv2_scale.models.config import named_config

    d = tmp_path_factory.mktemp("model") / "m"
    torch.manual_seed(0)
    build_model(named_config("tiny"), pretrained=False).save_pretrained(d, ModelCard(eval_size=64, max_size=96))
    return d


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(96, 128), (128, 128)]):
        p = d / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def test_parse_labels():
    assert parse_labels(" person, cup ,next to", "objects") == ["person", "cup", "next to"]
    with pytest.raises(UserError, match="empty label"):
        parse_labels("person,,cup", "objects")
    with pytest.raises(UserError, match="repeated"):
        parse_labels("cup,cup", "objects")


def test_open_label_space_allows_every_combination():
    space = open_label_space(["a", "b", "c"], ["x", "y"])
    assert space.valid.shape == (2, 3) and space.valid.min() == 1.0
    assert space.subject_index is None


def _prediction() -> dict:
    return {"predictions": [{"bbox": [1, 2, 20, 30], "category_id": 0}, {"bbox": [30, 2, 50, 30], "category_id": 1},
                            {"bbox": [1, 2, 20, 30], "category_id": 0}],
            "hoi_prediction": [{"subject_id": 0, "object_id": 1, "category_id": 1, "score": 0.9},
                               {"subject_id": 2, "object_id": 1, "category_id": 1, "score": 0.8},   # same triplet
                               {"subject_id": 0, "object_id": 1, "category_id": 0, "score": 0.5},
                               {"subject_id": 1, "object_id": 0, "category_id": 0, "score": 0.1}]}


def test_top_triplets_ranks_dedups_and_thresholds():
    got = top_triplets(_prediction(), ["person", "cup"], ["holding", "next to"], object_ids=[0, 1], verb_ids=[0, 1],
                       threshold=0.3, top=5)
    assert [(t.subject, t.predicate, t.object, t.score) for t in got] == [
        ("person", "next to", "cup", 0.9), ("person", "holding", "cup", 0.5)]
    assert len(top_triplets(_prediction(), ["person", "cup"], ["holding", "next to"], object_ids=[0, 1],
                            verb_ids=[0, 1], threshold=0.0, top=1)) == 1


def test_draw_relations_scales_and_adds_a_caption_per_triplet():
    image = Image.new("RGB", (32, 24), (0, 0, 0))
    t = DrawnTriplet("person", "holding", "cup", 0.9, (1, 1, 10, 10), (12, 2, 20, 12))
    out = draw_relations(image, [t, t], scale=4)
    assert out.width == 128 and out.height > 96 + 2 * 10
    px = np.asarray(out)
    assert (px[4, 4:40] == (230, 40, 40)).all(axis=-1).any()       # subject box outline, 4x scaled
    assert (px[96:] != 255).any()                                      # caption text below the picture


def test_predict_images_and_draw(model_dir, images, tmp_path):
    model = load_pretrained(str(model_dir))
    objects, relations = ["person", "cup", "table"], ["holding", "on"]
    preds = predict_images(model, images, objects, relations, eval_size=64)
    assert [p.path for p in preds] == images
    for p in preds:
        hois = p.prediction["hoi_prediction"]
        assert 0 < len(hois) <= 100
        scores = [h["score"] for h in hois]
        assert scores == sorted(scores, reverse=True)
        assert {h["category_id"] for h in hois} <= {0, 1}
        assert {b["category_id"] for b in p.prediction["predictions"]} <= {0, 1, 2}
    written = draw_predictions(preds, objects, relations, tmp_path / "out", threshold=0.0, top=3)
    assert [w.name for w in written] == ["img0.png", "img1.png"]
    with Image.open(written[0]) as im:
        assert im.width == 128 * 4     # 128 wide source drawn 4x


def test_predict_cli(model_dir, images, tmp_path, capsys):
    out = tmp_path / "drawn"
    rc = main(["predict", *map(str, images), "--checkpoint", str(model_dir), "--objects", "ball, box",
               "--relations", "inside,left of", "--out", str(out), "--threshold", "0", "--size", "64"])
    assert rc == 0
    data = json.loads((out / "predictions.json").read_text())
    assert data["objects"] == ["ball", "box"] and data["relations"] == ["inside", "left of"]
    assert len(data["images"]) == 2 and (out / "img0.png").is_file() and (out / "img1.png").is_file()
    assert str(out / "img0.png") in capsys.readouterr().out


def test_drawing_names_are_unique_in_input_order():
    paths = ["a/images/1.jpg", "b/images/1.jpg", "c/1-2.jpg", "d/1.png", "e/A.jpg", "f/a.jpg", "g/b.jpg"]
    assert drawing_names(paths) == ["1.png", "1-2.png", "1-2-2.png", "1-3.png", "A.png", "a-2.png", "b.png"]


def _predict(model_dir, out, *images, flags=()):
    return main(["predict", *map(str, images), "--checkpoint", str(model_dir), "--objects", "ball,box",
                 "--relations", "inside", "--out", str(out), "--size", "64", "--device", "cpu", *flags])


def test_predict_cli_draws_same_named_inputs_apart(model_dir, images, tmp_path, capsys):
    first, second = tmp_path / "a" / "images" / "1.png", tmp_path / "b" / "images" / "1.png"
    for src, dst in ((images[0], first), (images[1], second)):
        dst.parent.mkdir(parents=True)
        shutil.copy(src, dst)
    out = tmp_path / "drawn"
    assert _predict(model_dir, out, first, second, flags=["--threshold", "0"]) == 0
    data = json.loads((out / "predictions.json").read_text())
    assert [(e["image"], e["drawing"]) for e in data["images"]] == [(str(first), "1.png"), (str(second), "1-2.png")]
    with Image.open(out / "1.png") as a, Image.open(out / "1-2.png") as b:
        assert a.width == b.width == 128 * 4 and a.height < b.height     # 96 and 128 high sources, 4x
    assert sorted(p.name for p in out.iterdir()) == ["1-2.png", "1.png", "predictions.json"]


def test_predict_cli_replaces_files_only_with_overwrite(model_dir, images, tmp_path, capsys):
    out = tmp_path / "drawn"
    out.mkdir()
    (out / "predictions.json").write_text("the user's")
    assert _predict(model_dir, out, *images) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{out / 'predictions.json'} already exists" in err[0] and "--overwrite" in err[0]
    assert [p.name for p in out.iterdir()] == ["predictions.json"]
    assert (out / "predictions.json").read_text() == "the user's"
    (out / "predictions.json").unlink()
    (out / "img1.png").write_bytes(b"the user's drawing")
    assert _predict(model_dir, out, *images) == 2
    assert f"{out / 'img1.png'} already exists" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["img1.png"]
    assert _predict(model_dir, out, *images, flags=["--overwrite"]) == 0
    assert json.loads((out / "predictions.json").read_text())["objects"] == ["ball", "box"]
    with Image.open(out / "img1.png") as im:
        assert im.width == 128 * 4
    # an input image is never drawn over, --overwrite or not
    assert _predict(model_dir, out, out / "img1.png", flags=["--overwrite"]) == 2
    assert "would replace the input image" in capsys.readouterr().err


def test_predict_cli_takes_size_and_labels_from_the_model_card(model_dir, images, tmp_path, capsys):
    from rlipv2_scale.models.artifacts import CARD_FILE

    fine_tuned = tmp_path / "fine_tuned"
    shutil.copytree(model_dir, fine_tuned)
    card = json.loads((fine_tuned / CARD_FILE).read_text())
    card.update(objects=["ball", "box"], relations=["inside"])
    (fine_tuned / CARD_FILE).write_text(json.dumps(card))
    out = tmp_path / "drawn"
    assert main(["predict", str(images[0]), "--checkpoint", str(fine_tuned), "--out", str(out), "--device", "cpu"]) == 0
    data = json.loads((out / "predictions.json").read_text())
    assert (data["objects"], data["relations"], data["size"]) == (["ball", "box"], ["inside"], 64)
    # an open-vocabulary model has no lists of its own: the texts must be given
    assert main(["predict", str(images[0]), "--checkpoint", str(model_dir), "--out", str(out)]) == 2
    assert "open-vocabulary" in capsys.readouterr().err


def test_predict_cli_errors(model_dir, images, tmp_path, capsys):
    args = ["--objects", "a", "--relations", "x", "--out", str(tmp_path / "o")]
    assert main(["predict", str(tmp_path / "missing.jpg"), "--checkpoint", str(model_dir), *args]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    assert main(["predict", str(bad), "--checkpoint", str(model_dir), *args]) == 2
    assert "cannot be read" in capsys.readouterr().err
    assert main(["predict", str(images[0]), "--checkpoint", str(tmp_path / "nope"), *args]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["predict", str(images[0]), "--checkpoint", str(model_dir), "--objects", "a,", "--relations", "x",
                 "--out", str(tmp_path / "o")]) == 2
    assert "empty label" in capsys.readouterr().err
