"""The synthetic relational world: rendered scenes whose scene graphs follow from their geometry.

Every image shows 2-5 objects of 10 classes, each class a fixed shape in a fixed colour (with a
small per-instance jitter), on a muted noise or stripe background. Objects are placed in *groups*
(a person holding a cup, a ball inside a box, a lamp on a table, ...), but the labels never come
from the group that was intended: the relations of an image are computed from the final boxes and
classes by `relation_between`, one predicate at most per ordered pair (first rule that holds, in
`PREDICATES` order). Placements that put a pair near a rule's threshold (`ambiguous`) are
rejected, so every label is decided with a margin and no true relation is left unlabelled.

A scene in which no relation holds is resampled, so every image has a scene graph.
Held-out combinations (`HELD_OUT`, zero-shot tests): a train or val scene in which any of them
holds is *resampled* as a whole (never a dropped label, which would leave a true relation
unlabelled); a test scene realises one of them on purpose with probability `TEST_HELD_OUT_RATE`.

Scenes are random-access and deterministic: scene `i` of a split depends only on
(seed, split, i), so the same call writes the same bytes.

Output of `write_split` (one folder per split):
    images/{image_id}.jpg       the rendered JPEGs
    scene_graphs.json           raw Visual Genome layout (training; `--format synthetic`)
    image_data.json             VG image entries (image_id, width, height, url)
    {train: trainval, val, test}_hico.json   the same scenes in the QPIC HICO-DET layout (evaluation)
    objects.json verbs.json verb_object_valid.npy hoi_list.json triplets.json   the label space
    synthetic_world.json        classes, predicates, rules, held-out combinations, this split's counts
"""
from __future__ import annotations

import io
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from rlipv2_scale.data.constants import BASE_SIZE, OBJECTS_PER_IMAGE, SPLITS  # sizes below: pixels at BASE_SIZE
from rlipv2_scale.data.schema import Object, Relation
from rlipv2_scale.errors import UserError

Box = tuple[int, int, int, int]          # x1, y1, x2, y2 in pixels; x2, y2 exclusive (w = x2 - x1)
RGB = tuple[int, int, int]

SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
# Image ids are unique across splits, so shards of several splits never collide.
SPLIT_ID_OFFSET = {"train": 0, "val": 1_000_000, "test": 2_000_000}
HICO_FILE = {"train": "trainval_hico.json", "val": "val_hico.json", "test": "test_hico.json"}

JPEG_QUALITY = 92
TEST_HELD_OUT_RATE = 0.35
MAX_RESAMPLES = 200


@dataclass(frozen=True)
class ObjectClass:
    name: str
    colors: dict[str, RGB]             # "main" first; other parts of the shape
    width: tuple[int, int]             # size range at BASE_SIZE (inclusive)
    height: tuple[int, int]
    shape: str                         # what is drawn, for synthetic_world.json


CLASSES: tuple[ObjectClass, ...] = (
    ObjectClass("person", {"main": (40, 90, 230), "skin": (235, 185, 140), "dark": (40, 40, 70)},
                (22, 30), (40, 54), "stick figure: head, blue shirt, arms spanning the box width at 40% height, legs"),
    ObjectClass("ball", {"main": (220, 35, 35), "light": (255, 165, 165)}, (16, 24), (16, 24),
                "red disc with a highlight"),
    ObjectClass("box", {"main": (230, 125, 20)}, (28, 40), (24, 36), "hollow orange square frame (3 px)"),
    ObjectClass("cup", {"main": (20, 200, 215)}, (18, 24), (16, 22), "cyan tapered body with a handle on the right"),
    ObjectClass("table", {"main": (115, 65, 25)}, (50, 72), (30, 44), "brown top slab on two legs"),
    ObjectClass("bottle", {"main": (30, 165, 60), "dark": (15, 80, 30)}, (16, 20), (28, 36),
                "green body, shoulders, neck and dark cap"),
    ObjectClass("book", {"main": (140, 45, 175), "light": (245, 245, 235)}, (26, 34), (16, 20),
                "purple cover around white pages"),
    ObjectClass("basket", {"main": (225, 205, 35)}, (32, 44), (26, 34), "yellow open-topped U (3 px walls)"),
    ObjectClass("lamp", {"main": (250, 245, 205), "dark": (55, 55, 55)}, (18, 26), (30, 40),
                "pale shade on a dark pole and base"),
    ObjectClass("car", {"main": (225, 50, 150), "light": (180, 220, 250), "dark": (25, 25, 25)},
                (46, 62), (26, 34), "pink body and cabin with windows, two black wheels"),
)
CLASS_NAMES = tuple(c.name for c in CLASSES)
CLASS_INDEX = {c.name: i for i, c in enumerate(CLASSES)}

# Which classes take part in the class-gated (interaction) predicates.
HOLDABLE = frozenset({"ball", "cup", "bottle", "book"})
CONTAINER = frozenset({"box", "basket"})
CONTAINABLE = frozenset({"ball", "cup", "bottle", "book"})
SUPPORT = frozenset({"table", "box", "book"})
PLACEABLE = frozenset({"ball", "cup", "bottle", "book", "lamp", "box", "basket"})
UNDERABLE = frozenset({"ball", "box", "basket", "cup", "bottle"})

