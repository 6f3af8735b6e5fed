"""Data-side faults (issue #21, items 1, 6 and 8): each injected fault ends in one line naming the
fix with exit status 2, and nothing the user had is lost or silently changed."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from rlipv2_scale import cli
from rlipv2_scale.config import from_dict
from rlipv2_scale.data.config import DataConfig
from rlipv2_scale.data.schema import ImageInfo, Object, Relation, RelationalRecord
from rlipv2_scale.data.shards import iter_records, write_shards
from rlipv2_scale.errors import DataError, UserError

from data_fixtures import coco_instances, hico, jpeg, oi_sgg, pseudo_coco, truncate, vcoco, vg_raw, write_json


@pytest.fixture
def rlipv2(monkeypatch, capsys):
    """The real CLI entry point; returns (exit code, stderr lines) and keeps stdout in `.stdout`."""
    monkeypatch.setattr(cli, "COMMANDS", ["data_convert", "data_inspect", "data_subset"])

    def run(*argv):
        code = cli.main([str(a) for a in argv])
        captured = capsys.readouterr()
        run.stdout = captured.out
        return code, captured.err.strip().splitlines()
    return run


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_one_line_error(code: int, err: list[str], *needles: str) -> None:
    assert code == 2 and len(err) == 1 and err[0].startswith("rlipv2: error: "), err
    for needle in needles:
        assert needle in err[0], err[0]


def records(n: int, root: Path) -> list[RelationalRecord]:
    return [RelationalRecord(ImageInfo(i, "vg", "train", 32, 24, f"{i}.jpg"),
                             [Object((1.0, 2.0, 10.0, 20.0), "man"), Object((0.0, 0.0, 5.0, 5.0), "hat")],
                             [Relation(0, 1, "wearing")],
                             image_bytes=jpeg(root / f"{i}.jpg", 32, 24, (10 * i, 90, 40)))
            for i in range(n)]


# -- item 1: an output folder never destroys what the user had ---------------------------------

@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_convert_refuses_an_out_that_is_holds_or_lies_in_an_input(tmp_path, rlipv2, where):
    src = tmp_path / "SRC"
    fx = vg_raw(src)
    before = snapshot(tmp_path)
    out = {"same": src, "parent": tmp_path, "inside": src / "shards"}[where]
    code, err = rlipv2("data", "convert", "--format", "vg", "--annotations", fx["annotations"], "--images", src,
                       "--out", out, "--overwrite", "--no-progress", "--workers", 1)
    assert_one_line_error(code, err, f"output folder {out}", "choose an output folder outside the inputs")
    assert snapshot(tmp_path) == before       # every source file still there, byte-identical, nothing added


def test_overwrite_replaces_only_the_previous_shards(tmp_path, rlipv2):
    fx = vg_raw(tmp_path / "src")
    out = tmp_path / "shards"
    args = ["data", "convert", "--format", "vg", "--annotations", fx["annotations"], "--images", fx["images"],
            "--out", out, "--no-progress", "--workers", 1]
    assert rlipv2(*args, "--size-limit", 1500)[0] == 0          # one image per shard
    first = json.loads((out / "index.json").read_text())
    assert len(first["shards"]) == 2
    (out / "notes.txt").write_text("mine")
    (out / "extra").mkdir()
    (out / "extra" / "shard.00001.mds").write_text("not a shard of this folder")
    assert_one_line_error(*rlipv2(*args), "not empty", "--overwrite")
    assert rlipv2(*args, "--overwrite")[0] == 0                  # one shard now: shard.00001.mds must go
    assert sorted(p.name for p in out.iterdir()) == ["extra", "index.json", "notes.txt", "shard.00000.mds"]
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "extra" / "shard.00001.mds").read_text() == "not a shard of this folder"
    assert [r.image.id for r in iter_records(out)] == [1, 2]
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_overwrite_refuses_shard_files_no_index_lists(tmp_path, rlipv2):
    fx = vg_raw(tmp_path / "src")
    out = tmp_path / "shards"
    out.mkdir()
    (out / "shard.00000.mds").write_bytes(b"someone else's")
    code, err = rlipv2("data", "convert", "--format", "vg", "--annotations", fx["annotations"], "--images",
                       fx["images"], "--out", out, "--overwrite", "--no-progress", "--workers", 1)
    assert_one_line_error(code, err, "shard.00000.mds", "no index.json there lists")
    assert snapshot(out) == {"shard.00000.mds": b"someone else's"}


@pytest.mark.parametrize("listed", ["../victim/keep.txt", "ABSOLUTE", "notes.txt", "sub/shard.00000.mds",
                                    "shard.00000.mds.txt"])
def test_overwrite_deletes_nothing_an_edited_index_lists_but_its_own_shards(tmp_path, rlipv2, listed):
    fx = vg_raw(tmp_path / "src")
    out = tmp_path / "shards"
    args = ["data", "convert", "--format", "vg", "--annotations", fx["annotations"], "--images", fx["images"],
            "--out", out, "--no-progress", "--workers", 1]
    assert rlipv2(*args)[0] == 0
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "keep.txt").write_text("the user's")
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "shard.00000.mds").write_text("mine too")
    (out / "shard.00000.mds.txt").write_text("and this")
    listed = str(tmp_path / "victim" / "keep.txt") if listed == "ABSOLUTE" else listed
    index = json.loads((out / "index.json").read_text())
    index["shards"][0]["raw_data"]["basename"] = listed
    (out / "index.json").write_text(json.dumps(index))
    before = snapshot(tmp_path)
    assert_one_line_error(*rlipv2(*args, "--overwrite"), repr(listed), "not one this tool wrote", "another --out")
    assert snapshot(tmp_path) == before
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_overwrite_takes_the_compressed_shards_an_index_lists(tmp_path):
    from rlipv2_scale.data.output import own_files

    (tmp_path / "shard.00000.mds.zstd").write_bytes(b"z")
    write_json(tmp_path / "index.json", {"version": 2, "shards": [
        {"raw_data": {"basename": "shard.00000.mds", "bytes": 9}, "samples": 1,
         "zip_data": {"basename": "shard.00000.mds.zstd", "bytes": 1}}]})
    assert own_files(tmp_path) == {"index.json", "shard.00000.mds", "shard.00000.mds.zstd"}


def test_convert_that_skips_every_image_is_an_error(tmp_path, rlipv2):
    fx = vg_raw(tmp_path / "src")
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    code, err = rlipv2("data", "convert", "--format", "vg", "--annotations", fx["annotations"], "--images", wrong,
                       "--out", tmp_path / "shards", "--no-progress", "--workers", 1)
    assert_one_line_error(code, err, "no image written", "missing_image 2", "check --images")
    assert not (tmp_path / "shards").exists() and "wrote" not in rlipv2.stdout


def test_a_failed_run_leaves_the_previous_output_as_it_was(tmp_path, rlipv2):
    fx = vg_raw(tmp_path / "src")
    out = tmp_path / "shards"
    args = ["data", "convert", "--format", "vg", "--annotations", fx["annotations"], "--images", fx["images"],
            "--out", out, "--no-progress", "--workers", 1]
    assert rlipv2(*args)[0] == 0
    before = snapshot(out)
    truncate(fx["images"] / "VG_100K_2" / "2.jpg")
    assert_one_line_error(*rlipv2(*args, "--overwrite", "--strict"), "corrupt_image")
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards", "src"]     # no temporary folder left


def test_pseudo_label_refuses_to_write_over_its_input_shards(tmp_path):
    from rlipv2_scale.data.pseudo.pipeline import export_pseudo_labels

    det = tmp_path / "coco" / "shards"                 # `--shards coco/shards --out coco`
    write_shards(records(2, tmp_path / "img"), det)
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match="is the input"):
        export_pseudo_labels(det, tmp_path / "tags", tmp_path / "coco", "coco2017")
    assert snapshot(tmp_path) == before


def test_subset_never_replaces_a_different_file(tmp_path, rlipv2):
    fx = hico(tmp_path)
    released = fx["annotations"].with_name("trainval_hico_100percent.json")
    released.write_text("the released file")
    args = ["data", "subset", "--annotations", fx["annotations"], "--fraction", 1.0, "--out", released.parent]
    assert_one_line_error(*rlipv2(*args), str(released), "move it away")
    assert released.read_text() == "the released file"
    released.unlink()
    assert rlipv2(*args)[0] == 0
    written = released.read_bytes()
    assert rlipv2(*args)[0] == 0 and released.read_bytes() == written     # a same-seed rerun is a no-op
    source = fx["annotations"].read_bytes()
    assert_one_line_error(*rlipv2(*args[:-1], fx["annotations"]), "is a file, not a folder")
    assert fx["annotations"].read_bytes() == source


# -- item 6: failures that were tracebacks -------------------------------------------------------

def test_unwritable_out_is_one_line(tmp_path, rlipv2, monkeypatch):
    fx = vg_raw(tmp_path / "src")
    common = ["data", "convert", "--format", "vg", "--annotations", fx["annotations"], "--images", fx["images"],
              "--no-progress", "--workers", 1]
    (tmp_path / "file").write_text("x")
    assert_one_line_error(*rlipv2(*common, "--out", tmp_path / "file" / "shards"), "is a file, not a folder")

    def read_only(*_, **__):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    out = tmp_path / "ro"
    out.mkdir()
    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)     # root ignores chmod: simulate a read-only mount
    assert_one_line_error(*rlipv2(*common, "--out", out), f"cannot write to --out {out}", "Read-only file system")
    assert not any(out.iterdir())


def test_unwritable_summary_json_is_one_line_and_keeps_the_shards(tmp_path, rlipv2):
    fx = vg_raw(tmp_path / "src")
    code, err = rlipv2("data", "convert", "--format", "vg", "--annotations", fx["annotations"], "--images",
                       fx["images"], "--out", tmp_path / "shards", "--no-progress", "--workers", 1,
                       "--summary-json", tmp_path / "missing" / "summary.json")
    assert_one_line_error(code, err, "--summary-json", "the shards are written")
    assert "wrote 2 images" in rlipv2.stdout and len(list(iter_records(tmp_path / "shards"))) == 2


@pytest.fixture
def read_only_folder(tmp_path) -> Iterator[Path]:
    """A folder nobody may write into: mode 555, or for root (whom modes do not stop) a read-only
    tmpfs mounted there."""
    out = tmp_path / "ro"
    out.mkdir()
    if os.geteuid() != 0:
        out.chmod(0o555)
        yield out
        out.chmod(0o755)
        return
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "none", str(out)], capture_output=True,
                           text=True)
    if mount.returncode != 0:
        pytest.skip(f"root cannot mount a read-only tmpfs here ({mount.stderr.strip()})")
    try:
        yield out
    finally:
        subprocess.run(["umount", str(out)], check=True)


def test_read_only_out_folder(tmp_path, rlipv2, read_only_folder):
    fx = vg_raw(tmp_path / "src")
    code, err = rlipv2("data", "convert", "--format", "vg", "--annotations", fx["annotations"], "--images",
                       fx["images"], "--out", read_only_folder, "--no-progress", "--workers", 1)
    assert_one_line_error(code, err, "cannot write")


@pytest.fixture
def shards(tmp_path) -> Path:
    out = tmp_path / "shards"
    write_shards(records(2, tmp_path / "img"), out)
    return out


def test_inspect_truncated_shard(shards, rlipv2):
    truncate(shards / "shard.00000.mds")
    assert_one_line_error(*rlipv2("data", "inspect", shards), "shard.00000.mds", "truncated")


def test_inspect_damaged_shard_of_the_right_size(shards, rlipv2):
    path = shards / "shard.00000.mds"
    data = bytearray(path.read_bytes())
    data[4:12] = b"\xff" * 8                       # the first sample offsets
    path.write_bytes(bytes(data))
    assert_one_line_error(*rlipv2("data", "inspect", shards), "sample 0 of shard file", "shard.00000.mds")


@pytest.mark.parametrize("text", ['{"shards": [', '{"version": 2}', '{"shards": [{"samples": 1}]}'])
def test_inspect_corrupt_index(shards, rlipv2, text):
    (shards / "index.json").write_text(text)
    assert_one_line_error(*rlipv2("data", "inspect", shards), "index.json is not a valid MDS index")


def test_training_refuses_a_truncated_shard_when_it_opens_it(shards):
    from rlipv2_scale.data.streaming import make_streams

    cfg = from_dict(DataConfig, {"sources": [{"name": "vg", "local": str(shards)}], "batch_size": 2,
                                 "num_workers": 0, "num_obj_labels": 6, "num_rel_labels": 3})
    assert len(make_streams(cfg)) == 1
    truncate(shards / "shard.00000.mds")
    with pytest.raises(DataError, match=r"data source 'vg': shard file '.*shard\.00000\.mds' has \d+ bytes"):
        make_streams(cfg)
    (shards / "shard.00000.mds").unlink()
    with pytest.raises(DataError, match="is missing"):
        make_streams(cfg)


# -- item 8: records lost or changed without a word ---------------------------------------------

def run_convert(rlipv2, tmp_path, fmt, fx, *extra):
    summary = tmp_path / "summary.json"
    code, err = rlipv2("data", "convert", "--format", fmt, "--annotations", fx["annotations"], "--images",
                       fx["images"], "--out", tmp_path / f"out{len(extra)}", "--no-progress", "--workers", 1,
                       "--summary-json", summary, *extra)
    return code, err, (json.loads(summary.read_text()) if code == 0 else None)


def test_coco_annotations_without_an_image_are_counted(tmp_path, rlipv2):
    fx = coco_instances(tmp_path)
    fx["data"]["annotations"].append({"id": 7, "image_id": 999, "bbox": [0, 0, 4, 4], "category_id": 1,
                                      "iscrowd": 0})
    write_json(fx["annotations"], fx["data"])
    code, _, summary = run_convert(rlipv2, tmp_path, "coco", fx)
    assert code == 0 and summary["images"] == 2
    assert summary["skipped"] == {"annotation_without_image": 1}
    assert summary["skipped_examples"] == {"annotation_without_image": ["999"]}
    assert "skipped 1 image(s): annotation_without_image (e.g. 999)" in rlipv2.stdout
    assert_one_line_error(*run_convert(rlipv2, tmp_path, "coco", fx, "--strict")[:2], "image_id 999")


def duplicate_first(fx: dict, key: str | None) -> None:
    """Write the fixture's first image entry twice."""
    data = fx.get("data") or fx.get("entries") or fx["graphs"]
    listed = data[key] if key else data
    listed.append(dict(listed[0]))
    write_json(fx["annotations"], data)


