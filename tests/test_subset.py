"""Few-shot subsets: seeded, covering every verb and object, of the documented size."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from rlipv2_scale.cli import CommandTree, data_subset
from rlipv2_scale.data.subset import select_subset, subset_file_name, write_subsets
from rlipv2_scale.errors import DataError, UserError


def _entry(k: int, verbs: list[int], objects: list[int]) -> dict:
    anns = [{"bbox": [0, 0, 10, 10], "category_id": 1}] + [{"bbox": [5, 5, 20, 20], "category_id": o} for o in objects]
    return {"file_name": f"img_{k:05d}.jpg", "annotations": anns,
            "hoi_annotation": [{"subject_id": 0, "object_id": 1 + (j % len(objects)), "category_id": v}
                               for j, v in enumerate(verbs)]}


def _dataset(n: int = 1000, lonely_object: bool = True) -> list[dict]:
    """Verbs 1..20 and objects 2..16 with long tails: verb 20 and object 16 each occur in one image."""
    rng = np.random.default_rng(0)
    entries = []
    for k in range(n):
        verbs = sorted({int(v) for v in rng.integers(1, 20, size=rng.integers(1, 4))})
        objects = sorted({int(o) for o in rng.integers(2, 16, size=rng.integers(1, 3))})
        entries.append(_entry(k, verbs, objects))
    entries[n // 8] = _entry(n // 8, [20], [3])                    # the only image with verb 20
    if lonely_object:
        entries[3 * n // 4] = _entry(3 * n // 4, [5], [16])        # the only image with object 16
    return entries


def _cats(entries: list[dict]) -> tuple[set[int], set[int]]:
    return ({h["category_id"] for e in entries for h in e["hoi_annotation"]},
            {a["category_id"] for e in entries for a in e["annotations"]})


def test_subset_is_seeded_sized_and_covering():
    entries = _dataset()
    a, b, c = (select_subset(entries, 0.1, seed) for seed in (5, 5, 6))
    assert a.indices == b.indices and a.indices != c.indices
    assert a.target == 100 and len(a.indices) == 100 == len(set(a.indices))
    assert a.indices == sorted(a.indices)
    assert _cats([entries[i] for i in a.indices]) == _cats(entries)
    assert 125 in a.indices and 750 in a.indices      # the one image of verb 20 / of object 16


def test_fewer_images_than_verbs_keeps_one_image_per_verb():
    entries = _dataset(lonely_object=False)
    s = select_subset(entries, 0.01, 3)               # int(1000 * 0.01) = 10 < 20 verbs
    assert s.target == 10 and 10 < len(s.indices) <= 20
    assert _cats([entries[i] for i in s.indices]) == _cats(entries)


def test_uncoverable_object_is_a_clear_error():
    entries = _dataset(200, lonely_object=False)
    entries[50] = {"file_name": "lonely.jpg", "annotations": [{"bbox": [0, 0, 5, 5], "category_id": 99}],
                   "hoi_annotation": []}
    # 19 verbs already fill int(200 * 0.05) = 10 images: the image holding object 99 is never drawn.
    with pytest.raises(DataError, match=r"missed object ids \[99\]"):
        select_subset(entries, 0.05, 0)


@pytest.mark.parametrize("fraction", [0.0, 1.5])
def test_fraction_out_of_range(fraction):
    with pytest.raises(UserError, match="--fraction"):
        select_subset(_dataset(50), fraction, 0)


def test_malformed_entry_names_the_image():
    entries = _dataset(50)
    del entries[7]["hoi_annotation"]
    with pytest.raises(DataError, match="img_00007.jpg"):
        select_subset(entries, 0.5, 0)


def test_cli_writes_the_original_file_names(tmp_path, capsys):
    entries = _dataset(lonely_object=False)
    src = tmp_path / "trainval_hico.json"
    src.write_text(json.dumps(entries))
    parser = argparse.ArgumentParser(prog="rlipv2")
    data_subset.register(CommandTree(parser))
    args = parser.parse_args(["data", "subset", "--annotations", str(src), "--fraction", "0.01", "0.1",
                              "--seed", "4", "--out", str(tmp_path / "few")])
    assert args.handler(args) == 0
    assert "trainval_hico_10percent.json: 100 images" in capsys.readouterr().out
    ten = json.loads((tmp_path / "few" / "trainval_hico_10percent.json").read_text())
    one = json.loads((tmp_path / "few" / "trainval_hico_1percent.json").read_text())
    assert len(ten) == 100 and 10 < len(one) <= 20
    positions = [entries.index(e) for e in ten]
    assert positions == sorted(positions) == select_subset(entries, 0.1, 4).indices   # source order, same draw
    again = write_subsets(src, [0.1], 4, tmp_path / "again")
    assert again[0][0].read_bytes() == (tmp_path / "few" / "trainval_hico_10percent.json").read_bytes()
    assert subset_file_name("x/test_hico.json", 0.5) == "test_hico_50percent.json"


def test_fractions_that_share_a_file_name_and_negative_seeds_are_refused(tmp_path):
    src = tmp_path / "trainval_hico.json"
    src.write_text(json.dumps(_dataset(200, lonely_object=False)))
    out = tmp_path / "few"
    for fractions in (["0.5", "0.5000001"], ["0.1", "0.1"]):
        with pytest.raises(UserError, match=r"both be written to trainval_hico_\w+percent.json") as err:
            write_subsets(src, [float(f) for f in fractions], 0, out)
        assert all(f in str(err.value) for f in fractions)
        assert not out.exists()                     # neither subset written (before: the second replaced the first)
    with pytest.raises(UserError, match="--seed -1"):
        write_subsets(src, [0.1], -1, out)
    assert not out.exists()


@pytest.mark.parametrize("argv, words", [(["--fraction", "0.5", "0.5000001"], ["0.5", "0.5000001", "50percent"]),
                                         (["--fraction", "0.1", "--seed", "-1"], ["--seed -1", "≥ 0"])])
def test_cli_refuses_colliding_fractions_and_negative_seeds_in_one_line(tmp_path, capsys, argv, words):
    from rlipv2_scale.cli import main

    src = tmp_path / "trainval_hico.json"
    src.write_text(json.dumps(_dataset(200, lonely_object=False)))
    assert main(["data", "subset", "--annotations", str(src), "--out", str(tmp_path / "few"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rlipv2: error:") and all(w in err for w in words), err
    assert not (tmp_path / "few").exists()
