"""`rlipv2 eval hico-det | vcoco | oi-sgg`: tables, --json output, one-line errors."""
from __future__ import annotations

import argparse
import json
import re
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


def test_hico_det_warns_about_images_without_predictions(hico_files, capsys):
    pred = json.loads((hico_files / "pred.json").read_text())
    (hico_files / "part.json").write_text(json.dumps(pred[:5]))
    out = hico_files / "part-res.json"
    assert run(["eval", "hico-det", "--gt", str(hico_files / "gt.json"), "--pred", str(hico_files / "part.json"),
                "--json", str(out)]) == 0
    err = " ".join(capsys.readouterr().err.split())  # (rich wraps the line at the terminal width)
    assert "rlipv2: warning: 15 of 20 ground-truth images have no predictions" in err
    assert json.loads(out.read_text())["n_images_without_predictions"] == 15
    (hico_files / "none.json").write_text("[]")
    assert run(["eval", "hico-det", "--gt", str(hico_files / "gt.json"), "--pred", str(hico_files / "none.json")]) == 0
    assert "20 of 20 ground-truth images have no predictions" in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("value, expected", [("UC-XX", "(UC-NF, UC-RF, UO)"), ("uc-rf", "did you mean 'UC-RF'?")])
def test_hico_det_unknown_split_name_lists_the_splits(value, expected, hico_files, capsys, monkeypatch):
    monkeypatch.chdir(hico_files)
    assert run(["eval", "hico-det", "--gt", "gt.json", "--pred", "pred.json", "--zero-shot", value]) == 2
    msg = capsys.readouterr().out
    assert expected in msg and "does not exist" not in msg


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


def _vcoco_argv(tmp_path) -> list[str]:
    from test_eval_vcoco import coco, detections, vcoco

    for name, data in (("v.json", vcoco()), ("c.json", coco()), ("d.json", detections())):
        (tmp_path / name).write_text(json.dumps(data))
    (tmp_path / "ids").write_text("1\n2\n")
    return ["eval", "vcoco", "--vcoco", str(tmp_path / "v.json"), "--coco", str(tmp_path / "c.json"),
            "--image-ids", str(tmp_path / "ids"), "--detections", str(tmp_path / "d.json")]


def _json_cases(tmp_path):
    (tmp_path / "file").write_text("")
    (tmp_path / "folder").mkdir()
    return [(tmp_path / "file" / "out.json", r"file is a file, not a folder"),
            (tmp_path / "folder", r"folder is a folder; give a file path"),
            ("/proc/out.json", r"cannot create a file in /proc")]


@pytest.mark.parametrize("command", [
    ["eval", "hico-det", "--gt", "missing-gt.json", "--pred", "missing-pred.json"],
    ["eval", "vcoco", "--vcoco", "m.json", "--coco", "m.json", "--image-ids", "m.ids", "--detections", "m.json"],
    ["eval", "oi-sgg", "--gt", "missing-gt.json", "--pred", "missing-pred.json"],
    ["eval", "synthetic", "--checkpoint", "missing-model", "--data", "missing-split"],
    ["eval", "hico-det", "--checkpoint", "missing-model", "--data", "missing-root"],
])
def test_json_out_is_checked_before_any_work(command, tmp_path, capsys):
    """A --json path that cannot be written is refused first (the inputs here do not even exist), not
    with a traceback after the scoring or model run."""
    for out, message in _json_cases(tmp_path):
        assert run(command + ["--json", str(out)]) == 2
        printed = capsys.readouterr().out
        assert printed.startswith(f"rlipv2: error: --json {out}") and re.search(message, printed), printed


def test_json_write_failure_at_the_end_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(eval_cli, "_check_json_out", lambda out: None)   # as if the place changed meanwhile
    assert run(_vcoco_argv(tmp_path) + ["--json", "/proc/out.json"]) == 2
    assert "rlipv2: error: --json /proc/out.json: cannot write the results there" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--device", "tpu"], r"--device tpu: expected cpu, cuda or cuda:N"),
    (["--device", "cuda:x"], r"--device cuda:x: expected cpu, cuda or cuda:N"),
    (["--eval-size", "0"], r"--eval-size must be positive, got 0"),
    (["--eval-size", "-5"], r"--eval-size must be positive, got -5"),
])
@pytest.mark.parametrize("command", ["synthetic", "hico-det", "vcoco", "oi-sgg"])
def test_model_options_are_checked_before_the_model_loads(command, extra, message, tmp_path, capsys):
    argv = ["eval", command, "--checkpoint", str(tmp_path / "no-model"), "--data", str(tmp_path / "no-data")]
    assert run(argv + extra) == 2
    assert re.search(message, capsys.readouterr().out)


def test_model_sizes_and_counts_are_positive(tmp_path, capsys):
    argv = ["eval", "hico-det", "--checkpoint", str(tmp_path / "m"), "--data", str(tmp_path / "d")]
    for extra, message in ((["--max-size", "0"], "--max-size must be positive"),
                           (["--batch-size", "0"], "--batch-size must be positive"),
                           (["--num-workers", "-1"], "--num-workers must be 0 or more")):
        assert run(argv + extra) == 2
        assert message in capsys.readouterr().out


def test_cuda_device_needs_a_visible_gpu(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run(["eval", "synthetic", "--checkpoint", str(tmp_path / "m"), "--data", str(tmp_path / "d"),
                "--device", "cuda:1"]) == 2
    assert "--device cuda:1: no CUDA device is visible here" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert run(["eval", "synthetic", "--checkpoint", str(tmp_path / "m"), "--data", str(tmp_path / "d"),
                "--device", "cuda:1"]) == 2
    assert "this machine has 1 CUDA device(s), cuda:0 to cuda:0" in capsys.readouterr().out


def test_vcoco_errors_and_pickle_warning_through_the_real_entry_point(tmp_path):
    """One line each on stderr, no traceback and no multi-line Python warning."""
    import pickle

    from test_eval_vcoco import detections

    argv = _vcoco_argv(tmp_path)
    dets = detections()
    dets[2]["image_id"] = "abc"
    (tmp_path / "bad.json").write_text(json.dumps(dets))
    bad = argv[:-1] + [str(tmp_path / "bad.json")]
    proc = subprocess.run([sys.executable, "-m", "rlipv2_scale.cli", *bad], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"rlipv2: error: detections file '{tmp_path / 'bad.json'}': detection 2 has image_id 'abc'; it must be the "
        "integer COCO image id"]
    with (tmp_path / "d.pkl").open("wb") as f:
        pickle.dump(detections(), f)
    good = argv[:-1] + [str(tmp_path / "d.pkl"), "--trust-pickle", "--json", str(tmp_path / "dir" / "out.json")]
    proc = subprocess.run([sys.executable, "-m", "rlipv2_scale.cli", *good], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"rlipv2: warning: unpickling '{tmp_path / 'd.pkl'}' (--trust-pickle): this can run code from the file"]
    assert json.loads((tmp_path / "dir" / "out.json").read_text())["AP_role_s2"] == pytest.approx(1.0)
