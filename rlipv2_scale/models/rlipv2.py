"""RLIPv2 assembled: backbone -> 4-level input projections -> ALIF encoder (with the RoBERTa label
encoder) -> ParSe entity / relation decoders -> box and text-similarity heads.

`model(images, pixel_mask, obj_texts, rel_texts)` returns a `RelationOutput` (models/outputs.py):
the last decoder layer's predictions (`pred_sub_boxes`, `pred_obj_boxes` [B,P,4] cxcywh in [0,1];
`pred_sub_logits`, `pred_obj_logits` [B,P,Lo]; `pred_rel_logits` [B,P,Lr]), the earlier layers in
`aux_outputs`, and `rel_text_embeds` [Lr,dl] (pre-fusion pooled relation-text embeddings). Label
embeddings can be passed precomputed (`label_embeds` [Lo+Lr, dl]), e.g. once per evaluation.

Variants: ParSeDA (DAB-Deformable-DETR queries: content `tgt_embed`, anchor boxes
`refpoint_embed`) and ParSeD (Deformable-DETR queries: `query_embed` split into position, content
and relation content; 2-d reference points from `reference_points_sub/obj`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from rlipv2_scale.errors import UserError
from rlipv2_scale.models.alif import AlifEncoder
from rlipv2_scale.models.artifacts import PretrainedMixin
from rlipv2_scale.models.backbone import Backbone
from rlipv2_scale.models.config import ModelConfig
from rlipv2_scale.models.heads import MLP, FeatureResizer, LabelSimilarity, box_mlp
from rlipv2_scale.models.outputs import RelationOutput, RelationPredictions
from rlipv2_scale.models.parse import EntityDecoder, MultiBranchFusion, RelationDecoder
from rlipv2_scale.models.position import SinePositionEncoding
from rlipv2_scale.models.text import LabelEncoder


@dataclass
class Encoded:
    """Everything the decoders need from the encoder pass."""

    memory: torch.Tensor              # [B, S, d]
    memory_padding_mask: torch.Tensor  # [B, S] True = pad
    spatial_shapes: torch.Tensor      # [L, 2] (H, W)
    level_start_index: torch.Tensor   # [L]
    valid_ratios: torch.Tensor        # [B, L, 2] (w, h)
    text_states: list[torch.Tensor]   # per decoder layer: [B, Lt, d] language state (resized)
    label_embeds: torch.Tensor        # [Lt, dl] pre-fusion pooled label embeddings
    num_obj: int                      # Lo (the object texts come first, "no objects" last among them)


@dataclass
class EntityQueries:
    tgt: torch.Tensor                       # [B, Nq, d] content
    reference: torch.Tensor                 # [B, Nq, 4] boxes or [B, Nq, 2] points, in [0, 1]
    query_pos: torch.Tensor | None = None   # [B, Nq, d] static positions (ParSeD)
    self_attn_mask: torch.Tensor | None = None     # [Nq, Nq] or [B*heads, Nq, Nq] bool, True = blocked
    padding_mask: torch.Tensor | None = None       # [B, Nq] bool, True = unused slot


def _valid_ratio(mask: torch.Tensor) -> torch.Tensor:
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).float()
    valid_w = (~mask[:, 0, :]).sum(1).float()
    return torch.stack([valid_w / w, valid_h / h], -1)


class RLIPv2(PretrainedMixin, nn.Module):
    is_tagger = False

    def __init__(self, cfg: ModelConfig, pretrained: bool = True):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.backbone = Backbone(cfg.backbone, pretrained=pretrained)
        channels = self.backbone.num_channels
        groups = min(32, d // 2)
        self.input_proj = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(c, d, kernel_size=1), nn.GroupNorm(groups, d)) for c in channels]
            + [nn.Sequential(nn.Conv2d(channels[-1], d, kernel_size=3, stride=2, padding=1), nn.GroupNorm(groups, d))])
        for proj in self.input_proj:
            conv = cast(nn.Conv2d, cast(nn.Sequential, proj)[0])
            assert conv.bias is not None
            nn.init.xavier_uniform_(conv.weight, gain=1)
            nn.init.zeros_(conv.bias)
        self.position = SinePositionEncoding(d // 2, offset=cfg.position_offset)
        self.level_embed = nn.Parameter(torch.randn(cfg.num_feature_levels, d))
        self.text_encoder = LabelEncoder.build(cfg.text, pretrained=pretrained)
        self.encoder = AlifEncoder(cfg)
        self.resizer = FeatureResizer(cfg.text.hidden_size, d)
        dab = cfg.variant == "parseda"
        dec_args = (d, cfg.ffn_dim, cfg.dropout, cfg.num_feature_levels, cfg.num_heads, cfg.dec_points,
                    cfg.dec_layers, dab)
        self.ho_decoder = EntityDecoder(*dec_args)
        self.verb_decoder = RelationDecoder(*dec_args)
        if cfg.relation_query == "mbf":
            self.verb_tgt_generator = MultiBranchFusion(d, cfg.mbf_width, cfg.mbf_branches)
        # Box MLPs: [0, dec_layers) for the entity decoder; [dec_layers, 2*dec_layers) are the
        # original's relation-decoder refiners, frozen (they never receive a gradient there).
        self.sub_bbox_embed = nn.ModuleList(box_mlp(d) for _ in range(2 * cfg.dec_layers))
        self.obj_bbox_embed = nn.ModuleList(box_mlp(d) for _ in range(2 * cfg.dec_layers))
        for mlps in (self.sub_bbox_embed, self.obj_bbox_embed):
            last = cast(nn.Linear, cast(MLP, mlps[0]).layers[-1])
            nn.init.constant_(last.bias[2:], -2.0)
            for mlp in mlps[cfg.dec_layers:]:
                mlp.requires_grad_(False)
        self.classifier = LabelSimilarity(d)
        nq = cfg.num_queries
        if dab:
            self.tgt_embed = nn.Embedding(nq, d)
            self.verb_tgt_embed = nn.Embedding(nq, d)
            self.refpoint_embed = nn.Embedding(nq, 4)
        else:
            self.query_embed = nn.Embedding(nq, 3 * d)   # (position, content, relation content)
            self.reference_points_sub = nn.Linear(d, 2)
            self.reference_points_obj = nn.Linear(d, 2)
            for lin in (self.reference_points_sub, self.reference_points_obj):
                nn.init.xavier_uniform_(lin.weight, gain=1.0)
                nn.init.zeros_(lin.bias)
            if cfg.relation_query == "mbf":
                self.verb_query_embed = nn.Embedding(cfg.num_pairs, d)

    # ---------------------------------------------------------------- encoder
    def encode_labels(self, obj_texts: list[str], rel_texts: list[str]) -> torch.Tensor:
        """Pooled embeddings of `obj_texts + rel_texts`: [Lo+Lr, dl] (cached in eval under no_grad)."""
        return self.text_encoder.embed(list(obj_texts) + list(rel_texts))

    def encode(self, images: torch.Tensor, pixel_mask: torch.Tensor, obj_texts: list[str], rel_texts: list[str],
               label_embeds: torch.Tensor | None = None) -> Encoded:
        num_obj, num_rel = len(obj_texts), len(rel_texts)
        if num_obj < 1 or num_rel < 1:
            raise UserError(f"the model needs at least one object text and one relation text, got {num_obj} "
                            f"and {num_rel}")
        self_encoded = label_embeds is None
        if label_embeds is None:
            with record_function("text_encoder"):
                label_embeds = self.encode_labels(obj_texts, rel_texts)
        elif label_embeds.shape[0] != num_obj + num_rel:
            raise UserError(f"label_embeds has {label_embeds.shape[0]} rows but there are {num_obj} object and "
                            f"{num_rel} relation texts")
        with record_function("backbone"):
            feats = self.backbone(images, pixel_mask)
        srcs = [proj(f) for proj, (f, _) in zip(self.input_proj, feats)]
        masks = [m for _, m in feats]
        srcs.append(self.input_proj[-1](feats[-1][0]))
        masks.append(F.interpolate(pixel_mask[None].float(), size=srcs[-1].shape[-2:]).to(torch.bool)[0])

        src_flat, pos_flat, mask_flat, shapes = [], [], [], []
        for lvl, (src, mask) in enumerate(zip(srcs, masks)):
            pos = self.position(mask).to(src.dtype)   # cumulative sums in fp32 (exact under bf16 autocast)
            shapes.append(src.shape[-2:])
            src_flat.append(src.flatten(2).transpose(1, 2))
            pos_flat.append(pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
            mask_flat.append(mask.flatten(1))
        src, pos, pad = torch.cat(src_flat, 1), torch.cat(pos_flat, 1), torch.cat(mask_flat, 1)
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=src.device)
        level_start_index = torch.cat([spatial_shapes.new_zeros(1), (spatial_shapes[:, 0] * spatial_shapes[:, 1])
                                       .cumsum(0)[:-1]])
        valid_ratios = torch.stack([_valid_ratio(m) for m in masks], 1)   # fp32: reference points stay exact

        lang = label_embeds.to(src.dtype)[None].expand(src.shape[0], -1, -1)
        # Default: the label list is shared and unpadded. Original [QUIRK]: whenever it encoded the label
        # texts itself (its training input; also any eval-mode call given raw texts), labels whose pooled
        # vector sums to <= 0 were treated as padding in the in-encoder language layers; its evaluation
        # engines passed pre-encoded embeddings with an all-False mask (here: `label_embeds` in eval mode).
        quirk_mask = self.cfg.compat_original and (self.training or self_encoded)
        lang_pad = (lang.sum(-1) <= 0) if quirk_mask else None
        last_start = int(shapes[-1][0] * shapes[-1][1])
        memory, states = self.encoder(src, pos, pad, spatial_shapes, level_start_index, valid_ratios, lang,
                                      lang_pad, src.shape[1] - last_start)
        if not states:   # no fusion: every decoder layer classifies against the plain label embeddings
            states = [lang] * self.cfg.dec_layers
        text_states = [self.resizer(s) for s in states]
        return Encoded(memory, pad, spatial_shapes, level_start_index, valid_ratios, text_states, label_embeds,
                       num_obj)

    # ---------------------------------------------------------------- queries
    def entity_queries(self, enc: Encoded) -> EntityQueries:
        b = enc.memory.shape[0]
        pairs = self.cfg.num_pairs
        if self.cfg.variant == "parseda":
            tgt = self.tgt_embed.weight[None].expand(b, -1, -1)
            ref = self.refpoint_embed.weight.sigmoid()[None].expand(b, -1, -1)
            return EntityQueries(tgt, ref)
        query_pos, tgt, _ = self.query_embed.weight.split(self.cfg.d_model, dim=1)
        ref = torch.cat([self.reference_points_sub(query_pos[:pairs]), self.reference_points_obj(query_pos[pairs:])])
        return EntityQueries(tgt[None].expand(b, -1, -1), ref.sigmoid()[None].expand(b, -1, -1),
                             query_pos[None].expand(b, -1, -1))

    def relation_queries(self, h_sub: torch.Tensor, h_obj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(content [B,P,d], position [B,P,d] or None for DAB) of the relation queries."""
        pairs = self.cfg.num_pairs
        if self.cfg.variant == "parseda":
            verb_tgt = self.verb_tgt_embed.weight
        else:
            verb_tgt = self.query_embed.weight[:, 2 * self.cfg.d_model:]
        content = (verb_tgt[:pairs] + verb_tgt[pairs:])[None]
        if self.cfg.relation_query == "mbf":
            content = content + self.verb_tgt_generator(h_sub, h_obj)
        else:
            content = content.expand(h_sub.shape[0], -1, -1)
        if self.cfg.variant == "parseda":
            return content, None
        if self.cfg.relation_query == "mbf":
            return content, self.verb_query_embed.weight[None].expand(h_sub.shape[0], -1, -1)
        return content, h_sub + h_obj

    # ---------------------------------------------------------------- decoders + heads
    def decode(self, enc: Encoded, queries: EntityQueries | None = None) -> RelationOutput:
        queries = queries or self.entity_queries(enc)
        n_dec = self.cfg.dec_layers
        pairs = queries.tgt.shape[1] // 2
        geometry = (enc.memory, enc.spatial_shapes, enc.level_start_index, enc.valid_ratios, enc.memory_padding_mask)
        hs, sub_boxes, obj_boxes = self.ho_decoder(
            queries.tgt, queries.reference, *geometry, self.sub_bbox_embed[:n_dec], self.obj_bbox_embed[:n_dec],
            queries.query_pos, queries.self_attn_mask, queries.padding_mask)
        h_sub, h_obj = hs[-1][:, :pairs], hs[-1][:, pairs:]
        content, rel_pos = self.relation_queries(h_sub, h_obj)
        refiners = (self.sub_bbox_embed[n_dec:], self.obj_bbox_embed[n_dec:]) if self.cfg.compat_original else None
        rel_padding = None
        if queries.padding_mask is not None:
            rel_padding = queries.padding_mask[:, :pairs] & queries.padding_mask[:, pairs:]
        hs_rel = self.verb_decoder(content, sub_boxes[-1], obj_boxes[-1], *geometry, rel_pos, refiners, rel_padding)

        layers = []
        for i in range(n_dec):
            text = self.classifier.project(enc.text_states[i])
            text_obj, text_rel = text[:, :enc.num_obj], text[:, enc.num_obj:]
            layers.append(RelationPredictions(
                pred_sub_boxes=sub_boxes[i],
                pred_obj_boxes=obj_boxes[i],
                pred_sub_logits=self.classifier.logits(hs[i][:, :pairs], self.classifier.bias_obj, text_obj),
                pred_obj_logits=self.classifier.logits(hs[i][:, pairs:], self.classifier.bias_obj, text_obj),
                pred_rel_logits=self.classifier.logits(hs_rel[i], self.classifier.bias_rel, text_rel),
            ))
        return RelationOutput(**layers[-1], aux_outputs=layers[:-1], rel_text_embeds=enc.label_embeds[enc.num_obj:])

    def forward(self, images: torch.Tensor, pixel_mask: torch.Tensor, obj_texts: list[str], rel_texts: list[str],
                label_embeds: torch.Tensor | None = None) -> RelationOutput:
        return self.decode(self.encode(images, pixel_mask, obj_texts, rel_texts, label_embeds))


def resize_query_rows(weight: torch.Tensor, num_queries: int, compat_original: bool = False) -> torch.Tensor:
    """Query parameters of a checkpoint with another number of queries (first half subjects, second objects).

    Default: keep the first `num_queries/2` subject rows and the first `num_queries/2` object rows.
    `compat_original` ([QUIRK]): keep the first `num_queries` rows, re-split at the new half (so
    some former subject queries become object queries), as the original's loader did.
    """
    old = weight.shape[0]
    if old == num_queries:
        return weight
    if num_queries > old:
        raise UserError(f"cannot grow the queries of a checkpoint from {old} to {num_queries}")
    if compat_original:
        return weight[:num_queries]
    half_old, half_new = old // 2, num_queries // 2
    return torch.cat([weight[:half_new], weight[half_old:half_old + half_new]])
