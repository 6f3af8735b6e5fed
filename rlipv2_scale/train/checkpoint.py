"""Checkpoints: atomic save, keep-last-K, a `latest` pointer, resume lookup, export to safetensors.

Layout of a run directory::

    checkpoints/step_00001000/      one checkpoint (Accelerate `save_state` + ours)
        pytorch_model/              DeepSpeed: module, optimizer partitions of every rank
        random_states_<rank>.pkl    python / numpy / torch RNG of every rank (Accelerate)
        loader_rank<rank>.pt        streaming loader state of every rank
        trainer.json                step, epoch, samples, skipped steps, wandb run id
        scheduler.pt                lr schedule state
        config.yaml                 the resolved run config (export builds the model from it)
    checkpoints/latest              name of the newest complete checkpoint

Every rank writes into `checkpoints/.tmp-step_XXXXXXXX/`; after a barrier rank 0 renames it into
place and then replaces `latest` (both atomic on POSIX). A kill at any moment leaves either the
old or the new checkpoint complete, never a half-written one under a final name.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlipv2_scale.errors import UserError

_STEP_DIR = re.compile(r"^step_(\d{8,})$")
TRAINER_STATE = "trainer.json"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


class CheckpointManager:
    """Names, commits, prunes and finds the checkpoints of one run directory."""

    def __init__(self, run_dir: str | Path, keep_last: int = 3):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def tmp_dir(self, step: int) -> Path:
        return self.root / f".tmp-{step_dir_name(step)}"

    def final_dir(self, step: int) -> Path:
        return self.root / step_dir_name(step)

    def begin(self, step: int) -> Path:
        """The temporary directory a save of `step` writes into (call on rank 0 before the barrier)."""
        tmp = self.tmp_dir(step)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, step: int) -> Path:
        """Rank 0, after every rank has written: rename into place, move `latest`, prune."""
        final = self.final_dir(step)
        if final.exists():
            # Saved before (a run resumed from an earlier checkpoint re-reaches it): exact resume
            # makes the two identical, and the complete one on disk is never taken away.
            shutil.rmtree(self.tmp_dir(step))
        else:
            os.replace(self.tmp_dir(step), final)
        pointer = self.root / "latest.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, self.root / "latest")
        self.prune()
        return final

    def steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir())

    def prune(self) -> None:
        for step in self.steps()[:-self.keep_last]:
            shutil.rmtree(self.final_dir(step), ignore_errors=True)

    def clean_stale(self) -> None:
        """Remove temporary directories of saves that were interrupted."""
        if self.root.is_dir():
            for p in self.root.glob(".tmp-step_*"):
                shutil.rmtree(p, ignore_errors=True)

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if pointer.is_file():
            path = self.root / pointer.read_text().strip()
            if (path / TRAINER_STATE).is_file():
                return path
        # No pointer (or it names a pruned dir): fall back to the newest complete checkpoint.
        for step in reversed(self.steps()):
            if (self.final_dir(step) / TRAINER_STATE).is_file():
                return self.final_dir(step)
        return None


def resolve_resume(resume: str | None, run_dir: str | Path) -> Path | None:
    """`--resume auto` → this run's latest checkpoint (None when there is none yet);
    `--resume PATH` → that checkpoint (a checkpoint dir, a run dir or its `checkpoints/`)."""
    if resume is None:
        return None
    if resume == "auto":
        return CheckpointManager(run_dir).latest()
    path = Path(resume)
    if (path / TRAINER_STATE).is_file():
        return path
    found = CheckpointManager(path.parent if path.name == "checkpoints" else path).latest()
    if found is not None:
        return found
    raise UserError(f"--resume {resume}: no complete checkpoint there (expected a directory holding "
                    f"{TRAINER_STATE}, or a run directory with checkpoints/latest)")


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / TRAINER_STATE).read_text())


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def gathered_state_dict(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """The full fp32 model state dict of a checkpoint, ZeRO partitions gathered, frozen
    parameters and buffers included. Runs in one process, no distributed setup."""
    ckpt = Path(ckpt)
    ds_dir = ckpt / "pytorch_model"
    if not ds_dir.is_dir():
        raise UserError(f"'{ckpt}' is not a training checkpoint (no pytorch_model/ inside); pass a "
                        f"checkpoints/step_XXXXXXXX directory")
    if any(ds_dir.glob("*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="pytorch_model",
                                                         exclude_frozen_parameters=False)
    else:   # ZeRO stage 0: the module state is stored whole
        state = torch.load(ds_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {k: v.detach().float().clone() if v.is_floating_point() else v.detach().clone()
            for k, v in state.items()}


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `model`, failing with the names of missing / unexpected / mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        raise UserError(f"'{source}' does not match the model: missing {missing[:8]}, unexpected "
                        f"{unexpected[:8]}, shape mismatch {shapes[:8]} ({len(missing)}/{len(unexpected)}/"
                        f"{len(shapes)} in all)")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def export_checkpoint(ckpt: str | Path, out: str | Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """Write the checkpoint's weights as a plain safetensors state dict, checked strictly against
    `model` (a freshly built model of the checkpoint's config) before writing."""
    from safetensors.torch import save_file

    state = gathered_state_dict(ckpt)
    load_strict(model, state, str(ckpt))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    # Tied weights share storage, which safetensors refuses: every tensor gets its own copy.
    save_file({k: v.contiguous().clone() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out)
    return state


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights to initialise from: an exported `.safetensors` file or a training checkpoint."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise UserError(f"train.init_from: '{path}' does not exist")
        from safetensors.torch import load_file

        return load_file(str(path))
    found = resolve_resume(str(path), path)
    assert found is not None
    return gathered_state_dict(found)


def is_zero_partitioned(ckpt: Path) -> bool:
    """Whether the checkpoint's optimizer (and, under ZeRO-3, parameter) state is split by rank."""
    return any((ckpt / "pytorch_model").glob("*zero_pp_rank_*_optim_states.pt"))


def to_universal(ckpt: Path, out: Path) -> Path:
    """DeepSpeed's universal checkpoint (one file per parameter and optimizer state, whole) of the
    ZeRO partitions in `ckpt`, written to `out/pytorch_model` (`out` is replaced). An engine
    configured with `checkpoint.load_universal` loads it into any number of ranks. One process."""
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main

    if out.exists():
        shutil.rmtree(out)
    # One worker: the converter forks worker processes otherwise, unsafe beside the process group's threads.
    main(argparse.Namespace(input_folder=str(ckpt / "pytorch_model"), output_folder=str(out / "pytorch_model"),
                            num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                            inject_missing_state=True))
    return out
