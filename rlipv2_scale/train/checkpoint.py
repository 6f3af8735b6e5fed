"""Checkpoints: atomic save, keep-last-K, a `latest` pointer, resume lookup, the gathered weights.

Layout of a run directory::

    checkpoints/step_00001000/      one checkpoint (Accelerate `save_state` + ours)
        pytorch_model/              DeepSpeed: module, optimizer partitions of every rank
        random_states_<rank>.pkl    python / numpy / torch RNG of every rank (Accelerate)
        loader_rank<rank>.pt        streaming loader state of every rank
        trainer.json                step, epoch, samples, skipped steps, wandb run id
        scheduler.pt                lr schedule state
        config.yaml                 the resolved run config (export builds the model from it)
        manifest.json               size and sha256 of every other file, as written
    checkpoints/latest              name of the newest complete checkpoint
    checkpoints/diverged-step_*/    the state a diverging run stopped in (never `latest`), for debugging
    checkpoints/damaged-step_*/     a checkpoint whose files no longer match its manifest, set aside

Every rank writes into `checkpoints/.tmp-step_XXXXXXXX/`; after a barrier the files are fsynced,
rank 0 records the manifest, renames the directory into place and then replaces `latest` (both
atomic on POSIX, each followed by an fsync of the directory). A kill at any moment leaves either
the old or the new checkpoint complete, never a half-written one under a final name; a file
damaged later (a truncated copy, a full disk) is found by the manifest when a run resumes, which
then falls back to the newest intact checkpoint.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import re
import shutil
import sys
import types
from pathlib import Path
from typing import Any, Iterator

import torch

from rlipv2_scale.errors import UserError
from rlipv2_scale.safe_load import TRUST_HINT, torch_load

_STEP_DIR = re.compile(r"^step_(\d{8,})$")
TRAINER_STATE = "trainer.json"
MANIFEST = "manifest.json"
DIVERGED = "diverged-"
DAMAGED = "damaged-"


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

    def commit(self, step: int, known_good: int | None = None) -> Path:
        """Rank 0, after every rank has written: rename into place, move `latest`, prune (keeping the
        newest checkpoint at or before `known_good`, see `prune`)."""
        final = self.final_dir(step)
        if final.exists() and self.damage(final) is not None:
            self._set_aside(final, DAMAGED)
        if final.exists():
            # Saved before (a run resumed from an earlier checkpoint re-reaches it): exact resume
            # makes the two identical, and the complete one on disk is never taken away.
            shutil.rmtree(self.tmp_dir(step))
        else:
            self._seal(self.tmp_dir(step))
            os.replace(self.tmp_dir(step), final)
            _fsync(self.root)
        self._point_latest(final)
        self.prune(known_good)
        return final

    def commit_diverged(self, step: int, good_step: int) -> Path:
        """Rank 0, when a run diverged at `step`: its save and every checkpoint after `good_step`
        (the last step whose weights gave a finite loss) are renamed `diverged-...`, never deleted,
        and `latest` names the newest checkpoint left. Returns where the state of `step` went."""
        final = self.final_dir(step)
        if final.exists():   # saved before, at this step: the same state
            shutil.rmtree(self.tmp_dir(step))
        else:
            self._seal(self.tmp_dir(step))
            os.replace(self.tmp_dir(step), final)
        moved = {s: self._set_aside(self.final_dir(s), DIVERGED) for s in self.steps() if s > good_step}
        kept = self.steps()
        self._point_latest(self.final_dir(kept[-1]) if kept else None)
        return moved[step]

    def sync(self, step: int) -> None:
        """fsync every file of the save of `step` (once per node: the page cache is the node's)."""
        for path in self.tmp_dir(step).rglob("*"):
            if path.is_file():
                _fsync(path)

    def _seal(self, tmp: Path) -> None:
        """Record every file's size and hash, and make files and directories durable before the
        rename publishes them."""
        files = {p.relative_to(tmp).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
                 for p in sorted(tmp.rglob("*")) if p.is_file() and p.name != MANIFEST}
        write_json(tmp / MANIFEST, {"files": files})
        for path in tmp.rglob("*"):
            if path.is_file():
                _fsync(path)
        for directory in {tmp, *(p.parent for p in tmp.rglob("*"))}:
            _fsync(directory)

    def _point_latest(self, final: Path | None) -> None:
        pointer = self.root / "latest"
        if final is None:
            pointer.unlink(missing_ok=True)
        else:
            tmp = self.root / "latest.tmp"
            tmp.write_text(final.name + "\n")
            _fsync(tmp)
            os.replace(tmp, pointer)
        _fsync(self.root)

    def _set_aside(self, path: Path, prefix: str) -> Path:
        """Rename `path` to `prefix + name` (numbered when taken): set aside, never deleted."""
        aside, n = path.with_name(prefix + path.name), 1
        while aside.exists():
            n += 1
            aside = path.with_name(f"{prefix}{path.name}-{n}")
        try:
            os.replace(path, aside)
        except FileNotFoundError:   # another process of this run (a rank resolving init_from) was first
            pass
        _fsync(self.root)
        return aside

    @staticmethod
    def damage(ckpt: Path) -> str | None:
        """What differs in a checkpoint from what was written (None: intact; checkpoints written
        before manifests existed cannot be checked and count as intact)."""
        if not (ckpt / TRAINER_STATE).is_file():
            return f"{TRAINER_STATE} is missing"
        if not (ckpt / MANIFEST).is_file():
            return None
        try:
            files = json.loads((ckpt / MANIFEST).read_text())["files"]
        except (ValueError, KeyError, TypeError):
            return f"{MANIFEST} is unreadable"
        for name, want in files.items():
            path = ckpt / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != want["size"]:
                return f"{name} has {path.stat().st_size} bytes, {want['size']} were written"
            if _sha256(path) != want["sha256"]:
                return f"{name} differs from what was written (sha256)"
        return None

    def steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir())

    def prune(self, known_good: int | None = None) -> None:
        """Delete all but the newest `keep_last` checkpoints, and never the newest one at or before
        `known_good` (the last step whose weights gave a finite loss): a save's own weights are
        untried until the next step, and if they diverge `commit_diverged` falls back to that one."""
        steps = self.steps()
        good = [s for s in steps if known_good is not None and s <= known_good]
        for step in steps[:-self.keep_last]:
            if not (good and step == good[-1]):
                shutil.rmtree(self.final_dir(step), ignore_errors=True)

    def clean_stale(self) -> None:
        """Remove temporary directories of saves, and of resharding conversions (`engine.py:
        Trainer._prepare_reshard`), that were interrupted: both are the trainer's own."""
        if self.root.is_dir():
            for p in [*self.root.glob(".tmp-step_*"), *self.root.glob(".tmp-universal-step_*")]:
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

    def latest_intact(self) -> Path | None:
        """The newest checkpoint whose files are as written. Damaged newer ones are set aside
        (renamed `damaged-...`, not deleted) with a message naming the problem and the fallback;
        when every one is damaged, an error."""
        damaged = []
        while (found := self.latest()) is not None:
            problem = self.damage(found)
            if problem is None:
                break
            damaged.append(f"'{found}' ({problem}) set aside as '{self._set_aside(found, DAMAGED).name}'")
        if damaged and found is None:
            raise UserError(f"no intact checkpoint in '{self.root}': {'; '.join(damaged)}. Resume from a "
                            f"copy of the run, or start afresh without --resume")
        for line in damaged:
            print(f"rlipv2: warning: checkpoint {line}: resuming from '{found}' instead", file=sys.stderr, flush=True)
        if damaged:
            self._point_latest(found)
        return found


