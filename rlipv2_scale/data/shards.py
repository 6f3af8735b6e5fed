"""MDS shards of relational records (mosaicml-streaming), and the summary of writing them.

Columns: `key` (str, `source/split/id`), `image` (bytes: the original encoded file, untouched) and
`annotation` (json: `RelationalRecord.annotation()`). Shards are uncompressed (JPEG bytes do not
compress) and about `size_limit` bytes each. Any `streaming.StreamingDataset(local=OUT)` reads the
output; `record_from_sample` turns one of its samples back into a record.
"""
from __future__ import annotations

import json
import os
import struct
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlipv2_scale.data.constants import DEFAULT_SIZE_LIMIT
from rlipv2_scale.data.mds_index import check_shards
from rlipv2_scale.data.output import staged_output
from rlipv2_scale.data.schema import RelationalRecord
from rlipv2_scale.data.sources.base import Dropped, Item, Skip
from rlipv2_scale.errors import DataError, UserError

COLUMNS = {"key": "str", "image": "bytes", "annotation": "json"}
EXAMPLES_PER_REASON = 5
# The likely fix when every image of a run is skipped for one of these reasons.
ALL_SKIPPED_FIX = {
    "missing_image": "check --images: the annotation's image paths are read relative to that folder",
    "image_size_mismatch": "check that --images holds the very images the annotation describes",
    "corrupt_image": "check that the image files are whole JPEG or PNG files",
    "annotation_without_image": "check that --annotations is the file that lists these images",
}


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
                 strict: bool = False, overwrite: bool = False,
                 inputs: Iterable[str | os.PathLike | None] = ()) -> ConvertSummary:
    """Write records in order; count `Skip` / `Dropped` notes. A record whose key (source/split/id)
    was already written is skipped as `duplicate_image` (the first is kept). With `strict`, the first
    data error stops the run; so does a run that writes nothing because of data errors. The output
    folder is checked against `inputs` and written through `staged_output`: a run that stops leaves
    `out_dir` as it was."""
    from streaming import MDSWriter  # (imported here: it takes seconds, and every CLI command imports this module)

    summary = ConvertSummary(out=str(out_dir))
    written: set[str] = set()
    first_error: Skip | None = None
    with staged_output(out_dir, inputs, overwrite) as staged:
        writer = MDSWriter(out=str(staged), columns=COLUMNS, size_limit=size_limit)
        for item in items:
            if isinstance(item, RelationalRecord) and item.key in written:
                item = Skip(str(item.image.id), "duplicate_image", f"image {item.image.id!r} ({item.key}) occurs "
                                                                   f"again in the source; the first one is kept")
            if isinstance(item, RelationalRecord):
                item.validate()
                writer.write(to_sample(item))
                written.add(item.key)
            elif isinstance(item, Skip) and item.error and strict:
                writer.executor.shutdown(wait=False)
                raise DataError(f"{item.message} [{item.reason}] (--strict stops at the first bad sample)",
                                item.sample_id, item.reason)
            if isinstance(item, Skip) and item.error and first_error is None:
                first_error = item
            summary.add(item)
        writer.finish()
        if summary.images == 0 and first_error is not None:
            # Raised inside the block: an empty index would replace the previous output and pass for a success.
            counts = ", ".join(f"{reason} {n}" for reason, n in summary.skipped.most_common())
            fix = ALL_SKIPPED_FIX.get(first_error.reason, "fix the source data or the options that read it")
            raise UserError(f"no image written to {out_dir}: all {sum(summary.skipped.values())} were skipped "
                            f"({counts}); the first: {first_error.message}; {fix}")
    summary.shards = len(writer.shards)
    return summary


def iter_records(shard_dir: str | os.PathLike, limit: int | None = None) -> Iterator[RelationalRecord]:
    """Read records back in write order, without the shared-memory machinery of StreamingDataset.
    The shard files are checked against the index first; a sample that still does not decode is an
    error naming its shard file."""
    shard_dir = Path(shard_dir)
    from streaming.base.format import reader_from_json

    index = check_shards(shard_dir)
    n = 0
    for info in index["shards"]:
        try:
            shard = reader_from_json(str(shard_dir), None, info)
        except (AssertionError, KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{shard_dir / 'index.json'} describes shard {info['raw_data']['basename']} in a form "
                            f"streaming cannot read ({type(exc).__name__}: {exc}); re-convert the source",
                            info["raw_data"]["basename"], "corrupt_index") from None
        for i in range(shard.samples):
            if limit is not None and n >= limit:
                return
            try:
                record = record_from_sample(shard[i])
            except (IndexError, KeyError, TypeError, ValueError, struct.error) as exc:
                name = info["raw_data"]["basename"]
                raise DataError(f"sample {i} of shard file {shard_dir / name} does not decode ({type(exc).__name__}: "
                                f"{exc}); the shard is damaged: restore it or re-convert the source", name,
                                "corrupt_shard") from None
            yield record
            n += 1
