"""`eval vcoco --checkpoint` and `eval oi-sgg --checkpoint`: V-COCO detections from model outputs, the
files found under a dataset root, end-to-end runs of a tiny model on tiny datasets, and bad input."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from rlipv2_scale.cli import main
from rlipv2_scale.errors import UserError
from rlipv2_scale.inference import (
    evaluate_oi_checkpoint,
    evaluate_vcoco_checkpoint,
    find_oi_files,
    find_vcoco_files,
    oi_label_space_from_files,
    vcoco_detections,
    vcoco_image_id,
    vcoco_label_space,
)
from rlipv2_scale.labels.metadata import vcoco_verbs
from rlipv2_scale.models import original as O
from rlipv2_scale.models.build import build_model
from rlipv2_scale.models.config import named_config
from rlipv2_scale.models.postprocess import ImageTriplets, PostProcess

FAST = ["--eval-size", "64", "--max-size", "128", "--num-workers", "0", "--device", "cpu"]
VERB = {v["name"]: v["index"] for v in vcoco_verbs()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model, exported to the original format and imported back, as a user's would be."""
    from rlipv2_scale.config import save_config

    torch.manual_seed(0)
    cfg = named_config("tiny")
    cfg.compat_original = True
    d = tmp_path_factory.mktemp("ckpt")
    torch.save({"model": O.export_state_dict(build_model(cfg, pretrained=False).state_dict(), cfg)}, d / "tiny.pth")
    save_config(cfg, d / "tiny.yaml")
    O.import_checkpoint(d / "tiny.pth", str(d / "tiny.yaml"), d / "model")
    return d / "model"


# ------------------------------------------------------------------------------------------ V-COCO
SIZES = {1: (48, 64), 2: (64, 48)}   # COCO image id -> (h, w)


def _coco() -> dict:
    # image 1: person 10 holds cup 11; image 2: person 20 points (no object)
    anns = [(10, 1, 1, [2, 2, 30, 40]), (11, 1, 47, [30, 10, 20, 20]), (20, 2, 1, [5, 5, 30, 50])]
    return {"images": [{"id": i, "width": w, "height": h} for i, (h, w) in SIZES.items()],
            "categories": [{"id": 1, "name": "person"}, {"id": 47, "name": "cup"}],
            "annotations": [{"id": i, "image_id": im, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
                            for i, im, c, b in anns]}


def _vcoco() -> list[dict]:
    common = {"image_id": [1, 2], "ann_id": [10, 20]}
    return [dict(common, action_name="hold", role_name=["agent", "obj"], label=[1, 0], role_object_id=[10, 20, 11, 0]),
            dict(common, action_name="point", role_name=["agent", "instr"], label=[0, 1],
                 role_object_id=[10, 20, 0, 0])]


def _file(image_id: int) -> str:
    return f"COCO_val2014_{image_id:012d}.jpg"


@pytest.fixture(scope="module")
def vcoco_root(tmp_path_factory):
    """The QPIC / RLIPv2 layout plus the official toolkit's data/ folder."""
    root = tmp_path_factory.mktemp("v-coco")
    for d in ("annotations", "images/val2014", "data/vcoco", "data/splits"):
        (root / d).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for image_id, (h, w) in SIZES.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / "val2014" /
                                                                              _file(image_id))
    (root / "annotations" / "test_vcoco.json").write_text(json.dumps([{"file_name": _file(i)} for i in SIZES]))
    valid = np.ones((29, 80))
    valid[VERB["hold_obj"], 0] = 0   # nobody holds a person
    np.save(root / "annotations" / "corre_vcoco.npy", valid)
    (root / "data" / "vcoco" / "vcoco_test.json").write_text(json.dumps(_vcoco()))
    (root / "data" / "instances_vcoco_all_2014.json").write_text(json.dumps(_coco()))
    (root / "data" / "splits" / "vcoco_test.ids").write_text("1\n2\n")
    return root


