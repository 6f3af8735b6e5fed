"""Training the Relation Tagger with the project's trainer (reference §3.4, loss §2.7).

The Tagger also needs the given pairs at forward time: its `Parts.forward` passes the batch's
targets as `pairs`. `TaggerLoader` wraps the streaming loader and fills every image's pair slots
(annotated pairs first, then random unannotated ordered pairs with all-zero relation targets, as
the original's `VGRelTagger`). The criterion is `SetCriterion` with identity matching (query pair
i ↔ the i-th given pair) and the hard focal loss.

A Tagger recipe is a training recipe with one more section, `tagger:` (`TaggerTrainingConfig`):
the box / label noise of the denoising training and whether negatives fill the slots.
`rlipv2 data train-tagger RECIPE` runs it; `rlipv2 data export-tagger RUN OUT` writes the model
folder (`model.yaml` + `model.safetensors`) that `rlipv2 data tag --checkpoint` loads.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterator

import torch

from rlipv2_scale.config import deep_merge, from_dict, parse_overrides, read_yaml, save_config
from rlipv2_scale.data.batch import Batch, Target
from rlipv2_scale.errors import ConfigError, UserError
from rlipv2_scale.models.tagger import TaggerNoise, add_negative_pairs, build_tagger
from rlipv2_scale.train.config import RunConfig, run_config_from_dict


@dataclass
class TaggerTrainingConfig:
    """The `tagger:` section of a Tagger recipe. Defaults: the setting of the released pseudo-labels
    ("Noi24": box 0.4, label 0.2; the R50 script's 0.6 / 0.3 is `box_noise=0.6 label_noise=0.3`)."""

    box_noise: float = 0.4
    label_noise: float = 0.2
    negative_pairs: bool = True      # fill the pair slots with unannotated pairs (zero relation targets)

    def __post_init__(self) -> None:
        if not 0.0 <= self.box_noise <= 1.0 or not 0.0 <= self.label_noise <= 1.0:
            raise ValueError(f"tagger.box_noise and tagger.label_noise must be in [0, 1], got "
                             f"{self.box_noise} / {self.label_noise}")


@dataclass
class TaggerRunConfig(RunConfig):
    tagger: TaggerTrainingConfig = field(default_factory=TaggerTrainingConfig)


def tagger_run_config_from_dict(data: dict[str, Any]) -> TaggerRunConfig:
    data = dict(data)
    section = data.pop("tagger", None) or {}
    base = run_config_from_dict(data)
    if not base.model.tagger:
        raise ConfigError(f"model.name '{base.model.name}' is not a Relation Tagger: use tagger_r50 or tiny_tagger")
    if base.loss.matching != "identity" or base.loss.rel_loss != "focal" or base.loss.pseudo_targets:
        raise ConfigError("a Tagger recipe needs loss.matching=identity, loss.rel_loss=focal and "
                          "loss.pseudo_targets=false (query pair i is supervised by the i-th given pair, §2.7)")
    if base.eval.data is not None:
        raise ConfigError("eval.data (HICO-DET validation) does not apply to the Relation Tagger; remove it")
    tagger = from_dict(TaggerTrainingConfig, section, prefix="tagger")
    return TaggerRunConfig(**{f.name: getattr(base, f.name) for f in fields(RunConfig)}, tagger=tagger)


def load_tagger_run_config(path: str | Path, overrides: list[str] | None = None) -> TaggerRunConfig:
    """Tagger recipe YAML (+ `key=value` overrides, `tagger.*` included) → `TaggerRunConfig`."""
    return tagger_run_config_from_dict(deep_merge(read_yaml(path), parse_overrides(list(overrides or []))))


def tagger_forward(engine: torch.nn.Module, images: torch.Tensor, batch: Batch) -> dict:
    """The trainer's forward for a Tagger: the batch's (slot-filled) targets are the given pairs."""
    return engine(images, batch.pixel_mask, batch.obj_texts, batch.rel_texts, batch.targets)


class TaggerLoader:
    """The Tagger's batches: the inner loader's, each image's pair slots filled (annotated pairs,
    then negatives). Resumes exactly (the negatives' RNG is part of the state)."""

    def __init__(self, inner, num_slots: int, negative_pairs: bool = True, seed: int = 0):
        self.inner, self.num_slots, self.negative_pairs = inner, num_slots, negative_pairs
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.inner)

    def fill(self, target: Target) -> Target:
        if self.negative_pairs:
            return add_negative_pairs(target, self.num_slots, self.generator)
        if target.sub_index.numel() > self.num_slots:
            return add_negative_pairs(target, self.num_slots, self.generator)   # samples num_slots positives
        return target

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.inner:
            yield replace(batch, targets=[self.fill(t) for t in batch.targets])

    def state_dict(self) -> dict:
        return {"loader": self.inner.state_dict(), "negatives_rng": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["loader"])
        self.generator.set_state(state["negatives_rng"])


