"""The trainer's periodic actions, one hook each (as detectron2's `HookBase`): the loop
(`Trainer._fit`) runs micro-steps and calls the hooks; each hook owns when and how it acts.

Order matters and is fixed by `default_hooks`: after an optimizer step the metrics are logged, then
validation runs, then a checkpoint is written; at the end a preempted run writes its preemption
checkpoint and nothing else, a finished one validates (unless it just did) and writes its last
checkpoint. Every hook runs on every rank (collectives inside must meet on all ranks).
"""
from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from rlipv2_scale.train.launch import PREEMPTED_MARKER
from rlipv2_scale.train.optim import group_lrs
from rlipv2_scale.train.telemetry import Window, peak_memory_bytes

if TYPE_CHECKING:
    from rlipv2_scale.train.engine import Trainer


class Hook:
    """Called by the loop: `after_batch` for every micro-batch (the seconds spent waiting for it, its
    scalar losses or None when it was skipped), `after_step` after every optimizer step,
    `after_train` once, when the loop ends."""

    def after_batch(self, trainer: Trainer, waited: float, losses: dict[str, float] | None) -> None: ...

    def after_step(self, trainer: Trainer) -> None: ...

    def after_train(self, trainer: Trainer) -> None: ...


class LogHook(Hook):
    """Loss terms averaged over a window of steps and over ranks, lrs, grad norm, images/s, data
    time, memory, skipped / overflowing steps, TFLOP/s and MFU: to `metrics.jsonl`, wandb and the
    progress bar, every `logging.every_steps`, at the last step and at a stop."""

    def __init__(self) -> None:
        self.window = Window()

    def after_batch(self, trainer: Trainer, waited: float, losses: dict[str, float] | None) -> None:
        self.window.data_time += waited
        if losses is not None:
            self.window.add(losses, trainer.cfg.data.batch_size * trainer.info.world_size)

    def after_step(self, trainer: Trainer) -> None:
        trainer.telemetry.advance()
        if trainer.step % trainer.cfg.logging.every_steps == 0 or trainer.step == trainer.total_steps \
                or trainer.stopping:
            self.log(trainer)
            self.window.reset()

    def log(self, trainer: Trainer) -> None:
        window = self.window
        names = sorted(window.sums)
        values = torch.tensor([window.means()[k] for k in names] + [window.data_time], dtype=torch.float64,
                              device=trainer.info.device)
        dist.all_reduce(values)
        values /= trainer.info.world_size
        elapsed = max(time.perf_counter() - window.start, 1e-9)
        grad_norm = trainer.engine.get_global_grad_norm()
        record: dict[str, Any] = {"step": trainer.step, "epoch": trainer.epoch, "samples": trainer.samples}
        record.update({k: float(v) for k, v in zip(names, values[:-1].tolist())})
        record.update({f"lr/{k}": v for k, v in group_lrs(trainer.optimizer).items()})
        record["grad_norm"] = None if grad_norm is None else float(grad_norm)
        record["images_per_s"] = window.images / elapsed
        record["data_time_share"] = float(values[-1]) / elapsed
        record["peak_memory_bytes"] = peak_memory_bytes(trainer.info.device)
        record["skipped_steps"] = trainer.skipped
        record["overflow_steps"] = trainer.overflows
        if trainer.fp16:
            record["loss_scale"] = float(trainer.engine.optimizer.loss_scale)
        if trainer.flops_per_image is not None:
            tflops = trainer.flops_per_image * record["images_per_s"] / trainer.info.world_size / 1e12
            record["tflops_per_device"] = tflops
            if trainer.peak_tflops:
                record["mfu"] = tflops / trainer.peak_tflops
        trainer.telemetry.log(record)


class EvalHook(Hook):
    """The validation hook (`validation.RelationValidation`, the same function as `eval --checkpoint`)
    every `eval.every_steps` and at the end (unless the last step was just validated)."""

    def __init__(self, evaluator) -> None:
        self.evaluator = evaluator

    def after_step(self, trainer: Trainer) -> None:
        every = trainer.cfg.eval.every_steps
        if every and trainer.step % every == 0:
            self.evaluate(trainer)

    def after_train(self, trainer: Trainer) -> None:
        every = trainer.cfg.eval.every_steps
        if not trainer.preempted and (not every or trainer.step % every):
            self.evaluate(trainer)

    def evaluate(self, trainer: Trainer) -> None:
        trainer.engine.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):   # the training RNG stream stays untouched
            result = self.evaluator(trainer.engine, trainer.step)
        trainer.engine.train()
        if trainer.is_main and result:
            record = {"step": trainer.step, **{f"val/{k}": v for k, v in result.items()}}
            trainer.telemetry.log(record)
            print("rlipv2: validation " + ", ".join(f"{k} {v:.2f}" for k, v in record.items() if k != "step")
                  + f" at step {trainer.step}", flush=True)


class CheckpointHook(Hook):
    """A checkpoint every `checkpoint.every_steps` (not at a stop or the last step, which end the run
    with their own) and at the end of a finished run (`checkpoint.at_end`)."""

    def after_step(self, trainer: Trainer) -> None:
        if trainer.stopping or trainer.step >= trainer.total_steps:
            return
        if trainer.step % trainer.cfg.checkpoint.every_steps == 0:
            trainer.save()

    def after_train(self, trainer: Trainer) -> None:
        if not trainer.preempted and trainer.cfg.checkpoint.at_end:
            trainer.save()


class PreemptionHook(Hook):
    """SIGTERM / SIGUSR1 (agreed on by every rank at each micro-step): checkpoint at the step
    boundary, leave `PREEMPTED` for the scheduler to requeue, exit `EXIT_PREEMPTED`."""

    def after_train(self, trainer: Trainer) -> None:
        if not trainer.preempted:
            return
        path = trainer.save()
        if trainer.is_main:
            (trainer.run_dir / PREEMPTED_MARKER).write_text(json.dumps({"step": trainer.step, "checkpoint": str(path)}))
            print(f"rlipv2: stop signal received: checkpointed step {trainer.step} to {path}; "
                  f"resume with --resume auto", flush=True)


def default_hooks(evaluator) -> list[Hook]:
    return [LogHook(), *([EvalHook(evaluator)] if evaluator is not None else []), CheckpointHook(), PreemptionHook()]
