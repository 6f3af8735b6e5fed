"""Prediction heads: box MLPs, the label-text resizer and text-similarity classification (the original's `models/hoi.py: RLIP_ParSeDA.forward`)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Prior bias of every logit: sigmoid(c) = 0.01 (focal-loss style initialisation).
PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)


class MLP(nn.Module):
    """Linear layers with ReLU between them (`layers.0`, `layers.1`, ... as in DETR)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def box_mlp(d_model: int) -> MLP:
    """256 -> 256 -> 256 -> 4 box delta in logit space, last layer zero-initialised (boxes start at the reference)."""
    mlp = MLP(d_model, d_model, 4, 3)
    last = mlp.layers[-1]
    assert isinstance(last, nn.Linear)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return mlp


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def refine_boxes(delta: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Box refinement: sigmoid(delta + logit(reference)); a 2-d reference point only offsets (cx, cy)."""
    if reference.shape[-1] == 4:
        return (delta + inverse_sigmoid(reference)).sigmoid()
    return torch.cat([delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], -1).sigmoid()


class FeatureResizer(nn.Module):
    """Label-state resizer: Linear(dl -> d) + LayerNorm(eps 1e-12) + Dropout(0.1) (MDETR's FeatureResizer)."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.1):
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)
        self.layer_norm = nn.LayerNorm(out_dim, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.layer_norm(self.fc(x)))


class LabelSimilarity(nn.Module):
    """Logits as similarity with projected, L2-normalised label states, plus a learnable per-label bias.

    `logit = (h + a) · projection(normalize(text) / 2) + c`: `a·t` is a learned bias for every
    label, `c` the prior bias; image features are not normalised, there is no temperature.
    Subjects and objects share `bias_obj`, relations use `bias_rel`.
    """

    def __init__(self, d_model: int):
        super().__init__()
        self.projection = nn.Linear(d_model, d_model)
        self.bias_obj = nn.Parameter(torch.zeros(d_model))
        self.bias_rel = nn.Parameter(torch.zeros(d_model))

    def project(self, text: torch.Tensor) -> torch.Tensor:
        return self.projection(F.normalize(text, dim=-1) / 2)

    @staticmethod
    def logits(h: torch.Tensor, bias: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """h [B,P,d], text [B,L,d] (projected) -> [B,P,L]."""
        return torch.matmul(h + bias, text.transpose(-1, -2)) + PRIOR_BIAS
