"""Per-rank JSON-lines outputs that an interrupted run can continue (captioning, tagging).

A run killed mid-write leaves its file's last line cut short (no newline, not JSON): a rerun drops
it with a warning and writes that image again. Any other line that does not read back as a row is
an error naming the file and line, never skipped: it would silently lose (or redo) that image.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional

from rlipv2_scale.errors import UserError

# Checks a row's stage-specific fields; returns what is wrong with it, or None.
RowCheck = Callable[[dict], Optional[str]]
STAGES = {"captions": "rlipv2 data caption", "tags": "rlipv2 data tag"}     # file stem → the command writing it


def rank_file(out_dir: str | Path, stem: str, rank: int) -> Path:
    return Path(out_dir) / f"{stem}.rank{rank:05d}.jsonl"


def _row_problem(line: bytes, check: RowCheck | None) -> str | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        return f"is not JSON ({exc.msg} at column {exc.colno})"
    except ValueError:               # bytes that are not UTF-8
        return "is not JSON (not UTF-8 text)"
    if not isinstance(row, dict):
        return "is not a JSON object"
    image_id = row.get("image_id")
    # bool is an int to Python, but never an image id
    if isinstance(image_id, bool) or not isinstance(image_id, (int, str)):
        return f"has image_id {image_id!r}: it must be the image's id from the shards (an integer or a string)"
    return check(row) if check else None


def _fail(path: Path, number: int, problem: str) -> UserError:
    command = STAGES.get(path.name.split(".rank")[0], "the command that wrote it")
    return UserError(f"'{path}' line {number} {problem}: repair or delete that line (rerunning `{command}` into "
                     f"the folder then writes its image again), or rerun `{command}` into a new --out")


def _rows(path: Path, check: RowCheck | None, repair: bool) -> list[dict]:
    """One file's rows. A torn last line is dropped with a warning, and cut off the file when
    `repair` (a rerun appends after it); a whole last row missing only its newline is kept, and
    given its newline when `repair`. The file is changed only once every other line is valid."""
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    tail = lines.pop()               # b"" when the file ends with a newline
    torn = False
    if tail.strip():
        try:
            json.loads(tail)
        except ValueError:           # a prefix of a JSON object never parses: cut short mid-write
            torn = True
        else:                        # a whole record (checked below like any other line)
            lines.append(tail)
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        problem = _row_problem(line, check)
        if problem:
            raise _fail(path, number, problem)
        rows.append(json.loads(line))
    if torn:
        print(f"rlipv2: warning: '{path}': dropping its last line, cut short when the run was killed "
              f"({tail[:60].decode(errors='replace')!r}); a rerun writes its image again",
              file=sys.stderr, flush=True)
    if repair and tail.strip():
        if torn:
            path.write_bytes(raw[: len(raw) - len(tail)])
        else:
            with path.open("ab") as f:
                f.write(b"\n")
    return rows


def done_ids(path: Path, check: RowCheck | None = None) -> set[str]:
    """Image ids already written, before a rerun appends to `path` (a torn last line is cut off)."""
    if not path.exists():
        return set()
    return {str(row["image_id"]) for row in _rows(path, check, repair=True)}


def read_rows(out_dir: str | Path, stem: str, check: RowCheck | None = None) -> Iterator[dict]:
    """Every rank's rows, rank by rank, in write order; the files are not modified."""
    for path in sorted(Path(out_dir).glob(f"{stem}.rank*.jsonl")):
        yield from _rows(path, check, repair=False)
