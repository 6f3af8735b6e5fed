"""Model configuration: one dataclass tree, and the named configs of the paper's models.

`named_config(name)` returns `tiny | r50 | swin_t | swin_l | swin_l_hico | tagger_r50`. The big
ones reproduce the original's shapes exactly (`models/hoi.py`); `tiny` is a small, randomly
initialised, fully trainable model for CPU tests and the demo.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal

from rlipv2_scale.errors import ConfigError

BackboneName = Literal["resnet50", "swin_tiny", "swin_large", "tiny_resnet"]


@dataclass
class BackboneConfig:
    """Image backbone returning three levels (strides 8/16/32)."""

    name: BackboneName = "resnet50"
    # A timm model id with pretrained weights; loaded only when set (and the model is built with
    # pretrained=True).
    pretrained_weights: str | None = "resnet50.tv_in1k"
    # Freeze what the original freezes (R50 stem+layer1 with frozen BN; Swin norms / position
    # tables). Only meaningful for pretrained backbones: a random backbone must stay trainable.
    freeze_pretrained_parts: bool = True
    drop_path: float = 0.0              # Swin stochastic depth (0.2 Swin-T, 0.5 Swin-L in the scripts)
    channels: tuple[int, int, int, int] = (16, 32, 64, 128)  # tiny_resnet stage widths
    checkpointing: bool = False         # activation checkpointing inside the backbone


@dataclass
class TextConfig:
    """RoBERTa label encoder: one pooled vector per label string."""

    pretrained: str | None = "roberta-base"   # HF id / local dir of weights and tokenizer
    tokenizer: str | None = None              # tokenizer id / dir (default: `pretrained`, else a local BPE)
    vocab_size: int = 50265
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 514
    cache_eval_embeddings: bool = True        # reuse label embeddings while the model is in eval mode


@dataclass
class AlifConfig:
    """Asymmetric Language-Image Fusion (the original's `models/fuse_helper.py: RLIPv2_VLFuse`)."""

    fusion: Literal["last_level", "all_levels", "none"] = "last_level"
    embed_dim: int = 2048                 # inner width of the bi-attention (8 heads x 256)
    num_heads: int = 8
    interval: int = 2                     # one fusion round before every `interval`-th encoder layer
    gate: Literal["vxac", "glip"] = "vxac"  # scalar gate per direction / per-channel layer scale
    gate_init: float = 0.25
    attn_dropout: float = 0.1
    checkpointing: bool = False


@dataclass
class ModelConfig:
    """Defaults: RLIPv2-ParSeDA with ResNet-50, pre-training settings (the `r50` named config)."""

    name: str = "r50"
    variant: Literal["parseda", "parsed"] = "parseda"   # DAB-Deformable / Deformable-DETR queries
    tagger: bool = False                  # Relation Tagger (queries from given boxes; models/tagger.py)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    text: TextConfig = field(default_factory=TextConfig)
    alif: AlifConfig = field(default_factory=AlifConfig)
    d_model: int = 256
    num_heads: int = 8
    num_feature_levels: int = 4
    enc_layers: int = 6
    dec_layers: int = 3
    ffn_dim: int = 2048
    dropout: float = 0.0
    enc_points: int = 4
    dec_points: int = 4
    num_queries: int = 200                # entity queries: first half subjects, second half objects
    relation_query: Literal["mbf", "sum"] = "mbf"   # vanilla_MBF / vanilla relation-query content
    mbf_branches: int = 16
    mbf_width: int = 16
    # Position encoding: Swin runs subtract 0.5 from the cumulative pixel index before normalising.
    position_offset: float = 0.0
    checkpoint_encoder: bool = False      # activation checkpointing of the deformable encoder layers
    # Reproduce the [QUIRK]s of the original's `models/dab_deformable/deformable_transformer.py`,
    # `models/fuse_helper.py` and `util/misc.py` for loading released checkpoints.
    compat_original: bool = False

    def __post_init__(self) -> None:
        sizes = {"d_model": self.d_model, "num_heads": self.num_heads, "num_queries": self.num_queries,
                 "dec_layers": self.dec_layers, "ffn_dim": self.ffn_dim, "enc_points": self.enc_points,
                 "dec_points": self.dec_points, "mbf_branches": self.mbf_branches, "mbf_width": self.mbf_width}
        bad = {k: v for k, v in sizes.items() if v < 1}
        if bad or self.enc_layers < 0:
            raise ValueError(f"model sizes must be positive (enc_layers at least 0), got "
                             f"{bad or {'enc_layers': self.enc_layers}}")
        if self.num_queries % 2:
            raise ValueError(f"num_queries must be even (subject/object halves), got {self.num_queries}")
        if self.d_model % self.num_heads or (self.d_model // 2) % 2:
            raise ValueError(f"d_model={self.d_model} must be divisible by num_heads={self.num_heads} and by 4")
        if self.num_feature_levels != 4:
            raise ValueError("num_feature_levels must be 4 (three backbone levels + one stride-2 level)")
        if self.alif.fusion != "none":
            if self.enc_layers % self.alif.interval:
                raise ValueError(f"enc_layers={self.enc_layers} must be a multiple of alif.interval="
                                 f"{self.alif.interval}")
            if self.fusion_rounds != self.dec_layers:
                raise ValueError(f"decoder layer j classifies against language state j: dec_layers="
                                 f"{self.dec_layers} must equal the number of fusion rounds "
                                 f"enc_layers/alif.interval={self.fusion_rounds}")
            if self.alif.embed_dim % self.alif.num_heads:
                raise ValueError(f"alif.embed_dim={self.alif.embed_dim} not divisible by alif.num_heads")

    @property
    def fusion_rounds(self) -> int:
        return 0 if self.alif.fusion == "none" else self.enc_layers // self.alif.interval

    @property
    def num_pairs(self) -> int:
        return self.num_queries // 2


def _r50() -> ModelConfig:
    return ModelConfig(name="r50")


def _swin(name: str, backbone: BackboneName, weights: str, drop_path: float, queries: int = 200) -> ModelConfig:
    return ModelConfig(
        name=name,
        backbone=BackboneConfig(name=backbone, pretrained_weights=weights, drop_path=drop_path),
        num_queries=queries,
        position_offset=-0.5,
    )


def _tiny() -> ModelConfig:
    return ModelConfig(
        name="tiny",
        backbone=BackboneConfig(name="tiny_resnet", pretrained_weights=None, freeze_pretrained_parts=False,
                                channels=(16, 32, 64, 128)),
        text=TextConfig(pretrained=None, tokenizer=None, vocab_size=1024, hidden_size=64, num_layers=2,
                        num_heads=4, intermediate_size=128, max_position_embeddings=66),
        alif=AlifConfig(embed_dim=128, num_heads=4, interval=1),
        d_model=64,
        num_heads=4,
        enc_layers=2,
        dec_layers=2,
        ffn_dim=128,
        enc_points=2,
        dec_points=2,
        num_queries=20,
        mbf_branches=4,
        mbf_width=8,
    )


def _tagger_r50() -> ModelConfig:
    return ModelConfig(
        name="tagger_r50",
        variant="parsed",
        tagger=True,
        alif=AlifConfig(gate="glip"),
        ffn_dim=1024,
        dropout=0.1,
        relation_query="sum",
    )


def _tiny_tagger() -> ModelConfig:
    """The Relation Tagger's CPU twin: the tiny model with the tagger's queries, gate and dropout."""
    cfg = _tiny()
    cfg.name, cfg.variant, cfg.tagger, cfg.relation_query, cfg.dropout = "tiny_tagger", "parsed", True, "sum", 0.1
    cfg.alif.gate = "glip"
    return cfg


_NAMED = {
    "tiny": _tiny,
    "tiny_tagger": _tiny_tagger,
    "r50": _r50,
    "swin_t": lambda: _swin("swin_t", "swin_tiny", "swin_tiny_patch4_window7_224.ms_in1k", 0.2),
    "swin_l": lambda: _swin("swin_l", "swin_large", "swin_large_patch4_window7_224.ms_in22k", 0.5),
    "swin_l_hico": lambda: _swin("swin_l_hico", "swin_large", "swin_large_patch4_window7_224.ms_in22k", 0.5,
                                 queries=128),
    "tagger_r50": _tagger_r50,
}
NAMED_CONFIGS = tuple(_NAMED)
RELEASED = ("r50", "swin_t", "swin_l", "swin_l_hico", "tagger_r50")   # released RLIPv2 checkpoints


def named_config(name: str) -> ModelConfig:
    """A fresh copy of the named model config."""
    if name not in _NAMED:
        raise ConfigError(f"unknown model config '{name}'; choose one of {', '.join(NAMED_CONFIGS)}")
    return copy.deepcopy(_NAMED[name]())
