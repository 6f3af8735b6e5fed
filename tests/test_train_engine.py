"""The trainer on 2 CPU ranks (torchrun, gloo, DeepSpeed's CPU accelerator): exact resume under
ZeRO-2 and ZeRO-3, SIGTERM → checkpoint → resume, per-group lrs under ZeRO 1/2/3, non-finite
losses, export of gathered ZeRO shards. The model is `tests/train_toy.py` (engine mechanics only;
the real model's recipe run is in test_train_recipes.py)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlipv2_scale.errors import UserError
from rlipv2_scale.models.artifacts import load_state
from rlipv2_scale.train.checkpoint import CheckpointManager, gathered_state_dict, read_trainer_state
from rlipv2_scale.train.launch import EXIT_PREEMPTED

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TOY = Path(__file__).with_name("train_toy.py")
# toy_config: lr 1e-2, backbone 1e-3, text_encoder 5e-3; step schedule ×0.1 at epoch 15 (never reached).
GROUP_LRS = {"lr/default": 1e-2, "lr/backbone": 1e-3, "lr/text_encoder": 5e-3}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(run_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(_port()), str(TOY), str(run_dir), *args]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TOY.parent.parent)}


def launch(run_dir: Path, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(_cmd(run_dir, *args), env=_env(), capture_output=True, text=True, timeout=240)
    if expect == 0:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_same_params(a: Path, b: Path) -> dict[str, torch.Tensor]:
    sa, sb = gathered_state_dict(a), gathered_state_dict(b)
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    return sa


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, Path]:
    """One uninterrupted 6-step run per ZeRO stage (checkpoints at 3 and 6)."""
    runs = {}
    for stage in (2, 3):
        run_dir = tmp_path_factory.mktemp(f"ref{stage}")
        launch(run_dir, f"train.zero_stage={stage}")
        runs[stage] = run_dir
    return runs


@pytest.mark.parametrize("stage", [2, 3])
def test_reference_runs_partition_and_keep_group_lrs(reference, stage):
    ref = reference[stage]
    ref_m = metrics(ref)
    assert [r["step"] for r in ref_m] == [1, 2, 3, 4, 5, 6]
    assert len({r["loss"] for r in ref_m}) == 6        # the steps did differ from each other
    # Per-group lrs read back from the DeepSpeed optimizer after it wrapped the groups.
    for record in ref_m:
        assert {k: record[k] for k in GROUP_LRS} == GROUP_LRS
    # ZeRO partitions: one optimizer shard per rank (and, under ZeRO-3, one parameter shard per rank).
    ds = ref / "checkpoints" / "step_00000006" / "pytorch_model"
    assert len(list(ds.glob("*zero_pp_rank_*_optim_states.pt"))) == 2
    assert len(list(ds.glob("zero_pp_rank_*_model_states.pt"))) == (2 if stage == 3 else 0)
    state = read_trainer_state(ref / "checkpoints" / "step_00000006")
    assert state["step"] == 6 and state["samples"] == 6 * 2 * 2 and state["world_size"] == 2
    assert (ref / "COMPLETED").is_file() and (ref / "config.yaml").is_file()


def test_exact_resume_two_ranks_zero3(reference, tmp_path):
    """3 steps + (process gone) + resume + 3 steps == 6 steps: losses and parameters bit for bit.
    (ZeRO-2 is covered the same way, after a real SIGTERM, by the next test.)"""
    ref = reference[3]
    launch(tmp_path, "train.zero_stage=3", "--resume", str(ref / "checkpoints" / "step_00000003"))
    ref_m, res_m = metrics(ref), metrics(tmp_path)
    assert [r["step"] for r in res_m] == [4, 5, 6]
    for key in ("loss", "loss_bbox", "loss_ce", "loss_rel", "grad_norm"):
        assert [r[key] for r in res_m] == [r[key] for r in ref_m[3:]], key
    assert_same_params(ref / "checkpoints" / "step_00000006", tmp_path / "checkpoints" / "step_00000006")


def test_sigterm_checkpoints_and_resumes_exactly(reference, tmp_path):
    """`--nproc 2` launcher (spawn_local) gets SIGTERM mid-run → each rank checkpoints at the next
    step boundary, PREEMPTED, exit code 75; `--resume auto` finishes the run with the same losses
    and weights as the uninterrupted one, no step logged twice."""
    args = ("train.zero_stage=2", "checkpoint.every_steps=100")
    code = ("import sys\nfrom pathlib import Path\nfrom rlipv2_scale.train.launch import spawn_local\n"
            f"sys.exit(spawn_local(2, sys.argv[1:], Path({str(tmp_path)!r}), entry=({str(TOY)!r},)))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), *args, "--delay", "0.3"], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not (tmp_path / "metrics.jsonl").is_file():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, out[-3000:]
    marker = json.loads((tmp_path / "PREEMPTED").read_text())
    stopped = marker["step"]
    assert 1 <= stopped < 6, out[-3000:]
    assert f"stop signal received: checkpointed step {stopped}" in out
    assert CheckpointManager(tmp_path).latest().name == f"step_{stopped:08d}"
    assert not (tmp_path / "COMPLETED").exists()

    launch(tmp_path, *args, "--resume", "auto")
    ref_m, got = metrics(reference[2]), metrics(tmp_path)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]     # none lost, none twice
    for key in ("loss", "loss_bbox", "loss_ce", "loss_rel", "grad_norm", "samples"):
        assert [r[key] for r in got] == [r[key] for r in ref_m], key
    assert_same_params(reference[2] / "checkpoints" / "step_00000006", tmp_path / "checkpoints" / "step_00000006")
    assert not (tmp_path / "PREEMPTED").exists() and (tmp_path / "COMPLETED").is_file()


def test_a_signal_during_start_up_is_not_lost(tmp_path):
    """SLURM sends its time-limit warning once; arriving while the run builds its parts, it still
    makes the run checkpoint at the first step boundary and stop (PREEMPTED) instead of killing it."""
    proc = launch(tmp_path, "--signal-in-build", expect=EXIT_PREEMPTED)
    assert proc.returncode != 0
    assert json.loads((tmp_path / "PREEMPTED").read_text())["step"] == 1, proc.stderr[-3000:]
    assert [r["step"] for r in metrics(tmp_path)] == [1]
    assert CheckpointManager(tmp_path).latest().name == "step_00000001"


def test_gathered_zero3_shards_load_strictly_into_a_fresh_model(reference, capfd):
    from train_toy import ToyRelModel

    ckpt = reference[3] / "checkpoints" / "step_00000006"
    capfd.readouterr()
    exported = gathered_state_dict(ckpt)
    out, err = capfd.readouterr()
    assert out == "" and "Processing zero checkpoint" in err   # DeepSpeed's chatter off the command's stdout
    fresh = ToyRelModel()
    load_state(fresh, exported, str(ckpt))
    assert "frozen.weight" in exported and "calls" in exported          # frozen params and buffers too
    assert not torch.equal(fresh.box_head.weight, ToyRelModel().box_head.weight)
    zero2 = gathered_state_dict(reference[2] / "checkpoints" / "step_00000006")
    for k, v in exported.items():       # ZeRO-3 and ZeRO-2 runs trained the same weights
        assert torch.allclose(v, zero2[k], atol=1e-6), k
    with pytest.raises(UserError, match="does not fit the model"):
        load_state(ToyRelModel(width=8), exported, str(ckpt))


def test_zero1_group_lrs_and_nonfinite_losses(tmp_path):
    """ZeRO-1 keeps the per-group lrs; a NaN batch is skipped and counted; 3 in a row stop the run
    with its state set aside and a message naming the cause."""
    proc = launch(tmp_path, "train.zero_stage=1", "train.max_nonfinite_in_row=3", "train.max_steps=20",
                  "optim.warmup_steps=4", "--nan-batches", "2,6,7,8", expect=2)
    assert proc.returncode != 0
    assert "3 non-finite losses in a row" in proc.stderr + proc.stdout
    got = metrics(tmp_path)
    # Global batches 0,1 → steps 1,2; batch 2 skipped; 3,4,5 → steps 3..5; 6,7,8 skipped → stop.
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    assert [r["skipped_steps"] for r in got] == [0, 0, 1, 1, 1]
    assert all(math_isfinite(r["loss"]) for r in got)
    # The schedule advances once per optimizer step on every rank (not once per process, not on
    # skipped steps): after k steps the warm-up factor is min((k + 1) / 4, 1).
    for record in got:
        factor = min((record["step"] + 1) / 4, 1.0)
        assert {k: record[k] for k in GROUP_LRS} == pytest.approx({k: v * factor for k, v in GROUP_LRS.items()})
    # The weights of step 5 gave no finite loss: set aside; `latest` is step 3 (step 4's loss came from it).
    state = read_trainer_state(tmp_path / "checkpoints" / "diverged-step_00000005")
    assert state["step"] == 5 and state["skipped_steps"] == 4
    assert CheckpointManager(tmp_path).latest().name == "step_00000003"


def math_isfinite(x: float) -> bool:
    return x == x and abs(x) != float("inf")