@pytest.mark.parametrize("fmt,make,key,first_id", [
    ("coco", coco_instances, "images", "9"), ("vg", vg_raw, None, "1"), ("pseudo", pseudo_coco, None, "139"),
    ("hico-det", hico, None, "HICO_train2015_00000001.jpg"), ("vcoco", vcoco, None, "COCO_train2014_000000000064.jpg"),
    ("oi-sgg", oi_sgg, None, "0a1b2c.jpg")])
def test_an_image_listed_twice_is_written_once(tmp_path, rlipv2, fmt, make, key, first_id):
    fx = make(tmp_path)
    _, _, clean = run_convert(rlipv2, tmp_path, fmt, fx)
    duplicate_first(fx, key)
    code, _, summary = run_convert(rlipv2, tmp_path, fmt, fx, "--overwrite")
    assert code == 0 and summary["images"] == clean["images"]
    assert summary["skipped"].get("duplicate_image") == 1
    assert summary["skipped_examples"]["duplicate_image"] == [first_id]
    keys = [r.key for r in iter_records(summary["out"])]
    assert len(keys) == len(set(keys)) == clean["images"]
    assert_one_line_error(*run_convert(rlipv2, tmp_path, fmt, fx, "--overwrite", "--strict")[:2],
                          "duplicate_image")


