"""The one trainer: Accelerate + DeepSpeed (ZeRO 0/1/2/3), exact resume, preemption, telemetry.

`Trainer(cfg, model, criterion, loader).fit()` runs on every rank of an initialised process group
(`launch.init_distributed`). The model follows the RLIPv2 call contract
`model(images, pixel_mask, obj_texts, rel_texts) -> outputs` and the criterion
`criterion(outputs, targets) -> {"loss": total, term: value, ...}`; the loader yields `Batch`es for
this rank and resumes through `state_dict()` / `load_state_dict()`. It is a streaming loader that
shards by rank itself, so it is *not* passed to `accelerator.prepare`.

A step: forward (bf16 on GPU, fp32 on CPU, or fp16 by choice), outputs cast to fp32 for matching
and losses, one all-reduce of [loss is non-finite, stop requested] so that every rank takes the
same decision, then DeepSpeed's backward and step (gradient accumulation and clipping by
DeepSpeed). A non-finite loss on any rank skips the micro-batch on all ranks;
`train.max_nonfinite_in_row` of them in a row stop the run: its state is saved aside
(`diverged-step_*`) and `latest` stays the newest checkpoint whose weights still gave a finite loss.
A step whose gradients overflow (fp16 loss scaling) is skipped by DeepSpeed and counted
(`overflow_steps`). SIGTERM / SIGUSR1 only set a flag: the loop checkpoints at the next
optimizer-step boundary, leaves `PREEMPTED` in the run directory and exits with `EXIT_PREEMPTED`,
for the scheduler to requeue; `--resume auto` then continues exactly (on another number of ranks:
`_prepare_reshard`). `run` holds the run directory's lock (`runlock.py`) and clears `PREEMPTED`
before anything can fail, so that the marker only ever means "checkpointed on a signal".
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import shutil
import signal
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from rlipv2_scale.config import save_config, to_dict
from rlipv2_scale.data.batch import Batch
from rlipv2_scale.data.streaming import build_train_loader
from rlipv2_scale.errors import DataError, UserError
from rlipv2_scale.models.artifacts import load_state
from rlipv2_scale.models.build import build_model
from rlipv2_scale.models.losses import SetCriterion
from rlipv2_scale.models.rlipv2 import resize_query_rows
from rlipv2_scale.safe_load import torch_load
from rlipv2_scale.train import checkpoint as ckpt_io
from rlipv2_scale.train.config import RunConfig, load_run_config
from rlipv2_scale.train.export import init_weights
from rlipv2_scale.train.hooks import EvalHook, default_hooks
from rlipv2_scale.train.launch import (
    COMPLETED_MARKER,
    EXIT_PREEMPTED,
    PREEMPTED_MARKER,
    DistInfo,
    build_accelerator,
    deepspeed_config,
    die_with_parent,
    init_distributed,
    merge_deepspeed,
    report_to_launcher,
)
from rlipv2_scale.train.optim import build_optimizer, build_scheduler
from rlipv2_scale.train.parts import Builder, Evaluator, Parts, ResumableLoader, rlipv2_forward
from rlipv2_scale.train.tagger import build_tagger_parts
from rlipv2_scale.train.telemetry import FlopMeter, Telemetry, peak_tflops
from rlipv2_scale.train.validation import RelationValidation


class TrainingDiverged(UserError):
    """Too many non-finite losses in a row."""


def _to_fp32(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    # Typed outputs (models/outputs.py) stay typed; they are dicts too, so this comes first.
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _to_fp32(getattr(value, f.name))
                                             for f in dataclasses.fields(value) if f.init})
    if isinstance(value, dict):
        return {k: _to_fp32(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_fp32(v) for v in value)
    return value


class _StopSignal:
    """SIGTERM / SIGUSR1 → a flag read at the next step boundary (no work in the handler)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if not self._previous:
            for s in (signal.SIGTERM, signal.SIGUSR1):
                self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}


