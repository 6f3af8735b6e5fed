"""AdamW with parameter groups chosen by module path, and the learning-rate schedules.

Groups (the original's `main.py: main`): parameters whose dotted name matches a group's patterns train with that
group's lr (backbone and label-text encoder: a tenth of the base lr); the rest with `optim.lr`.
Each group carries a `name` so that the lr of every group can be logged and checked after
DeepSpeed has wrapped the optimizer. Frozen parameters are left out (they are still saved).

The schedule is a multiplier of each group's base lr as a function of the optimizer step; the
trainer steps it exactly once per optimizer step, on every rank (never once per process per step).
"""
from __future__ import annotations

import math
from fnmatch import fnmatchcase
from typing import Callable

import torch
from torch import nn

from rlipv2_scale.errors import ConfigError
from rlipv2_scale.train.config import OptimConfig


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Trainable parameters split into the configured groups (first matching group wins)."""
    members: dict[str, list[nn.Parameter]] = {g.name: [] for g in cfg.groups}
    members["default"] = []
    matched = {g.name: 0 for g in cfg.groups}
    for name, param in model.named_parameters():
        group = next((g for g in cfg.groups if any(fnmatchcase(name, p) for p in g.patterns)), None)
        if group is not None:
            matched[group.name] += 1
        if param.requires_grad:
            members[group.name if group else "default"].append(param)
    unmatched = [name for name, n in matched.items() if n == 0]
    if unmatched:
        raise ConfigError(f"optim.groups {unmatched}: their patterns match no parameter of the model; "
                          f"parameter names look like {[n for n, _ in list(model.named_parameters())[:3]]}")
    groups = []
    for g in cfg.groups:
        wd = cfg.weight_decay if g.weight_decay is None else g.weight_decay
        groups.append({"name": g.name, "params": members[g.name], "lr": g.lr, "weight_decay": wd})
    groups.append({"name": "default", "params": members["default"], "lr": cfg.lr, "weight_decay": cfg.weight_decay})
    # ZeRO flattens each group into one buffer: empty groups (all frozen) are left out.
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    # Plain torch AdamW, handed to DeepSpeed as a client optimizer: it partitions any torch
    # optimizer and needs no compiled op (DeepSpeed's own Adam compiles one on CPU).
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                              weight_decay=cfg.weight_decay)


def lr_multiplier(cfg: OptimConfig, total_steps: int, steps_per_epoch: int) -> Callable[[int], float]:
    """step → factor applied to every group's base lr."""
    drops = sorted(e * steps_per_epoch for e in cfg.lr_drop_epochs)
    warmup = cfg.warmup_steps

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "step":
            return cfg.lr_drop_factor ** sum(step >= d for d in drops)
        span = max(total_steps - warmup, 1)
        progress = min(max(step - warmup, 0) / span, 1.0)
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg, total_steps, steps_per_epoch))


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """{group name: current lr} read from the optimizer that actually steps."""
    return {g.get("name", str(i)): float(g["lr"]) for i, g in enumerate(optimizer.param_groups)}
