"""Precision: fp16 with DeepSpeed's dynamic loss scaling in the generated config, refused on a
CPU-only run in one line; a step whose gradients overflow is skipped by DeepSpeed, counted and
reported, and the lr schedule waits for the next applied step (the toy makes the gradients of one
batch infinite with a finite loss: DeepSpeed's real skip path, which fp16 overflows take too)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlipv2_scale.train.checkpoint import gathered_state_dict, read_trainer_state
from rlipv2_scale.train.launch import deepspeed_config, merge_deepspeed

TOY = Path(__file__).with_name("train_toy.py")
GROUP_LRS = {"lr/default": 1e-2, "lr/backbone": 1e-3, "lr/text_encoder": 5e-3}


def _generated(**kw) -> dict:
    args = dict(micro_batch_size=2, grad_accum=1, world_size=1, zero_stage=2, bf16=False, grad_clip=0.1,
                zero3_persistence_threshold=0, reduce_bucket_size=1000, allgather_bucket_size=1000)
    return deepspeed_config(**{**args, **kw})


def toy(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """One rank, no launcher (the trainer makes a process group of one)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TOY.parent.parent)}
    return subprocess.run([sys.executable, str(TOY), str(run_dir), *args], env=env, capture_output=True, text=True,
                          timeout=240)


def test_fp16_config_uses_dynamic_loss_scaling():
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = _generated(fp16=True)
    assert cfg["fp16"] == {"enabled": True} and cfg["bf16"] == {"enabled": False}
    no_world = {k: v for k, v in cfg.items() if k != "train_batch_size"}
    parsed = DeepSpeedConfig(no_world).float16_config
    assert parsed.enabled and parsed.loss_scale == 0          # 0: dynamic
    # The scaler is tuned through train.deepspeed; whether fp16 is on is train.precision's to say.
    tuned = DeepSpeedConfig(merge_deepspeed(no_world, {"fp16": {"initial_scale_power": 12, "loss_scale_window": 50}}))
    assert tuned.float16_config.initial_scale_power == 12 and tuned.float16_config.loss_scale_window == 50
    assert _generated()["fp16"] == {"enabled": False}


def test_fp16_on_a_cpu_only_run_is_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = toy(tmp_path, "train.precision=fp16")
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("rlipv2: error:")]
    assert errors == ["rlipv2: error: train.precision=fp16 needs a GPU (DeepSpeed's fp16 loss scaling); use "
                      "train.precision=fp32 (or auto) on CPU"]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_an_overflowing_step_is_skipped_counted_and_the_run_goes_on(tmp_path):
    # Global batch 1 → step 2 has infinite gradients (finite loss).
    proc = toy(tmp_path, "train.max_steps=4", "optim.warmup_steps=4", "checkpoint.every_steps=1",
               "--inf-grad-batches", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rlipv2: gradient overflow at step 2: DeepSpeed skipped the update" in proc.stdout
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["overflow_steps"] for r in records] == [0, 1, 1, 1]
    assert [r["skipped_steps"] for r in records] == [0, 0, 0, 0]       # not a non-finite loss
    # Warm-up factor min((applied steps + 1) / 4, 1): the skipped step does not advance the schedule.
    for record, applied in zip(records, (1, 1, 2, 3)):
        factor = min((applied + 1) / 4, 1.0)
        assert {k: record[k] for k in GROUP_LRS} == pytest.approx({k: v * factor for k, v in GROUP_LRS.items()})
    ckpts = tmp_path / "checkpoints"
    step1, step2, step3 = (gathered_state_dict(ckpts / f"step_0000000{i}") for i in (1, 2, 3))
    assert all(torch.equal(step1[k], step2[k]) for k in step1)            # the update was skipped
    assert not all(torch.equal(step2[k], step3[k]) for k in step2)        # the next one was not
    assert read_trainer_state(ckpts / "step_00000004")["overflow_steps"] == 1
