"""Inference over a HICO-DET-format test set and `eval hico-det --checkpoint`, end to end on a tiny model."""
import json
import os
import shutil
import types

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from rlipv2_scale.errors import UserError
from rlipv2_scale.inference import (
    RelationImages,
    collate_images,
    evaluate_checkpoint,
    find_hico_files,
    label_texts,
    predict,
)
from rlipv2_scale.labels.space import hico_label_space
from rlipv2_scale.models import original as O
from rlipv2_scale.models.build import build_model, load_pretrained
from rlipv2_scale.models.config import named_config
from rlipv2_scale.models.postprocess import PostProcess

from relation_data import toy_label_space

SIZES = {"HICO_test2015_00000001.jpg": (96, 128), "HICO_test2015_00000002.jpg": (128, 80),
         "HICO_test2015_00000003.jpg": (64, 64)}


def _entry(name: str, h: int, w: int) -> dict:
    # person holding a cup (verb 37 = "hold", COCO id 47 = "cup"), person riding a horse (77, 19)
    return {"file_name": name,
            "annotations": [{"bbox": [2, 3, w // 2, h - 4], "category_id": 1},
                            {"bbox": [w // 3, h // 4, w - 3, h // 2], "category_id": 47},
                            {"bbox": [w // 4, h // 2, w - 1, h - 1], "category_id": 19}],
            "hoi_annotation": [{"subject_id": 0, "object_id": 1, "category_id": 37},
                               {"subject_id": 0, "object_id": 2, "category_id": 77}]}


@pytest.fixture(scope="module")
def hico_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hico_20160224_det")
    (root / "annotations").mkdir()
    (root / "images" / "test2015").mkdir(parents=True)
    rng = np.random.default_rng(0)
    entries = []
    for name, (h, w) in SIZES.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / "test2015" / name)
        entries.append(_entry(name, h, w))
    (root / "annotations" / "test_hico.json").write_text(json.dumps(entries))
    # training counts: hold-cup 10 (non-rare), ride-horse 9 (rare)
    hold_only = dict(entries[0], hoi_annotation=entries[0]["hoi_annotation"][:1])
    (root / "annotations" / "trainval_hico.json").write_text(json.dumps(entries * 3 + [hold_only]))
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model, exported to the original format and imported back, as a user's would be."""
    torch.manual_seed(0)
    cfg = named_config("tiny")
    cfg.compat_original = True
    model = build_model(cfg, pretrained=False)
    d = tmp_path_factory.mktemp("ckpt")
    torch.save({"model": O.export_state_dict(model.state_dict(), cfg)}, d / "tiny.pth")
    cfg_file = d / "tiny.yaml"
    from rlipv2_scale.config import save_config
    save_config(cfg, cfg_file)
    O.import_checkpoint(d / "tiny.pth", str(cfg_file), d / "model")
    return d / "model"


def test_find_hico_files(hico_root, tmp_path):
    files = find_hico_files(hico_root)
    assert files.test == hico_root / "annotations" / "test_hico.json"
    assert files.images == hico_root / "images" / "test2015"
    assert files.train == hico_root / "annotations" / "trainval_hico.json"
    with pytest.raises(UserError, match="test annotations not found under"):
        find_hico_files(tmp_path)
    with pytest.raises(UserError, match="is not a directory"):
        find_hico_files(tmp_path / "nope")


def test_images_are_resized_and_normalised_as_in_evaluation(tmp_path):
    Image.new("RGB", (128, 64), (255, 0, 128)).save(tmp_path / "a.png")
    ds = RelationImages([{"file_name": "a.png"}], tmp_path, eval_size=32, max_size=1333)
    image, size, index = ds[0]
    assert image.shape == (3, 32, 64) and size == (64, 128) and index == 0
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    for c, v in enumerate((255, 0, 128)):
        assert torch.allclose(image[c], torch.full((32, 64), (v / 255 - mean[c]) / std[c]), atol=1e-5)
    # the longer side is capped: 64x128 at shorter side 800 with max 1000 -> 500x1000
    capped = RelationImages([{"file_name": "a.png"}], tmp_path, eval_size=800, max_size=1000)[0][0]
    assert capped.shape == (3, 500, 1000)
    with pytest.raises(UserError, match="does not exist"):
        RelationImages([{"file_name": "b.png"}], tmp_path)[0]
    with pytest.raises(UserError, match="no 'file_name'"):
        RelationImages([{"name": "a.png"}], tmp_path)


def test_collate_pads_and_masks():
    a, b = torch.ones(3, 4, 6), torch.full((3, 5, 2), 2.0)
    images, mask, sizes, idx = collate_images([(a, (40, 60), 3), (b, (50, 20), 7)])
    assert images.shape == (2, 3, 5, 6) and idx == [3, 7] and sizes.tolist() == [[40, 60], [50, 20]]
    assert mask[0, :4, :6].logical_not().all() and mask[0, 4].all()
    assert mask[1, :, :2].logical_not().all() and mask[1, :, 2:].all()
    assert images[1, :, :, 2:].abs().sum() == 0 and torch.equal(images[0, :, :4], a)


def test_label_texts():
    obj, rel = label_texts(hico_label_space())
    assert len(obj) == 81 and obj[0] == "person" and obj[-1] == "no objects"
    assert len(rel) == 117 and all("_" not in r for r in rel)


def _check_predictions(preds, space):
    assert [p["file_name"] for p in preds] == list(SIZES)
    verb_index = {v: i for i, v in enumerate(space.verb_ids)}
    obj_index = {o: i for i, o in enumerate(space.object_ids)}
    for p in preds:
        h, w = SIZES[p["file_name"]]
        scores = [t["score"] for t in p["hoi_prediction"]]
        assert 0 < len(scores) <= 100 and scores == sorted(scores, reverse=True)
        for box in p["predictions"]:
            x1, y1, x2, y2 = box["bbox"]   # cxcywh in [0, 1] scaled to the original image (not clipped)
            assert 0 <= (x1 + x2) / 2 <= w and 0 <= (y1 + y2) / 2 <= h and 0 <= x2 - x1 <= w and 0 <= y2 - y1 <= h
        for t in p["hoi_prediction"]:
            assert p["predictions"][t["subject_id"]]["category_id"] == space.object_ids[space.subject_index]
            obj = obj_index[p["predictions"][t["object_id"]]["category_id"]]
            assert space.valid[verb_index[t["category_id"]], obj] == 1   # invalid verb-object pairs dropped


def test_eval_checkpoint_end_to_end(hico_root, model_dir, tmp_path, capsys):
    from rlipv2_scale.cli import main

    code = main(["eval", "hico-det", "--checkpoint", str(model_dir), "--data", str(hico_root), "--eval-size", "64",
                 "--max-size", "128", "--num-workers", "0", "--device", "cpu",
                 "--json", str(tmp_path / "res.json"), "--save-predictions", str(tmp_path / "p.json")])
    assert code == 0 and "mAP (full)" in capsys.readouterr().out
    res = json.loads((tmp_path / "res.json").read_text())
    assert res["n_images"] == 3 and res["n_triplets"] == 2 and res["setting"] == "default"
    assert 0.0 <= res["mAP"] <= 1.0
    assert res["n_rare"] == 1 and res["n_non_rare"] == 1   # training file found under --data
    preds = json.loads((tmp_path / "p.json").read_text())
    _check_predictions(preds, hico_label_space())

    nf = evaluate_checkpoint(model_dir, hico_root, "NF", eval_size=64, max_size=128, device="cpu", progress=False)
    assert nf["setting"] == "NF" and "mAP_unseen" not in nf
    uc = evaluate_checkpoint(model_dir, hico_root, "UC-RF", eval_size=64, max_size=128, device="cpu", progress=False)
    assert "mAP_unseen" in uc and uc["zero_shot"] == "UC-RF"
    with pytest.raises(UserError, match="zero-shot setting 'XX'"):
        evaluate_checkpoint(model_dir, hico_root, "XX", device="cpu")


def test_nf_filter_keeps_only_person_subjects(hico_root, model_dir):
    """NF: pairs whose subject is not classified as the person are dropped, so every NF triplet is a
    default triplet of a pair whose subject argmax is the person class."""
    model = load_pretrained(str(model_dir))
    space = hico_label_space()
    ds = RelationImages(json.loads((hico_root / "annotations" / "test_hico.json").read_text()),
                        hico_root / "images" / "test2015", eval_size=64, max_size=128)
    base = predict(model, ds, space, PostProcess.for_label_space(space, top_k=None), progress=False)
    nf = predict(model, ds, space, PostProcess.for_label_space(space, top_k=None, zero_shot_nf=True), progress=False)
    for b, n in zip(base, nf):
        assert len(n["hoi_prediction"]) <= len(b["hoi_prediction"])
        keep = {(round(t["score"], 7), t["category_id"]) for t in n["hoi_prediction"]}
        assert keep <= {(round(t["score"], 7), t["category_id"]) for t in b["hoi_prediction"]}


def test_custom_label_space_and_explicit_paths(hico_root, model_dir):
    space = toy_label_space(n_objects=4, n_verbs=3)
    gt = [{"file_name": name, "annotations": [{"bbox": [1, 1, 30, 30], "category_id": space.object_ids[0]},
                                              {"bbox": [10, 10, 50, 40], "category_id": space.object_ids[1]}],
           "hoi_annotation": [{"subject_id": 0, "object_id": 1, "category_id": space.verb_ids[0]}]}
          for name in SIZES]
    test = hico_root / "toy_test.json"
    test.write_text(json.dumps(gt))
    res = evaluate_checkpoint(model_dir, test=test, images=hico_root / "images" / "test2015", label_space=space,
                              eval_size=64, max_size=128, device="cpu", progress=False)
    assert res["n_images"] == 3 and 0.0 <= res["mAP"] <= 1.0 and res["mAP_rare"] is None
    obj, rel = label_texts(space)
    assert obj == list(space.objects) + ["no objects"] and len(rel) == 3


def test_tagger_cannot_detect():
    fake = types.SimpleNamespace(cfg=types.SimpleNamespace(tagger=True))
    with pytest.raises(UserError, match="Relation Tagger"):
        predict(fake, None, hico_label_space(), PostProcess())


def _rank(rank: int, world: int, init: str, model_dir: str, root: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        space = hico_label_space()
        model = load_pretrained(str(model_dir))
        ds = RelationImages(json.loads(open(os.path.join(root, "annotations", "test_hico.json")).read()),
                            os.path.join(root, "images", "test2015"), eval_size=64, max_size=128)
        preds = predict(model, ds, space, PostProcess.for_label_space(space, top_k=100), batch_size=1, progress=False)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(preds, f)
        else:
            assert preds is None
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_slices_gather_to_the_single_process_result(hico_root, model_dir, tmp_path):
    space = hico_label_space()
    model = load_pretrained(str(model_dir))
    ds = RelationImages(json.loads((hico_root / "annotations" / "test_hico.json").read_text()),
                        hico_root / "images" / "test2015", eval_size=64, max_size=128)
    single = predict(model, ds, space, PostProcess.for_label_space(space, top_k=100), batch_size=1, progress=False)
    out = tmp_path / "dist.json"
    init = f"file://{tmp_path / 'rendezvous'}"
    # fork: the ranks inherit the imported modules (spawning re-imports torch and transformers)
    mp.start_processes(_rank, args=(2, init, str(model_dir), str(hico_root), str(out)), nprocs=2, join=True,
                       start_method="fork")
    dist = json.loads(out.read_text())
    assert [p["file_name"] for p in dist] == list(SIZES)
    for a, b in zip(dist, single):
        assert a["predictions"] == b["predictions"]
        assert [t["category_id"] for t in a["hoi_prediction"]] == [t["category_id"] for t in b["hoi_prediction"]]
        assert np.allclose([t["score"] for t in a["hoi_prediction"]], [t["score"] for t in b["hoi_prediction"]])


def test_open_images_hook(hico_root, model_dir, tmp_path):
    from rlipv2_scale.inference import evaluate_oi_checkpoint
    from rlipv2_scale.labels.space import LabelSpace

    space = LabelSpace(objects=("person", "cup", "horse"), verbs=("hold", "ride"), valid=np.ones((2, 3)))
    gt = [{"file_name": name, "annotations": [{"bbox": [1, 1, 30, 30], "category_id": 0},
                                              {"bbox": [10, 10, 50, 40], "category_id": 2}],
           "rel_annotations": [{"subject_id": 0, "object_id": 1, "category_id": 1}]} for name in SIZES]
    (tmp_path / "oi_test.json").write_text(json.dumps(gt))
    res = evaluate_oi_checkpoint(model_dir, test=tmp_path / "oi_test.json", images=hico_root / "images" / "test2015",
                                 label_space=space, eval_size=64, max_size=128, device="cpu", progress=False,
                                 predictions_out=tmp_path / "p.json")
    assert 0.0 <= res["recall@50"] <= 1.0 and res["score_wtd"] is not None and res["n_triplets"] == 1
    preds = json.loads((tmp_path / "p.json").read_text())
    assert [p["file_name"] for p in preds] == list(SIZES)
    for p in preds:
        rels = p["rel_predictions"]
        assert 0 < len(rels) <= 100 and "hoi_prediction" not in p
        # scene graphs: the subject keeps its own predicted class (any of the three), ids are 0-based
        assert {p["predictions"][r["subject_id"]]["category_id"] for r in rels} <= {0, 1, 2}
        assert {r["category_id"] for r in rels} <= {0, 1}


def test_a_model_fine_tuned_on_other_labels_is_not_scored_silently_in_hicos(hico_root, model_dir, tmp_path, capsys):
    """A HICO-format dataset whose names are not HICO's used to score 0.0 without a word: the model's
    own label lists (its card) and the data's (objects.json / verbs.json) must agree with the space."""
    from rlipv2_scale.cli import main
    from rlipv2_scale.models.artifacts import CARD_FILE

    tuned = shutil.copytree(model_dir, tmp_path / "tuned")
    card = json.loads((tuned / CARD_FILE).read_text())
    card.update(objects=["person", "ball"], relations=["holding", "next to"])
    (tuned / CARD_FILE).write_text(json.dumps(card))
    args = ["--data", str(hico_root), "--eval-size", "64", "--max-size", "128", "--device", "cpu"]
    assert main(["eval", "hico-det", "--checkpoint", str(tuned), *args]) == 2
    err = capsys.readouterr().err
    assert "trained with 2 object / 2 relation labels" in err and "'hico-det' label space" in err
    # the same dataset describing itself with those labels is scored in them
    own = shutil.copytree(hico_root, tmp_path / "own")
    (own / "annotations" / "objects.json").write_text(json.dumps([{"id": 1, "name": "person"},
                                                                  {"id": 2, "name": "ball"}]))
    (own / "annotations" / "verbs.json").write_text(json.dumps([{"id": 1, "name": "holding"},
                                                                {"id": 2, "name": "next_to", "text": "next to"}]))
    from rlipv2_scale.inference import data_label_space

    space = data_label_space(own / "annotations")
    assert space.objects == ("person", "ball") and space.verbs == ("holding", "next to")
    assert space.object_ids == (1, 2) and space.subject_index == 0


def test_export_of_a_run_without_checkpoint_says_so(tmp_path, capsys):
    from rlipv2_scale.cli import main

    (tmp_path / "run").mkdir()
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "m")]) == 2
    assert "holds no complete checkpoint" in capsys.readouterr().err and not (tmp_path / "m").exists()
