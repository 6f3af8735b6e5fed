"""Per-rank JSON-lines outputs that an interrupted run can continue (captioning, tagging)."""
from __future__ import annotations

import json
from pathlib import Path


def rank_file(out_dir: str | Path, stem: str, rank: int) -> Path:
    return Path(out_dir) / f"{stem}.rank{rank:05d}.jsonl"


def done_ids(path: Path) -> set[str]:
    """Image ids already written; a torn last line (the run was killed mid-write) is cut off."""
    if not path.exists():
        return set()
    raw = path.read_bytes()
    keep = raw[: raw.rfind(b"\n") + 1]
    if len(keep) != len(raw):
        path.write_bytes(keep)
    return {str(json.loads(line)["image_id"]) for line in keep.splitlines() if line.strip()}


def read_rows(out_dir: str | Path, stem: str):
    """Every rank's rows, rank by rank, in write order."""
    for path in sorted(Path(out_dir).glob(f"{stem}.rank*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                yield json.loads(line)