def resolve_resume(resume: str | None, run_dir: str | Path) -> Path | None:
    """`--resume auto` → this run's latest checkpoint (None when there is none yet);
    `--resume PATH` → that checkpoint (a checkpoint dir, a run dir or its `checkpoints/`)."""
    if resume is None:
        return None
    if resume == "auto":
        return CheckpointManager(run_dir).latest_intact()
    path = Path(resume)
    if (path / TRAINER_STATE).is_file():
        problem = CheckpointManager.damage(path)
        if problem is not None:
            raise UserError(f"--resume {resume}: the checkpoint is damaged ({problem}); resume from another "
                            f"checkpoint, or pass the run directory to take the newest intact one")
        return path
    found = CheckpointManager(path.parent if path.name == "checkpoints" else path).latest_intact()
    if found is not None:
        return found
    raise UserError(f"--resume {resume}: no complete checkpoint there (expected a directory holding "
                    f"{TRAINER_STATE}, or a run directory with checkpoints/latest)")


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / TRAINER_STATE).read_text())


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync(path: Path) -> None:
    """Make a file's data, or a directory's entries (a rename into it), durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _deepspeed_globals() -> list[Any]:
    """What DeepSpeed pickles into the trainer's checkpoints besides tensors and plain containers
    (found by listing the unsafe globals of ZeRO 0-3 checkpoints written by `tests/train_toy.py`)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


