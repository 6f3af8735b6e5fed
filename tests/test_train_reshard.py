"""Resume on another number of ranks: a run checkpointed mid-epoch on 2 ranks continues on 1, and
that one's mid-epoch checkpoint on 2 again (ZeRO partitions through DeepSpeed's universal
checkpoint; the real streaming loader, whose sample order does not depend on the rank count).
The toy model and the synthetic images make a sample's loss independent of its batch-mates, so the
resharded parts must train the very steps of the uninterrupted 2-rank run."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlipv2_scale.train.checkpoint import gathered_state_dict, read_trainer_state

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TOY = Path(__file__).with_name("train_toy.py")
IMAGES = 32            # one epoch = 8 steps of 4 samples


def launch(nproc: int, run_dir: Path, shards: Path, *overrides: str, resume: Path | None = None,
           expect: int = 0) -> subprocess.CompletedProcess:
    """`nproc` ranks under torchrun; one rank in a plain process (the trainer makes a group of one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                "--master_port", str(port)] if nproc > 1 else []
    cmd = [sys.executable, *launcher, str(TOY), str(run_dir), "train.max_steps=8", "checkpoint.every_steps=2",
           *overrides, "--dropout", "0", "--shards", str(shards), *(["--resume", str(resume)] if resume else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TOY.parent.parent)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if expect == 0:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def steps(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def seen(run_dir: Path, first_step: int) -> dict[int, set[str]]:
    """Step → the sample ids every rank trained on in it (one line per rank and step, gas 1)."""
    out: dict[int, set[str]] = {}
    for path in run_dir.glob("seen_rank*.jsonl"):
        for i, line in enumerate(path.read_text().splitlines()):
            out.setdefault(first_step + i, set()).update(json.loads(line))
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from rlipv2_scale.data.convert import convert
    from rlipv2_scale.data.synthetic import write_split

    root = tmp_path_factory.mktemp("data")
    write_split(root / "raw", IMAGES, seed=0, split="train", size=64)
    convert("vg", root / "raw" / "scene_graphs.json", root / "raw", root / "shards", progress=False)
    return root / "shards"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shards) -> Path:
    """The uninterrupted epoch on 2 ranks x 2 samples."""
    run_dir = tmp_path_factory.mktemp("ref")
    launch(2, run_dir, shards)
    return run_dir


@pytest.fixture(scope="module")
def on_one_rank(tmp_path_factory, shards, reference) -> Path:
    """Steps 3-4 on 1 rank x 4 samples, from the 2-rank checkpoint of step 2."""
    run_dir = tmp_path_factory.mktemp("one")
    launch(1, run_dir, shards, "train.max_steps=4", "data.batch_size=4",
           resume=reference / "checkpoints" / "step_00000002")
    return run_dir


def assert_same_steps(run: Path, reference: Path, numbers: list[int]) -> None:
    got, ref = steps(run), steps(reference)
    assert sorted(got) == numbers
    for n in numbers:   # same samples, same weights and optimizer state before the step: same losses
        assert got[n]["samples"] == ref[n]["samples"]
        for key in ("loss", "loss_bbox", "loss_ce", "loss_rel", "grad_norm"):   # no grad_norm under stage 0
            expected = ref[n][key] if ref[n][key] is None else pytest.approx(ref[n][key], rel=1e-5, abs=1e-6)
            assert got[n][key] == expected, (n, key)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = gathered_state_dict(a), gathered_state_dict(b)
    assert sorted(wa) == sorted(wb)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k


def test_two_ranks_continue_on_one(reference, on_one_rank):
    assert_same_steps(on_one_rank, reference, [3, 4])
    # Adam's moments came along: without them steps 3-4 would move the weights elsewhere.
    assert_same_weights(on_one_rank / "checkpoints" / "step_00000004", reference / "checkpoints" / "step_00000004")
    assert seen(on_one_rank, 3) == {n: s for n, s in seen(reference, 1).items() if n in (3, 4)}
    state = read_trainer_state(on_one_rank / "checkpoints" / "step_00000004")
    assert state["world_size"] == 1 and state["step"] == 4 and state["samples"] == 16
    assert [p.name for p in (on_one_rank / "checkpoints").iterdir() if p.name.startswith(".")] == []


def test_one_rank_continues_on_two_and_the_epoch_is_seen_once(shards, reference, on_one_rank, tmp_path):
    launch(2, tmp_path, shards, resume=on_one_rank / "checkpoints" / "step_00000004")
    assert_same_steps(tmp_path, reference, [5, 6, 7, 8])
    assert_same_weights(tmp_path / "checkpoints" / "step_00000008", reference / "checkpoints" / "step_00000008")
    parts = {**{n: s for n, s in seen(reference, 1).items() if n <= 2}, **seen(on_one_rank, 3), **seen(tmp_path, 5)}
    assert sorted(parts) == list(range(1, 9)) and all(len(s) == 4 for s in parts.values())
    ids = [i for s in parts.values() for i in s]
    assert len(ids) == IMAGES and len(set(ids)) == IMAGES          # every sample of the epoch, once


def test_a_global_batch_that_cannot_be_kept_is_one_line(shards, reference, tmp_path):
    proc = launch(1, tmp_path, shards, resume=reference / "checkpoints" / "step_00000002", expect=2)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("rlipv2: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "trained on 2 ranks with 4 samples per optimizer step" in errors[0]
    assert "set data.batch_size x train.grad_accum to 4 (now 2 x 1)" in errors[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("stage", [0, 3])
def test_other_zero_stages_continue_on_one_rank(shards, tmp_path, stage):
    """ZeRO-3 partitions parameters too (per-group lrs and Adam's step must survive DeepSpeed's
    universal load); stage 0 stores the model and optimizer whole (no conversion)."""
    launch(2, tmp_path / "ref", shards, f"train.zero_stage={stage}", "train.max_steps=4")
    launch(1, tmp_path / "one", shards, f"train.zero_stage={stage}", "train.max_steps=4", "data.batch_size=4",
           resume=tmp_path / "ref" / "checkpoints" / "step_00000002")
    assert_same_steps(tmp_path / "one", tmp_path / "ref", [3, 4])
    got, ref = steps(tmp_path / "one"), steps(tmp_path / "ref")
    assert {k: v for k, v in got[4].items() if k.startswith("lr/")} == {k: v for k, v in ref[4].items()
                                                                        if k.startswith("lr/")}
    assert_same_weights(tmp_path / "one" / "checkpoints" / "step_00000004",
                        tmp_path / "ref" / "checkpoints" / "step_00000004")