def test_vcoco_label_space_appends_the_always_valid_missing_object_column():
    mat = np.zeros((29, 80))
    mat[3, 5] = 1
    space = vcoco_label_space(mat)
    assert len(space.objects) == 81 and space.objects[0] == "person" and space.objects[80] == "missing objects"
    assert space.verbs[VERB["sit_instr"]] == "sit on/at" and space.subject_index == 0
    assert space.valid.shape == (29, 81) and space.valid[3, 5] == 1 and space.valid[:, 80].all()
    assert space.valid[:, :80].sum() == 1
    # a file with the 81st column keeps its own (the original appends the ones after it)
    wide = vcoco_label_space(np.hstack([mat, np.zeros((29, 1))])).valid
    assert np.array_equal(wide[:, :80], space.valid[:, :80]) and not wide[:, 80].any()
    with pytest.raises(UserError, match=r"shape \(29, 79\), expected \(29, 80\)"):
        vcoco_label_space(np.ones((29, 79)))


def test_vcoco_image_id():
    assert vcoco_image_id({"file_name": "COCO_val2014_000000000042.jpg"}) == 42
    assert vcoco_image_id({"file_name": "x.jpg", "img_id": 7}) == 7
    with pytest.raises(UserError, match="neither a COCO file name"):
        vcoco_image_id({"file_name": "x.jpg"})


def test_vcoco_detections_by_hand():
    """Pair 0: person + cup (object 41); pair 1: an object of the "missing objects" class (80)."""
    sub = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    obj = torch.tensor([[10.0, 11.0, 12.0, 13.0], [0.0, 0.0, 1.0, 1.0]])
    pairs = [0, 0, 0, 1, 1]
    rels = [VERB["hold_obj"], VERB["cut_instr"], VERB["cut_obj"], VERB["stand"], VERB["point_instr"]]
    scores = [0.5, 0.25, 0.75, 0.125, 0.375]
    t = ImageTriplets(sub, obj, torch.zeros(2, dtype=torch.long), torch.tensor([41, 80]), torch.ones(2),
                      torch.ones(2), torch.tensor(pairs), torch.tensor(rels), torch.tensor(scores))
    d0, d1 = vcoco_detections(t, image_id=9)
    assert d0["image_id"] == 9 and d0["person_box"] == [1.0, 2.0, 3.0, 4.0]
    assert d0["hold_obj"] == [10.0, 11.0, 12.0, 13.0, 0.5] and d0["hold_agent"] == 0.5
    assert d0["cut_instr"][-1] == 0.25 and d0["cut_obj"][-1] == 0.75 and d0["cut_agent"] == 0.75  # max over roles
    assert d0["stand_agent"] == 0.0 and d0["eat_obj"] == [10.0, 11.0, 12.0, 13.0, 0.0] and d0["eat_agent"] == 0.0
    assert d1["stand_agent"] == 0.125 and d1["point_agent"] == 0.375
    assert all(math.isnan(v) for v in d1["point_instr"][:4]) and d1["point_instr"][4] == 0.375
    # every action-role of the 29 classes, and an agent score for each of the 26 actions
    roles = [v["name"] for v in vcoco_verbs() if v["role"] != "agent"]
    assert all(len(d0[r]) == 5 for r in roles) and len(roles) == 25
    assert len([k for k in d0 if k.endswith("_agent")]) == 26


def test_vcoco_detections_carry_every_pair_score_of_the_post_processing():
    """Scores are s_rel * s_obj * valid for every query pair and action-role (zeros included)."""
    torch.manual_seed(1)
    mat = (torch.rand(29, 80) > 0.3).double().numpy()
    space = vcoco_label_space(mat)
    n_q = 6
    out = {"pred_obj_logits": torch.randn(1, n_q, 82), "pred_sub_logits": torch.randn(1, n_q, 82),
           "pred_rel_logits": torch.randn(1, n_q, 29), "pred_sub_boxes": torch.rand(1, n_q, 4) * 0.5 + 0.25,
           "pred_obj_boxes": torch.rand(1, n_q, 4) * 0.5 + 0.25}
    out["pred_obj_logits"][0, 2, 80] = 50.0   # query 2: "missing objects"
    (res,) = PostProcess.for_label_space(space, top_k=None)(out, torch.tensor([[40, 60]]))
    dets = vcoco_detections(res, 1)
    assert len(dets) == n_q
    s_obj, c_obj = out["pred_obj_logits"][0].softmax(-1)[:, :-1].max(-1)
    expected = out["pred_rel_logits"][0].sigmoid() * s_obj[:, None] * torch.as_tensor(space.valid).float()[:, c_obj].T
    for q, det in enumerate(dets):
        for v in vcoco_verbs():
            got = det[f"{v['action']}_agent"] if v["role"] == "agent" else det[v["name"]][4]
            assert got == pytest.approx(expected[q, v["index"]].item(), rel=1e-5)
        box = det["hold_obj"][:4]
        assert all(math.isnan(x) for x in box) == (q == 2)
        cx, cy, w, h = out["pred_sub_boxes"][0, q].tolist()
        assert det["person_box"] == pytest.approx([(cx - w / 2) * 60, (cy - h / 2) * 40, (cx + w / 2) * 60,
                                                   (cy + h / 2) * 40], rel=1e-5)


