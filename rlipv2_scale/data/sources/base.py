"""What every reader shares: the skip / drop notes, JSON loading, image files and box checks.

A reader yields, in source order, one item per image: a `RelationalRecord`, or a `Skip` saying
why that image cannot be used. `Dropped` notes count parts of a *kept* image that a documented
policy leaves out (relations below the confidence threshold, crowd boxes, V-COCO roles without
an object), so that nothing disappears without a count in the summary.
"""
from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from rlipv2_scale.data.schema import Object, RelationalRecord
from rlipv2_scale.errors import DataError, UserError

# VG boxes often overshoot the image border by one pixel (x + w == width + 1); such boxes are
# clamped. A larger overshoot means the box does not belong to this image: the sample is skipped.
BOX_TOLERANCE_PX = 1.0


@dataclass(frozen=True)
class Skip:
    """An image left out. `error` is False for policy filters (e.g. no relation above threshold):
    those never stop a `--strict` run."""
    sample_id: str
    reason: str
    message: str
    error: bool = True


@dataclass(frozen=True)
class Dropped:
    """`count` relations or objects of a kept image left out by a documented policy."""
    sample_id: str
    reason: str
    count: int


Item = RelationalRecord | Skip | Dropped


def load_json(path: Path, what: str) -> Any:
    """Parse a whole annotation file; a missing or malformed file is the user's to fix."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist; pass the path of the {what} JSON")
    try:
        with path.open("rb") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno} "
                        f"(character {exc.pos}); fix or re-download the file") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not valid JSON: not UTF-8 text at byte {exc.start}") from None


def expect_list(data: Any, path: Path, what: str) -> list:
    if not isinstance(data, list):
        raise UserError(f"{path} should hold a JSON list of {what}, found a {type(data).__name__}")
    return data


def read_image(path: Path, sample_id: str) -> tuple[bytes, int, int]:
    """The file's bytes, untouched, and the size its header declares (no full decode here:
    the convert workers decode every image)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"image {sample_id!r}: file {path} is missing", sample_id, "missing_image") from None
    except OSError as exc:
        raise DataError(f"image {sample_id!r}: cannot read {path}: {exc.strerror}", sample_id,
                        "missing_image") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    except Exception as exc:  # PIL raises many types for a bad header
        raise DataError(f"image {sample_id!r}: {path} is not a readable image ({exc})", sample_id,
                        "corrupt_image") from None
    return data, width, height


def fit_box(box: tuple[float, float, float, float], width: int, height: int, sample_id: str,
            what: str) -> tuple[float, float, float, float]:
    """Check an xyxy box against its image: clamp an overshoot of at most BOX_TOLERANCE_PX,
    reject larger overshoot (`box_out_of_image`) and empty boxes (`degenerate_box`)."""
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise DataError(f"image {sample_id!r}: {what} box {box!r} is not 4 numbers", sample_id,
                        "malformed_annotation") from None
    if not all(v == v and abs(v) != float("inf") for v in (x1, y1, x2, y2)):
        raise DataError(f"image {sample_id!r}: {what} box {box!r} is not finite", sample_id, "degenerate_box")
    tol = BOX_TOLERANCE_PX
    if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
        raise DataError(f"image {sample_id!r}: {what} box [{x1:g}, {y1:g}, {x2:g}, {y2:g}] lies outside the "
                        f"{width}x{height} image by more than {tol:g} px", sample_id, "box_out_of_image")
    x1, x2 = min(max(x1, 0.0), float(width)), min(max(x2, 0.0), float(width))
    y1, y2 = min(max(y1, 0.0), float(height)), min(max(y2, 0.0), float(height))
    if x2 <= x1 or y2 <= y1:
        raise DataError(f"image {sample_id!r}: {what} box [{x1:g}, {y1:g}, {x2:g}, {y2:g}] has no area",
                        sample_id, "degenerate_box")
    return x1, y1, x2, y2


def as_id(value: Any, sample_id: str, what: str) -> int:
    """An integer id or index from the annotation. `int()` alone would turn 1.7 into 1 and point at
    another object or class; a non-integral number skips the sample (`non_integer_id`). Integral
    floats (1.0) and digit strings are the same id and are accepted."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise DataError(f"image {sample_id!r}: {what} {value!r} is not an integer id", sample_id, "non_integer_id")
    return int(value)   # a wrong type or a non-numeric string is a malformed entry (see `guarded`)


def qpic_objects(entry: dict, width: int, height: int, sample_id: str, name_of: Callable[[int], str | None],
                 unknown: str) -> list[Object]:
    """The boxes of a QPIC-form entry (HICO-DET, V-COCO, Open Images SGG): `annotations` of an xyxy
    `bbox` and a `category_id` that `name_of` names; an id it does not name (None) skips the sample
    as `unknown_category`, `unknown` saying which ids there are."""
    objects = []
    for i, ann in enumerate(entry.get("annotations") or []):
        cat = as_id(ann["category_id"], sample_id, f"box {i} category_id")
        name = name_of(cat)
        if name is None:
            raise DataError(f"image {sample_id!r}: box {i} has object category id {cat}, {unknown}", sample_id,
                            "unknown_category")
        objects.append(Object(box=fit_box(ann["bbox"], width, height, sample_id, f"box {i}"), name=name,
                              category_id=cat))
    return objects


def xywh_to_xyxy(x: Any, y: Any, w: Any, h: Any) -> tuple[float, float, float, float]:
    return float(x), float(y), float(x) + float(w), float(y) + float(h)


def guarded(sample_id: str, build: Callable[[], Iterator[Item]]) -> Iterator[Item]:
    """Run one sample's builder; a DataError or a malformed entry becomes a Skip for that sample."""
    try:
        yield from list(build())
    except DataError as exc:
        yield Skip(exc.sample_id or sample_id, exc.reason, str(exc))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        detail = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
        yield Skip(sample_id, "malformed_annotation", f"image {sample_id!r}: malformed annotation entry ({detail})")
