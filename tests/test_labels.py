"""Per-batch label sequence (the original's `engine.py: merge_batch_data`): positives, frequency-sampled negatives, fixed lists, vocabulary."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from streaming import MDSWriter

from rlipv2_scale.data.batch import NO_OBJECTS
from rlipv2_scale.data.labels import LabelVocabulary, build_label_sequence, fixed_label_sequence
from rlipv2_scale.data.schema import ImageInfo, Object, Relation, RelationalRecord
from rlipv2_scale.data.shards import COLUMNS
from rlipv2_scale.errors import DataError

VOCAB = LabelVocabulary({"person": 50, "cup": 20, "dog": 10, "car": 5, "tree": 1},
                        {"holds": 30, "on": 10, "near": 5, "rides": 1})


def test_positives_first_in_batch_order_then_negatives_then_no_objects():
    seq = build_label_sequence([["dog", "person", "dog"], ["cup", "person"]], [["holds"], ["on", "holds"]],
                               VOCAB, num_obj=4, num_rel=3, g=torch.Generator().manual_seed(0))
    assert seq.obj_texts[:3] == ["dog", "person", "cup"] and seq.num_obj_pos == 3
    assert len(seq.obj_texts) == 5 and seq.obj_texts[-1] == NO_OBJECTS
    assert seq.obj_texts[3] in {"car", "tree"}
    assert seq.rel_texts[:2] == ["holds", "on"] and seq.num_rel_pos == 2
    assert len(seq.rel_texts) == 3 and seq.rel_texts[2] in {"near", "rides"}
    assert seq.obj_id("cup") == 2 and seq.rel_id("on") == 1


def test_lists_longer_than_the_cap_are_kept_whole_and_a_short_vocabulary_is_used_up():
    seq = build_label_sequence([["a", "b", "c"]], [["x", "y"]], VOCAB, num_obj=2, num_rel=1, g=torch.Generator())
    assert seq.obj_texts == ["a", "b", "c", NO_OBJECTS] and seq.rel_texts == ["x", "y"]
    # 5 vocabulary objects, 1 of them positive: only 4 negatives exist, however many are asked for.
    seq = build_label_sequence([["cup"]], [[]], VOCAB, num_obj=50, num_rel=50, g=torch.Generator())
    assert sorted(seq.obj_texts[:-1]) == ["car", "cup", "dog", "person", "tree"]
    assert len(set(seq.obj_texts)) == len(seq.obj_texts) and len(seq.rel_texts) == 4


def test_negatives_are_drawn_in_proportion_to_frequency():
    vocab = LabelVocabulary({"common": 900, "rare": 100}, {"r": 1})
    g = torch.Generator().manual_seed(0)
    picks = Counter(build_label_sequence([[]], [[]], vocab, num_obj=1, num_rel=0, g=g).obj_texts[0]
                    for _ in range(2000))
    assert 0.87 < picks["common"] / 2000 < 0.93


def test_same_generator_state_gives_same_sequence():
    def make(seed: int):
        return build_label_sequence([["cup"]], [["on"]], VOCAB, 3, 2, torch.Generator().manual_seed(seed))

    assert make(3).obj_texts == make(3).obj_texts and make(3).rel_texts == make(3).rel_texts
    assert len({tuple(make(s).obj_texts) for s in range(20)}) > 1


def test_no_vocabulary_means_positives_only():
    seq = build_label_sequence([["cup"]], [["on"]], None, 333, 167, None)
    assert seq.obj_texts == ["cup", NO_OBJECTS] and seq.rel_texts == ["on"]


def test_fixed_lists_are_used_as_given_and_unknown_names_are_data_errors():
    seq = fixed_label_sequence(["person", "bicycle"], ["ride", "hold"])
    assert seq.obj_texts == ["person", "bicycle", NO_OBJECTS] and seq.rel_texts == ["ride", "hold"]
    assert seq.num_obj_pos == 2 and seq.num_rel_pos == 2
    with pytest.raises(DataError, match="'zebra' is not in the label list"):
        seq.obj_id("zebra")
    with pytest.raises(DataError, match="repeats"):
        fixed_label_sequence(["a", "a"], ["r"])


def _records() -> list[RelationalRecord]:
    box_a, box_b = (0, 0, 5, 5), (1, 1, 9, 9)
    return [
        RelationalRecord(ImageInfo(1, "coco", "train", 10, 10), [Object(box_a, "man"), Object(box_b, "cup")],
                         [Relation(0, 1, "holds", 0.9), Relation(0, 1, "drinks", 0.1)], image_bytes=b"x"),
        RelationalRecord(ImageInfo(2, "vg", "train", 10, 10), [Object(box_a, "man"), Object(box_b, "man")],
                         [Relation(0, 1, "near"), Relation(1, 0, "near")], image_bytes=b"y"),
    ]


def test_vocabulary_from_shards_counts_instances_and_thresholded_triplets(tmp_path):
    with MDSWriter(out=str(tmp_path / "shards"), columns=COLUMNS) as writer:
        for rec in _records():
            writer.write({"key": rec.key, "image": rec.image_bytes, "annotation": rec.annotation()})
    vocab = LabelVocabulary.from_shards([tmp_path / "shards"], relation_threshold=0.2)
    assert vocab.obj_counts == {"man": 3, "cup": 1}
    assert vocab.rel_counts == {"near": 2, "holds": 1}          # "drinks" (0.1) is below 0.2
    assert LabelVocabulary.from_records(_records(), 0.0).rel_counts == {"near": 2, "holds": 1, "drinks": 1}


def test_vocabulary_save_load_round_trip_and_malformed_file(tmp_path):
    VOCAB.save(tmp_path / "vocab.json")
    loaded = LabelVocabulary.load(tmp_path / "vocab.json")
    assert loaded.obj_counts == VOCAB.obj_counts and loaded.rel_counts == VOCAB.rel_counts
    (tmp_path / "bad.json").write_text(json.dumps({"objects": {"a": "many"}}))
    with pytest.raises(DataError, match="bad.json.*malformed"):
        LabelVocabulary.load(tmp_path / "bad.json")
    with pytest.raises(DataError, match="does not exist"):
        LabelVocabulary.load(tmp_path / "missing.json")
