"""ParSe decoding: parallel entity decoding, then sequential relation decoding (the original's
`models/dab_deformable/deformable_transformer.py: DABDeformableTransformerDecoderHOI`).

The entity decoder runs all `Nq` queries together (first half subjects, second half objects;
pair i = subject i + object P+i) and refines their boxes layer by layer. The relation decoder
runs `P` relation queries whose content starts from a multi-branch fusion of the paired subject
and object features, with the pair's midpoint box as reference.

Positional queries: DAB style (`dab=True`, ParSeDA: a sine embedding of the current reference box
through `ref_point_head`, scaled by `query_scale(h)` after the first layer) or static learned
positions passed in (`dab=False`, ParSeD).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rlipv2_scale.models.deformable import DeformableDecoderLayer
from rlipv2_scale.models.heads import MLP, refine_boxes
from rlipv2_scale.models.position import box_sine_embedding


class MultiBranchFusion(nn.Module):
    """MBF(a, b) = ReLU(sum_k W3_k ReLU(W1_k a * W2_k b)) (spatially-conditioned graphs' fusion)."""

    def __init__(self, d_model: int, width: int, branches: int):
        super().__init__()
        self.fc_1 = nn.ModuleList(nn.Linear(d_model, width) for _ in range(branches))
        self.fc_2 = nn.ModuleList(nn.Linear(d_model, width) for _ in range(branches))
        self.fc_3 = nn.ModuleList(nn.Linear(width, d_model) for _ in range(branches))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        branches = [f3(F.relu(f1(a) * f2(b))) for f1, f2, f3 in zip(self.fc_1, self.fc_2, self.fc_3)]
        out = branches[0]
        for branch in branches[1:]:      # summed in order, as the original
            out = out + branch
        return F.relu(out)


class _Decoder(nn.Module):
    def __init__(self, d_model: int, ffn_dim: int, dropout: float, n_levels: int, n_heads: int, n_points: int,
                 num_layers: int, dab: bool):
        super().__init__()
        self.d_model = d_model
        self.dab = dab
        self.layers = nn.ModuleList(DeformableDecoderLayer(d_model, ffn_dim, dropout, n_levels, n_heads, n_points)
                                    for _ in range(num_layers))
        if dab:
            self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
            self.query_scale = MLP(d_model, d_model, d_model, 2)
            for p in [*self.ref_point_head.parameters(), *self.query_scale.parameters()]:
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)

    def position(self, layer: int, h: torch.Tensor, ref_in: torch.Tensor,
                 query_pos: torch.Tensor | None) -> torch.Tensor:
        if not self.dab:
            if query_pos is None:
                raise ValueError("a non-DAB decoder needs query_pos")
            return query_pos
        pos = self.ref_point_head(box_sine_embedding(ref_in[:, :, 0], self.d_model // 2))
        return pos if layer == 0 else pos * self.query_scale(h)

    @staticmethod
    def scaled_reference(ref: torch.Tensor, valid_ratios: torch.Tensor) -> torch.Tensor:
        """ref [B,Q,2|4] in the valid image frame -> [B,Q,L,2|4] in each level's padded frame."""
        ratios = valid_ratios if ref.shape[-1] == 2 else torch.cat([valid_ratios, valid_ratios], -1)
        return ref[:, :, None] * ratios[:, None]


class EntityDecoder(_Decoder):
    """Decodes `Nq` entity queries; returns per-layer features and refined subject / object boxes."""

    def forward(self, tgt: torch.Tensor, reference: torch.Tensor, memory: torch.Tensor,
                spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, valid_ratios: torch.Tensor,
                memory_padding_mask: torch.Tensor | None, sub_box_mlps: list[nn.Module], obj_box_mlps: list[nn.Module],
                query_pos: torch.Tensor | None = None, self_attn_mask: torch.Tensor | None = None,
                query_padding_mask: torch.Tensor | None = None,
                ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """tgt [B,Nq,d]; reference [B,Nq,4] boxes (or [B,Nq,2] points) in [0,1].

        Returns (hs, sub_boxes, obj_boxes): lists over layers of [B,Nq,d], [B,P,4], [B,P,4]. The boxes
        carry gradient; the next layer's reference is their detached copy.
        """
        pairs = tgt.shape[1] // 2
        h = tgt
        hs, subs, objs = [], [], []
        for i, layer in enumerate(self.layers):
            ref_in = self.scaled_reference(reference, valid_ratios)
            pos = self.position(i, h, ref_in, query_pos)
            h = layer(h, pos, ref_in, memory, spatial_shapes, level_start_index, memory_padding_mask,
                      self_attn_mask, query_padding_mask)
            sub = refine_boxes(sub_box_mlps[i](h[:, :pairs]), reference[:, :pairs])
            obj = refine_boxes(obj_box_mlps[i](h[:, pairs:]), reference[:, pairs:])
            hs.append(h)
            subs.append(sub)
            objs.append(obj)
            reference = torch.cat([sub, obj], 1).detach()
        return hs, subs, objs


class RelationDecoder(_Decoder):
    """Decodes `P` relation queries around the midpoint box of each (subject, object) pair.

    By default the reference box stays the midpoint of the entity decoder's final boxes. With
    `refiners` (the original's behaviour, `compat_original`), the subject / object boxes are
    re-refined from the relation features by frozen box MLPs after every layer and re-averaged.
    """

    def forward(self, tgt: torch.Tensor, sub_ref: torch.Tensor, obj_ref: torch.Tensor, memory: torch.Tensor,
                spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, valid_ratios: torch.Tensor,
                memory_padding_mask: torch.Tensor | None, query_pos: torch.Tensor | None = None,
                refiners: tuple[list[nn.Module], list[nn.Module]] | None = None,
                query_padding_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        sub_ref, obj_ref = sub_ref.detach(), obj_ref.detach()
        reference = 0.5 * (sub_ref + obj_ref)
        h = tgt
        hs = []
        for i, layer in enumerate(self.layers):
            ref_in = self.scaled_reference(reference, valid_ratios)
            pos = self.position(i, h, ref_in, query_pos)
            h = layer(h, pos, ref_in, memory, spatial_shapes, level_start_index, memory_padding_mask,
                      None, query_padding_mask)
            hs.append(h)
            if refiners is not None:
                with torch.no_grad():
                    sub_ref = refine_boxes(refiners[0][i](h), sub_ref)
                    obj_ref = refine_boxes(refiners[1][i](h), obj_ref)
                reference = 0.5 * (sub_ref + obj_ref)
        return hs
