"""Checkpoint directory mechanics: atomic commit, keep-last-K, `latest`, resume lookup, a kill
during a save leaving the previous checkpoint whole."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlipv2_scale.errors import UserError
from rlipv2_scale.train.checkpoint import TRAINER_STATE, CheckpointManager, resolve_resume


def fake_save(manager: CheckpointManager, step: int, payload: bytes = b"x", known_good: int | None = None) -> Path:
    tmp = manager.begin(step)
    (tmp / "weights.bin").write_bytes(payload)
    (tmp / TRAINER_STATE).write_text(json.dumps({"step": step}))
    return manager.commit(step, known_good)


def test_commit_keeps_last_k_and_moves_latest(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=2)
    assert m.latest() is None and resolve_resume("auto", tmp_path) is None
    for step in (10, 20, 30):
        final = fake_save(m, step)
        assert m.latest() == final and (tmp_path / "checkpoints" / "latest").read_text().strip() == final.name
    assert m.steps() == [20, 30]
    assert not any(p.name.startswith(".tmp") for p in m.root.iterdir())
    assert resolve_resume("auto", tmp_path) == m.final_dir(30)
    assert resolve_resume(str(m.final_dir(20)), tmp_path) == m.final_dir(20)
    assert resolve_resume(str(tmp_path), tmp_path / "elsewhere") == m.final_dir(30)
    with pytest.raises(UserError, match="no complete checkpoint"):
        resolve_resume(str(tmp_path / "nothing"), tmp_path)


def test_pruning_keeps_the_newest_checkpoint_known_to_give_a_finite_loss(tmp_path):
    """keep_last=1: a save's weights are untried until the next step, so the one before it stays
    until a later save is known good; a diverging run then still has a checkpoint to resume."""
    m = CheckpointManager(tmp_path, keep_last=1)
    fake_save(m, 2, known_good=1)
    fake_save(m, 4, known_good=3)
    assert m.steps() == [2, 4] and m.latest() == m.final_dir(4)
    fake_save(m, 6, known_good=5)
    assert m.steps() == [4, 6]                       # 4 is now known good: 2 goes
    fake_save(m, 8, known_good=8)                    # a finished run's last save
    assert m.steps() == [8]
    m2 = CheckpointManager(tmp_path / "b", keep_last=1)
    fake_save(m2, 2, known_good=1)
    fake_save(m2, 4, known_good=3)
    m2.begin(5)
    (m2.tmp_dir(5) / TRAINER_STATE).write_text(json.dumps({"step": 5}))
    m2.commit_diverged(5, good_step=3)               # step 4's weights gave no finite loss
    assert m2.steps() == [2] and m2.latest() == m2.final_dir(2)


def test_saving_a_step_again_keeps_the_complete_one(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=3)
    fake_save(m, 5, b"first")
    fake_save(m, 5, b"second")
    assert (m.final_dir(5) / "weights.bin").read_bytes() == b"first" and not m.tmp_dir(5).exists()


def test_latest_falls_back_when_the_pointer_names_a_missing_checkpoint(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=3)
    fake_save(m, 1)
    fake_save(m, 2)
    (m.root / "latest").write_text("step_00000099\n")
    assert m.latest() == m.final_dir(2)


_KILLED_SAVE = """
import sys, time
from pathlib import Path
from rlipv2_scale.train.checkpoint import CheckpointManager
m = CheckpointManager(sys.argv[1], keep_last=1)
tmp = m.begin(2)
with open(tmp / "weights.bin", "wb") as f:
    f.write(b"partial")
    f.flush()
    Path(sys.argv[2]).touch()          # tell the test we are mid-save
    time.sleep(60)
m.commit(2)
"""


def test_kill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=1)
    previous = fake_save(m, 1, b"complete")
    flag = tmp_path / "mid-save"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(tmp_path), str(flag)])
    deadline = time.time() + 60
    while not flag.exists() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert flag.exists() and m.tmp_dir(2).exists()           # it really died half-way
    assert resolve_resume("auto", tmp_path) == previous
    assert (previous / "weights.bin").read_bytes() == b"complete"
    universal = m.root / ".tmp-universal-step_00000001" / "pytorch_model"   # a resharding cut short
    universal.mkdir(parents=True)
    (m.root / "mine").mkdir()                                # not the trainer's: kept
    m.clean_stale()                                          # what the next run does first
    assert not m.tmp_dir(2).exists() and m.steps() == [1]
    assert not universal.parent.exists() and (m.root / "mine").is_dir()


def test_deepspeed_reads_resumed_files_weights_only(tmp_path):
    """DeepSpeed's own readers (`torch.load(..., weights_only=False)`) get the weights-only load
    while a run resumes: a file pickling anything beyond tensors and DeepSpeed's classes is
    refused with the fix, and the readers see the real torch again afterwards."""
    import argparse

    import torch
    from deepspeed.runtime.checkpoint_engine import torch_checkpoint_engine
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    from rlipv2_scale.train.checkpoint import NOT_OURS, deepspeed_reads_weights_only

    ours, foreign = tmp_path / "ours.pt", tmp_path / "foreign.pt"
    torch.save({"module": {"w": torch.ones(2)}, "loss_scaler": LossScaler(1.0)}, ours)
    torch.save({"module": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1.0)}, foreign)
    engine = TorchCheckpointEngine()
    with deepspeed_reads_weights_only(hint=NOT_OURS):
        state = engine.load(str(ours), map_location="cpu")
        assert torch.equal(state["module"]["w"], torch.ones(2))
        with pytest.raises(UserError, match=r"argparse\.Namespace.*not written by `rlipv2 train`"):
            engine.load(str(foreign), map_location="cpu")
    assert torch_checkpoint_engine.torch is torch
    assert engine.load(str(foreign), map_location="cpu")["args"].lr == 1.0    # DeepSpeed's own load, outside
