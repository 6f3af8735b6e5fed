"""Which model a config names, and the model of a model directory: the one place that knows both
RLIPv2 and the Relation Tagger (which subclasses it)."""
from __future__ import annotations

import torch
from torch import nn

from rlipv2_scale.models.artifacts import instantiate, read_model_dir, resolve_pretrained
from rlipv2_scale.models.config import ModelConfig
from rlipv2_scale.models.rlipv2 import RLIPv2
from rlipv2_scale.models.tagger import build_tagger


def build_model(cfg: ModelConfig, pretrained: bool = True) -> nn.Module:
    """The model of `cfg`; `pretrained=False` never loads weights (random init, no download)."""
    return build_tagger(cfg, pretrained=pretrained) if cfg.tagger else RLIPv2(cfg, pretrained=pretrained)


def load_pretrained(name_or_path: str, device: str | torch.device = "cpu") -> nn.Module:
    """The model of a model directory (or Hub id), RLIPv2 or Relation Tagger, in eval mode on `device`."""
    md = read_model_dir(resolve_pretrained(name_or_path))
    return instantiate(build_model(md.config, pretrained=False), md, device)