class Trainer:
    def __init__(self, cfg: RunConfig, info: DistInfo, model: nn.Module, criterion: nn.Module,
                 loader: ResumableLoader, *, resume: str | None = None, evaluator: Evaluator | None = None,
                 stop: _StopSignal | None = None, forward: Callable[[nn.Module, torch.Tensor, Batch], dict] | None = None):
        self.cfg, self.info, self.criterion, self.loader, self.evaluator = cfg, info, criterion, loader, evaluator
        self.forward = forward or rlipv2_forward
        self.run_dir = cfg.run.path
        self.is_main = info.rank == 0
        self.stop = stop or _StopSignal()
        t = cfg.train
        self.bf16 = t.precision == "bf16" or (t.precision == "auto" and info.device.type == "cuda")
        if self.bf16 and info.device.type != "cuda":
            raise UserError("train.precision=bf16 needs a GPU; use auto or fp32 on CPU")
        self.fp16 = t.precision == "fp16"
        if self.fp16 and info.device.type != "cuda":
            raise UserError("train.precision=fp16 needs a GPU (DeepSpeed's fp16 loss scaling); use "
                            "train.precision=fp32 (or auto) on CPU")
        self.steps_per_epoch = t.steps_per_epoch or self._loader_steps_per_epoch()
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch
        self.manager = ckpt_io.CheckpointManager(self.run_dir, cfg.checkpoint.keep_last)

        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for marker in (PREEMPTED_MARKER, COMPLETED_MARKER):
                (self.run_dir / marker).unlink(missing_ok=True)
            self.manager.clean_stale()
            save_config(cfg, self.run_dir / "config.yaml")
        dist.barrier()

        optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(optimizer, cfg.optim, self.total_steps, self.steps_per_epoch)
        ds_cfg = deepspeed_config(micro_batch_size=cfg.data.batch_size, grad_accum=t.grad_accum,
                                  world_size=info.world_size, zero_stage=t.zero_stage, bf16=self.bf16,
                                  grad_clip=t.grad_clip, zero3_persistence_threshold=t.zero3_persistence_threshold,
                                  reduce_bucket_size=t.reduce_bucket_size, allgather_bucket_size=t.allgather_bucket_size,
                                  fp16=self.fp16)
        if t.deepspeed:
            ds_cfg = merge_deepspeed(ds_cfg, t.deepspeed)
        self.resumed_from = self._resume_checkpoint(resume)
        self._check_stage(self.resumed_from)
        self.universal = self._prepare_reshard(self.resumed_from)
        if self.universal is not None:
            ds_cfg["checkpoint"] = {**ds_cfg.get("checkpoint", {}), "load_universal": True}
        self.accelerator = build_accelerator(ds_cfg, info)
        # The scheduler stays ours (stepped once per optimizer step): Accelerate would step it once
        # per process, and DeepSpeed would not save it with our per-group lambdas.
        self.engine, self.optimizer = self.accelerator.prepare(model, optimizer)

        self.step = 0
        self.epoch = 0
        self.samples = 0
        self.skipped = 0
        self.overflows = 0
        self.stopping = False            # a stop signal, agreed on by every rank
        self.nonfinite_in_row = 0
        self.wandb_id: str | None = None
        self.hooks = default_hooks(evaluator)
        resumed = ckpt_io.read_trainer_state(self.resumed_from) if self.resumed_from is not None else {}
        log = cfg.logging
        wandb_cfg = ({"project": log.wandb_project, "entity": log.wandb_entity, "mode": log.wandb_mode}
                     if log.wandb and log.wandb_mode != "disabled" else None)
        self.telemetry = Telemetry(self.run_dir, enabled=self.is_main, total_steps=self.total_steps,
                                   start_step=resumed.get("step", 0), progress=log.progress, wandb_cfg=wandb_cfg,
                                   wandb_id=resumed.get("wandb_id"), config=to_dict(cfg))
        self.wandb_id = self.telemetry.wandb_id
        if self.resumed_from is not None:   # last: nothing may draw from the RNG it restores
            self._load(self.resumed_from)
        self.flops_per_image = log.flops_per_image
        self.peak_tflops = log.peak_tflops or peak_tflops(info.device)

    # ------------------------------------------------------------------ setup helpers
    def _loader_steps_per_epoch(self) -> int:
        try:
            batches = len(self.loader)  # type: ignore[arg-type]
        except TypeError:
            raise UserError("the loader has no length: set train.steps_per_epoch") from None
        steps = batches // self.cfg.train.grad_accum
        if steps <= 0:
            raise UserError(f"an epoch holds {batches} batches per rank, fewer than train.grad_accum="
                            f"{self.cfg.train.grad_accum}: use more data or a smaller batch")
        return steps

    def _resume_checkpoint(self, resume: str | None) -> Path | None:
        """Rank 0 finds and verifies the checkpoint (reading every byte once, not once per rank);
        every rank loads that one, or raises rank 0's error."""
        choice: list = [None, None]
        if self.is_main:
            try:
                found = ckpt_io.resolve_resume(resume, self.run_dir)
                choice[0] = None if found is None else str(found)
            except UserError as exc:
                choice[1] = str(exc)
        dist.broadcast_object_list(choice, src=0)
        if choice[1] is not None:
            raise UserError(choice[1])
        return None if choice[0] is None else Path(choice[0])

    def _check_stage(self, path: Path | None) -> None:
        """DeepSpeed lays the optimizer out by ZeRO stage; a checkpoint resumes only at its own."""
        if path is None:
            return
        stage = ckpt_io.read_trainer_state(path).get("zero_stage")
        if stage is not None and stage != self.cfg.train.zero_stage:
            raise UserError(f"checkpoint '{path}' was written with train.zero_stage={stage}, this run has "
                            f"{self.cfg.train.zero_stage}: resume with train.zero_stage={stage}, or start a new run "
                            f"from its weights (train.init_from={_run_of(path)}, a new run.dir)")

    def _model_mismatch(self, path: Path, exc: RuntimeError) -> UserError:
        """A checkpoint whose weights do not fit this run's model: the model settings that differ."""
        old = _flat(to_dict(load_run_config(path / "config.yaml").model), "model")
        new = _flat(to_dict(self.cfg.model), "model")
        diff = [f"{k}: {old.get(k)!r} in the checkpoint, {new.get(k)!r} now" for k in sorted(old.keys() | new.keys())
                if old.get(k) != new.get(k)]
        return UserError(f"checkpoint '{path}' does not fit this run's model ({str(exc).splitlines()[0]}); "
                         f"model settings changed: {'; '.join(diff) or 'none'}. Resume with the checkpoint's "
                         f"settings, or start a new run from its weights (train.init_from={_run_of(path)}, "
                         f"a new run.dir)")

    # ------------------------------------------------------------------ checkpointing
    def save(self, diverged_after: int | None = None) -> Path:
        """Every rank writes its part into the temporary directory; rank 0 commits (with
        `diverged_after`: sets it aside, with the checkpoints after that step; the path is rank 0's)."""
        tmp = self.manager.tmp_dir(self.step)
        if self.is_main:
            self.manager.begin(self.step)
        dist.barrier()
        self.accelerator.save_state(str(tmp))       # DeepSpeed shards of every rank + RNG of every rank
        torch.save(self.loader.state_dict(), tmp / f"loader_rank{self.info.rank}.pt")
        if self.is_main:
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            save_config(self.cfg, tmp / "config.yaml")
            ckpt_io.write_json(tmp / ckpt_io.TRAINER_STATE, {
                "step": self.step, "epoch": self.epoch, "samples": self.samples, "skipped_steps": self.skipped,
                "wandb_id": self.wandb_id, "world_size": self.info.world_size, "overflow_steps": self.overflows,
                "zero_stage": self.cfg.train.zero_stage})
        dist.barrier()
        if self.info.local_rank == 0 and not self.is_main:   # rank 0's commit syncs its own node
            self.manager.sync(self.step)
        dist.barrier()
        final = self.manager.final_dir(self.step)
        if self.is_main:
            if diverged_after is None:
                # A finished run's last weights are final; any other save's are untried until the next step.
                self.manager.commit(self.step, self.step if self.step >= self.total_steps else self.good_step)
            else:
                final = self.manager.commit_diverged(self.step, diverged_after)
        dist.barrier()
        return final

    def _load(self, path: Path) -> None:
        state = ckpt_io.read_trainer_state(path)
        if state["world_size"] != self.info.world_size:
            return self._load_resharded(path, state)
        loader_file = path / f"loader_rank{self.info.rank}.pt"
        if not loader_file.is_file():
            raise UserError(f"checkpoint '{path}' has no loader state for rank {self.info.rank}")
        # Plain data only (no code from the files): what the trainer wrote there holds nothing else.
        try:
            with ckpt_io.deepspeed_reads_weights_only(hint=ckpt_io.NOT_OURS):
                self.accelerator.load_state(str(path))      # restores the RNG of this rank last
        except RuntimeError as exc:
            if "state_dict" not in str(exc):
                raise
            raise self._model_mismatch(path, exc) from None
        self.scheduler.load_state_dict(torch_load(path / "scheduler.pt", hint=ckpt_io.NOT_OURS))
        self.loader.load_state_dict(torch_load(loader_file, hint=ckpt_io.NOT_OURS))
        self.step, self.epoch, self.samples = state["step"], state["epoch"], state["samples"]
        self.skipped = state["skipped_steps"]
        self.overflows = state.get("overflow_steps", 0)

    def _prepare_reshard(self, path: Path | None) -> Path | None:
        """Resuming a checkpoint written by another number of ranks: the samples per optimizer step
        must stay the same (the schedule, the data position and the step count are counted in
        them). ZeRO partitions are converted (rank 0) into DeepSpeed's universal checkpoint in this
        run's checkpoints/, returned for `_load_resharded`; stage 0 stores the model whole (None)."""
        if path is None:
            return None
        ranks = ckpt_io.read_trainer_state(path)["world_size"]
        if ranks == self.info.world_size:
            return None
        old = load_run_config(path / "config.yaml")
        per_step = old.data.batch_size * old.train.grad_accum * ranks
        per_rank = self.cfg.data.batch_size * self.cfg.train.grad_accum
        if per_rank * self.info.world_size != per_step:
            fix = (f"set data.batch_size x train.grad_accum to {per_step // self.info.world_size} (now "
                   f"{self.cfg.data.batch_size} x {self.cfg.train.grad_accum})"
                   if per_step % self.info.world_size == 0 else f"resume on a number of ranks that divides {per_step}")
            raise UserError(f"checkpoint '{path}' trained on {ranks} ranks with {per_step} samples per optimizer "
                            f"step; to continue it on {self.info.world_size} ranks keep {per_step}: {fix}")
        if not ckpt_io.is_zero_partitioned(path):
            return None
        universal = self.manager.root / f".tmp-universal-{path.name}"
        if self.is_main:
            print(f"rlipv2: resharding '{path}' from {ranks} to {self.info.world_size} ranks (DeepSpeed "
                  f"universal checkpoint in '{universal}')", flush=True)
            ckpt_io.to_universal(path, universal)
        dist.barrier()
        return universal

    def _load_resharded(self, path: Path, state: dict) -> None:
        """Model and optimizer state into this world's partitions; the lr schedule and counters as
        saved; the loader from rank 0's state, which is global for the streaming loader (a sample
        position; streaming keeps the order with the checkpoint's `num_canonical_nodes`). Each
        rank's RNG starts afresh from (seed, rank, step): the old ranks' streams have no successor."""
        from accelerate.utils import set_seed

        groups = self.scheduler.optimizer.param_groups
        own = [{k: v for k, v in group.items() if k != "params"} for group in groups]
        try:
            with ckpt_io.deepspeed_reads_weights_only(hint=ckpt_io.NOT_OURS):
                self.engine.load_checkpoint(str(self.universal or path), tag="pytorch_model",
                                            load_lr_scheduler_states=False)
        except RuntimeError as exc:
            if "state_dict" not in str(exc):
                raise
            raise self._model_mismatch(path, exc) from None
        dist.barrier()
        if self.is_main and self.universal is not None:
            shutil.rmtree(self.universal)
        # DeepSpeed's ZeRO-3 universal load (stage3.py, load_hp_checkpoint_state_from_checkpoint_dir_stage3)
        # gives every group the first group's settings, ours differ by group; and one `step` tensor
        # to every partition, which torch's AdamW would then advance once per partition.
        for group, settings in zip(groups, own):
            group.update(settings)
        for moments in self.scheduler.optimizer.state.values():
            if isinstance(moments.get("step"), torch.Tensor):
                moments["step"] = moments["step"].clone()
        self.scheduler.load_state_dict(torch_load(path / "scheduler.pt", hint=ckpt_io.NOT_OURS))
        for group, lr in zip(groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
        self.loader.load_state_dict(torch_load(path / "loader_rank0.pt", hint=ckpt_io.NOT_OURS))
        self.step, self.epoch, self.samples = state["step"], state["epoch"], state["samples"]
        self.skipped, self.overflows = state["skipped_steps"], state.get("overflow_steps", 0)
        set_seed(zlib.crc32(f"{self.cfg.train.seed}/{self.info.rank}/{self.step}".encode()))

    # ------------------------------------------------------------------ the loop
    def _forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        images = batch.images.to(torch.bfloat16) if self.bf16 else batch.images.half() if self.fp16 else batch.images
        outputs = self.forward(self.engine, images, batch)
        # Matching and losses in fp32 whatever the compute dtype.
        with torch.autocast(self.info.device.type, enabled=False):
            return self.criterion(_to_fp32(outputs), batch.targets)

    def _batches(self) -> Iterable[tuple[Batch, float]]:
        """(batch on device, seconds waited for it), epoch after epoch."""
        first_pass = True
        while True:
            # Creating a DataLoader iterator draws a seed from the global torch RNG, and loading in
            # the main process (num_workers=0) may draw more: keep data loading out of the training
            # RNG stream (dropout), which a resumed run restores from the checkpoint.
            with torch.random.fork_rng(devices=[]):
                iterator = iter(self.loader)
            produced = False
            while True:
                t0 = time.perf_counter()
                try:
                    with torch.random.fork_rng(devices=[]):
                        batch = next(iterator)
                except StopIteration:
                    break
                except FileNotFoundError as exc:
                    raise DataError(f"{_missing(exc)} (at step {self.step})") from exc
                except (DataError, RuntimeError) as exc:   # e.g. "DataLoader worker (pid 123) exited unexpectedly"
                    raise DataError(f"training data failed at step {self.step}: {exc}") from exc
                produced = True
                yield batch.to(self.info.device, non_blocking=True), time.perf_counter() - t0
            # A run resumed from the last step of an epoch first sees that epoch's empty remainder.
            if not produced and not first_pass:
                raise DataError("the training loader produced no batch in a whole epoch: check data.sources")
            first_pass = False
            self.epoch += 1

    def _agree(self, nonfinite: bool) -> tuple[bool, bool]:
        flags = torch.tensor([float(nonfinite), float(self.stop.signum is not None)], device=self.info.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0]), bool(flags[1])

    def fit(self) -> int:
        """Train to the end (exit code 0) or to a preemption checkpoint (`EXIT_PREEMPTED`)."""
        self.stop.install()
        try:
            return self._fit()
        finally:
            self.stop.restore()
            self.telemetry.close()

    def _fit(self) -> int:
        """The loop: micro-steps until the last optimizer step or a stop; the hooks do the rest."""
        self.good_step = self.step - 1   # the last step whose weights gave a finite loss
        self.engine.train()
        if self.cfg.eval.only:           # evaluate the initial weights and stop (zero-shot NF)
            EvalHook(self.evaluator).evaluate(self)
            return self._completed()
        micro = 0
        for batch, waited in (self._batches() if self.step < self.total_steps else ()):
            losses = self._micro_step(batch, first=micro == 0)
            for hook in self.hooks:
                hook.after_batch(self, waited, losses)
            if losses is None:           # a non-finite loss, skipped on every rank
                continue
            micro += 1
            if micro % self.cfg.train.grad_accum:
                continue
            self.step += 1
            self.samples += self.cfg.data.batch_size * self.info.world_size * self.cfg.train.grad_accum
            self._step_schedule()
            for hook in self.hooks:
                hook.after_step(self)
            if self.stopping or self.step >= self.total_steps:
                break
        for hook in self.hooks:
            hook.after_train(self)
        return EXIT_PREEMPTED if self.preempted else self._completed()

    @property
    def preempted(self) -> bool:
        """Stopped by a signal before the last step (the run continues after a requeue)."""
        return self.stopping and self.step < self.total_steps

    def _micro_step(self, batch: Batch, first: bool) -> dict[str, float] | None:
        """Forward, every rank's agreement on [non-finite loss, stop requested], backward and
        DeepSpeed's step: the micro-batch's scalar losses, or None when it was skipped (`max_nonfinite_in_row`
        skipped in a row end the run). The first micro-step on a GPU also measures the FLOPs per image."""
        meter = FlopMeter(self.flops_per_image is None and self.info.device.type == "cuda" and first)
        with meter:
            losses = self._forward(batch)
            nonfinite, self.stopping = self._agree(not bool(torch.isfinite(losses["loss"]).item()))
            if not nonfinite:
                self.engine.backward(losses["loss"])
        if meter.flops is not None:
            self.flops_per_image = meter.flops / batch.batch_size
        if nonfinite:
            self.skipped += 1
            self.nonfinite_in_row += 1
            if self.nonfinite_in_row >= self.cfg.train.max_nonfinite_in_row:
                raise self._diverged(self.nonfinite_in_row)
            return None
        self.nonfinite_in_row = 0
        self.good_step = self.step
        self.engine.step()
        return {k: float(v.detach()) for k, v in losses.items() if v.numel() == 1}

    def _completed(self) -> int:
        if self.is_main:
            (self.run_dir / COMPLETED_MARKER).write_text(json.dumps({"step": self.step}))
        return 0

    def _diverged(self, in_row: int) -> TrainingDiverged:
        """Save the diverging state aside; `latest` becomes the newest checkpoint whose weights gave a
        finite loss (later ones are set aside too), so that `--resume auto` continues from it."""
        aside = self.save(diverged_after=min(self.good_step, self.step - 1))
        message: list[str | None] = [None]
        if self.is_main:
            good = self.manager.latest()
            resume = (f"`latest` stays '{good}', the newest checkpoint whose weights gave finite losses"
                      if good is not None else "no checkpoint was saved before it")
            message[0] = (f"{in_row} non-finite losses in a row at step {self.step} ({self.skipped} skipped in all): "
                          f"the run diverged; its state is kept for debugging in '{aside}', {resume}. Lower "
                          f"optim.lr, check the data, or raise train.max_nonfinite_in_row")
        dist.broadcast_object_list(message, src=0)   # every rank says the same
        return TrainingDiverged(message[0])

    def _step_schedule(self) -> None:
        """Advance the lr schedule after an optimizer step DeepSpeed applied. DeepSpeed skips a step
        whose gradients overflowed (non-finite gradient norm; under fp16 it also lowers the loss
        scale): counted and reported, and the schedule waits for the next applied step."""
        if self.engine.was_step_applied():
            self.scheduler.step()
            return
        self.overflows += 1
        if self.is_main:
            scale = f"; loss scale now {self.engine.optimizer.loss_scale:g}" if self.fp16 else ""
            print(f"rlipv2: gradient overflow at step {self.step}: DeepSpeed skipped the update{scale}", flush=True)