# Rule order = priority: an ordered pair gets the first predicate whose rule holds.
PREDICATES: tuple[tuple[str, str], ...] = (
    ("holding", "subject is a person and a hand point (each side of its box at 40% of its height) "
                f"lies in the object's box; object in {sorted(HOLDABLE)}"),
    ("riding", "person on a car: the subject's bottom edge equals the car's top edge and the subject's "
               "centre x lies within the car's x-range"),
    ("inside", f"object in {sorted(CONTAINER)}, subject in {sorted(CONTAINABLE)}, subject box within the "
               "object box with at least 2 px on every side"),
    ("under", f"object is a table, subject in {sorted(UNDERABLE)}, subject box within the table box and its "
              "top below the table's top 20%"),
    ("on", f"object in {sorted(SUPPORT)}, subject in {sorted(PLACEABLE)}: subject bottom edge equals object top "
           "edge and the subject's centre x lies within the object's x-range"),
    ("above", "any classes: subject bottom 4-24 px above the object top and x-overlap at least half the "
              "narrower width"),
    ("next to", "any classes, subject to the left: y-overlap at least half the lower height and a horizontal "
                "gap of 0-6 px"),
    ("left of", "any classes: y-overlap at least half the lower height and a horizontal gap of 14 px or more"),
)
PREDICATE_NAMES = tuple(p for p, _ in PREDICATES)
FLIP_SENSITIVE = ("next to", "left of")     # a horizontal flip makes them hold the other way round
PREDICATE_INDEX = {p: i for i, p in enumerate(PREDICATE_NAMES)}

ABOVE_MIN_GAP = 4
ABOVE_MAX_GAP = 24       # farther apart in a column is no relation (gaps up to ABOVE_DEAD_GAP are not rendered)
ABOVE_DEAD_GAP = 32
NEXT_TO_MAX_GAP = 6
LEFT_OF_MIN_GAP = 14
SAME_LINE = 0.5          # overlap / smaller extent that puts two boxes on one row (column)
DEAD_LINE = 0.25         # overlaps in [DEAD_LINE, SAME_LINE) are too close to call: never rendered
HAND_HEIGHT = 0.4
CONTAIN_MARGIN = 2
UNDER_TOP = 0.2
GROUP_GAP = 4            # minimum space between the boxes of separate groups

# (subject, predicate, object) combinations never seen in train/val: each predicate and each class
# occurs in training in other combinations, so these test composition, not new words.
HELD_OUT: tuple[tuple[str, str, str], ...] = (
    ("person", "holding", "cup"),
    ("ball", "inside", "basket"),
    ("cup", "on", "box"),
    ("bottle", "under", "table"),
    ("lamp", "next to", "car"),
)


def _allowed(predicate: str, s: str, o: str) -> bool:
    """Class pairs a predicate's rule can ever hold for (the spatial ones: all pairs)."""
    if predicate == "holding":
        return s == "person" and o in HOLDABLE
    if predicate == "riding":
        return s == "person" and o == "car"
    if predicate == "inside":
        return s in CONTAINABLE and o in CONTAINER
    if predicate == "under":
        return s in UNDERABLE and o == "table"
    if predicate == "on":
        return s in PLACEABLE and o in SUPPORT
    return True


POSSIBLE_TRIPLETS: tuple[tuple[str, str, str], ...] = tuple(
    (s, p, o) for p in PREDICATE_NAMES for s in CLASS_NAMES for o in CLASS_NAMES if _allowed(p, s, o))


# ---------------------------------------------------------------------------------------------
# The rules: relations from boxes and classes alone.

def _overlap(a1: int, a2: int, b1: int, b2: int) -> int:
    return min(a2, b2) - max(a1, b1)


def hand_points(person: Box) -> tuple[tuple[int, int], tuple[int, int]]:
    x1, y1, x2, y2 = person
    hy = y1 + round(HAND_HEIGHT * (y2 - y1))
    return (x1, hy), (x2 - 1, hy)


def _in_box(p: tuple[int, int], b: Box) -> bool:
    return b[0] <= p[0] < b[2] and b[1] <= p[1] < b[3]


def _scaled(v: float, size: int) -> int:
    return max(1, round(v * size / BASE_SIZE))