def test_find_vcoco_files(vcoco_root, tmp_path):
    files = find_vcoco_files(vcoco_root)
    assert files.test == vcoco_root / "annotations" / "test_vcoco.json"
    assert files.images == vcoco_root / "images" / "val2014"
    assert files.correct_mat == vcoco_root / "annotations" / "corre_vcoco.npy"
    assert files.vcoco == vcoco_root / "data" / "vcoco" / "vcoco_test.json"
    assert files.coco == vcoco_root / "data" / "instances_vcoco_all_2014.json"
    assert files.image_ids == vcoco_root / "data" / "splits" / "vcoco_test.ids"
    assert find_vcoco_files(vcoco_root, image_ids=tmp_path).image_ids == tmp_path   # explicit paths win
    with pytest.raises(UserError, match=r"'.*nope' \(--coco\) does not exist"):
        find_vcoco_files(vcoco_root, coco=tmp_path / "nope")


def test_eval_vcoco_checkpoint_end_to_end(vcoco_root, model_dir, tmp_path, capsys):
    out, det_file = tmp_path / "res.json", tmp_path / "dets.json"
    code = main(["eval", "vcoco", "--checkpoint", str(model_dir), "--data", str(vcoco_root), *FAST,
                 "--json", str(out), "--save-predictions", str(det_file)])
    assert code == 0 and "role AP scenario 1" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert 0.0 <= res["AP_role_s1"] <= 1.0 and 0.0 <= res["AP_role_s2"] <= 1.0
    assert set(res["per_role_s1"]) == {"hold-obj", "point-instr"} and res["n_images"] == 2
    dets = json.loads(det_file.read_text())
    n_q = named_config("tiny").num_pairs   # one detection per query pair
    assert len(dets) == 2 * n_q and [d["image_id"] for d in dets] == [1] * n_q + [2] * n_q
    for d in dets:
        assert len(d["person_box"]) == 4 and len(d["hold_obj"]) == 5 and 0.0 <= d["hold_obj"][4] <= 1.0
    # the detection file scores the same through the file path of the command
    again = tmp_path / "again.json"
    assert main(["eval", "vcoco", "--vcoco", str(vcoco_root / "data/vcoco/vcoco_test.json"),
                 "--coco", str(vcoco_root / "data/instances_vcoco_all_2014.json"),
                 "--image-ids", str(vcoco_root / "data/splits/vcoco_test.ids"), "--detections", str(det_file),
                 "--json", str(again)]) == 0
    scored = json.loads(again.read_text())
    assert scored["AP_role_s1"] == res["AP_role_s1"] and scored["AP_role_s2"] == res["AP_role_s2"]


def _vcoco_rank(rank: int, world: int, init: str, model_dir: str, root: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        res = evaluate_vcoco_checkpoint(model_dir, root, batch_size=1, eval_size=64, max_size=128, device="cpu",
                                        progress=False, predictions_out=out + ".dets" if rank == 0 else None)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(res, f)
        else:
            assert res is None
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_vcoco_gathers_the_single_process_detections(vcoco_root, model_dir, tmp_path):
    import torch.multiprocessing as mp

    single = evaluate_vcoco_checkpoint(model_dir, vcoco_root, batch_size=1, eval_size=64, max_size=128, device="cpu",
                                       progress=False, predictions_out=tmp_path / "single.json")
    out = tmp_path / "dist.json"
    mp.start_processes(_vcoco_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", str(model_dir), str(vcoco_root),
                                          str(out)), nprocs=2, join=True, start_method="fork")
    dist = json.loads(out.read_text())
    assert dist["AP_role_s1"] == single["AP_role_s1"] and dist["AP_role_s2"] == single["AP_role_s2"]
    a, b = json.loads((tmp_path / "single.json").read_text()), json.loads((tmp_path / "dist.json.dets").read_text())
    assert [d["image_id"] for d in a] == [d["image_id"] for d in b]
    assert np.allclose([d["hold_obj"][4] for d in a], [d["hold_obj"][4] for d in b])