def build_rlipv2(cfg: RunConfig, info: DistInfo) -> Parts:
    """The RLIPv2 model, its set criterion, the streaming loader of this rank and the validation hook."""
    model = build_model(cfg.model)
    if cfg.train.init_from:
        reinit = cfg.train.init_reinit
        state = {k: v for k, v in init_weights(cfg.train.init_from).items()
                 if not any(fnmatch.fnmatchcase(k, p) for p in reinit)}
        load_state(model, _fit_query_rows(state, model, cfg), cfg.train.init_from, reinit=reinit)
    evaluator = RelationValidation(cfg, info) if cfg.eval.data is not None else None
    try:
        loader = build_train_loader(cfg.data)
    except FileNotFoundError as exc:
        raise DataError(_missing(exc)) from exc
    return Parts(model, SetCriterion(cfg.loss), loader, evaluator)


def _flat(tree: Any, prefix: str) -> dict[str, Any]:
    """A config's nested dict as dotted keys (`model.alif.fusion`), as overrides name them."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}.{key}").items()}


def _run_of(ckpt: Path) -> Path:
    """The run directory of a checkpoint `RUN/checkpoints/step_N` (what train.init_from takes)."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt


def _missing(exc: FileNotFoundError) -> str:
    return (f"training data: '{exc.filename}' is missing ({exc.strerror}); the shard directory is incomplete: "
            f"convert or download that source again")


