"""MDS shards: exact columns, order, round trip, readable by plain StreamingDataset."""
from __future__ import annotations

import json

import pytest

from rlipv2_scale.data.schema import ImageInfo, Object, Relation, RelationalRecord
from rlipv2_scale.data.shards import COLUMNS, iter_records, record_from_sample, write_shards
from rlipv2_scale.data.sources import Dropped, Skip
from rlipv2_scale.errors import DataError, UserError

from data_fixtures import jpeg


def make_records(tmp_path, n):
    out = []
    for i in range(n):
        data = jpeg(tmp_path / "img" / f"{i}.jpg", 32 + i, 24, (10 * i, 100, 50))
        out.append(RelationalRecord(
            image=ImageInfo(id=i, source="vg", split="train", width=32 + i, height=24, file_name=f"{i}.jpg"),
            objects=[Object((1.0, 2.0, 10.5, 20.0), "man"), Object((0.0, 0.0, 5.0, 5.0), "hat", 7)],
            relations=[Relation(0, 1, "wearing", 0.5 if i % 2 else None), Relation(1, 0, "on")],
            provenance={"format": "vg"}, image_bytes=data))
    return out


def test_round_trip_in_order_across_shards(tmp_path):
    records = make_records(tmp_path, 6)
    out = tmp_path / "shards"
    summary = write_shards(records, out, size_limit=1500)       # ~2 images per shard
    index = json.loads((out / "index.json").read_text())
    assert summary.shards == len(index["shards"]) > 1
    assert dict(zip(index["shards"][0]["column_names"], index["shards"][0]["column_encodings"])) == COLUMNS
    assert (summary.images, summary.objects, summary.relations) == (6, 12, 12)
    back = list(iter_records(out))
    assert [r.annotation() for r in back] == [r.annotation() for r in records]
    assert [r.image_bytes for r in back] == [r.image_bytes for r in records]
    assert [r.image.id for r in iter_records(out, limit=4)] == [0, 1, 2, 3]


def test_plain_streaming_dataset_reads_the_output(tmp_path):
    from streaming import StreamingDataset

    from rlipv2_scale.data.shared_memory import clean_stale

    records = make_records(tmp_path, 3)
    out = tmp_path / "shards"
    write_shards(records, out, size_limit=2000)
    clean_stale()      # dead runs' segments only: the library's cleaner also takes live neighbours'
    ds = StreamingDataset(local=str(out), shuffle=False, batch_size=1)
    samples = [ds[i] for i in range(len(ds))]
    assert [s["key"] for s in samples] == ["vg/train/0", "vg/train/1", "vg/train/2"]
    assert isinstance(samples[0]["annotation"], dict)
    rec = record_from_sample(samples[1])
    assert rec.image_bytes == records[1].image_bytes
    assert rec.inspect_line() == records[1].inspect_line()
    assert rec.relations[0].confidence == 0.5 and rec.objects[1].category_id == 7


def test_skips_and_drops_are_counted(tmp_path):
    records = make_records(tmp_path, 2)
    items = [records[0], Skip("x1", "corrupt_image", "bad"), Dropped("1", "below_threshold", 3),
             Skip("x2", "corrupt_image", "bad"), Skip("x3", "below_threshold", "low", error=False), records[1]]
    summary = write_shards(items, tmp_path / "out")
    assert summary.images == 2 and summary.errors == 2
    assert summary.skipped == {"corrupt_image": 2, "below_threshold": 1}
    assert summary.examples["corrupt_image"] == ["x1", "x2"]
    assert summary.dropped == {"below_threshold": 3}
    text = summary.format()
    assert "skipped 2 image(s): corrupt_image (e.g. x1, x2)" in text and "left out 3" in text


def test_strict_stops_without_an_index(tmp_path):
    records = make_records(tmp_path, 2)
    out = tmp_path / "out"
    # a policy filter does not stop a strict run; a data error does
    items = [records[0], Skip("a", "below_threshold", "low", error=False), Skip("b", "missing_image", "gone"),
             records[1]]
    with pytest.raises(DataError, match="gone") as info:
        write_shards(items, out, strict=True)
    assert info.value.reason == "missing_image" and not (out / "index.json").exists()


def test_refuses_a_non_empty_output_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    records = make_records(tmp_path, 1)
    with pytest.raises(UserError, match="not empty"):
        write_shards(records, out)
    write_shards(records, out, overwrite=True)
    # --overwrite replaces only what the tool wrote: the user's file stays
    assert (out / "keep.txt").read_text() == "x" and len(list(iter_records(out))) == 1


def test_invalid_record_and_missing_index(tmp_path):
    rec = make_records(tmp_path, 1)[0]
    rec.relations.append(Relation(0, 5, "on"))
    with pytest.raises(DataError, match="points at object 5"):
        write_shards([rec], tmp_path / "out")
    with pytest.raises(UserError, match="index.json"):
        list(iter_records(tmp_path / "nothing"))
