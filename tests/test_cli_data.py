"""`rlipv2 data convert` and `rlipv2 data inspect` through the real CLI entry point."""
from __future__ import annotations

import json

import pytest

from rlipv2_scale import cli

from data_fixtures import oi_sgg, pseudo_coco, vg_raw


@pytest.fixture
def rlipv2(monkeypatch):
    # Only this file's commands: the CLI entry point is the real one.
    monkeypatch.setattr(cli, "COMMANDS", ["data_convert", "data_inspect"])
    return lambda *argv: cli.main([str(a) for a in argv])


def test_convert_then_inspect_prints_the_exact_lines(tmp_path, rlipv2, capsys):
    fx = vg_raw(tmp_path)
    out = tmp_path / "shards"
    summary_path = tmp_path / "summary.json"
    assert rlipv2("data", "convert", "--format", "vg", "--annotations", fx["annotations"], "--images", fx["images"],
                  "--out", out, "--workers", 2, "--no-progress", "--summary-json", summary_path) == 0
    printed = capsys.readouterr().out
    assert "wrote 2 images, 4 objects, 3 relations in 1 shard(s)" in printed
    assert json.loads(summary_path.read_text())["images"] == 2

    assert rlipv2("data", "inspect", out) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == json.dumps({
        "image_id": 1, "source": "vg", "width": 64, "height": 48,
        "objects": [{"box": [2.0, 3.0, 22.0, 13.0], "name": "man"}, {"box": [30.0, 5.0, 64.0, 48.0], "name": "horse"}],
        "relations": [{"subject": 0, "object": 1, "predicate": "riding", "confidence": None},
                      {"subject": 1, "object": 0, "predicate": "next to", "confidence": None}]})
    assert [json.loads(x)["image_id"] for x in lines] == [1, 2]
    assert rlipv2("data", "inspect", out, "--limit", 1) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    assert rlipv2("data", "inspect", out, "--limit", -1) == 2       # not "nothing to print"
    assert "--limit must be 0 or more, got -1" in capsys.readouterr().err


def test_pseudo_threshold_flag_and_confidence_in_inspect(tmp_path, rlipv2, capsys):
    fx = pseudo_coco(tmp_path)
    out = tmp_path / "shards"
    assert rlipv2("data", "convert", "--format", "pseudo", "--annotations", fx["annotations"], "--images",
                  fx["images"], "--out", out, "--threshold", 0.3, "--workers", 1, "--no-progress") == 0
    text = capsys.readouterr().out
    assert "skipped 1 image(s): below_threshold (e.g. 285)" in text
    assert rlipv2("data", "inspect", out) == 0
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert line["source"] == "coco2017"
    assert line["relations"] == [{"subject": 0, "object": 1, "predicate": "watching", "confidence": 0.31}]


def test_data_errors_are_one_line_without_traceback(tmp_path, rlipv2, capsys):
    fx = oi_sgg(tmp_path)
    fx["annotations"].write_text('[{"file_name": 1,,}]')
    code = rlipv2("data", "convert", "--format", "oi-sgg", "--annotations", fx["annotations"], "--images",
                  fx["images"], "--out", tmp_path / "o", "--no-progress")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "OI_SGG_train_finetuning.json is not valid JSON" in err and "line 1, column 18" in err


def test_strict_stops_at_the_first_bad_sample(tmp_path, rlipv2, capsys):
    fx = vg_raw(tmp_path)
    (fx["images"] / "VG_100K" / "1.jpg").write_bytes(b"\xff\xd8\xff garbage")
    args = ["data", "convert", "--format", "vg", "--annotations", fx["annotations"], "--images", fx["images"],
            "--workers", 1, "--no-progress"]
    assert rlipv2(*args, "--out", tmp_path / "a", "--strict") == 2
    err = capsys.readouterr().err
    assert "image '1'" in err and "corrupt_image" in err and "Traceback" not in err
    assert rlipv2(*args, "--out", tmp_path / "b") == 0        # without --strict: skipped and counted
    assert "skipped 1 image(s): corrupt_image (e.g. 1)" in capsys.readouterr().out


def test_inspect_of_a_folder_without_shards(tmp_path, rlipv2, capsys):
    assert rlipv2("data", "inspect", tmp_path) == 2
    assert "index.json" in capsys.readouterr().err


def test_size_limit_flag(tmp_path, rlipv2, capsys):
    fx = vg_raw(tmp_path)
    args = ["data", "convert", "--format", "vg", "--annotations", fx["annotations"], "--images", fx["images"],
            "--workers", 1, "--no-progress"]
    assert rlipv2(*args, "--out", tmp_path / "a", "--size-limit", "64mb") == 0
    assert rlipv2(*args, "--out", tmp_path / "b", "--size-limit", "900") == 0
    assert "in 1 shard(s)" in capsys.readouterr().out.splitlines()[0]
    index = json.loads((tmp_path / "b" / "index.json").read_text())
    # each ~1.3 kB sample overflows a 900-byte shard: one image per shard
    assert [s["samples"] for s in index["shards"] if s["samples"]] == [1, 1]
    assert rlipv2(*args, "--out", tmp_path / "c", "--size-limit", "lots") == 2
    assert "--size-limit 'lots' is not a size" in capsys.readouterr().err


def test_keep_empty_flag(tmp_path, rlipv2, capsys):
    fx = pseudo_coco(tmp_path)
    args = ["data", "convert", "--format", "pseudo", "--annotations", fx["annotations"], "--images", fx["images"],
            "--workers", 1, "--no-progress", "--threshold", 0.5]
    assert rlipv2(*args, "--out", tmp_path / "a") == 0
    assert "wrote 0 images" in capsys.readouterr().out
    assert rlipv2(*args, "--out", tmp_path / "b", "--keep-empty") == 0
    assert "wrote 2 images, 4 objects, 0 relations" in capsys.readouterr().out