# The fix named when a checkpoint being resumed pickles more than the trainer writes.
NOT_OURS = "it was not written by `rlipv2 train`; resume from a checkpoint the trainer wrote"

# The DeepSpeed modules that read checkpoint files with `torch.load(..., weights_only=False)`: the
# engine's checkpoint engine (model and ZeRO optimizer states), the universal-checkpoint converter
# and loaders, and the ZeRO gatherer.
_DEEPSPEED_READERS = ("deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine", "deepspeed.runtime.base_optimizer",
                      "deepspeed.runtime.zero.stage3", "deepspeed.checkpoint.universal_checkpoint",
                      "deepspeed.checkpoint.ds_to_universal", "deepspeed.utils.zero_to_fp32")


@contextlib.contextmanager
def deepspeed_reads_weights_only(trust_pickle: bool = False, hint: str = TRUST_HINT) -> Iterator[None]:
    """While open, DeepSpeed's readers see a `torch` whose `load` is the project's weights-only one
    (`rlipv2_scale/safe_load.py`), allowing DeepSpeed's own classes: a checkpoint file pickling
    anything else is refused with `hint` as the fix, unless `trust_pickle`. The real torch, and
    every other attribute, are left alone."""
    def load(path: str | Path, *args: Any, **kwargs: Any) -> Any:
        return torch_load(path, allow=_deepspeed_globals(), trust_pickle=trust_pickle, hint=hint)

    safe_torch = types.ModuleType("torch")
    vars(safe_torch).update(__getattr__=lambda name: getattr(torch, name), load=load)
    modules = [importlib.import_module(name) for name in _DEEPSPEED_READERS]
    real = [vars(m)["torch"] for m in modules]
    for m in modules:
        vars(m)["torch"] = safe_torch
    try:
        yield
    finally:
        for m, t in zip(modules, real):
            vars(m)["torch"] = t


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

    if is_zero_partitioned(ckpt):
        from deepspeed.utils import zero_to_fp32

        try:
            # Its progress lines ("Processing zero checkpoint ...") are printed: sent to stderr, so
            # the stdout of the command that loads a run (a table, JSON lines) stays its own.
            with deepspeed_reads_weights_only(trust_pickle, hint), contextlib.redirect_stdout(sys.stderr):
                state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(
                    str(ckpt), tag="pytorch_model", exclude_frozen_parameters=False)
        except (KeyError, ValueError, IndexError, TypeError) as exc:   # shards missing or not DeepSpeed's
            raise UserError(f"'{ds_dir}' is not a complete DeepSpeed checkpoint ({exc!r})") from None
    else:   # ZeRO stage 0: the module state is stored whole
        state = torch_load(ds_dir / "mp_rank_00_model_states.pt", allow=_deepspeed_globals(),
                           trust_pickle=trust_pickle, hint=hint)
        if not isinstance(state, dict) or not isinstance(state.get("module"), dict):
            raise UserError(f"'{ds_dir / 'mp_rank_00_model_states.pt'}' holds no module state dict; pass a "
                            f"checkpoint written by `rlipv2 train`")
        state = state["module"]
    return {k: v.detach().float().clone() if v.is_floating_point() else v.detach().clone()
            for k, v in state.items()}


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
    with deepspeed_reads_weights_only(hint=NOT_OURS):
        main(argparse.Namespace(input_folder=str(ckpt / "pytorch_model"), output_folder=str(out / "pytorch_model"),
                                num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                                inject_missing_state=True))
    return out
