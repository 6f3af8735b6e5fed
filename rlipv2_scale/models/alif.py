"""ALIF: Asymmetric Language-Image Fusion inside the deformable encoder (the original's
`models/deformable_transformer.py: RLIPv2_DeformableTransformerEncoder`).

A fusion round is a gated bidirectional attention between image tokens (by default only the
coarsest level) and the label sequence (`AlifBlock`), followed by one freshly initialised RoBERTa
layer on the language side. `AlifEncoder` runs a round before every `interval`-th deformable
encoder layer (layers 0, 2, 4 in the paper: 3 rounds, 6 vision layers) and returns the language
state after every round; decoder layer j classifies against state j.

Masks: by default padded image tokens and padded labels are masked as keys (they change no
output). `compat_original` reproduces the original, whose masks were no-ops in the bi-attention
and whose label mask in the RoBERTa layers came from the sign of the embeddings' sum.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.profiler import record_function
from torch.utils.checkpoint import checkpoint
from transformers.models.roberta.modeling_roberta import RobertaLayer

from rlipv2_scale.kernels import alif_bi_attention
from rlipv2_scale.models.config import ModelConfig
from rlipv2_scale.models.deformable import DeformableEncoderLayer
from rlipv2_scale.models.text import roberta_config


class AlifBlock(nn.Module):
    """One gated bi-attention between v [B,Nv,dv] and l [B,Lt,dl]; returns (LN(v) + g_v dV, LN(l) + g_l dL).

    Gates: `gamma_v` [dv], `gamma_l` [dl] initialised to `gate_init`; with `gate="vxac"` only
    element 0 is used (one scalar per direction, no tanh), with `gate="glip"` the whole vector
    (per-channel layer scale). Parameter names follow the original's `b_attn` module.
    """

    def __init__(self, v_dim: int, l_dim: int, embed_dim: int, num_heads: int, gate: str = "vxac",
                 gate_init: float = 0.25, attn_dropout: float = 0.1):
        super().__init__()
        self.num_heads = num_heads
        self.gate = gate
        self.attn_dropout = attn_dropout
        self.layer_norm_v = nn.LayerNorm(v_dim)
        self.layer_norm_l = nn.LayerNorm(l_dim)
        self.v_proj = nn.Linear(v_dim, embed_dim)          # queries (from vision)
        self.l_proj = nn.Linear(l_dim, embed_dim)          # keys (from language)
        self.values_v_proj = nn.Linear(v_dim, embed_dim)
        self.values_l_proj = nn.Linear(l_dim, embed_dim)
        self.out_v_proj = nn.Linear(embed_dim, v_dim)
        self.out_l_proj = nn.Linear(embed_dim, l_dim)
        self.gamma_v = nn.Parameter(torch.full((v_dim,), gate_init))
        self.gamma_l = nn.Parameter(torch.full((l_dim,), gate_init))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.v_proj, self.l_proj, self.values_v_proj, self.values_l_proj, self.out_v_proj,
                    self.out_l_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def gates(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.gate == "vxac":
            return self.gamma_v[0], self.gamma_l[0]
        return self.gamma_v, self.gamma_l

    def forward(self, v: torch.Tensor, l: torch.Tensor, v_pos: torch.Tensor, v_pad_mask: torch.Tensor | None = None,
                l_pad_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        gate_v, gate_l = self.gates()
        return alif_bi_attention(
            self.layer_norm_v(v), self.layer_norm_l(l), v_pos,
            self.v_proj.weight, self.v_proj.bias, self.l_proj.weight, self.l_proj.bias,
            self.values_v_proj.weight, self.values_v_proj.bias, self.values_l_proj.weight, self.values_l_proj.bias,
            self.out_v_proj.weight, self.out_v_proj.bias, self.out_l_proj.weight, self.out_l_proj.bias,
            gate_v, gate_l, self.num_heads, v_pad_mask=v_pad_mask, l_pad_mask=l_pad_mask,
            dropout_p=self.attn_dropout, training=self.training)


# The additive pad value of transformers 4.5.1 (the original's), where newer versions use finfo.min.
# They differ only when every label of an image is masked: -10000 shifts all scores alike and the
# layer attends as if unmasked, finfo.min swamps the scores and gives uniform attention.
ORIGINAL_MASK_VALUE = -10000.0


def _extended_mask(pad_mask: torch.Tensor | None, dtype: torch.dtype, compat: bool = False) -> torch.Tensor | None:
    """[B, Lt] bool (True = pad) -> HF additive mask [B, 1, 1, Lt]."""
    if pad_mask is None:
        return None
    fill = ORIGINAL_MASK_VALUE if compat else torch.finfo(dtype).min
    return pad_mask[:, None, None, :].to(dtype) * fill


class AlifEncoder(nn.Module):
    """Deformable encoder layers interleaved with ALIF rounds and sparse RoBERTa language layers."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        a = cfg.alif
        self.fusion = a.fusion
        self.interval = a.interval
        self.compat = cfg.compat_original
        self.checkpoint_encoder = cfg.checkpoint_encoder
        self.checkpoint_fusion = a.checkpointing
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(cfg.d_model, cfg.ffn_dim, cfg.dropout, cfg.num_feature_levels, cfg.num_heads,
                                   cfg.enc_points) for _ in range(cfg.enc_layers))
        rounds = cfg.fusion_rounds
        self.fusion_layers = nn.ModuleList(
            AlifBlock(cfg.d_model, cfg.text.hidden_size, a.embed_dim, a.num_heads, a.gate, a.gate_init,
                      a.attn_dropout) for _ in range(rounds))
        lang_cfg = roberta_config(cfg.text)
        lang_cfg._attn_implementation = "sdpa"   # a bare layer is not dispatched by from_pretrained
        self.roberta_layers = nn.ModuleList(RobertaLayer(lang_cfg) for _ in range(rounds))
        for layer in self.roberta_layers:   # freshly initialised, Xavier as the original
            for p in layer.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)

    def _fuse(self, k: int, src: torch.Tensor, pos: torch.Tensor, pad: torch.Tensor, lang: torch.Tensor,
              lang_pad: torch.Tensor | None, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        v, v_pos, v_pad = src[:, start:], pos[:, start:], pad[:, start:]
        if self.compat:   # the original's bi-attention masks had no effect
            v_pad_mask, l_pad_mask = None, None
        else:
            v_pad_mask, l_pad_mask = v_pad, lang_pad
        with record_function("alif"):
            v, lang = self.fusion_layers[k](v, lang, v_pos, v_pad_mask, l_pad_mask)
            out = self.roberta_layers[k](lang, attention_mask=_extended_mask(lang_pad, lang.dtype, self.compat))
            lang = out[0] if isinstance(out, tuple) else out   # transformers >= 5 returns the tensor
        src = torch.cat([src[:, :start], v], dim=1) if start > 0 else v
        return src, lang

    def forward(self, src: torch.Tensor, pos: torch.Tensor, pad: torch.Tensor, spatial_shapes: torch.Tensor,
                level_start_index: torch.Tensor, valid_ratios: torch.Tensor, lang: torch.Tensor,
                lang_pad: torch.Tensor | None, last_level_start: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """src/pos [B,S,d], pad [B,S] (True = pad), lang [B,Lt,dl]; returns (memory, language states)."""
        reference_points = DeformableEncoderLayer.reference_points(spatial_shapes, valid_ratios)
        start = last_level_start if self.fusion == "last_level" else 0
        grad_ckpt = self.training and torch.is_grad_enabled()
        states = []
        for i, layer in enumerate(self.layers):
            if self.fusion != "none" and i % self.interval == 0:
                k = i // self.interval
                if self.checkpoint_fusion and grad_ckpt:
                    src, lang = checkpoint(self._fuse, k, src, pos, pad, lang, lang_pad, start, use_reentrant=False)
                else:
                    src, lang = self._fuse(k, src, pos, pad, lang, lang_pad, start)
                states.append(lang)
            args = (src, pos, reference_points, spatial_shapes, level_start_index, pad)
            src = checkpoint(layer, *args, use_reentrant=False) if self.checkpoint_encoder and grad_ckpt \
                else layer(*args)
        return src, states