def relation_between(s: Box, s_cls: str, o: Box, o_cls: str, size: int = BASE_SIZE) -> str | None:
    """The predicate that holds from subject `s` to object `o` (first rule in `PREDICATES` order)."""
    sx1, sy1, sx2, sy2 = s
    ox1, oy1, ox2, oy2 = o
    scx2 = sx1 + sx2        # twice the centre x (integers throughout)
    if s_cls == "person" and o_cls in HOLDABLE and any(_in_box(p, o) for p in hand_points(s)):
        return "holding"
    if s_cls == "person" and o_cls == "car" and sy2 == oy1 and 2 * ox1 <= scx2 < 2 * ox2:
        return "riding"
    m = CONTAIN_MARGIN
    if (o_cls in CONTAINER and s_cls in CONTAINABLE
            and sx1 >= ox1 + m and sy1 >= oy1 + m and sx2 <= ox2 - m and sy2 <= oy2 - m):
        return "inside"
    if (o_cls == "table" and s_cls in UNDERABLE and sx1 >= ox1 and sx2 <= ox2 and sy2 <= oy2
            and sy1 >= oy1 + UNDER_TOP * (oy2 - oy1)):
        return "under"
    if o_cls in SUPPORT and s_cls in PLACEABLE and sy2 == oy1 and 2 * ox1 <= scx2 < 2 * ox2:
        return "on"
    h_ov = _overlap(sx1, sx2, ox1, ox2)
    v_ov = _overlap(sy1, sy2, oy1, oy2)
    if (_scaled(ABOVE_MIN_GAP, size) <= oy1 - sy2 <= _scaled(ABOVE_MAX_GAP, size)
            and h_ov >= SAME_LINE * min(sx2 - sx1, ox2 - ox1)):
        return "above"
    if v_ov >= SAME_LINE * min(sy2 - sy1, oy2 - oy1):
        gap = ox1 - sx2
        if 0 <= gap <= _scaled(NEXT_TO_MAX_GAP, size):
            return "next to"
        if gap >= _scaled(LEFT_OF_MIN_GAP, size):
            return "left of"
    return None


def ambiguous(a: Box, b: Box, size: int = BASE_SIZE) -> bool:
    """True when two disjoint boxes sit near a spatial rule's threshold (rejected at placement)."""
    h_ov = _overlap(a[0], a[2], b[0], b[2])
    v_ov = _overlap(a[1], a[3], b[1], b[3])
    if h_ov > 0 and v_ov > 0:
        return False                       # overlapping boxes only come from interaction groups
    h_frac = h_ov / min(a[2] - a[0], b[2] - b[0])
    v_frac = v_ov / min(a[3] - a[1], b[3] - b[1])
    v_gap = max(b[1] - a[3], a[1] - b[3])
    h_gap = max(b[0] - a[2], a[0] - b[2])
    if DEAD_LINE <= h_frac < SAME_LINE or DEAD_LINE <= v_frac < SAME_LINE:
        return True
    if h_frac >= SAME_LINE and (0 < v_gap < _scaled(ABOVE_MIN_GAP, size)
                                or _scaled(ABOVE_MAX_GAP, size) < v_gap < _scaled(ABOVE_DEAD_GAP, size)):
        return True
    return v_frac >= SAME_LINE and _scaled(NEXT_TO_MAX_GAP, size) < h_gap < _scaled(LEFT_OF_MIN_GAP, size)


def scene_relations(boxes: list[Box], classes: list[str], size: int = BASE_SIZE) -> list[tuple[int, int, str]]:
    """Every (subject index, object index, predicate) that holds, in index order."""
    out = []
    for i, (bi, ci) in enumerate(zip(boxes, classes)):
        for j, (bj, cj) in enumerate(zip(boxes, classes)):
            if i != j and (p := relation_between(bi, ci, bj, cj, size)) is not None:
                out.append((i, j, p))
    return out


# ---------------------------------------------------------------------------------------------
# Groups: small rigid layouts that make the interaction predicates frequent.

class _Item(NamedTuple):
    cls: str
    box: Box


def _size(rng: np.random.Generator, cls: str, f: float) -> tuple[int, int]:
    c = CLASSES[CLASS_INDEX[cls]]
    w = round(rng.integers(c.width[0], c.width[1] + 1) * f)
    h = round(rng.integers(c.height[0], c.height[1] + 1) * f)
    if cls == "ball":
        h = w
    return w, h