def test_eval_vcoco_checkpoint_bad_input(vcoco_root, model_dir, tmp_path, capsys):
    broken = tmp_path / "v-coco"
    shutil.copytree(vcoco_root, broken)
    (broken / "annotations" / "corre_vcoco.npy").unlink()
    assert main(["eval", "vcoco", "--checkpoint", str(model_dir), "--data", str(broken), *FAST]) == 2
    err = capsys.readouterr().err
    assert "valid action-object matrix not found under" in err and "--correct-mat" in err
    # an explicit matrix fixes it
    res = evaluate_vcoco_checkpoint(model_dir, broken, correct_mat=vcoco_root / "annotations" / "corre_vcoco.npy",
                                    eval_size=64, max_size=128, device="cpu", progress=False)
    assert "AP_role_s1" in res
    # the test list and the official split disagree
    (broken / "data" / "splits" / "vcoco_test.ids").write_text("2\n")
    with pytest.raises(UserError, match="not in the split"):
        evaluate_vcoco_checkpoint(model_dir, vcoco_root, image_ids=broken / "data" / "splits" / "vcoco_test.ids",
                                  device="cpu", progress=False)
    # no --data: every file must be named
    assert main(["eval", "vcoco", "--checkpoint", str(model_dir), *FAST]) == 2
    assert "missing --test, --images, --correct-mat" in capsys.readouterr().err
    # neither a model nor a detection file
    assert main(["eval", "vcoco", "--vcoco", "v.json"]) == 2
    assert "missing --coco, --image-ids, --detections" in capsys.readouterr().err


def test_checkpoint_of_the_wrong_config_is_a_clear_error(vcoco_root, model_dir, tmp_path, capsys):
    from rlipv2_scale.config import load_config, save_config
    from rlipv2_scale.models.artifacts import CONFIG_FILE
    from rlipv2_scale.models.config import ModelConfig

    wrong = tmp_path / "wrong"
    shutil.copytree(model_dir, wrong)
    cfg = load_config(ModelConfig, wrong / CONFIG_FILE)
    cfg.num_queries = cfg.num_queries + 2
    save_config(cfg, wrong / CONFIG_FILE)
    assert main(["eval", "vcoco", "--checkpoint", str(wrong), "--data", str(vcoco_root), *FAST]) == 2
    err = capsys.readouterr().err
    assert "does not fit the model" in err and "shape mismatch" in err and "model.yaml" in err
    # an original .pth instead of a model directory
    assert main(["eval", "vcoco", "--checkpoint", str(model_dir.parent / "tiny.pth"), "--data", str(vcoco_root),
                 *FAST]) == 2
    assert "rlipv2 import-checkpoint" in capsys.readouterr().err
    assert main(["eval", "vcoco", "--checkpoint", str(tmp_path / "none"), "--data", str(vcoco_root), *FAST]) == 2
    err = capsys.readouterr().err
    assert "does not exist (create one with `rlipv2 export RUN --out DIR`" in err and "import-checkpoint" in err


# ------------------------------------------------------------------------------------------ Open Images
ALL_OBJECTS = ["Tree", "Man", "Cup", "Horse", "Woman"]
SGG_OBJECTS = ["Man", "Woman", "Cup", "Horse"]        # the SGG list: ids are positions in ALL_OBJECTS
PREDICATES = ["hold", "ride", "at"]
OI_SIZES = {"a.jpg": (64, 80), "b.jpg": (48, 48)}


