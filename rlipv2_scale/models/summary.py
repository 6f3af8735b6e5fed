"""Parameter counts of a model, in total and per architectural group (shared tensors counted once).

Big configs are built on the meta device: shapes only, no memory, no weights, no download.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rlipv2_scale.config import load_config
from rlipv2_scale.models.config import NAMED_CONFIGS, ModelConfig, named_config

# Module-path prefix -> group name (first match wins; anything else is grouped by its top-level name).
GROUPS = (
    ("backbone.", "backbone"),
    ("input_proj.", "input_proj"),
    ("text_encoder.", "text_encoder"),
    ("encoder.fusion_layers.", "alif"),
    ("encoder.roberta_layers.", "language_layers"),
    ("encoder.layers.", "encoder"),
    ("ho_decoder.", "entity_decoder"),
    ("verb_decoder.", "relation_decoder"),
    ("sub_bbox_embed.", "box_heads"),
    ("obj_bbox_embed.", "box_heads"),
    ("verb_tgt_generator.", "multi_branch_fusion"),
    ("resizer.", "text_resizer"),
    ("classifier.", "classifier"),
)


def group_of(name: str) -> str:
    for prefix, group in GROUPS:
        if name.startswith(prefix):
            return group
    return name.split(".")[0]


def count_parameters(model: nn.Module) -> dict:
    """{"total", "trainable", "groups": {group: count}}; `named_parameters` yields a shared tensor once."""
    total = trainable = 0
    groups: dict[str, int] = {}
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        trainable += n if p.requires_grad else 0
        group = group_of(name)
        groups[group] = groups.get(group, 0) + n
    return {"total": total, "trainable": trainable, "groups": groups}


def resolve_config(spec: str) -> ModelConfig:
    """A named config (`tiny`, `r50`, ...) or the path of a YAML file holding a ModelConfig."""
    if spec in NAMED_CONFIGS:
        return named_config(spec)
    if Path(spec).is_file():
        return load_config(ModelConfig, spec)
    from rlipv2_scale.errors import ConfigError

    raise ConfigError(f"'{spec}' is neither a named model config ({', '.join(NAMED_CONFIGS)}) nor a YAML file")


def model_summary(cfg: ModelConfig) -> dict:
    """Build `cfg` on the meta device (random init, nothing loaded) and count its parameters."""
    from rlipv2_scale.models.build import build_model

    with torch.device("meta"):
        model = build_model(cfg, pretrained=False)
    return {"config": cfg.name, **count_parameters(model)}
