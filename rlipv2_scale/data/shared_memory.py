"""Remove the streaming library's shared memory left behind by dead processes on this node.

A killed job (preemption, node failure, `scancel`) leaves its `/dev/shm/NNNNNN_*` segments, and
the next job on the node then trips over them. The library's own `clean_stale_shared_memory()`
removes *every* such segment, the live ones of a neighbouring job on a shared node included; here
a segment is stale only when no live process maps or holds open any segment of its dataset (its
prefix), and only this user's are removed.

    python -m rlipv2_scale.data.shared_memory            # run by the node launcher before torchrun
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

# The library names its segments `%06d_<what>` (locals, barrier, cache_usage, ...). Matched here
# without importing it: the launcher runs this before every job start, and the import costs seconds.
_SEGMENT = re.compile(r"(\d{6})_[a-z_]+")


def segments_in_use(proc: Path = Path("/proc")) -> set[str]:
    """Names under /dev/shm that some live process maps or has open."""
    used: set[str] = set()
    for pid in proc.iterdir():
        if not pid.name.isdigit():
            continue
        try:
            for line in (pid / "maps").read_text().splitlines():
                if "/dev/shm/" in line:
                    used.add(line.rsplit("/dev/shm/", 1)[1].removesuffix(" (deleted)"))
            for fd in (pid / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("/dev/shm/"):
                    used.add(target[len("/dev/shm/"):])
        except OSError:            # the process ended meanwhile, or is not ours to read
            continue
    return used


def clean_stale(shm: Path = Path("/dev/shm"), proc: Path = Path("/proc")) -> list[str]:
    """Unlink this user's streaming segments of datasets no live process uses; returns their names."""
    if not shm.is_dir():
        return []
    # A prefix is one dataset's set of segments: while any is in use, all stay (a starting job has
    # created its `_locals` before it attaches the others, some of which may be a dead job's leftovers).
    busy = {m[1] for m in map(_SEGMENT.fullmatch, segments_in_use(proc)) if m}
    removed = []
    for path in sorted(shm.iterdir()):
        m = _SEGMENT.fullmatch(path.name)
        if not m or m[1] in busy:
            continue
        try:
            # Another user's processes may be hidden from us (hidepid, PID namespaces): never theirs.
            if path.stat().st_uid == os.getuid():
                path.unlink()
                removed.append(path.name)
        except OSError:           # removed meanwhile
            continue
    return removed


def main() -> int:
    removed = clean_stale()
    if removed:
        print(f"rlipv2: removed {len(removed)} stale shared-memory segment(s) of dead jobs", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