def _pair_group(rng: np.random.Generator, predicate: str, s: str, o: str, f: float) -> list[_Item]:
    """Subject and object (in this order, which is also the drawing order) arranged so that
    `predicate` holds from the first to the second."""
    sw, sh = _size(rng, s, f)
    ow, oh = _size(rng, o, f)

    def r(lo: float, hi: float) -> int:
        lo, hi = round(lo), round(hi)
        return int(rng.integers(lo, max(lo, hi) + 1))

    if predicate == "holding":
        sbox = (0, 0, sw, sh)
        hx, hy = hand_points(sbox)[int(rng.integers(2))]
        ox1 = hx - ow // 2 + r(-ow / 6, ow / 6)
        oy1 = hy - oh // 2 + r(-oh / 6, oh / 6)
        return [_Item(s, sbox), _Item(o, (ox1, oy1, ox1 + ow, oy1 + oh))]
    if predicate in ("riding", "on"):
        if sw > ow:          # a subject wider than its support would hang over both edges
            sw = ow
            sh = sw if s == "ball" else sh
        ox1 = r(-0.3 * sw, ow - 0.7 * sw) if predicate == "on" else r(0, ow - sw)
        return [_Item(s, (ox1, 0, ox1 + sw, sh)), _Item(o, (0, sh, ow, sh + oh))]
    if predicate == "inside":
        pad = CONTAIN_MARGIN * f + 3 * f + 1      # margin + wall
        ow, oh = max(ow, round(sw + 2 * pad + r(0, 8 * f))), max(oh, round(sh + 2 * pad + r(0, 6 * f)))
        x1 = r(pad, ow - pad - sw)
        y1 = r(pad, oh - pad - sh) if o == "box" else oh - round(pad) - sh     # baskets: resting on the bottom
        return [_Item(s, (x1, y1, x1 + sw, y1 + sh)), _Item(o, (0, 0, ow, oh))]
    if predicate == "under":
        ow = max(ow, int(np.ceil((sw + 2 + r(0, 8 * f)) / 0.8)))     # legs take 10% of the width each side
        leg = max(3, round(0.1 * ow))
        oh = max(oh, round(sh / (1 - UNDER_TOP - 0.08)) + 1)
        x1 = r(leg + 1, ow - leg - 1 - sw)
        return [_Item(s, (x1, oh - sh, x1 + sw, oh)), _Item(o, (0, 0, ow, oh))]
    if predicate == "above":
        gap = r(ABOVE_MIN_GAP * f, (ABOVE_MIN_GAP + 16) * f)
        narrow = min(sw, ow)
        sx1 = r(-(sw - 0.6 * narrow), ow - 0.6 * narrow) if sw <= ow else r(ow - sw, 0)
        return [_Item(s, (sx1, 0, sx1 + sw, sh)), _Item(o, (0, sh + gap, ow, sh + gap + oh))]
    if predicate in ("next to", "left of"):
        gap = r(0, NEXT_TO_MAX_GAP * f) if predicate == "next to" else r(LEFT_OF_MIN_GAP * f, (LEFT_OF_MIN_GAP + 30) * f)
        low = min(sh, oh)
        oy1 = r(sh - oh, 0) if oh >= sh else r(0, sh - oh)             # the lower box within the other's rows
        oy1 += r(-0.3 * low, 0.3 * low)
        return [_Item(s, (0, 0, sw, sh)), _Item(o, (sw + gap, oy1, sw + gap + ow, oy1 + oh))]
    raise ValueError(predicate)


# How often each predicate's group is drawn (spatial relations also arise between groups).
GROUP_WEIGHTS = {"holding": 1.0, "riding": 0.5, "inside": 1.0, "under": 0.8, "on": 1.2,
                 "above": 0.5, "next to": 0.5, "left of": 0.3}
SINGLE_RATE = 0.25


def _triplets_by_predicate(exclude: frozenset) -> dict[str, list[tuple[str, str, str]]]:
    out: dict[str, list] = {p: [] for p in PREDICATE_NAMES}
    for t in POSSIBLE_TRIPLETS:
        if t not in exclude:
            out[t[1]].append(t)
    return out


# ---------------------------------------------------------------------------------------------
# Rendering.

def _jitter(rng: np.random.Generator, c: RGB, amount: int = 12) -> RGB:
    def one(v: int) -> int:
        return int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255))

    r, g, b = c
    return one(r), one(g), one(b)   # drawn in this order