def _fit_query_rows(state: dict[str, torch.Tensor], model: nn.Module, cfg: RunConfig) -> dict[str, torch.Tensor]:
    """Fine-tuning with fewer queries than pre-training (200 → 128 on HICO-DET): keep the first
    subject and object query rows (the model's `resize_query_rows`), the first relation queries."""
    own = model.state_dict()
    out = dict(state)
    for key, value in state.items():
        if key not in own or own[key].shape == value.shape or own[key].shape[1:] != value.shape[1:]:
            continue
        rows = own[key].shape[0]
        if rows == cfg.model.num_queries:
            out[key] = resize_query_rows(value, rows, cfg.model.compat_original)
        elif rows == cfg.model.num_pairs and value.shape[0] > rows:
            out[key] = value[:rows]
    return out


def run(cfg: RunConfig, resume: str | None = None, build: Builder | None = None) -> int:
    """Set up this rank, build the parts of the run's task (or `build`'s) and train; returns the exit code."""
    from accelerate.utils import set_seed

    build = build or {"rlipv2": build_rlipv2, "tagger": build_tagger_parts}[cfg.task]
    if "TORCHELASTIC_RUN_ID" in os.environ:   # a torchrun rank, in a session of its own
        die_with_parent()
    # Listen from the start: SLURM sends its time-limit warning once, possibly while we build.
    stop = _StopSignal()
    stop.install()
    lock = None
    try:
        lock = _claim_run_directory(cfg, resume)
        info = init_distributed()
        set_seed(cfg.train.seed)                    # identical initial weights on every rank
        parts = build(cfg, info)
        set_seed(cfg.train.seed + info.rank)        # distinct dropout / sampling per rank (the original's `main.py: main`)
        trainer = Trainer(cfg, info, parts.model, parts.criterion, parts.loader, resume=resume,
                          evaluator=parts.evaluator, stop=stop, forward=parts.forward)
        return trainer.fit()
    except UserError as exc:
        if report_to_launcher(str(exc), int(os.environ.get("RANK", 0))):
            return 2
        raise
    finally:
        stop.restore()
        if lock is not None:
            lock.release()


