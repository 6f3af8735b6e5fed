"""MDS shards of relational records (mosaicml-streaming), and the summary of writing them.

Columns: `key` (str, `source/split/id`), `image` (bytes: the original encoded file, untouched) and
`annotation` (json: `RelationalRecord.annotation()`). Shards are uncompressed (JPEG bytes do not
compress) and about `size_limit` bytes each. Any `streaming.StreamingDataset(local=OUT)` reads the
output; `record_from_sample` turns one of its samples back into a record.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streaming import MDSWriter
from streaming.base.format import reader_from_json

from rlipv2_scale.data.constants import DEFAULT_SIZE_LIMIT
from rlipv2_scale.data.schema import RelationalRecord
from rlipv2_scale.data.sources.base import Dropped, Item, Skip
from rlipv2_scale.errors import DataError, UserError

COLUMNS = {"key": "str", "image": "bytes", "annotation": "json"}
EXAMPLES_PER_REASON = 5


@dataclass
class ConvertSummary:
    """What a conversion wrote and what it left out, by reason (with the first few ids)."""
    out: str = ""
    images: int = 0
    objects: int = 0
    relations: int = 0
    shards: int = 0
    skipped: Counter = field(default_factory=Counter)              # images left out, by reason
    examples: dict[str, list[str]] = field(default_factory=dict)   # first ids per skip reason
    errors: int = 0                                                 # skips that are data errors
    dropped: Counter = field(default_factory=Counter)              # parts of kept images, by reason
    seconds: float = 0.0                                            # wall time of the whole conversion

    def add(self, item: Item) -> None:
        if isinstance(item, RelationalRecord):
            self.images += 1
            self.objects += len(item.objects)
            self.relations += len(item.relations)
        elif isinstance(item, Skip):
            self.skipped[item.reason] += 1
            self.errors += int(item.error)
            ids = self.examples.setdefault(item.reason, [])
            if len(ids) < EXAMPLES_PER_REASON:
                ids.append(item.sample_id)
        elif isinstance(item, Dropped):
            self.dropped[item.reason] += item.count

    def to_dict(self) -> dict[str, Any]:
        return {"out": self.out, "images": self.images, "objects": self.objects, "relations": self.relations,
                "shards": self.shards, "skipped": dict(self.skipped), "skipped_examples": self.examples,
                "errors": self.errors, "dropped": dict(self.dropped), "seconds": round(self.seconds, 3)}

    def format(self) -> str:
        lines = [f"wrote {self.images} images, {self.objects} objects, {self.relations} relations "
                 f"in {self.shards} shard(s) to {self.out}"]
        if self.seconds > 0:
            seen = self.images + sum(self.skipped.values())
            lines[0] += f" in {self.seconds:.1f} s ({seen / self.seconds:.0f} images/s)"
        for reason, n in sorted(self.skipped.items()):
            lines.append(f"  skipped {n} image(s): {reason} (e.g. {', '.join(self.examples.get(reason, []))})")
        for reason, n in sorted(self.dropped.items()):
            lines.append(f"  left out {n} part(s) of kept images: {reason}")
        return "\n".join(lines)


def to_sample(record: RelationalRecord) -> dict[str, Any]:
    if record.image_bytes is None:
        raise DataError(f"image {record.image.id!r} ({record.image.source}) has no image bytes to store",
                        str(record.image.id), "missing_image")
    return {"key": record.key, "image": record.image_bytes, "annotation": record.annotation()}


def record_from_sample(sample: dict[str, Any]) -> RelationalRecord:
    """A shard sample (as `StreamingDataset` or `iter_records` returns it) -> a record with its bytes."""
    ann = sample["annotation"]
    if isinstance(ann, (str, bytes)):
        ann = json.loads(ann)
    return RelationalRecord.from_annotation(ann, image_bytes=bytes(sample["image"]))


def write_shards(items: Iterable[Item], out_dir: str | os.PathLike, *, size_limit: int | str = DEFAULT_SIZE_LIMIT,
                 strict: bool = False, overwrite: bool = False) -> ConvertSummary:
    """Write records in order; count `Skip` / `Dropped` notes. With `strict`, the first data error
    stops the run (no index is written, so the partial output is never read as a dataset)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output folder {out} is not empty; choose a new folder or pass --overwrite")
    summary = ConvertSummary(out=str(out))
    writer = MDSWriter(out=str(out), columns=COLUMNS, size_limit=size_limit, exist_ok=overwrite)
    for item in items:
        if isinstance(item, RelationalRecord):
            item.validate()
            writer.write(to_sample(item))
        elif isinstance(item, Skip) and item.error and strict:
            writer.executor.shutdown(wait=False)
            raise DataError(f"{item.message} [{item.reason}] (--strict stops at the first bad sample)",
                            item.sample_id, item.reason)
        summary.add(item)
    writer.finish()
    summary.shards = len(writer.shards)
    return summary


def iter_records(shard_dir: str | os.PathLike, limit: int | None = None) -> Iterator[RelationalRecord]:
    """Read records back in write order, without the shared-memory machinery of StreamingDataset."""
    shard_dir = Path(shard_dir)
    index_path = shard_dir / "index.json"
    if not index_path.is_file():
        raise UserError(f"{shard_dir} holds no MDS index (index.json); write shards with `rlipv2 data convert`")
    index = json.loads(index_path.read_text())
    n = 0
    for info in index["shards"]:
        shard = reader_from_json(str(shard_dir), None, info)
        for i in range(shard.samples):
            if limit is not None and n >= limit:
                return
            yield record_from_sample(shard[i])
            n += 1