def _float_box(box: Box) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = box
    return float(x1), float(y1), float(x2), float(y2)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    grey = rng.integers(80, 165)
    base = np.clip(grey + rng.integers(-15, 16, size=3), 0, 255).astype(np.float32)
    if rng.random() < 0.5:
        img = np.broadcast_to(base, (size, size, 3)).copy()
        noise_sd = 10.0
    else:   # stripes at a random angle and period, low contrast
        period = rng.uniform(6, 18) * size / BASE_SIZE
        angle = rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        phase = (xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / period)
        contrast = rng.uniform(12, 28)
        img = base + contrast * np.sign(np.sin(phase))[..., None]
        noise_sd = 5.0
    img += rng.normal(0, noise_sd, size=(size, size, 3)).astype(np.float32)   # img's shape, either branch
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape(cls: str, box: Box) -> list[tuple[str, Any, str]]:
    """Drawing primitives (kind, PIL coordinates, colour key) that exactly fill `box`."""
    x1, y1, x2, y2 = box
    X, Y = x2 - 1, y2 - 1          # PIL coordinates are inclusive
    w, h = x2 - x1, y2 - y1
    cx = (x1 + X) / 2
    if cls == "person":
        r = max(3, round(0.13 * h))
        torso_w = max(3, round(0.22 * w))
        hy = hand_points(box)[0][1]
        hip = y1 + round(0.65 * h)
        leg_w = max(2, round(0.16 * w))
        return [("ellipse", [cx - r, y1, cx + r, y1 + 2 * r], "skin"),
                ("rectangle", [cx - torso_w, y1 + 2 * r, cx + torso_w, hip], "main"),
                ("rectangle", [x1, hy - 1, X, hy + 1], "skin"),
                ("rectangle", [cx - torso_w, hip, cx - torso_w + leg_w, Y], "dark"),
                ("rectangle", [cx + torso_w - leg_w, hip, cx + torso_w, Y], "dark")]
    if cls == "ball":
        return [("ellipse", [x1, y1, X, Y], "main"),
                ("ellipse", [x1 + w * 0.22, y1 + h * 0.22, x1 + w * 0.42, y1 + h * 0.42], "light")]
    if cls == "box":
        return [("frame", [x1, y1, X, Y], "main")]
    if cls == "basket":
        t = 3
        return [("rectangle", [x1, y1, x1 + t - 1, Y], "main"), ("rectangle", [X - t + 1, y1, X, Y], "main"),
                ("rectangle", [x1, Y - t + 1, X, Y], "main"),
                ("rectangle", [x1, y1 + h // 2, X, y1 + h // 2 + 1], "main")]
    if cls == "cup":
        bw = round(0.7 * w)
        return [("polygon", [(x1, y1), (x1 + bw, y1), (x1 + bw - 2, Y), (x1 + 2, Y)], "main"),
                ("ring", [x1 + bw - 4, y1 + round(0.2 * h), X, y1 + round(0.7 * h)], "main")]
    if cls == "table":
        top = max(4, round(0.15 * h))
        leg = max(3, round(0.1 * w))
        return [("rectangle", [x1, y1, X, y1 + top - 1], "main"), ("rectangle", [x1, y1, x1 + leg - 1, Y], "main"),
                ("rectangle", [X - leg + 1, y1, X, Y], "main")]
    if cls == "bottle":
        neck = round(0.3 * w)
        shoulder, body = y1 + round(0.3 * h), y1 + round(0.5 * h)
        return [("rectangle", [x1 + neck, y1, X - neck, shoulder], "main"),
                ("polygon", [(x1 + neck, shoulder), (X - neck, shoulder), (X, body), (x1, body)], "main"),
                ("rectangle", [x1, body, X, Y], "main"),
                ("rectangle", [x1 + neck, y1, X - neck, y1 + 2], "dark")]
    if cls == "book":
        return [("rectangle", [x1, y1, X, Y], "main"), ("rectangle", [x1 + 4, y1 + 3, X - 1, Y - 3], "light")]
    if cls == "lamp":
        shade = y1 + round(0.45 * h)
        return [("polygon", [(x1 + round(0.3 * w), y1), (X - round(0.3 * w), y1), (X, shade), (x1, shade)], "main"),
                ("rectangle", [cx - 1, shade, cx + 1, Y], "dark"),
                ("rectangle", [x1 + round(0.2 * w), Y - 2, X - round(0.2 * w), Y], "dark")]
    if cls == "car":
        body_top, body_bot = y1 + round(0.35 * h), Y - round(0.2 * h)
        d = round(0.4 * h)
        return [("polygon", [(x1 + round(0.25 * w), y1), (X - round(0.3 * w), y1), (X - round(0.15 * w), body_top),
                             (x1 + round(0.12 * w), body_top)], "main"),
                ("rectangle", [x1, body_top, X, body_bot], "main"),
                ("rectangle", [x1 + round(0.3 * w), y1 + 3, X - round(0.35 * w), body_top - 1], "light"),
                ("ellipse", [x1 + round(0.12 * w), Y - d + 1, x1 + round(0.12 * w) + d - 1, Y], "dark"),
                ("ellipse", [X - round(0.12 * w) - d + 1, Y - d + 1, X - round(0.12 * w), Y], "dark")]
    raise ValueError(cls)


def _draw(draw: ImageDraw.ImageDraw, prims: list[tuple[str, Any, str]], colors: dict[str, Any]) -> None:
    for kind, xy, key in prims:
        fill = colors[key]
        if kind == "rectangle":
            draw.rectangle(xy, fill=fill)
        elif kind == "ellipse":
            draw.ellipse(xy, fill=fill)
        elif kind == "polygon":
            draw.polygon(xy, fill=fill)
        elif kind == "frame":
            draw.rectangle(xy, outline=fill, width=3)
        elif kind == "ring":
            draw.ellipse(xy, outline=fill, width=3)


def render(rng: np.random.Generator, items: list[_Item], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Image [H, W, 3] uint8 and per-object masks [N, H, W] bool (each object drawn alone, unoccluded)."""
    img = Image.fromarray(_background(rng, size))
    draw = ImageDraw.Draw(img)
    masks = np.zeros((len(items), size, size), dtype=bool)
    for k, it in enumerate(items):
        spec = CLASSES[CLASS_INDEX[it.cls]]
        prims = _shape(it.cls, it.box)
        _draw(draw, prims, {key: _jitter(rng, c) for key, c in spec.colors.items()})
        mask = Image.new("L", (size, size), 0)
        _draw(ImageDraw.Draw(mask), prims, {key: 255 for key in spec.colors})
        masks[k] = np.asarray(mask) > 0
    return np.asarray(img), masks


# ---------------------------------------------------------------------------------------------
# Scenes.

class Scene(NamedTuple):
    image: np.ndarray                 # [H, W, 3] uint8
    objects: list[Object]             # boxes xyxy in pixels, class name, category id 1..K
    relations: list[Relation]         # subject / object index into objects, predicate text


class SyntheticWorld:
    """`SyntheticWorld(seed, split).scene(i)`: the i-th scene of a split, a pure function of its arguments."""

    def __init__(self, seed: int = 0, split: str = "train", size: int = BASE_SIZE,
                 objects_per_image: tuple[int, int] = OBJECTS_PER_IMAGE):
        if split not in SPLIT_CODE:
            raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        if int(seed) < 0:
            raise UserError(f"seed must be a non-negative integer, got {seed}")
        if size < 64:
            raise UserError(f"image size {size} is too small for the synthetic world; use --size 64 or more")
        lo, hi = objects_per_image
        if not 2 <= lo <= hi <= 6:
            raise UserError(f"objects per image {objects_per_image} must satisfy 2 <= min <= max <= 6")
        self.seed, self.split, self.size, self.objects_per_image = int(seed), split, int(size), (lo, hi)
        self.held_out = frozenset(HELD_OUT)
        # train and val never show a held-out combination, not even in a forced group.
        self._choices = _triplets_by_predicate(self.held_out if split != "test" else frozenset())

    def _rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, SPLIT_CODE[self.split], int(i)]))

    def _group(self, rng: np.random.Generator, f: float, room: int) -> list[_Item]:
        if room == 1 or rng.random() < SINGLE_RATE:
            cls = CLASS_NAMES[int(rng.integers(len(CLASS_NAMES)))]
            w, h = _size(rng, cls, f)
            return [_Item(cls, (0, 0, w, h))]
        preds = [p for p in PREDICATE_NAMES if self._choices[p]]
        weights = np.array([GROUP_WEIGHTS[p] for p in preds])
        p = preds[int(rng.choice(len(preds), p=weights / weights.sum()))]
        s, _, o = self._choices[p][int(rng.integers(len(self._choices[p])))]
        return _pair_group(rng, p, s, o, f)

    def _place(self, rng: np.random.Generator, placed: list[_Item], group: list[_Item]) -> list[_Item] | None:
        """Move `group` to a random free spot: inside the image, GROUP_GAP from other groups, no pair near
        a rule's threshold. None when 40 tries find no spot."""
        size = self.size
        gx1 = min(it.box[0] for it in group)
        gy1 = min(it.box[1] for it in group)
        gw = max(it.box[2] for it in group) - gx1
        gh = max(it.box[3] for it in group) - gy1
        if gw > size or gh > size:
            return None
        gap = _scaled(GROUP_GAP, size)
        for _ in range(40):
            dx = int(rng.integers(0, size - gw + 1)) - gx1
            dy = int(rng.integers(0, size - gh + 1)) - gy1
            moved = [_Item(it.cls, (it.box[0] + dx, it.box[1] + dy, it.box[2] + dx, it.box[3] + dy)) for it in group]
            if any(_overlap(a.box[0] - gap, a.box[2] + gap, b.box[0], b.box[2]) > 0
                   and _overlap(a.box[1] - gap, a.box[3] + gap, b.box[1], b.box[3]) > 0
                   for a in moved for b in placed):
                continue
            if any(ambiguous(a.box, b.box, size) for a in moved for b in placed):
                continue
            return moved
        return None

    def layout(self, i: int) -> tuple[list[_Item], list[tuple[int, int, str]], np.random.Generator]:
        """Object boxes and relations of scene `i` (before rendering), and the generator to render it."""
        rng = self._rng(i)
        f = self.size / BASE_SIZE
        lo, hi = self.objects_per_image
        forced = self.split == "test" and rng.random() < TEST_HELD_OUT_RATE
        for _ in range(MAX_RESAMPLES):
            target = int(rng.integers(lo, hi + 1))
            placed: list[_Item] = []
            if forced:
                s, p, o = HELD_OUT[int(rng.integers(len(HELD_OUT)))]
                placed = self._place(rng, [], _pair_group(rng, p, s, o, f)) or []
            tries = 0
            while len(placed) < target and tries < 4 * target:
                tries += 1
                group = self._group(rng, f, target - len(placed))
                if len(placed) + len(group) > target:
                    continue
                moved = self._place(rng, placed, group)
                if moved is not None:
                    placed += moved
            if len(placed) < 2:
                continue
            rels = scene_relations([it.box for it in placed], [it.cls for it in placed], self.size)
            if not rels:
                continue            # every scene has a scene graph (readers drop relation-less images)
            triplets = {(placed[a].cls, p, placed[b].cls) for a, b, p in rels}
            if self.split != "test" and triplets & self.held_out:
                continue            # resample: a held-out combination occurred by chance
            if forced and not triplets & self.held_out:
                continue
            return placed, rels, rng
        raise RuntimeError(f"scene {i} of split {self.split}: no valid layout in {MAX_RESAMPLES} tries")

    def scene_with_masks(self, i: int) -> tuple[Scene, np.ndarray]:
        items, rels, rng = self.layout(i)
        image, masks = render(rng, items, self.size)
        objects = [Object(box=_float_box(it.box), name=it.cls, category_id=CLASS_INDEX[it.cls] + 1)
                   for it in items]
        relations = [Relation(subject=a, object=b, predicate=p) for a, b, p in rels]
        return Scene(image, objects, relations), masks

    def scene(self, i: int) -> Scene:
        return self.scene_with_masks(i)[0]

    def image_id(self, i: int) -> int:
        return SPLIT_ID_OFFSET[self.split] + i + 1


# ---------------------------------------------------------------------------------------------
# Files.

def encode_jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # 4:4:4 keeps the thin coloured parts (arms, walls) their colour at 128 px.
    Image.fromarray(image).save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False)
    return buf.getvalue()


def label_space() -> dict[str, Any]:
    """Object / verb lists, valid verb-object matrix, HOI list and triplet sets (0-based indices)."""
    objects = [{"index": i, "id": i + 1, "name": n} for i, n in enumerate(CLASS_NAMES)]
    verbs = [{"index": i, "id": i + 1, "name": p.replace(" ", "_"), "text": p} for i, p in enumerate(PREDICATE_NAMES)]
    valid = np.zeros((len(PREDICATE_NAMES), len(CLASS_NAMES)), dtype=np.float64)
    for s, p, o in POSSIBLE_TRIPLETS:
        valid[PREDICATE_INDEX[p], CLASS_INDEX[o]] = 1.0
    pairs = sorted(((int(o), int(v)) for v, o in zip(*np.nonzero(valid))))
    hoi_list = [{"hoi_id": k + 1, "hoi_index": k, "object_name": CLASS_NAMES[o], "object_id": o + 1,
                 "object_index": o, "verb_name": verbs[v]["name"], "verb_id": v + 1, "verb_index": v}
                for k, (o, v) in enumerate(pairs)]

    def idx(t: tuple[str, str, str]) -> list[int]:
        return [CLASS_INDEX[t[0]], CLASS_INDEX[t[2]], PREDICATE_INDEX[t[1]]]

    triplets = {"index_base": 0, "order": ["subject_index", "object_index", "verb_index"],
                "possible": [idx(t) for t in POSSIBLE_TRIPLETS],
                "seen": [idx(t) for t in POSSIBLE_TRIPLETS if t not in HELD_OUT],
                "held_out": [idx(t) for t in HELD_OUT]}
    return {"objects": objects, "verbs": verbs, "valid": valid, "hoi_list": hoi_list, "triplets": triplets}


def eval_label_space():
    """The world's label space for `rlipv2_scale.eval.hico.evaluate_hico` (ids 1..K / 1..V as in the
    HICO-DET files; zero-shot split "held-out" = `HELD_OUT`)."""
    from rlipv2_scale.labels.space import LabelSpace

    space = label_space()
    return LabelSpace(objects=CLASS_NAMES, verbs=PREDICATE_NAMES, valid=space["valid"],
                      object_ids=tuple(range(1, len(CLASS_NAMES) + 1)),
                      verb_ids=tuple(range(1, len(PREDICATE_NAMES) + 1)), subject_index=CLASS_INDEX["person"],
                      zero_shot_splits={"held-out": tuple(tuple(t) for t in space["triplets"]["held_out"])},
                      name="synthetic")


def describe_world(size: int = BASE_SIZE, objects_per_image: tuple[int, int] = OBJECTS_PER_IMAGE) -> dict[str, Any]:
    return {
        "image_size": size,
        "objects_per_image": list(objects_per_image),
        "classes": [{"id": i + 1, "name": c.name, "shape": c.shape, "color": list(c.colors["main"]),
                     "width_px": [round(v * size / BASE_SIZE) for v in c.width],
                     "height_px": [round(v * size / BASE_SIZE) for v in c.height]} for i, c in enumerate(CLASSES)],
        "predicates": [{"id": i + 1, "name": p, "rule": rule} for i, (p, rule) in enumerate(PREDICATES)],
        "rule_order": "an ordered pair gets the first predicate (in id order) whose rule holds; boxes are "
                      "pixel [x1, y1, x2, y2) at image_size; pixel thresholds scale with image_size",
        "held_out": [{"subject": s, "predicate": p, "object": o} for s, p, o in HELD_OUT],
        "held_out_policy": "train and val scenes in which a held-out combination holds are resampled as a "
                           "whole (no label is ever dropped); test scenes realise one on purpose with "
                           f"probability {TEST_HELD_OUT_RATE} and may contain them by chance otherwise",
        "ambiguity_policy": "layouts with a pair near a spatial threshold (overlap fraction in "
                            f"[{DEAD_LINE}, {SAME_LINE}), vertical gap in (0, {ABOVE_MIN_GAP}) or "
                            f"({ABOVE_MAX_GAP}, {ABOVE_DEAD_GAP}) px, horizontal "
                            f"gap in ({NEXT_TO_MAX_GAP}, {LEFT_OF_MIN_GAP}) px) are never rendered",
        "possible_triplets": len(POSSIBLE_TRIPLETS),
        "horizontal_flip": f"mirrors {list(FLIP_SENSITIVE)} (subject and object trade places); train without "
                           "flipping or swap them",
    }


def _dump(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, separators=(",", ":")))
    os.replace(tmp, path)


@dataclass
class SplitSummary:
    out: str
    split: str
    images: int
    objects: int
    relations: int
    predicates: dict[str, int]
    held_out_relations: int

    def format(self) -> str:
        preds = ", ".join(f"{p} {n}" for p, n in self.predicates.items())
        return (f"synthesised {self.images} {self.split} images, {self.objects} objects, {self.relations} "
                f"relations ({self.held_out_relations} of held-out combinations) in {self.out}\n  {preds}")


def write_split(out: str | os.PathLike, n: int, seed: int = 0, split: str = "train", size: int = BASE_SIZE,
                objects_per_image: tuple[int, int] = OBJECTS_PER_IMAGE, progress: bool = False) -> SplitSummary:
    """Render `n` scenes of `split` into `out` (VG + HICO-DET layouts, label space, world description)."""
    if n < 1:
        raise UserError(f"--images must be at least 1, got {n}")
    world = SyntheticWorld(seed, split, size, objects_per_image)
    out = Path(out)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    space = label_space()
    hoi_id = {(h["verb_index"], h["object_index"]): h["hoi_id"] for h in space["hoi_list"]}
    scene_graphs, image_data, hico = [], [], []
    pred_counts: Counter = Counter()
    triplet_counts: Counter = Counter()
    n_obj = n_rel = n_held = 0
    iterator: Any = range(n)
    if progress:
        from tqdm import tqdm
        iterator = tqdm(iterator, desc=f"synth {split}", unit=" img")
    for i in iterator:
        scene = world.scene(i)
        image_id = world.image_id(i)
        file_name = f"{image_id}.jpg"
        (images_dir / file_name).write_bytes(encode_jpeg(scene.image))
        ids = [image_id * 100 + k for k in range(len(scene.objects))]
        objs = []
        for oid, ob in zip(ids, scene.objects):
            x1, y1, x2, y2 = (int(v) for v in ob.box)
            objs.append({"object_id": oid, "x": x1, "y": y1, "w": x2 - x1, "h": y2 - y1,
                         "names": [ob.name], "synsets": []})
        rels = [{"relationship_id": image_id * 100 + k, "predicate": r.predicate, "subject_id": ids[r.subject],
                 "object_id": ids[r.object], "synsets": []} for k, r in enumerate(scene.relations)]
        scene_graphs.append({"image_id": image_id, "objects": objs, "relationships": rels})
        image_data.append({"image_id": image_id, "width": size, "height": size, "url": f"images/{file_name}",
                           "coco_id": None, "flickr_id": None})
        hico.append({
            "file_name": file_name, "img_id": image_id,
            "annotations": [{"bbox": [int(v) for v in ob.box], "category_id": ob.category_id} for ob in scene.objects],
            "hoi_annotation": [{"subject_id": r.subject, "object_id": r.object,
                                "category_id": PREDICATE_INDEX[r.predicate] + 1,
                                "hoi_category_id": hoi_id[PREDICATE_INDEX[r.predicate],
                                                          CLASS_INDEX[scene.objects[r.object].name]]}
                               for r in scene.relations],
        })
        n_obj += len(scene.objects)
        n_rel += len(scene.relations)
        for r in scene.relations:
            t = (scene.objects[r.subject].name, r.predicate, scene.objects[r.object].name)
            pred_counts[r.predicate] += 1
            triplet_counts[t] += 1
            n_held += t in world.held_out
    _dump(out / "scene_graphs.json", scene_graphs)
    _dump(out / "image_data.json", image_data)
    _dump(out / HICO_FILE[split], hico)
    _dump(out / "objects.json", space["objects"])
    _dump(out / "verbs.json", space["verbs"])
    _dump(out / "hoi_list.json", space["hoi_list"])
    np.save(out / "verb_object_valid.npy", space["valid"])
    triplets = dict(space["triplets"])
    triplets["counts"] = [[CLASS_INDEX[s], CLASS_INDEX[o], PREDICATE_INDEX[p], c]
                          for (s, p, o), c in sorted(triplet_counts.items())]
    _dump(out / "triplets.json", triplets)
    summary = SplitSummary(out=str(out), split=split, images=n, objects=n_obj, relations=n_rel,
                           predicates={p: pred_counts[p] for p in PREDICATE_NAMES}, held_out_relations=n_held)
    world_desc = describe_world(size, world.objects_per_image)
    world_desc.update({"split": split, "seed": seed, "images": n, "objects": n_obj, "relations": n_rel,
                       "relations_per_predicate": summary.predicates, "held_out_relations": n_held,
                       "files": {"vg": ["scene_graphs.json", "image_data.json", "images/"],
                                 "hico_det": HICO_FILE[split],
                                 "label_space": ["objects.json", "verbs.json", "verb_object_valid.npy",
                                                 "hoi_list.json", "triplets.json"]}})
    _dump(out / "synthetic_world.json", world_desc)
    return summary