def _claim_run_directory(cfg: RunConfig, resume: str | None = None):
    """On rank 0, before anything can fail: a new run (no --resume) only in an empty or new run
    directory, the directory's lock (unless a `spawn_local` launcher holds it for its ranks;
    returned to be released), and no `PREEMPTED` of an earlier run."""
    from rlipv2_scale.train.runlock import HELD_ENV, LOCK_FILE, RunLock

    if os.environ.get("RANK", "0") != "0":
        return None
    had_lock = (cfg.run.path / LOCK_FILE).exists()
    lock = None
    if HELD_ENV not in os.environ:      # first: a folder in use is named as such
        lock = RunLock(cfg.run.path)
        lock.acquire()
    # A new run in a used folder would overwrite its config and metrics, rotate its checkpoints
    # (or the user's folders named like them) away and leave `latest` on the old run's weights.
    held = sorted(p.name for p in cfg.run.path.iterdir() if p.name != LOCK_FILE) if cfg.run.path.is_dir() else []
    if resume is None and held:
        if lock is not None:
            lock.release()
            if not had_lock:
                (cfg.run.path / LOCK_FILE).unlink(missing_ok=True)
        raise UserError(f"run.dir '{cfg.run.path}' is not empty ({', '.join(held[:4])}"
                        f"{', ...' if len(held) > 4 else ''}): continue that run with --resume auto, or give a new "
                        f"run.dir (remove the folder yourself if it is to go)")
    (cfg.run.path / PREEMPTED_MARKER).unlink(missing_ok=True)
    return lock
