"""A safe output folder for the commands that write shards (`data convert`, `data pseudo-label`, the demo).

The rules: the output never equals, contains or lies inside an input; the new output is written
into a temporary sibling and moved into place only after it is complete (a failed or interrupted
run leaves the previous output as it was); and `--overwrite` removes only a previous output this
tool recognises as its own: the shard files its MDS `index.json` lists, and that index. Any other
file in the folder stays; an index listing anything but shard names directly in the folder is
refused.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rlipv2_scale.data.mds_index import INDEX, listed_files, read_index
from rlipv2_scale.errors import UserError

# MDSWriter's shard names: `shard.{n:05}.mds` (raw_data), plus a compression extension (zip_data)
SHARD_FILE = re.compile(r"shard\.\d{5,}\.mds(\.(br|bz2|gz|snappy|zstd))?")


def check_apart(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Refuse an output that is, holds or sits inside one of the inputs (writing there could
    destroy the very files being read)."""
    target = Path(out).resolve()
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        if target == source or target in source.parents:
            how = "is" if target == source else "contains"
            raise UserError(f"output folder {out} {how} the input {given}; choose an output folder outside the "
                            f"inputs")
        if source in target.parents:
            raise UserError(f"output folder {out} lies inside the input {given}; choose an output folder outside "
                            f"the inputs")


def own_files(out: Path) -> set[str]:
    """Names of the files a previous run of this tool wrote to `out`: its index and the shards that
    index lists. Shard-named files no index lists are refused: nothing here can tell whose they are."""
    try:
        own = listed_files(read_index(out)) if (out / INDEX).is_file() else set()
    except UserError as exc:
        raise UserError(f"--overwrite cannot tell which files in {out} are shards it wrote: {exc}. Remove the old "
                        f"shards yourself or choose another --out") from None
    # The names come from a file anyone can edit: only a shard name the writer gives, directly in
    # `out`, may be deleted (never `../x`, `/etc/x` or `notes.txt`).
    foreign = sorted(name for name in own - {INDEX} if not SHARD_FILE.fullmatch(name))
    if foreign:
        raise UserError(f"{out / INDEX} lists {foreign[0]!r} as a shard, which is not a shard file name this tool "
                        f"writes: the index is not one this tool wrote, and --overwrite removes nothing it lists. "
                        f"Choose another --out, or remove the old output yourself")
    strays = sorted(p.name for p in out.iterdir() if SHARD_FILE.fullmatch(p.name) and p.name not in own)
    if strays:
        raise UserError(f"--out {out} holds shard files that no index.json there lists ({', '.join(strays[:3])}); "
                        f"they were not written by a finished run of this tool: move them away or choose "
                        f"another --out")
    return own


def _writable(out: Path) -> None:
    try:
        if out.exists():
            with tempfile.TemporaryFile(dir=out):
                pass
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"--out {out}: part of this path is a file, not a folder; choose another --out") from None
    except OSError as exc:
        raise UserError(f"cannot write to --out {out}: {exc.strerror or exc}; choose a writable folder") from None


def _swap(staged: Path, out: Path, previous: set[str]) -> None:
    """Move the finished output into `out`: the old index goes first and the new one comes last, so
    that no moment shows an index naming shards that are not there."""
    if not out.exists():
        staged.rename(out)
        return
    for name in [INDEX] + sorted(previous - {INDEX}):
        (out / name).unlink(missing_ok=True)
    new = sorted(p.name for p in staged.iterdir())
    for name in [n for n in new if n != INDEX] + [n for n in new if n == INDEX]:
        os.replace(staged / name, out / name)
    staged.rmdir()


@contextmanager
def staged_output(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (),
                  overwrite: bool = False) -> Iterator[Path]:
    """Check `out`, yield an empty temporary sibling to write into, and put its contents in `out`
    when the block finishes; on any exception the temporary folder (and only it) is removed."""
    out = Path(out)
    check_apart(out, inputs)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; choose a folder")
    previous: set[str] = set()
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"output folder {out} is not empty; choose a new folder or pass --overwrite")
        previous = own_files(out)
    _writable(out)
    try:
        # Not mkdtemp: its mode 0700 would become the output folder's; mkdir applies the umask.
        staged = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staged.mkdir()
    except OSError as exc:
        raise UserError(f"cannot write beside --out {out} (in {out.parent}): {exc.strerror or exc}; choose a "
                        f"folder whose parent is writable") from None
    try:
        yield staged
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    try:
        _swap(staged, out, previous)
    except OSError as exc:
        raise UserError(f"could not move the finished output from {staged} into {out}: {exc.strerror or exc}; "
                        f"the output is complete in {staged}") from None
