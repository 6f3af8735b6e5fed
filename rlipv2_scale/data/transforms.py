"""DETR-style augmentation of one image and its boxes, on uint8 tensors (the original's `datasets/mixed_dataset.py: make_vg_transforms`).

Train: horizontal flip (p=0.5), colour jitter (brightness/contrast/saturation 0.4, random order),
then with p=0.5 either a random resize of the shorter side (480..800, longer side ≤ 1333) or
resize {400, 500, 600} → random size crop (384..600) → random resize. Eval: shorter side 800.

Speed choices, each keeping the augmentation's distribution:
- Images stay uint8 [3, H, W] until the batch is assembled; resizing uint8 with antialias is several
  times faster than on float tensors or PIL images.
- Colour jitter is affine per pixel, so the three steps are composed into one map
  x' = a·x + b·grey(x) + t (`color`), applied in `collate` together with the ImageNet
  normalisation, over the output pixels only.
  Contrast uses the grey mean of the whole (uncropped) image, as the original; values are clamped
  to [0, 255] once at the end rather than after each step.
- The resize → crop → resize branch resamples once: the crop is drawn in the coordinates of the
  first resize, mapped to a source-pixel window, and that window is resized to the final size.

Everything random is drawn from the `torch.Generator` passed in, which the dataset seeds from
(seed, epoch, sample id): a resumed run sees exactly the same augmentations.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from torchvision.io import ImageReadMode, decode_image

from rlipv2_scale.data.config import TransformConfig
from rlipv2_scale.data.schema import RelationalRecord
from rlipv2_scale.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's rgb_to_grayscale weights (what adjust_contrast / adjust_saturation use).
GREY_WEIGHTS = (0.2989, 0.587, 0.114)


Color = tuple[float, float, float]


@dataclass
class Example:
    """One transformed image with its annotation, the input of `collate`."""

    key: str                                  # shard key: source/split/image id
    image_id: int | str
    image: torch.Tensor                       # uint8 [3, h, w], transformed, not normalised
    color: Color | None                       # colour jitter (a, b, t): x' = a·x + b·grey(x) + t
    boxes: torch.Tensor                       # [N, 4] float absolute xyxy in the transformed image
    names: list[str]                          # object names, aligned with boxes
    relations: list[tuple[int, int, str, float | None]]   # (subject, object, predicate, confidence)
    orig_size: tuple[int, int]                # (H, W) of the decoded original
    sample_id: int = -1                       # global sample index in the stream
    epoch: int = 0

    @property
    def size(self) -> tuple[int, int]:
        return int(self.image.shape[1]), int(self.image.shape[2])


def sample_generator(seed: int, epoch: int, sample_id: int) -> torch.Generator:
    """An independent, reproducible generator per (seed, epoch, sample)."""
    state = np.random.SeedSequence([seed, epoch, sample_id + 1]).generate_state(1, np.uint64)
    return torch.Generator().manual_seed(int(state[0]) & ((1 << 63) - 1))


def decode(data: bytes | None, key: str) -> torch.Tensor:
    """Encoded image bytes → uint8 RGB [3, H, W]; a DataError naming the sample on failure."""
    if not data:
        raise DataError(f"sample {key!r}: the image column is empty; re-convert this source",
                        sample_id=key, reason="missing_image")
    try:
        # bytearray: decode_image wants a writable buffer; the copy is tiny next to decoding.
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as exc:
        raise DataError(f"sample {key!r}: the image bytes do not decode ({exc}); the shard holds a corrupt "
                        f"or truncated image: re-convert this source", sample_id=key, reason="corrupt_image") from exc


def resized_size(h: int, w: int, shorter: int, max_size: int | None) -> tuple[int, int]:
    """(H, W) with the shorter side `shorter`, reduced so the longer side stays ≤ max_size (DETR rule)."""
    short, long = min(h, w), max(h, w)
    if max_size is not None and long / short * shorter > max_size:
        shorter = int(round(max_size * short / long))
    if short == shorter:
        return h, w
    if w < h:
        return int(shorter * h / w), shorter
    return shorter, int(shorter * w / h)


def _randint(g: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high] (inclusive)."""
    return int(torch.randint(low, high + 1, (1,), generator=g))


