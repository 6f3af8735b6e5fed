"""`train.deepspeed` pass-through (merged into the generated DeepSpeed config, checked against what
the recipe decides and against DeepSpeed's own parser), ZeRO-3 with CPU offload on 2 CPU ranks, and
launching through `accelerate launch` (Accelerate takes the ranks from the process group)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlipv2_scale.errors import ConfigError
from rlipv2_scale.train.checkpoint import gathered_state_dict, read_trainer_state
from rlipv2_scale.train.launch import deepspeed_config, merge_deepspeed

TOY = Path(__file__).with_name("train_toy.py")
OFFLOAD = {"zero_optimization": {"offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}}


def _generated(zero_stage: int = 3) -> dict:
    return deepspeed_config(micro_batch_size=2, grad_accum=1, world_size=1, zero_stage=zero_stage, bf16=False,
                            grad_clip=0.1, zero3_persistence_threshold=0, reduce_bucket_size=1000,
                            allgather_bucket_size=1000)


def test_pass_through_merges_key_by_key():
    merged = merge_deepspeed(_generated(), {**OFFLOAD, "wall_clock_breakdown": True,
                                            "zero_optimization": {**OFFLOAD["zero_optimization"], "stage": 3}})
    zero = merged["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu"} and zero["offload_param"] == {"device": "cpu"}
    assert zero["stage"] == 3 and zero["reduce_bucket_size"] == 1000      # the recipe's keys stay
    assert merged["wall_clock_breakdown"] is True and merged["gradient_clipping"] == 0.1


@pytest.mark.parametrize("extra, names", [
    ({"zero_optimization": {"stage": 2}}, ["train.deepspeed.zero_optimization.stage=2", "train.zero_stage"]),
    ({"gradient_accumulation_steps": 4}, ["train.deepspeed.gradient_accumulation_steps=4", "train.grad_accum"]),
    ({"bf16": {"enabled": True}}, ["train.deepspeed.bf16.enabled=True", "train.precision"]),
    ({"optimizer": {"type": "Adam"}}, ["train.deepspeed.optimizer=", "optim.*"]),
    ({"zero_optimization": {"stage3_param_persistence_threshold": 5}},
     ["train.deepspeed.zero_optimization.stage3_param_persistence_threshold=5", "train.zero3_persistence_threshold"]),
])
def test_a_conflict_with_the_recipe_names_both_keys(extra, names):
    with pytest.raises(ConfigError) as err:
        merge_deepspeed(_generated(), extra)
    message = str(err.value)
    assert "\n" not in message and all(name in message for name in names), message


@pytest.mark.parametrize("extra, names", [
    ({"zero_optimisation": {"stage": 3}}, ["unknown DeepSpeed key", "zero_optimisation"]),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu", "pin_memroy": True}}},
     ["DeepSpeedZeroConfig", "offload_optimizer.pin_memroy"]),
    ({"fp16": {"initial_scale_powr": 8}}, ["initial_scale_powr"]),
])
def test_an_unknown_deepspeed_key_is_one_line(extra, names):
    with pytest.raises(ConfigError) as err:
        merge_deepspeed(_generated(), extra)
    message = str(err.value)
    assert "\n" not in message and all(name in message for name in names), message


def test_the_recipe_key_reaches_the_config():
    from rlipv2_scale.config import parse_overrides

    from train_toy import toy_config

    cfg = toy_config("unused", parse_overrides(["train.deepspeed.zero_optimization.offload_optimizer.device=cpu"]))
    assert cfg.train.deepspeed == {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TOY.parent.parent), **extra}


def torchrun(run_dir: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_port()), str(TOY), str(run_dir), *args]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_with_cpu_offload_on_two_ranks(tmp_path):
    """Optimizer and parameters offloaded to the CPU train the same steps as plain ZeRO-3."""
    args = ("train.zero_stage=3", "train.max_steps=2", "checkpoint.every_steps=2")
    torchrun(tmp_path / "offload", *args, "train.deepspeed.zero_optimization.offload_optimizer.device=cpu",
             "train.deepspeed.zero_optimization.offload_param.device=cpu")
    torchrun(tmp_path / "plain", *args)
    ckpt = tmp_path / "offload" / "checkpoints" / "step_00000002"
    states = sorted((ckpt / "pytorch_model").glob("zero_pp_rank_*_model_states.pt"))
    assert len(states) == 2 and read_trainer_state(ckpt)["world_size"] == 2
    zero = torch.load(states[0], map_location="cpu", weights_only=False)["ds_config"]["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert losses(tmp_path / "offload") == pytest.approx(losses(tmp_path / "plain"), rel=1e-5)
    plain = gathered_state_dict(tmp_path / "plain" / "checkpoints" / "step_00000002")
    for k, v in gathered_state_dict(ckpt).items():
        assert torch.allclose(v, plain[k], atol=1e-6), k


@pytest.mark.slow
@pytest.mark.distributed
def test_accelerate_launch_starts_real_ranks(tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(_port()), str(TOY), str(tmp_path), "train.max_steps=2", "checkpoint.every_steps=2"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = tmp_path / "checkpoints" / "step_00000002"
    assert read_trainer_state(ckpt)["world_size"] == 2
    assert len(list((ckpt / "pytorch_model").glob("*zero_pp_rank_*_optim_states.pt"))) == 2   # ZeRO-2 over 2


def test_an_accelerate_launch_setting_the_recipe_owns_is_one_line(tmp_path):
    """As `accelerate launch --use_deepspeed --zero_stage 3` would export it (no launcher needed)."""
    proc = subprocess.run([sys.executable, str(TOY), str(tmp_path)], capture_output=True, text=True, timeout=240,
                          env=_env(ACCELERATE_DEEPSPEED_ZERO_STAGE="3", ACCELERATE_MIXED_PRECISION="bf16"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("rlipv2: error:")]
    assert len(errors) == 1 and "--zero_stage" in errors[0] and "train.zero_stage" in errors[0], proc.stderr[-2000:]
    assert "--mixed_precision" in errors[0] and "train.precision" in errors[0]
    assert "Traceback" not in proc.stderr
