"""`rlipv2 data convert`: read a real annotation format, check every image, write MDS shards.

Readers run in this process (they parse the JSON and read the files); a pool of workers decodes
every image fully, which catches corrupt and truncated files, and checks that the decoded size is
the size the annotation declares. Results come back in source order, so shards keep the order of
the annotation file. At most a few chunks per worker are in flight, so memory stays bounded on
datasets of millions of images.
"""
from __future__ import annotations

import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from itertools import islice
from multiprocessing.pool import Pool
from pathlib import Path
from typing import Any

from tqdm import tqdm

from rlipv2_scale.data.image_check import check_chunk, check_image
from rlipv2_scale.data.shards import DEFAULT_SIZE_LIMIT, ConvertSummary, write_shards
from rlipv2_scale.data.sources import FORMATS
from rlipv2_scale.data.sources.base import Dropped, Item
from rlipv2_scale.errors import UserError

CHUNK = 16             # items per task sent to a worker
IN_FLIGHT_PER_WORKER = 4

__all__ = ["ConvertSummary", "check_image", "checked", "convert", "worker_pool"]


@contextmanager
def worker_pool(workers: int) -> Iterator[Pool | None]:
    """Processes for `checked`; none when `workers` <= 1.

    Forked where the platform can (workers start at once, with the modules already imported;
    spawned ones would re-import torch through mosaicml-streaming, and the caller's main module).
    Made before the progress bar and the shard writer start any thread."""
    if workers <= 1:
        yield None
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers) as pool:
        yield pool


def checked(items: Iterable[Item], pool: Pool | None, workers: int = 1) -> Iterator[Item]:
    """`check_image` over `items`, in order, on the pool's `workers` processes (in-process without
    a pool); at most a few chunks per worker are in flight."""
    if pool is None:
        yield from map(check_image, items)
        return
    it = iter(items)
    pending: deque = deque()
    while True:
        while len(pending) < workers * IN_FLIGHT_PER_WORKER:
            chunk = list(islice(it, CHUNK))
            if not chunk:
                break
            pending.append((chunk, pool.apply_async(check_chunk, (chunk,))))
        if not pending:
            return
        chunk, verdicts = pending.popleft()
        for item, verdict in zip(chunk, verdicts.get()):
            yield item if verdict is None else verdict


def convert(format: str, annotations: str | os.PathLike, images: str | os.PathLike, out: str | os.PathLike,
            split: str = "train", *, workers: int = 1, strict: bool = False,
            size_limit: int | str = DEFAULT_SIZE_LIMIT, overwrite: bool = False, progress: bool = True,
            **options: Any) -> ConvertSummary:
    """Convert one annotation file (+ image folder) of `format` to MDS shards in `out`.

    `options` go to the reader (e.g. `threshold` for pseudo labels, `image_paths` for Objects365,
    `categories` for Open Images)."""
    if format not in FORMATS:
        raise UserError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if not Path(images).is_dir():
        raise UserError(f"image folder {images} does not exist; pass --images DIR")
    try:
        items = FORMATS[format](Path(annotations), Path(images), split, **options)
    except TypeError as exc:
        raise UserError(f"format {format!r} does not take these options: {exc}") from None
    start = time.perf_counter()
    with worker_pool(workers) as pool, tqdm(desc=f"convert {format}", unit=" img", disable=not progress) as bar:
        def counted() -> Iterator[Item]:
            for item in checked(items, pool, workers):
                if not isinstance(item, Dropped):
                    bar.update(1)
                yield item
        # Every path the reader reads: the output must stay clear of all of them.
        inputs = [annotations, images, *(v for v in options.values() if isinstance(v, (str, os.PathLike)))]
        summary = write_shards(counted(), out, size_limit=size_limit, strict=strict, overwrite=overwrite,
                               inputs=inputs)
    summary.seconds = time.perf_counter() - start
    return summary