def _choice(g: torch.Generator, items: list[int]) -> int:
    return items[_randint(g, 0, len(items) - 1)]


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


def color_affine(order: list[int], factors: tuple[float, float, float], grey_mean: float) -> Color:
    """Compose brightness (0), contrast (1), saturation (2) in `order` into one map
    x' = a·x + b·grey(x) + t (per pixel, the same a, b, t for every channel).

    Brightness: f·x. Contrast: f·x + (1-f)·mean(grey(x)) over the whole image. Saturation:
    f·x + (1-f)·grey(x). All three have this form and so does their composition; `grey_mean`, the
    mean grey level of the input image, gives the mean at the contrast step exactly.
    """
    w_sum = sum(GREY_WEIGHTS)            # grey(1, 1, 1): the weights sum to 0.9999
    a, b, t = 1.0, 0.0, 0.0
    for op in order:
        f = factors[op]
        if op == 0:
            sa, sb, st = f, 0.0, 0.0
        elif op == 1:
            sa, sb, st = f, 0.0, (1 - f) * ((a + b * w_sum) * grey_mean + t * w_sum)
        else:
            sa, sb, st = f, 1 - f, 0.0
        # grey(a·x + b·grey(x) + t) = (a + b·w_sum)·grey(x) + t·w_sum
        a, b, t = sa * a, sa * b + sb * (a + b * w_sum), sa * t + sb * t * w_sum + st
    return a, b, t


def normalize(image: torch.Tensor, color: Color | None, out: torch.Tensor) -> torch.Tensor:
    """uint8 [3, h, w] → `out` (float [3, h, w], may be a view into a padded batch): colour map,
    clamp to [0, 255], ImageNet normalisation; a few in-place passes over the output pixels only."""
    out.copy_(image)
    if color is not None:
        a, b, t = color
        grey = out[0] * (GREY_WEIGHTS[0] * b)
        grey.add_(out[1], alpha=GREY_WEIGHTS[1] * b).add_(out[2], alpha=GREY_WEIGHTS[2] * b).add_(t)
        out.mul_(a).add_(grey).clamp_(0.0, 255.0)
    for c in range(3):   # scalars per channel: faster than broadcasting [3, 1, 1] tensors
        out[c].mul_(1.0 / (255.0 * IMAGENET_STD[c])).sub_(IMAGENET_MEAN[c] / IMAGENET_STD[c])
    return out