def build_tagger_parts(cfg: RunConfig, info) -> Any:
    """The trainer's builder for a Tagger run (`engine.run(cfg, build=build_tagger_parts)`)."""
    from rlipv2_scale.data.streaming import build_train_loader
    from rlipv2_scale.models.losses import SetCriterion
    from rlipv2_scale.train import checkpoint as ckpt_io
    from rlipv2_scale.train.engine import Parts

    if not isinstance(cfg, TaggerRunConfig):
        raise UserError("build_tagger_parts needs a TaggerRunConfig (load_tagger_run_config)")
    noise = TaggerNoise(box=cfg.tagger.box_noise, label=cfg.tagger.label_noise)
    model = build_tagger(cfg.model, pretrained=True, noise=noise)
    if cfg.train.init_from:
        load_init(model, ckpt_io.load_weights(cfg.train.init_from), cfg.train.init_from)
    loader = TaggerLoader(build_train_loader(cfg.data), cfg.model.num_pairs, cfg.tagger.negative_pairs,
                          seed=cfg.data.seed + info.rank)
    return Parts(model, SetCriterion(cfg.loss), loader, forward=tagger_forward)


# Layers a detection / RLIPv2 checkpoint does not have: the Tagger's own query layers, and the
# label-text encoder when the checkpoint is a plain detector (it then keeps its roberta-base weights).
TAGGER_ONLY = ("coord_proj.", "verb_tgt.", "text_encoder.")


def load_init(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Initialise from a detector or RLIPv2 checkpoint (§3.4: Deformable-DETR OD weights): every key
    must fit; only the Tagger's own layers (and the text encoder) may be missing. Returns those."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    bad_missing = [k for k in missing if not k.startswith(TAGGER_ONLY)]
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if bad_missing or unexpected or shapes:
        raise UserError(f"train.init_from '{source}' does not fit the Tagger: missing {bad_missing[:8]}, unexpected "
                        f"{unexpected[:8]}, shape mismatch {shapes[:8]}; only {list(TAGGER_ONLY)} may be absent")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)
    return missing


def train_tagger(cfg: TaggerRunConfig, resume: str | None = None) -> int:
    from rlipv2_scale.train.engine import run

    return run(cfg, resume=resume, build=build_tagger_parts)


def export_tagger(run_or_checkpoint: str | Path, out: str | Path) -> Path:
    """A Tagger run's latest (or the given) checkpoint → a model folder for `rlipv2 data tag`."""
    from rlipv2_scale.models.original import CONFIG_FILE, WEIGHTS_FILE
    from rlipv2_scale.models.rlipv2 import build_model
    from rlipv2_scale.train import checkpoint as ckpt_io

    try:
        ckpt = ckpt_io.resolve_resume(str(run_or_checkpoint), Path(run_or_checkpoint))
    except UserError:
        ckpt = None
    if ckpt is None:
        raise UserError(f"'{run_or_checkpoint}' holds no complete Tagger checkpoint: pass the run directory of "
                        f"`rlipv2 data train-tagger` (run.dir) or one of its checkpoints/step_* directories")
    cfg = load_tagger_run_config(ckpt / "config.yaml")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = replace(cfg.model)
    if model_cfg.text.tokenizer:
        shutil.copytree(model_cfg.text.tokenizer, out / "tokenizer", dirs_exist_ok=True)
        model_cfg.text = replace(model_cfg.text, tokenizer=str((out / "tokenizer").resolve()))
    ckpt_io.export_checkpoint(ckpt, out / WEIGHTS_FILE, build_model(model_cfg, pretrained=False))
    save_config(model_cfg, out / CONFIG_FILE)
    return out