@pytest.mark.parametrize("fmt,make,path", [
    ("hico-det", hico, ("entries", 0, "hoi_annotation", 0, "object_id")),
    ("vcoco", vcoco, ("entries", 0, "hoi_annotation", 0, "subject_id")),
    ("oi-sgg", oi_sgg, ("entries", 0, "rel_annotations", 1, "category_id")),
    ("coco", coco_instances, ("data", "annotations", 0, "category_id")),
    ("pseudo", pseudo_coco, ("entries", 0, "image_id"))])
def test_a_non_integer_id_skips_the_image(tmp_path, rlipv2, fmt, make, path):
    fx = make(tmp_path)
    _, _, clean = run_convert(rlipv2, tmp_path, fmt, fx)
    node = fx[path[0]]
    for step in path[1:-1]:
        node = node[step]
    node[path[-1]] += 0.7                           # e.g. HICO object_id 1 -> 1.7, which int() made 1 again
    write_json(fx["annotations"], fx[path[0]])
    code, err, summary = run_convert(rlipv2, tmp_path, fmt, fx, "--overwrite")
    if clean["images"] == 1:        # the only image skipped: a run that writes nothing says why
        assert_one_line_error(code, err, "no image written", "non_integer_id 1", "is not an integer id")
    else:
        assert code == 0 and summary["images"] == clean["images"] - 1
        assert summary["skipped"]["non_integer_id"] == 1
    assert_one_line_error(*run_convert(rlipv2, tmp_path, fmt, fx, "--overwrite", "--strict")[:2],
                          "is not an integer id")