def _resize(image: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = image.shape[-2:]
    if (h, w) == size:
        return image, boxes
    scale = torch.tensor([size[1] / w, size[0] / h, size[1] / w, size[0] / h], dtype=boxes.dtype)
    return F.resize(image, list(size), antialias=True), boxes * scale


class TrainTransform:
    def __init__(self, cfg: TransformConfig):
        self.cfg = cfg

    def __call__(self, image: torch.Tensor, boxes: torch.Tensor, g: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor, Color | None]:
        cfg = self.cfg
        h, w = image.shape[-2:]
        if float(torch.rand((), generator=g)) < cfg.flip_prob:
            image = image.flip(-1)
            boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
        color = self._jitter(image, g)
        if float(torch.rand((), generator=g)) < cfg.crop_prob:
            image, boxes = self._resize_crop_resize(image, boxes, g)
        else:
            size = resized_size(h, w, _choice(g, cfg.train_scales), cfg.max_size)
            image, boxes = _resize(image, boxes, size)
        return image, boxes, color

    def _jitter(self, image: torch.Tensor, g: torch.Generator) -> Color | None:
        cfg = self.cfg
        amounts = (cfg.brightness, cfg.contrast, cfg.saturation)
        if not any(amounts):
            return None
        order = torch.randperm(3, generator=g).tolist()
        def factor(a: float) -> float:
            return _uniform(g, max(0.0, 1 - a), 1 + a) if a else 1.0

        factors = (factor(amounts[0]), factor(amounts[1]), factor(amounts[2]))   # drawn in this order
        channel_mean = image.reshape(3, -1).to(torch.float32).mean(1).tolist()
        return color_affine(order, factors, sum(w * m for w, m in zip(GREY_WEIGHTS, channel_mean)))

    def _resize_crop_resize(self, image: torch.Tensor, boxes: torch.Tensor, g: torch.Generator
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        h, w = image.shape[-2:]
        h1, w1 = resized_size(h, w, _choice(g, cfg.crop_scales), None)
        # Random size crop in the first resize's coordinates (DETR's RandomSizeCrop + RandomCrop).
        hi_w, hi_h = min(w1, cfg.crop_max), min(h1, cfg.crop_max)
        cw, ch = _randint(g, min(cfg.crop_min, hi_w), hi_w), _randint(g, min(cfg.crop_min, hi_h), hi_h)
        top, left = _randint(g, 0, h1 - ch), _randint(g, 0, w1 - cw)
        # The same window in source pixels: one resampling instead of two.
        sy, sx = h / h1, w / w1
        y0, x0 = min(int(round(top * sy)), h - 1), min(int(round(left * sx)), w - 1)
        y1, x1 = max(min(int(round((top + ch) * sy)), h), y0 + 1), max(min(int(round((left + cw) * sx)), w), x0 + 1)
        window = image[:, y0:y1, x0:x1]
        boxes = boxes - torch.tensor([x0, y0, x0, y0], dtype=boxes.dtype)
        limit = torch.tensor([x1 - x0, y1 - y0], dtype=boxes.dtype)
        boxes = torch.minimum(boxes.reshape(-1, 2, 2), limit).clamp(min=0).reshape(-1, 4)
        size = resized_size(ch, cw, _choice(g, cfg.train_scales), cfg.max_size)
        return _resize(window, boxes, size)


class EvalTransform:
    def __init__(self, cfg: TransformConfig):
        self.cfg = cfg

    def __call__(self, image: torch.Tensor, boxes: torch.Tensor, g: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, None]:
        h, w = image.shape[-2:]
        image, boxes = _resize(image, boxes, resized_size(h, w, self.cfg.eval_size, self.cfg.max_size))
        return image, boxes, None


Transform = TrainTransform | EvalTransform


def prepare_example(record: RelationalRecord, transform: Transform, g: torch.Generator, *,
                    relation_threshold: float = 0.0, max_relations: int = 100,
                    sample_id: int = -1, epoch: int = 0) -> Example:
    """Decode, filter and transform one record into an `Example`.

    Relations below `relation_threshold` confidence are ignored, then the first `max_relations`
    kept (the original's order of operations). Objects whose box has no area after the transform
    are removed together with their relations; the remaining indices are renumbered.
    """
    key = record.key
    image = decode(record.image_bytes, key)
    h, w = image.shape[-2:]
    rels = [(r.subject, r.object, r.predicate, r.confidence) for r in record.relations
            if r.confidence is None or r.confidence >= relation_threshold][:max_relations]
    if record.objects:
        boxes = torch.tensor([o.box for o in record.objects], dtype=torch.float32)
        # Stored sizes can disagree with the decoded image (the original clamps to the real image).
        boxes = torch.minimum(boxes.reshape(-1, 2, 2), torch.tensor([w, h], dtype=torch.float32))
        boxes = boxes.clamp(min=0).reshape(-1, 4)
    else:
        boxes = torch.zeros(0, 4)
    image, boxes, color = transform(image, boxes, g)
    keep = ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).tolist()
    names = [o.name for o in record.objects]
    if not all(keep):
        new_index, count = [], 0
        for k in keep:
            new_index.append(count if k else -1)
            count += k
        boxes = boxes[torch.tensor(keep, dtype=torch.bool)]
        names = [n for n, k in zip(names, keep) if k]
        rels = [(new_index[s], new_index[o], p, c) for s, o, p, c in rels if keep[s] and keep[o]]
    return Example(key=key, image_id=record.image.id, image=image, color=color, boxes=boxes, names=names,
                   relations=rels, orig_size=(int(h), int(w)), sample_id=sample_id, epoch=epoch)
