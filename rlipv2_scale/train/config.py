"""`RunConfig`: one training run = model + data + loss + trainer settings, loaded from a YAML recipe.

A recipe is plain data (`recipes/**.yaml`, `extends:` another recipe). `model.name` picks a named
model config (`tiny | r50 | swin_t | swin_l | ...`) whose fields the recipe's other `model.*` keys
override; everything else maps one to one onto the dataclasses below. Unknown keys are errors that
name the dotted key; `key=value` overrides come from the command line.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rlipv2_scale.config import deep_merge, from_dict, parse_overrides, read_yaml, to_dict
from rlipv2_scale.data.config import DataConfig
from rlipv2_scale.errors import ConfigError
from rlipv2_scale.models.config import ModelConfig, named_config
from rlipv2_scale.models.losses import LossConfig


@dataclass
class RunSection:
    name: str = "run"
    dir: str | None = None            # run directory; default runs/<name>

    @property
    def path(self) -> Path:
        return Path(self.dir if self.dir is not None else Path("runs") / self.name)


@dataclass
class TrainConfig:
    epochs: int = 20
    max_steps: int | None = None      # stop after this many optimizer steps (overrides epochs)
    # Optimizer steps per epoch; derived from the loader's length when it has one.
    steps_per_epoch: int | None = None
    grad_accum: int = 1               # micro-batches per optimizer step (data.batch_size each, per rank)
    zero_stage: Literal[0, 1, 2, 3] = 2   # 0 = plain data parallel
    # ZeRO-3 keeps parameters smaller than this whole on every rank (DeepSpeed's default).
    zero3_persistence_threshold: int = 100_000
    # DeepSpeed's gradient-reduction and weight all-gather buckets, in elements (its defaults): more,
    # smaller collectives with smaller buckets, less memory (`rlipv2 scale plan` counts both).
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    # auto: bf16 on GPU, fp32 on CPU; fp16 (GPU): DeepSpeed's dynamic loss scaling, overflowing steps skipped.
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    grad_clip: float = 0.1            # global L2 norm (the original's `main.py: --clip_max_norm`), applied by DeepSpeed
    seed: int = 42                    # + rank, as the original
    # Activation checkpointing, switched on in the model config: any of backbone, encoder, alif.
    activation_checkpointing: list[Literal["backbone", "encoder", "alif"]] = field(default_factory=list)
    max_nonfinite_in_row: int = 10    # skipped (non-finite loss) steps in a row before the run stops
    init_from: str | None = None      # weights to start from: a model directory, a .safetensors file or a run
    # Layers (fnmatch patterns of parameter names) that keep their fresh initialisation instead of
    # init_from's weights, e.g. ["classifier.*"]; every other key must fit exactly.
    init_reinit: list[str] = field(default_factory=list)
    # Merged into the generated DeepSpeed config (offload, NVMe, profiling, ...): launch.merge_deepspeed.
    deepspeed: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise ValueError(f"train.epochs must be positive, got {self.epochs}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"train.max_steps must be positive, got {self.max_steps}")
        if self.grad_accum <= 0:
            raise ValueError(f"train.grad_accum must be positive, got {self.grad_accum}")
        if self.max_nonfinite_in_row <= 0:
            raise ValueError("train.max_nonfinite_in_row must be positive")
        for key in ("reduce_bucket_size", "allgather_bucket_size"):
            if getattr(self, key) <= 0:
                raise ValueError(f"train.{key} must be a positive number of elements, got {getattr(self, key)}")
        _check_range("train.grad_clip", self.grad_clip, "0 (no clipping) or a positive norm")


@dataclass
class ParamGroupConfig:
    """Parameters whose dotted name matches one of `patterns` (fnmatch) train with `lr`."""

    name: str
    patterns: list[str]
    lr: float
    weight_decay: float | None = None     # default: optim.weight_decay

    def __post_init__(self) -> None:
        _check_range(f"optim.groups '{self.name}' lr", self.lr, "a learning rate >= 0")
        if self.weight_decay is not None:
            _check_range(f"optim.groups '{self.name}' weight_decay", self.weight_decay, "a weight decay >= 0")


def _default_groups() -> list[ParamGroupConfig]:
    # The original's `main.py: main`: "backbone" and the label-text encoder train at a tenth of the base lr.
    return [ParamGroupConfig("backbone", ["backbone.*"], 1.41e-5),
            ParamGroupConfig("text_encoder", ["text_encoder.*"], 1.41e-5)]


@dataclass
class OptimConfig:
    lr: float = 1.41e-4                   # everything not matched by a group
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    groups: list[ParamGroupConfig] = field(default_factory=_default_groups)
    schedule: Literal["step", "cosine", "constant"] = "step"
    lr_drop_epochs: list[int] = field(default_factory=lambda: [15])   # step: x lr_drop_factor at each
    lr_drop_factor: float = 0.1
    warmup_steps: int = 0                 # linear warm-up from 0, then the schedule
    min_lr_ratio: float = 0.0             # cosine floor as a fraction of each group's lr

    def __post_init__(self) -> None:
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names) or "default" in names:
            raise ValueError(f"optim.groups names must be unique and not 'default', got {names}")
        if self.warmup_steps < 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError("optim.warmup_steps must be >= 0 and optim.min_lr_ratio in [0, 1]")
        _check_range("optim.lr", self.lr, "a learning rate >= 0")
        _check_range("optim.weight_decay", self.weight_decay, "a weight decay >= 0")
        _check_range("optim.eps", self.eps, "a small positive number such as 1e-8", low_open=True)
        for i, beta in enumerate(self.betas):
            _check_range(f"optim.betas[{i}]", beta, "a number in [0, 1), such as 0.9 and 0.999", high=1.0)
        _check_range("optim.lr_drop_factor", self.lr_drop_factor, "a positive factor such as 0.1", low_open=True)


def _check_range(key: str, value: float, want: str, *, low_open: bool = False, high: float | None = None) -> None:
    """Finite, >= 0 (> 0 with `low_open`), < `high`: what torch's AdamW and DeepSpeed's clipping need,
    checked when the recipe loads instead of as a traceback (or a silent NaN run) after start-up."""
    if not math.isfinite(value) or value < 0 or (low_open and value == 0) or (high is not None and value >= high):
        raise ValueError(f"{key} is {value}: it must be {want}")


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep_last: int = 3            # plus, while the newest is untried, the newest known good (checkpoint.py: prune)
    at_end: bool = True

    def __post_init__(self) -> None:
        if self.every_steps <= 0 or self.keep_last <= 0:
            raise ValueError("checkpoint.every_steps and checkpoint.keep_last must be positive")


@dataclass
class LoggingConfig:
    every_steps: int = 10                 # metrics.jsonl / wandb cadence
    progress: bool = True                 # progress bar with ETA on rank 0
    wandb: bool = True
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "rlipv2-scale"
    wandb_entity: str | None = None
    # FLOPs of one training image (forward + backward); measured once on GPU when None.
    flops_per_image: float | None = None
    peak_tflops: float | None = None      # accelerator peak for MFU; looked up from the device name when None


@dataclass
class EvalConfig:
    """Periodic validation with the HICO-DET protocol; off unless `data` is set."""

    data: DataConfig | None = None        # validation shards, with the benchmark's fixed label lists
    every_steps: int = 0                  # 0: only at the end of training
    max_batches: int | None = None        # per rank
    # Also report unseen / seen mAP: a split of the label space (UC-RF / UC-NF / UO) or a JSON file
    # of unseen [subject, object, verb] index triplets.
    zero_shot: str | None = None
    nms: bool = True                      # triplet NMS of the fine-tuning scripts (--use_nms_filter)
    only: bool = False                    # evaluate the initial weights and stop (zero-shot NF)
    # Who may be a subject: "auto" the person class when the object list has one (HOI benchmarks,
    # where only person-subject triplets count), "any" every class (scene graphs, the synthetic world).
    subject: Literal["auto", "any"] = "auto"

    def __post_init__(self) -> None:
        if self.data is not None and not self.data.fixed_labels:
            raise ValueError("eval.data needs fixed_obj_labels / fixed_rel_labels (the benchmark's label lists)")
        if self.only and self.data is None:
            raise ValueError("eval.only needs eval.data")


@dataclass
class TaggerTrainingConfig:
    """The `tagger:` section of a Relation Tagger run (`task: tagger`). Defaults: the setting of the
    released pseudo-labels ("Noi24": box 0.4, label 0.2; the R50 script's 0.6 / 0.3 is
    `box_noise=0.6 label_noise=0.3`)."""

    box_noise: float = 0.4
    label_noise: float = 0.2
    negative_pairs: bool = True      # fill the pair slots with unannotated pairs (zero relation targets)

    def __post_init__(self) -> None:
        if not 0.0 <= self.box_noise <= 1.0 or not 0.0 <= self.label_noise <= 1.0:
            raise ValueError(f"tagger.box_noise and tagger.label_noise must be in [0, 1], got "
                             f"{self.box_noise} / {self.label_noise}")


@dataclass
class RunConfig:
    model: ModelConfig
    data: DataConfig
    # What the run trains: the RLIPv2 detector, or the Relation Tagger that pseudo-labels data
    # (given boxes, identity matching; `train/tagger.py`).
    task: Literal["rlipv2", "tagger"] = "rlipv2"
    tagger: TaggerTrainingConfig = field(default_factory=TaggerTrainingConfig)
    run: RunSection = field(default_factory=RunSection)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


_ACTIVATION_SWITCHES = {"backbone": ("backbone", "checkpointing"), "encoder": (None, "checkpoint_encoder"),
                        "alif": ("alif", "checkpointing")}


def _expand_model(data: dict[str, Any]) -> dict[str, Any]:
    model = data.get("model")
    if not isinstance(model, dict) or "name" not in model:
        raise ConfigError("recipe key 'model.name' is required: one of the named model configs "
                          "(tiny, r50, swin_t, swin_l, ...), optionally with other model.* keys overriding it")
    try:
        base = to_dict(named_config(model["name"]))
    except ConfigError as exc:
        raise ConfigError(f"config key 'model.name': {exc}") from None
    return {**data, "model": deep_merge(base, model)}


def _check_task(cfg: RunConfig) -> None:
    if cfg.task == "rlipv2":
        if cfg.model.tagger:
            raise ConfigError(f"model.name '{cfg.model.name}' is a Relation Tagger: set task: tagger to train it")
        return
    if not cfg.model.tagger:
        raise ConfigError(f"task: tagger needs a Relation Tagger model (model.name tagger_r50 or tiny_tagger), "
                          f"got '{cfg.model.name}'")
    if cfg.loss.matching != "identity" or cfg.loss.rel_loss != "focal" or cfg.loss.pseudo_targets:
        raise ConfigError("task: tagger needs loss.matching=identity, loss.rel_loss=focal and "
                          "loss.pseudo_targets=false (query pair i is supervised by the i-th given pair)")
    if cfg.eval.data is not None:
        raise ConfigError("eval.data (relation-detection validation) does not apply to the Relation Tagger; "
                          "remove it")


def run_config_from_dict(data: dict[str, Any]) -> RunConfig:
    cfg = from_dict(RunConfig, _expand_model(data))
    _check_task(cfg)
    for part in cfg.train.activation_checkpointing:
        section, key = _ACTIVATION_SWITCHES[part]
        setattr(getattr(cfg.model, section) if section else cfg.model, key, True)
    return cfg


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Recipe YAML (+ `key=value` overrides) → validated `RunConfig`."""
    data = deep_merge(read_yaml(path), parse_overrides(list(overrides or [])))
    return run_config_from_dict(data)
