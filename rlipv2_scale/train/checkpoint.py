"""Checkpoints: atomic save, keep-last-K, a `latest` pointer, resume lookup, the gathered weights.

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
import types
from pathlib import Path
from typing import Any

import torch

from rlipv2_scale.errors import UserError
from rlipv2_scale.safe_load import TRUST_HINT, torch_load

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


def _deepspeed_globals() -> list[Any]:
    """What DeepSpeed pickles into the trainer's checkpoints besides tensors and plain containers
    (found by listing the unsafe globals of ZeRO 0-3 checkpoints written by `tests/train_toy.py`)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


def gathered_state_dict(ckpt: str | Path, trust_pickle: bool = False, hint: str = TRUST_HINT) -> dict[str, torch.Tensor]:
    """The full fp32 model state dict of a checkpoint, ZeRO partitions gathered, frozen
    parameters and buffers included. Runs in one process, no distributed setup.

    Every file is read weights-only, allowing DeepSpeed's own classes: a file pickling anything
    else is refused with `hint` as the fix, unless `trust_pickle`."""
    ckpt = Path(ckpt)
    ds_dir = ckpt / "pytorch_model"
    if not ds_dir.is_dir():
        raise UserError(f"'{ckpt}' is not a training checkpoint (no pytorch_model/ inside); pass a "
                        f"checkpoints/step_XXXXXXXX directory")

    def load(path: str | Path, *args: Any, **kwargs: Any) -> Any:
        return torch_load(path, allow=_deepspeed_globals(), trust_pickle=trust_pickle, hint=hint)

    if any(ds_dir.glob("*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils import zero_to_fp32

        # DeepSpeed's gatherer calls `torch.load(..., weights_only=False)` on every shard: it gets
        # a `torch` whose `load` is the weights-only one above (the real torch is left alone).
        safe_torch = types.ModuleType("torch")
        safe_torch.__getattr__ = lambda name: getattr(torch, name)
        safe_torch.load = load
        real, zero_to_fp32.torch = zero_to_fp32.torch, safe_torch
        try:
            state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="pytorch_model",
                                                                          exclude_frozen_parameters=False)
        except (KeyError, ValueError, IndexError, TypeError) as exc:   # shards missing or not DeepSpeed's
            raise UserError(f"'{ds_dir}' is not a complete DeepSpeed checkpoint ({exc!r})") from None
        finally:
            zero_to_fp32.torch = real
    else:   # ZeRO stage 0: the module state is stored whole
        state = load(ds_dir / "mp_rank_00_model_states.pt")
        if not isinstance(state, dict) or not isinstance(state.get("module"), dict):
            raise UserError(f"'{ds_dir / 'mp_rank_00_model_states.pt'}' holds no module state dict; pass a "
                            f"checkpoint written by `rlipv2 train`")
        state = state["module"]
    return {k: v.detach().float().clone() if v.is_floating_point() else v.detach().clone()
            for k, v in state.items()}
