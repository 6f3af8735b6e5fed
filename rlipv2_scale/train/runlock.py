"""One run per run directory: an exclusive `flock` on `RUN_DIR/run.lock`, holding "host pid time".

The kernel drops a `flock` when its holder dies, however it dies, so a lock is never stale in the
kernel's eyes; the holder line left in the file by a process that was killed is reported when the
next run takes the lock over. The file is emptied on release, never deleted: a process that opened
it just before a deletion would lock an orphaned inode beside a third process locking a new file.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
import time
from pathlib import Path

from rlipv2_scale.errors import UserError

LOCK_FILE = "run.lock"
# Set by `spawn_local` for its ranks: the launcher holds the lock for them.
HELD_ENV = "RLIPV2_RUN_LOCK_HELD"


class RunLock:
    """`with RunLock(run_dir):` - the run directory is this process's until the block ends."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise UserError(f"run directory '{self.path.parent}' is in use by another run ({_describe(holder)}): "
                                f"wait for it to end or stop it, or give this run another run.dir") from None
            # A filesystem without locks (some network mounts): run, but say that nothing guards it.
            print(f"rlipv2: warning: cannot lock '{self.path}' ({exc.strerror}); make sure no other run uses "
                  f"this run directory", file=sys.stderr, flush=True)
            return
        previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if previous:
            print(f"rlipv2: taking over the run-directory lock of a run that is gone ({_describe(previous)})",
                  file=sys.stderr, flush=True)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{socket.gethostname()} {os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n"
                  .encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)   # a clean end leaves no holder to report
            os.close(self._fd)          # closing drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(holder: str) -> str:
    parts = holder.split()
    if len(parts) == 3:
        return f"host {parts[0]}, pid {parts[1]}, since {parts[2]}"
    return f"holder '{holder}'"
