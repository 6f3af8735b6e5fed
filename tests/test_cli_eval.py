"""`rlipv2 eval hico-det | vcoco | oi-sgg`: tables, --json output, one-line errors."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from rlipv2_scale.cli import CommandTree
from rlipv2_scale.cli import eval as eval_cli
from rlipv2_scale.errors import UserError
from rlipv2_scale.labels.space import hico_label_space

from relation_data import random_relation_data


def run(argv: list[str]) -> int:
    """The `rlipv2` entry point restricted to the eval commands (exit 2 on a user error)."""
    parser = argparse.ArgumentParser(prog="rlipv2")
    eval_cli.register(CommandTree(parser))
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except UserError as exc:
        print(f"rlipv2: error: {exc}")
        return 2


@pytest.fixture()
def hico_files(tmp_path):
    gt, pred = random_relation_data(hico_label_space(), 20, 30, n_queries=8, seed=3)
    train, _ = random_relation_data(hico_label_space(), 30, 0, n_queries=1, seed=4)
    for name, data in (("gt.json", gt), ("pred.json", pred), ("train.json", train)):
        (tmp_path / name).write_text(json.dumps(data))
    return tmp_path


def test_hico_det_table_and_json(hico_files, capsys):
    out = hico_files / "res" / "hico.json"
    code = run(["eval", "hico-det", "--gt", str(hico_files / "gt.json"), "--pred", str(hico_files / "pred.json"),
                "--train", str(hico_files / "train.json"), "--zero-shot", "UC-RF", "--json", str(out)])
    assert code == 0
    res = json.loads(out.read_text())
    for key in ("mAP", "mAP_rare", "mAP_non_rare", "mean_max_recall", "mAP_unseen", "mAP_seen"):
        assert key in res
    assert 0.0 <= res["mAP"] <= 1.0 and res["zero_shot"] == "UC-RF"
    printed = capsys.readouterr().out
    assert "mAP (full)" in printed and f"{100 * res['mAP']:.2f}" in printed


def test_hico_det_zero_shot_file_and_strict(hico_files):
    split = hico_files / "nf.json"
    split.write_text(json.dumps({"unseen_triplets": [[0, 47, 36]]}))
    out = hico_files / "strict.json"
    assert run(["eval", "hico-det", "--gt", str(hico_files / "gt.json"), "--pred", str(hico_files / "pred.json"),
                "--zero-shot", str(split), "--strict", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["protocol"] == "strict" and res["zero_shot"] == "custom"


def test_hico_det_errors_are_one_line(hico_files, capsys):
    pred = json.loads((hico_files / "pred.json").read_text())
    pred[3]["hoi_prediction"][0]["score"] = None
    (hico_files / "bad.json").write_text(json.dumps(pred))
    assert run(["eval", "hico-det", "--gt", str(hico_files / "gt.json"), "--pred", str(hico_files / "bad.json")]) == 2
    msg = capsys.readouterr().out
    assert "img_000003.jpg" in msg and "hoi_prediction[0].score" in msg
    assert run(["eval", "hico-det", "--gt", str(hico_files / "missing.json"), "--pred", str(hico_files / "pred.json")]) == 2
    assert "does not exist" in capsys.readouterr().out
    assert run(["eval", "hico-det", "--gt", str(hico_files / "gt.json")]) == 2
    assert "--pred" in capsys.readouterr().out
    assert run(["eval", "hico-det", "--gt", str(hico_files / "gt.json"), "--pred", str(hico_files / "pred.json"),
                "--zero-shot", "NF"]) == 2
    assert "file of unseen triplets" in capsys.readouterr().out


def test_malformed_file_through_the_real_entry_point(hico_files):
    """The command as users run it: one line naming the entry, status 2, no traceback."""
    pred = json.loads((hico_files / "pred.json").read_text())
    pred[5]["predictions"][2]["bbox"] = [1, 2, 3]
    (hico_files / "bad.json").write_text(json.dumps(pred))
    proc = subprocess.run([sys.executable, "-m", "rlipv2_scale.cli", "eval", "hico-det", "--gt",
                           str(hico_files / "gt.json"), "--pred", str(hico_files / "bad.json")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "rlipv2: error: predictions for image 'img_000005.jpg': predictions[2].bbox must be 4 numbers "
        "[x1, y1, x2, y2], got [1, 2, 3]"]


def test_commands_start_without_torch():
    """Building the command line imports no heavy library (torch alone takes seconds and 0.3 GB, which
    `rlipv2 eval` from files does not need); commands import what they use when they run."""
    code = ("import sys; from rlipv2_scale.cli import build_parser; build_parser(); "
            "print(sorted({'torch', 'streaming', 'transformers', 'timm'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_oi_sgg_command(tmp_path):
    gt = [{"file_name": "a", "annotations": [{"bbox": [0, 0, 9, 9], "category_id": 0}, {"bbox": [20, 0, 29, 9], "category_id": 5}],
           "rel_annotations": [{"subject_id": 0, "object_id": 1, "category_id": 3}]}]
    pred = [{"file_name": "a", "predictions": gt[0]["annotations"],
             "rel_predictions": [{"subject_id": 0, "object_id": 1, "category_id": 3, "score": 0.4}]}]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "pred.json").write_text(json.dumps(pred))
    out = tmp_path / "oi.json"
    assert run(["eval", "oi-sgg", "--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "pred.json"),
                "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["recall@50"] == 1.0 and res["score_wtd"] == pytest.approx(1.0)


def test_vcoco_command(tmp_path):
    from test_eval_vcoco import coco, detections, vcoco

    for name, data in (("v.json", vcoco()), ("c.json", coco()), ("d.json", detections())):
        (tmp_path / name).write_text(json.dumps(data))
    (tmp_path / "ids").write_text("1\n2\n")
    out = tmp_path / "v_res.json"
    assert run(["eval", "vcoco", "--vcoco", str(tmp_path / "v.json"), "--coco", str(tmp_path / "c.json"),
                "--image-ids", str(tmp_path / "ids"), "--detections", str(tmp_path / "d.json"), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["AP_role_s1"] == pytest.approx(0.5) and res["AP_role_s2"] == pytest.approx(1.0)


def test_hico_det_files_are_named_in_the_label_space_beside_the_annotations(tmp_path):
    """A HICO-DET-format dataset with its own objects.json / verbs.json (as `rlipv2 data synth` writes)
    is scored in that label space from files too, as with --checkpoint: triplets carry its names."""
    from rlipv2_scale.inference import data_label_space

    (tmp_path / "objects.json").write_text(json.dumps([{"id": 1, "name": "person"}, {"id": 2, "name": "cup"},
                                                       {"id": 3, "name": "lamp"}]))
    (tmp_path / "verbs.json").write_text(json.dumps([{"id": 1, "name": "holding"}, {"id": 2, "name": "next to"}]))
    space = data_label_space(tmp_path)
    gt, pred = random_relation_data(space, 12, 20, n_queries=6, seed=5)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "pred.json").write_text(json.dumps(pred))
    out = tmp_path / "res.json"
    assert run(["eval", "hico-det", "--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "pred.json"),
                "--json", str(out)]) == 0
    triplets = [tuple(t["triplet"]) for t in json.loads(out.read_text())["per_triplet"]]   # (subject, object, verb)
    assert len(triplets) == 6 and all(s == "person" and o in ("person", "cup", "lamp") and v in ("holding", "next to")
                                      for s, o, v in triplets), triplets
