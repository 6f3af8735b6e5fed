"""DETR-style transforms on uint8 tensors: sizes, box/pixel consistency, colour jitter, dropping."""
from __future__ import annotations

import itertools

import pytest
import torch
import torchvision.transforms.v2.functional as F
from torchvision.io import encode_jpeg

from rlipv2_scale.data.config import TransformConfig
from rlipv2_scale.data.schema import ImageInfo, Object, Relation, RelationalRecord
from rlipv2_scale.data.transforms import (
    GREY_WEIGHTS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    TrainTransform,
    color_affine,
    decode,
    normalize,
    prepare_example,
    resized_size,
    sample_generator,
)
from rlipv2_scale.errors import DataError

SMALL = TransformConfig(train_scales=[64, 80, 96], max_size=160, crop_scales=[72, 88], crop_min=48, crop_max=72,
                        eval_size=96)


def test_resized_size_follows_the_detr_rule():
    assert resized_size(480, 640, 800, 1333) == (800, 1066)
    assert resized_size(640, 480, 800, 1333) == (1066, 800)
    # Very wide: the longer side would pass 1333, so the shorter side shrinks to round(1333*100/1000) = 133
    # and the longer side follows as int(133*1000/100).
    assert resized_size(100, 1000, 800, 1333) == (133, 1330)
    assert resized_size(480, 640, 480, 1333) == (480, 640)          # already the size
    assert resized_size(480, 640, 400, None) == (400, 533)


def _rect_image(h: int, w: int, box: tuple[int, int, int, int]) -> torch.Tensor:
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    x1, y1, x2, y2 = box
    img[:, y1:y2, x1:x2] = 255
    return img


@pytest.mark.parametrize("seed", range(12))
def test_train_transform_keeps_boxes_on_their_pixels(seed):
    """A white rectangle annotated by its box: after flip / resize / crop, the transformed box must
    still frame the white pixels (inside bright, a ring outside dark)."""
    cfg = TransformConfig(train_scales=SMALL.train_scales, max_size=SMALL.max_size, crop_scales=SMALL.crop_scales,
                          crop_min=SMALL.crop_min, crop_max=SMALL.crop_max, eval_size=SMALL.eval_size,
                          brightness=0.0, contrast=0.0, saturation=0.0)
    box = (30, 20, 70, 50)
    image = _rect_image(72, 96, box)
    out, boxes, color = TrainTransform(cfg)(image, torch.tensor([box], dtype=torch.float32),
                                            torch.Generator().manual_seed(seed))
    assert color is None and out.dtype == torch.uint8
    h, w = out.shape[1:]
    assert min(h, w) in cfg.train_scales or max(h, w) == cfg.max_size
    x1, y1, x2, y2 = boxes[0].tolist()
    assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h
    if x2 - x1 < 4 or y2 - y1 < 4:
        return  # (almost) cropped away: nothing to look at
    inner = out[0, int(y1) + 1:int(y2) - 1, int(x1) + 1:int(x2) - 1].float()
    assert inner.mean() > 240
    bright = (out[0] > 128).nonzero()
    assert bright[:, 0].min() >= y1 - 1.5 and bright[:, 0].max() <= y2 + 0.5
    assert bright[:, 1].min() >= x1 - 1.5 and bright[:, 1].max() <= x2 + 0.5


def test_flip_only_mirrors_boxes():
    cfg = TransformConfig(train_scales=[48], max_size=200, crop_prob=0.0, flip_prob=1.0, brightness=0.0,
                          contrast=0.0, saturation=0.0, crop_min=8, crop_max=16, crop_scales=[16], eval_size=48)
    image = _rect_image(48, 64, (4, 8, 20, 30))
    out, boxes, _ = TrainTransform(cfg)(image, torch.tensor([[4.0, 8.0, 20.0, 30.0]]), torch.Generator())
    assert out.shape == (3, 48, 64)
    assert boxes.tolist() == [[44.0, 8.0, 60.0, 30.0]]
    assert torch.equal(out, image.flip(-1))


def test_eval_transform_resizes_to_800_1333():
    out, boxes, color = EvalTransform(TransformConfig())(torch.zeros(3, 480, 640, dtype=torch.uint8),
                                                         torch.tensor([[64.0, 48.0, 640.0, 480.0]]))
    assert out.shape == (3, 800, 1066) and color is None
    torch.testing.assert_close(boxes, torch.tensor([[64 * 1066 / 640, 80.0, 1066.0, 800.0]]))


