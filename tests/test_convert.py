"""`convert`: reader -> parallel image check -> shards, with bad samples skipped or stopping --strict."""
from __future__ import annotations

import pytest

from rlipv2_scale.data.convert import convert
from rlipv2_scale.data.image_check import check_image
from rlipv2_scale.data.shards import iter_records
from rlipv2_scale.errors import DataError, UserError

from data_fixtures import hico, jpeg, pseudo_coco, truncate, vg_raw, write_json


def many_hico(root, n):
    images = root / "imgs"
    entries = []
    for i in range(n):
        name = f"HICO_train2015_{i:08d}.jpg"
        jpeg(images / name, 20 + i % 7, 16, (i * 5 % 255, 10, 10))
        entries.append({"file_name": name, "img_id": i,
                        "annotations": [{"bbox": [0, 0, 10, 10], "category_id": 1},
                                        {"bbox": [5, 5, 18, 15], "category_id": 1 + i % 3}],
                        "hoi_annotation": [{"subject_id": 0, "object_id": 1, "category_id": 1 + i % 117}]})
    return write_json(root / "trainval_hico.json", entries), images, entries


@pytest.mark.parametrize("workers", [1, 2])
def test_convert_keeps_source_order(tmp_path, workers):
    ann, images, entries = many_hico(tmp_path, 40)
    truncate(images / entries[5]["file_name"])     # header fine, decode fails in a worker
    (images / entries[33]["file_name"]).unlink()
    summary = convert("hico-det", ann, images, tmp_path / "out", "train", workers=workers, progress=False,
                      size_limit=4000)
    expected = [e["file_name"] for i, e in enumerate(entries) if i not in (5, 33)]
    assert [r.image.id for r in iter_records(tmp_path / "out")] == expected
    assert (summary.images, summary.objects, summary.relations) == (38, 76, 38)
    assert summary.skipped == {"corrupt_image": 1, "missing_image": 1}
    assert summary.examples == {"corrupt_image": [entries[5]["file_name"]], "missing_image": [entries[33]["file_name"]]}
    assert summary.shards > 1


def test_truncated_jpeg_is_caught_by_the_full_decode(tmp_path):
    fx = hico(tmp_path)
    truncate(fx["images"] / "HICO_train2015_00000001.jpg")
    # its only image skipped: nothing written is an error naming the reason, not an empty output
    with pytest.raises(UserError, match=r"all 1 were skipped \(corrupt_image 1\).*not a readable image"):
        convert("hico-det", fx["annotations"], fx["images"], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_every_image_skipped_is_an_error_and_keeps_the_previous_output(tmp_path):
    ann, images, entries = many_hico(tmp_path, 4)
    out = tmp_path / "out"
    convert("hico-det", ann, images, out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    wrong = tmp_path / "elsewhere"           # --images pointing at the wrong folder
    wrong.mkdir()
    with pytest.raises(UserError, match=r"no image written to .*all 4 were skipped \(missing_image 4\).*"
                                        r"check --images"):
        convert("hico-det", ann, wrong, out, overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "imgs", "out", "trainval_hico.json"]


def test_image_size_mismatch(tmp_path):
    fx = vg_raw(tmp_path)
    fx["image_data"][1]["width"] = 41                 # the file is 40 wide
    write_json(fx["annotations"].parent / "image_data.json", fx["image_data"])
    summary = convert("vg", fx["annotations"], fx["images"], tmp_path / "out", progress=False)
    assert summary.images == 1 and summary.examples == {"image_size_mismatch": ["2"]}


def test_strict_stops_with_the_message(tmp_path):
    fx = vg_raw(tmp_path)
    (fx["images"] / "VG_100K_2" / "2.jpg").unlink()
    with pytest.raises(DataError, match=r"image '2'.*missing.*\[missing_image\]"):
        convert("vg", fx["annotations"], fx["images"], tmp_path / "out", strict=True, progress=False)
    assert not (tmp_path / "out" / "index.json").exists()


def test_strict_lets_policy_filters_through(tmp_path):
    fx = pseudo_coco(tmp_path)
    summary = convert("pseudo", fx["annotations"], fx["images"], tmp_path / "out", strict=True, progress=False)
    assert summary.images == 1 and summary.skipped == {"below_threshold": 1} and summary.errors == 0
    assert summary.dropped == {"below_threshold": 1}
    summary = convert("pseudo", fx["annotations"], fx["images"], tmp_path / "out2", threshold=0.0, progress=False)
    assert (summary.images, summary.relations) == (2, 4)


def test_user_errors(tmp_path):
    fx = hico(tmp_path)
    with pytest.raises(UserError, match="unknown format 'kitti'"):
        convert("kitti", fx["annotations"], fx["images"], tmp_path / "o")
    with pytest.raises(UserError, match="image folder"):
        convert("hico-det", fx["annotations"], tmp_path / "nope", tmp_path / "o")
    with pytest.raises(UserError, match="does not take"):
        convert("hico-det", fx["annotations"], fx["images"], tmp_path / "o", threshold=0.3)


def test_check_image_passes_a_good_record(tmp_path):
    from rlipv2_scale.data.schema import ImageInfo, RelationalRecord
    data = jpeg(tmp_path / "a.jpg", 12, 8)
    rec = RelationalRecord(ImageInfo(1, "vg", "train", 12, 8, "a.jpg"), image_bytes=data)
    assert check_image(rec) is rec


def test_synthetic_world_agrees_in_its_vg_and_hico_layouts(tmp_path):
    from rlipv2_scale.data.synthetic import write_split

    world = tmp_path / "world"
    write_split(world, 6, seed=3)
    vg = convert("synthetic", world, world / "images", tmp_path / "vg", progress=False)
    hoi = convert("hico-det", world / "trainval_hico.json", world / "images", tmp_path / "hoi", progress=False)
    assert vg.images == hoi.images == 6 and vg.skipped == hoi.skipped == {}
    for a, b in zip(iter_records(tmp_path / "vg"), iter_records(tmp_path / "hoi")):
        assert (a.image.source, b.image.source) == ("synthetic", "hico-det")
        assert a.image_bytes == b.image_bytes
        assert [(o.box, o.name) for o in a.objects] == [(o.box, o.name) for o in b.objects]
        assert [(r.subject, r.object, r.predicate) for r in a.relations] == \
               [(r.subject, r.object, r.predicate) for r in b.relations]
