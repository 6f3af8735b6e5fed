"""An MDS shard folder's `index.json`: read it, name the files it lists, check those files are whole.

A truncated or missing shard file otherwise surfaces deep inside mosaicml-streaming as an
IndexError on some sample, mid-epoch; checking each file's size against the index when the
folder is opened names the file at once. Sizes only: hashing every shard on every rank at start
would read the whole dataset.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rlipv2_scale.errors import DataError, UserError

INDEX = "index.json"


def read_index(shard_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed index; a missing, unreadable or malformed one is one error naming the file."""
    path = Path(shard_dir) / INDEX
    if not path.is_file():
        raise UserError(f"{shard_dir} holds no MDS index ({INDEX}); write shards with `rlipv2 data convert`")
    try:
        index = json.loads(path.read_bytes())
        for info in index["shards"]:
            if not (isinstance(info["raw_data"]["basename"], str) and isinstance(info["raw_data"]["bytes"], int)
                    and isinstance(info["samples"], int)):
                raise TypeError("a shard entry lacks raw_data.basename, raw_data.bytes or samples")
    except (ValueError, KeyError, TypeError) as exc:   # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DataError(f"{path} is not a valid MDS index ({type(exc).__name__}: {exc}); re-create the shards "
                        f"with `rlipv2 data convert`", str(path), "corrupt_index") from None
    return index


def listed_files(index: dict[str, Any]) -> set[str]:
    """The file names an index lists (shards, plain and compressed), and the index itself."""
    return {INDEX} | {name for info in index["shards"]
                      for name in (info["raw_data"]["basename"], (info.get("zip_data") or {}).get("basename"))
                      if name}


def check_shards(shard_dir: str | os.PathLike) -> dict[str, Any]:
    """`read_index`, and every shard file there with the size the index records."""
    shard_dir = Path(shard_dir)
    index = read_index(shard_dir)
    for info in index["shards"]:
        candidates = [info["raw_data"]] + ([info["zip_data"]] if info.get("zip_data") else [])
        present = [(shard_dir / c["basename"], c["bytes"]) for c in candidates if (shard_dir / c["basename"]).is_file()]
        if not present:
            raise DataError(f"shard file '{shard_dir / info['raw_data']['basename']}' is missing (listed in "
                            f"'{shard_dir / INDEX}'); restore it or re-convert the source",
                            info["raw_data"]["basename"], "missing_shard")
        path, expected = present[0]
        size = path.stat().st_size
        if size != expected:
            raise DataError(f"shard file '{path}' has {size} bytes, but '{shard_dir / INDEX}' records {expected}: "
                            f"it is truncated or damaged; restore it or re-convert the source", path.name,
                            "corrupt_shard")
    return index