def test_same_generator_seed_gives_identical_augmentation():
    image = torch.randint(0, 255, (3, 72, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[10.0, 10.0, 50.0, 60.0]])
    a = TrainTransform(SMALL)(image, boxes, sample_generator(1, 0, 5))
    b = TrainTransform(SMALL)(image, boxes, sample_generator(1, 0, 5))
    c = TrainTransform(SMALL)(image, boxes, sample_generator(1, 1, 5))   # next epoch
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    assert a[2] != c[2]


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_color_affine_matches_torchvision_jitter_steps(order):
    """The composed map equals torchvision's brightness/contrast/saturation applied in order
    (pixel values chosen so that no intermediate step clips)."""
    x = torch.randint(90, 150, (3, 20, 30), generator=torch.Generator().manual_seed(1)).float()
    factors = (1.2, 0.8, 1.3)
    ref = x / 255
    for op in order:
        ref = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)[op](ref, factors[op])
    grey_mean = sum(w * m for w, m in zip(GREY_WEIGHTS, x.reshape(3, -1).mean(1).tolist()))
    out = torch.empty(3, 20, 30)
    normalize(x.to(torch.uint8), color_affine(list(order), factors, grey_mean), out)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(out, (ref - mean) / std, atol=1e-4, rtol=1e-4)


def test_normalize_without_colour_is_imagenet_normalisation_and_clamps_with_colour():
    x = torch.tensor([0, 128, 255], dtype=torch.uint8).view(3, 1, 1).expand(3, 2, 2).contiguous()
    out = normalize(x, None, torch.empty(3, 2, 2))
    expect = torch.tensor([0.0, 128 / 255, 1.0]).view(3, 1, 1)
    torch.testing.assert_close(out, ((expect - torch.tensor(IMAGENET_MEAN).view(3, 1, 1))
                                     / torch.tensor(IMAGENET_STD).view(3, 1, 1)).expand(3, 2, 2))
    bright = normalize(x, (2.0, 0.0, 0.0), torch.empty(3, 2, 2))    # brightness x2 clips at 255
    assert bright[2, 0, 0] == pytest.approx((1.0 - IMAGENET_MEAN[2]) / IMAGENET_STD[2], abs=1e-5)


def _record(image_bytes: bytes | None) -> RelationalRecord:
    return RelationalRecord(
        ImageInfo(7, "vg", "train", 64, 48),
        [Object((2, 2, 20, 20), "man"), Object((30, 10, 60, 40), "horse"), Object((0, 0, 64, 48), "field")],
        [Relation(0, 1, "rides"), Relation(1, 2, "on", 0.9), Relation(0, 2, "weak", 0.1), Relation(2, 0, "has")],
        image_bytes=image_bytes)


def _jpeg() -> bytes:
    return encode_jpeg(torch.full((3, 48, 64), 100, dtype=torch.uint8)).numpy().tobytes()


def test_prepare_example_drops_vanished_boxes_with_their_relations():
    def kill_first(image, boxes, g):      # a "crop" that leaves object 0 with no area
        boxes = boxes.clone()
        boxes[0] = torch.tensor([5.0, 5.0, 5.0, 9.0])
        return image, boxes, None

    ex = prepare_example(_record(_jpeg()), kill_first, torch.Generator(), relation_threshold=0.2)
    assert ex.names == ["horse", "field"]
    # rides (0→1) and has (2→0) lost their subject/object; weak (0.1) is under the threshold.
    assert ex.relations == [(0, 1, "on", 0.9)]
    assert ex.boxes.tolist() == [[30.0, 10.0, 60.0, 40.0], [0.0, 0.0, 64.0, 48.0]]
    assert ex.orig_size == (48, 64) and ex.key == "vg/train/7"


def test_prepare_example_keeps_the_first_max_relations():
    ex = prepare_example(_record(_jpeg()), EvalTransform(SMALL), torch.Generator(), max_relations=2)
    assert [r[2] for r in ex.relations] == ["rides", "on"]
    assert ex.image.shape == (3, 96, 128)
    torch.testing.assert_close(ex.boxes[1], torch.tensor([60.0, 20.0, 120.0, 80.0]))


def test_corrupt_or_missing_image_is_a_data_error_naming_the_key():
    with pytest.raises(DataError, match="vg/train/7.*corrupt or truncated"):
        prepare_example(_record(_jpeg()[:30]), EvalTransform(SMALL), torch.Generator())
    with pytest.raises(DataError, match="vg/train/7.*empty"):
        prepare_example(_record(None), EvalTransform(SMALL), torch.Generator())
    assert decode(_jpeg(), "k").shape == (3, 48, 64)