@pytest.fixture(scope="module")
def oi_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("open-imagev6")
    (root / "annotations").mkdir()
    (root / "images").mkdir()
    rng = np.random.default_rng(1)
    gt = []
    for name, (h, w) in OI_SIZES.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / name)
        gt.append({"file_name": name,
                   "annotations": [{"bbox": [1, 1, w // 2, h - 2], "category_id": 1},
                                   {"bbox": [w // 3, h // 4, w - 2, h // 2], "category_id": 2},
                                   {"bbox": [w // 4, h // 2, w - 1, h - 1], "category_id": 3}],
                   "rel_annotations": [{"subject_id": 0, "object_id": 1, "category_id": 0},
                                       {"subject_id": 0, "object_id": 2, "category_id": 1}]})
    (root / "annotations" / "OI_SGG_test.json").write_text(json.dumps(gt))
    (root / "annotations" / "OI_SGG_trainval_test_categories_dict.json").write_text(
        json.dumps({"obj": SGG_OBJECTS, "rel": PREDICATES}))
    (root / "annotations" / "categories_dict.json").write_text(json.dumps({"obj": ALL_OBJECTS, "rel": PREDICATES}))
    return root


def test_oi_label_space_ids_index_the_full_object_list(oi_root, tmp_path):
    files = find_oi_files(oi_root)
    assert files.test.name == "OI_SGG_test.json" and files.images == oi_root / "images"
    space = oi_label_space_from_files(files.categories, files.object_categories)
    assert space.objects == tuple(SGG_OBJECTS) and space.object_ids == (1, 4, 2, 3)
    assert space.verbs == tuple(PREDICATES) and space.verb_ids == (0, 1, 2)
    assert oi_label_space_from_files(files.categories).object_ids == (0, 1, 2, 3)   # no full list: SGG positions
    (tmp_path / "all.json").write_text(json.dumps({"obj": ["Man", "Cup"]}))
    with pytest.raises(UserError, match="lacks"):
        oi_label_space_from_files(files.categories, tmp_path / "all.json")


def test_eval_oi_checkpoint_end_to_end(oi_root, model_dir, tmp_path, capsys):
    out, pred = tmp_path / "res.json", tmp_path / "pred.json"
    code = main(["eval", "oi-sgg", "--checkpoint", str(model_dir), "--data", str(oi_root), *FAST,
                 "--json", str(out), "--save-predictions", str(pred)])
    assert code == 0 and "wmAP_rel" in capsys.readouterr().out
    res = json.loads(out.read_text())
    for key in ("recall@50", "wmAP_rel", "wmAP_phr", "score_wtd"):
        assert 0.0 <= res[key] <= 1.0
    assert res["score_wtd"] == pytest.approx(0.2 * res["recall@50"] + 0.4 * res["wmAP_rel"] + 0.4 * res["wmAP_phr"])
    assert res["n_triplets"] == 2 and res["n_images"] == 2
    preds = json.loads(pred.read_text())
    assert [p["file_name"] for p in preds] == list(OI_SIZES)
    for p in preds:
        assert 0 < len(p["rel_predictions"]) <= 100
        assert {b["category_id"] for b in p["predictions"]} <= {1, 2, 3, 4}   # ids of the full object list
    # the prediction file scores the same through the file path of the command
    again = tmp_path / "again.json"
    assert main(["eval", "oi-sgg", "--gt", str(oi_root / "annotations" / "OI_SGG_test.json"), "--pred", str(pred),
                 "--json", str(again)]) == 0
    scored = json.loads(again.read_text())
    assert [scored[k] for k in ("recall@50", "wmAP_rel", "wmAP_phr")] == [res[k] for k in ("recall@50", "wmAP_rel",
                                                                                          "wmAP_phr")]


def test_eval_oi_checkpoint_bad_input(oi_root, model_dir, tmp_path, capsys):
    broken = tmp_path / "oi"
    shutil.copytree(oi_root, broken)
    (broken / "annotations" / "OI_SGG_trainval_test_categories_dict.json").unlink()
    assert main(["eval", "oi-sgg", "--checkpoint", str(model_dir), "--data", str(broken), *FAST]) == 2
    err = capsys.readouterr().err
    assert "category names not found under" in err and "--categories" in err
    assert main(["eval", "oi-sgg", "--checkpoint", str(model_dir), "--data", str(tmp_path / "nope"), *FAST]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["eval", "oi-sgg", "--gt", "gt.json"]) == 2
    assert "--checkpoint DIR --data ROOT" in capsys.readouterr().err
    with pytest.raises(UserError, match="--categories"):
        evaluate_oi_checkpoint(model_dir, test=oi_root / "annotations" / "OI_SGG_test.json", images=oi_root / "images")
