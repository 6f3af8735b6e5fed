"""collate: padding and masks, pair grouping with multi-hot relations, cxcywh boxes, packing."""
from __future__ import annotations

import pickle

import pytest
import torch

from rlipv2_scale.config import from_dict
from rlipv2_scale.data.batch import NO_OBJECTS
from rlipv2_scale.data.collate import Collator, build_target, collate, pack
from rlipv2_scale.data.config import DataConfig
from rlipv2_scale.data.labels import LabelVocabulary, fixed_label_sequence
from rlipv2_scale.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Example
from rlipv2_scale.errors import DataError

LABELS = fixed_label_sequence(["man", "horse"], ["rides", "near", "eats"])


def example(h: int = 40, w: int = 80, fill: int = 0, sample_id: int = 0, epoch: int = 0, color=None) -> Example:
    return Example(
        key=f"vg/train/{sample_id}", image_id=sample_id,
        image=torch.full((3, h, w), fill, dtype=torch.uint8), color=color,
        boxes=torch.tensor([[0.0, 0.0, 40.0, 20.0], [40.0, 20.0, 80.0, 40.0], [10.0, 10.0, 30.0, 30.0]]),
        names=["man", "horse", "man"],
        relations=[(0, 1, "rides", None), (0, 1, "near", 0.6), (2, 1, "near", None)],
        orig_size=(400, 800), sample_id=sample_id, epoch=epoch)


def test_target_groups_relations_into_pairs_with_multi_hot_vectors():
    t = build_target(example(), LABELS)
    torch.testing.assert_close(t.boxes, torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5],
                                                      [0.25, 0.5, 0.25, 0.5]]))
    assert t.labels.tolist() == [0, 1, 0]
    assert t.sub_index.tolist() == [0, 2] and t.obj_index.tolist() == [1, 1]
    assert t.sub_labels.tolist() == [0, 0] and t.obj_labels.tolist() == [1, 1]
    assert t.rel_labels.tolist() == [[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]]
    torch.testing.assert_close(t.sub_boxes, t.boxes[[0, 2]])
    torch.testing.assert_close(t.obj_boxes, t.boxes[[1, 1]])
    assert t.size == (40, 80) and t.orig_size == (400, 800)


def test_confidence_weighted_targets_use_the_confidence():
    t = build_target(example(), LABELS, confidence_weighted=True)
    assert t.rel_labels.tolist() == [[1.0, 0.6000000238418579, 0.0], [0.0, 1.0, 0.0]]


def test_image_without_relations_has_empty_pairs():
    ex = example()
    ex.relations = []
    t = build_target(ex, LABELS)
    assert t.rel_labels.shape == (0, 3) and t.sub_boxes.shape == (0, 4) and t.labels.tolist() == [0, 1, 0]


def test_unknown_name_in_fixed_mode_is_a_data_error():
    ex = example()
    ex.names[1] = "zebra"
    with pytest.raises(DataError, match="zebra"):
        build_target(ex, LABELS)


def test_padding_mask_and_normalisation():
    batch = collate([example(2, 3, fill=255), example(3, 2, fill=0)], LABELS)
    assert batch.images.shape == (2, 3, 3, 3) and batch.images.dtype == torch.float32
    assert batch.pixel_mask.tolist() == [
        [[False, False, False], [False, False, False], [True, True, True]],
        [[False, False, True], [False, False, True], [False, False, True]]]
    white = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    black = [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    for c in range(3):
        assert torch.allclose(batch.images[0, c, :2, :3], torch.tensor(white[c]))
        assert torch.allclose(batch.images[1, c, :3, :2], torch.tensor(black[c]))
    assert (batch.images[0, :, 2, :] == 0).all() and (batch.images[1, :, :, 2] == 0).all()
    assert batch.obj_texts == ["man", "horse", NO_OBJECTS] and batch.meta["keys"] == ["vg/train/0", "vg/train/0"]
    assert batch.targets[1].size == (3, 2)


def test_packed_batch_survives_pickling_and_unpacks_to_the_same_batch():
    examples = [example(4, 6, fill=90, sample_id=1, color=(1.2, 0.1, -3.0)), example(5, 3, fill=30, sample_id=2)]
    direct = collate(examples, LABELS)
    moved = pickle.loads(pickle.dumps(pack(examples, LABELS))).unpack()
    assert torch.equal(direct.images, moved.images) and torch.equal(direct.pixel_mask, moved.pixel_mask)
    for a, b in zip(direct.targets, moved.targets):
        for k, v in vars(a).items():
            assert torch.equal(v, getattr(b, k)) if isinstance(v, torch.Tensor) else v == getattr(b, k)
    assert moved.meta == direct.meta


def _config(**extra) -> DataConfig:
    return from_dict(DataConfig, {"sources": [{"name": "vg", "local": "unused"}], "num_obj_labels": 5,
                                  "num_rel_labels": 4, **extra})


def test_collator_negatives_depend_only_on_the_batch_and_its_epoch():
    vocab = LabelVocabulary({f"o{i}": i + 1 for i in range(40)} | {"man": 5, "horse": 5},
                            {f"r{i}": i + 1 for i in range(40)} | {"rides": 3, "near": 3})
    collator = Collator(_config(), vocab)
    a = collator([example(sample_id=3), example(sample_id=9)])
    b = collator([example(sample_id=3), example(sample_id=9)])
    assert a.obj_texts == b.obj_texts and a.rel_texts == b.rel_texts
    assert a.obj_texts[:2] == ["man", "horse"] and len(a.obj_texts) == 6 and a.num_obj_pos == 2
    assert a.rel_texts[:2] == ["rides", "near"] and len(a.rel_texts) == 4
    others = {tuple(collator([example(sample_id=3, epoch=e), example(sample_id=9, epoch=e)]).obj_texts)
              for e in range(1, 8)}
    assert len(others) > 1


def test_collator_fixed_mode_and_missing_vocabulary():
    batch = Collator(_config(fixed_obj_labels=["man", "horse", "dog"], fixed_rel_labels=["rides", "near"]),
                     None)([example()])
    assert batch.obj_texts == ["man", "horse", "dog", NO_OBJECTS] and batch.rel_texts == ["rides", "near"]
    with pytest.raises(ValueError, match="LabelVocabulary"):
        Collator(_config(), None)
