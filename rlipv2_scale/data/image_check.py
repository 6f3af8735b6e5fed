"""Full decode of a record's image: the check `convert` runs on its worker processes.

Kept free of heavy imports (no mosaicml-streaming, no torch) so worker processes start fast.
"""
from __future__ import annotations

import io
from typing import cast

from PIL import Image

from rlipv2_scale.data.schema import RelationalRecord
from rlipv2_scale.data.sources.base import Item, Skip


def check_image(item: Item) -> Item:
    """Decode a record's image fully (catches corrupt and truncated files) and compare its size
    with the annotation's; other items pass through."""
    if not isinstance(item, RelationalRecord):
        return item
    sid = str(item.image.id)
    try:
        with Image.open(io.BytesIO(item.image_bytes or b"")) as im:
            im.load()
            size = im.size
    except Exception as exc:   # truncated / corrupt data raises OSError, SyntaxError, ValueError, ...
        return Skip(sid, "corrupt_image", f"image {sid!r}: {item.image.file_name} cannot be decoded ({exc})")
    if size != (item.image.width, item.image.height):
        return Skip(sid, "image_size_mismatch",
                    f"image {sid!r}: {item.image.file_name} is {size[0]}x{size[1]} but the annotation says "
                    f"{item.image.width}x{item.image.height}")
    return item


def check_chunk(items: list[Item]) -> list[Skip | None]:
    """Worker side: only the verdicts travel back (None = good), not the image bytes again."""
    out: list[Skip | None] = []
    for it in items:
        res = check_image(it)
        # check_image hands back its own item unchanged, or a new Skip
        out.append(cast(Skip, res) if res is not it else None)
    return out
