"""The training loader's shared-memory clean-up is safe on a shared node: it removes a killed job's
streaming segments and never those of a job still running beside it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_streaming import data_config, write_source

from rlipv2_scale.data.shared_memory import clean_stale

SHM = Path("/dev/shm")

# A job running beside ours: a plain StreamingDataset, which names and creates its segments itself.
# Prints the segments it maps, then stays alive until its stdin closes.
LIVE_JOB = """
import json, sys
from streaming import StreamingDataset
ds = StreamingDataset(local=sys.argv[1], batch_size=1)
print(json.dumps(sorted({l.split("/dev/shm/", 1)[1].strip() for l in open("/proc/self/maps") if "/dev/shm/" in l})),
      flush=True)
sys.stdin.read()
"""
# A job that was killed: its segments stay behind (no atexit, its resource tracker killed with it).
KILLED_JOB = """
import sys
from multiprocessing import resource_tracker, shared_memory
for name in sys.argv[1:]:
    resource_tracker.unregister(shared_memory.SharedMemory(name, create=True, size=64)._name, "shared_memory")
"""


@pytest.mark.skipif(not SHM.is_dir() or not Path("/proc/self/maps").exists(), reason="needs Linux /dev/shm and /proc")
def test_loader_clean_up_keeps_a_live_jobs_segments_and_removes_a_killed_ones(tmp_path, monkeypatch):
    import rlipv2_scale.data.streaming as loader_module

    shards = write_source(tmp_path, "vg", 4)
    live = subprocess.Popen([sys.executable, "-c", LIVE_JOB, shards], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    prefix = f"{900_000 + os.getpid() % 99_999:06}"     # far above the prefixes streaming hands out here
    stale = [f"{prefix}_{what}" for what in ("locals", "barrier", "shard_states")]
    try:
        subprocess.run([sys.executable, "-c", KILLED_JOB, *stale], check=True, timeout=60)
        assert all((SHM / n).exists() for n in stale)
        held = json.loads(live.stdout.readline() or "[]")
        assert held and all((SHM / n).exists() for n in held)

        monkeypatch.setattr(loader_module, "_CLEANED", False)
        loader_module.build_train_loader(data_config([{"name": "vg", "local": shards}]))   # default clean-up

        assert [n for n in held if not (SHM / n).exists()] == []    # the running job's are all there
        assert [n for n in stale if (SHM / n).exists()] == []       # the killed job's are gone
    finally:
        live.stdin.close()                                          # it exits and unlinks its own
        live.wait(timeout=60)
        for name in stale:
            (SHM / name).unlink(missing_ok=True)


def _fake_node(tmp_path: Path, names: list[str], mapped: str) -> tuple[Path, Path]:
    shm, proc = tmp_path / "shm", tmp_path / "proc"
    shm.mkdir()
    for name in names:
        (shm / name).write_bytes(b"x")
    (proc / "4242" / "fd").mkdir(parents=True)
    (proc / "4242" / "maps").write_text(f"7f00-7f01 rw-s 00000000 00:1a 12 /dev/shm/{mapped}\n")
    return shm, proc


def test_a_dataset_in_use_keeps_all_its_segments(tmp_path):
    # A starting job has created its `_locals` but not yet attached its barrier: the barrier stays.
    shm, proc = _fake_node(tmp_path, ["000003_locals", "000003_barrier", "000004_barrier"], "000003_locals")
    assert clean_stale(shm, proc) == ["000004_barrier"]
    assert sorted(p.name for p in shm.iterdir()) == ["000003_barrier", "000003_locals"]


def test_another_users_segments_are_never_removed(tmp_path, monkeypatch):
    # Their processes may be invisible here (hidepid, another PID namespace): unused-looking is not enough.
    shm, proc = _fake_node(tmp_path, ["000000_locals", "000000_barrier"], "unrelated")
    monkeypatch.setattr(os, "getuid", lambda: os.stat(shm).st_uid + 1)
    assert clean_stale(shm, proc) == []
    assert len(list(shm.iterdir())) == 2
