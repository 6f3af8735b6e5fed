"""Relation Tagger (the original's `models/verb_tagger_helper.py: prepare_query`,
`generate_relations_using_verb_tagger.py`): scores candidate relation texts for *given* region pairs.

The Tagger is RLIP-ParSeD whose entity queries are built from given boxes and labels instead of
learned embeddings: the subject of pair k fills query slot k and its object slot P+k, with

    query_pos = coord_proj(logit(box))        content = label state of the box's class

(the label state is the last ALIF language state, detached). Unused slots are zero and masked as
keys of the decoder's self-attention (one slot always stays visible, so no row is all-masked).
Relation query k (content: the sum of the two halves of `verb_tgt`; position: h_sub + h_obj)
then scores every relation text for pair k. Training adds DN-DETR-style noise to the given boxes
and labels and forbids attention between copies of the same entity (the same box with the same
label appearing in several pairs), so a query cannot copy its own answer from a duplicate.

Training uses `SetCriterion(tagger_loss_config())`: query pair i is supervised by the i-th given
pair (no Hungarian matching), CornerNet focal loss on relations. `add_negative_pairs` fills the
query slots with unrelated ordered pairs of annotated boxes, as the original's training data did.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol, Sequence

import torch
from torch import nn

from rlipv2_scale.data.batch import Target
from rlipv2_scale.errors import ConfigError, UserError
from rlipv2_scale.models.config import ModelConfig
from rlipv2_scale.models.heads import inverse_sigmoid
from rlipv2_scale.models.losses import LossConfig
from rlipv2_scale.models.outputs import RelationOutput
from rlipv2_scale.models.rlipv2 import Encoded, EntityQueries, RLIPv2


class GivenPairs(Protocol):
    """What the Tagger reads of each image's pairs (`Target` qualifies)."""

    sub_boxes: torch.Tensor     # [n, 4] cxcywh in [0, 1]
    obj_boxes: torch.Tensor     # [n, 4]
    sub_labels: torch.Tensor    # [n] object-text index
    obj_labels: torch.Tensor    # [n]


@dataclass
class Pairs:
    sub_boxes: torch.Tensor
    obj_boxes: torch.Tensor
    sub_labels: torch.Tensor
    obj_labels: torch.Tensor


@dataclass
class TaggerNoise:
    """Training-time denoising noise (the released pseudo-labels used 0.4 / 0.2)."""

    box: float = 0.4      # centre moves by up to box·(w/2, h/2), size by up to box·(w, h)
    label: float = 0.2    # probability of replacing a label by a random object class


def jitter_boxes(boxes: torch.Tensor, scale: float) -> torch.Tensor:
    """cxcywh boxes [n, 4] with uniform noise: c += U(-1,1)·(w/2,h/2)·scale, (w,h) += U(-1,1)·(w,h)·scale."""
    if scale <= 0 or boxes.numel() == 0:
        return boxes
    spread = torch.cat([boxes[:, 2:] / 2, boxes[:, 2:]], dim=1)
    return (boxes + (torch.rand_like(boxes) * 2 - 1) * spread * scale).clamp(0.0, 1.0)


def flip_labels(labels: torch.Tensor, prob: float, num_classes: int) -> torch.Tensor:
    """Each label replaced, with probability `prob`, by a uniformly random class in [0, num_classes)."""
    if prob <= 0 or labels.numel() == 0:
        return labels
    flip = torch.rand(labels.shape, device=labels.device) < prob
    return torch.where(flip, torch.randint_like(labels, 0, num_classes), labels)


def duplicate_entity_mask(labels: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, Nq, Nq] bool, True where query a must not attend to query b: a != b, both used, and both
    carry the same label and the identical box (one entity repeated across pairs)."""
    same = (labels[:, :, None] == labels[:, None, :]) & (boxes[:, :, None] == boxes[:, None, :]).all(-1)
    same &= valid[:, :, None] & valid[:, None, :]
    eye = torch.eye(labels.shape[1], dtype=torch.bool, device=labels.device)
    return same & ~eye


def tagger_loss_config(**overrides) -> LossConfig:
    """Tagger loss (the original's `models/hoi.py: SetCriterionHOI.loss_verb_tagger`): identity
    matching, CE (no-objects weight 0.1), L1 2.5 + GIoU 1, hard focal."""
    return LossConfig(matching="identity", rel_loss="focal", pseudo_targets=False, **overrides)


def add_negative_pairs(target: Target, num_slots: int, generator: torch.Generator | None = None) -> Target:
    """The Tagger's training pairs of one image: its annotated pairs first (`num_slots` of them sampled
    when there are more), then random unannotated ordered pairs of its boxes with all-zero relation
    targets, up to `num_slots` pairs or until none are left."""
    n_pos = target.sub_index.numel()
    if n_pos >= num_slots:
        keep = torch.randperm(n_pos, generator=generator)[:num_slots].sort().values
        return _select_pairs(target, keep)
    num_boxes = target.boxes.shape[0]
    grid = torch.ones(num_boxes, num_boxes, dtype=torch.bool)
    grid.fill_diagonal_(False)
    grid[target.sub_index.cpu(), target.obj_index.cpu()] = False
    candidates = grid.nonzero()
    pick = candidates[torch.randperm(candidates.shape[0], generator=generator)[: num_slots - n_pos]]
    device = target.boxes.device
    sub_idx, obj_idx = pick[:, 0].to(device), pick[:, 1].to(device)
    return replace(
        target,
        sub_index=torch.cat([target.sub_index, sub_idx]),
        obj_index=torch.cat([target.obj_index, obj_idx]),
        sub_boxes=torch.cat([target.sub_boxes, target.boxes[sub_idx]]),
        obj_boxes=torch.cat([target.obj_boxes, target.boxes[obj_idx]]),
        sub_labels=torch.cat([target.sub_labels, target.labels[sub_idx]]),
        obj_labels=torch.cat([target.obj_labels, target.labels[obj_idx]]),
        rel_labels=torch.cat([target.rel_labels, target.rel_labels.new_zeros(len(pick), target.rel_labels.shape[1])]),
    )


def _select_pairs(target: Target, keep: torch.Tensor) -> Target:
    keep = keep.to(target.sub_index.device)
    return replace(target, **{k: getattr(target, k)[keep] for k in
                              ("sub_index", "obj_index", "sub_boxes", "obj_boxes", "sub_labels", "obj_labels",
                               "rel_labels")})


class RelationTagger(RLIPv2):
    """RLIP-ParSeD with entity queries from given boxes and labels.

    `forward(images, pixel_mask, obj_texts, rel_texts, pairs)` returns the RLIPv2 `RelationOutput`, with
    prediction k belonging to the k-th given pair of its image; `score_candidates` returns
    sigmoid confidences per (pair, relation text).
    """

    is_tagger = True

    def __init__(self, cfg: ModelConfig, pretrained: bool = True, noise: TaggerNoise | None = None):
        if cfg.variant != "parsed":
            raise ConfigError(f"the Relation Tagger is a ParSeD model: set variant=parsed (got '{cfg.variant}')")
        super().__init__(cfg, pretrained=pretrained)
        self.noise = noise or TaggerNoise()
        d, nq = cfg.d_model, cfg.num_queries
        self.coord_proj = nn.Linear(4, d)
        nn.init.xavier_uniform_(self.coord_proj.weight)
        nn.init.zeros_(self.coord_proj.bias)
        self.verb_tgt = nn.Embedding(nq, d)
        nn.init.xavier_uniform_(self.verb_tgt.weight)
        # The original checkpoint holds the learned ParSeD queries too, but the Tagger never reads
        # them: kept (for the checkpoint layout) and frozen.
        self.query_embed.requires_grad_(False)

    # ---------------------------------------------------------------- queries
    def pair_queries(self, enc: Encoded, pairs: Sequence[GivenPairs]) -> EntityQueries:
        """Entity queries of the given pairs (noised and duplicate-masked in training)."""
        b = enc.memory.shape[0]
        if len(pairs) != b:
            raise UserError(f"{len(pairs)} pair lists for a batch of {b} images")
        slots_per_side, d = self.cfg.num_pairs, self.cfg.d_model
        nq = 2 * slots_per_side
        device, dtype = enc.memory.device, enc.memory.dtype
        num_obj = enc.num_obj

        batch_parts: list[torch.Tensor] = []
        slot_parts: list[torch.Tensor] = []
        box_parts: list[torch.Tensor] = []
        label_parts: list[torch.Tensor] = []
        for i, p in enumerate(pairs):
            n = p.sub_boxes.shape[0]
            if n > slots_per_side:
                raise UserError(f"image {i}: {n} pairs but the Tagger has {slots_per_side} pair slots; "
                                f"split the candidates into groups of at most {slots_per_side}")
            slots = torch.arange(n, device=device)
            batch_parts.append(torch.full((2 * n,), i, dtype=torch.long, device=device))
            slot_parts.append(torch.cat([slots, slots + slots_per_side]))
            box_parts.append(torch.cat([p.sub_boxes, p.obj_boxes]).to(device, dtype))
            label_parts.append(torch.cat([p.sub_labels, p.obj_labels]).to(device, torch.long))
        batch_idx, slot_idx = torch.cat(batch_parts), torch.cat(slot_parts)
        boxes, labels = torch.cat(box_parts), torch.cat(label_parts)
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_obj):
            raise UserError(f"pair labels must index the {num_obj} object texts, got values in "
                            f"[{labels.min().item()}, {labels.max().item()}]")

        query_boxes, query_labels = boxes, labels
        if self.training:
            query_boxes = jitter_boxes(boxes, self.noise.box)
            # A random *real* class ("no objects" excluded). [QUIRK] the original drew from [0, B).
            num_classes = b if self.cfg.compat_original else max(num_obj - 1, 1)
            query_labels = flip_labels(labels, self.noise.label, num_classes)

        label_states = enc.text_states[-1][:, :num_obj].detach()
        tgt = torch.zeros(b, nq, d, device=device, dtype=dtype)
        tgt = tgt.index_put((batch_idx, slot_idx), label_states[batch_idx, query_labels])
        query_pos = torch.zeros(b, nq, d, device=device, dtype=dtype)
        query_pos = query_pos.index_put((batch_idx, slot_idx), self.coord_proj(inverse_sigmoid(query_boxes)))
        used = torch.zeros(b, nq, dtype=torch.bool, device=device)
        used[batch_idx, slot_idx] = True
        padding = ~used
        padding[~used.any(1), 0] = False   # an image without pairs keeps one visible slot

        reference = torch.cat([self.reference_points_sub(query_pos[:, :slots_per_side]),
                               self.reference_points_obj(query_pos[:, slots_per_side:])], 1).sigmoid()
        attn_mask = None
        if self.training:
            full_labels = torch.full((b, nq), -1, dtype=torch.long, device=device)
            full_labels[batch_idx, slot_idx] = labels
            full_boxes = torch.zeros(b, nq, 4, device=device, dtype=dtype)
            full_boxes[batch_idx, slot_idx] = boxes
            mask = duplicate_entity_mask(full_labels, full_boxes, used)
            if self.cfg.compat_original and not used.all():
                mask = torch.zeros_like(mask)   # [QUIRK] the original's mask vanished with any unused slot
            attn_mask = mask.repeat_interleave(self.cfg.num_heads, dim=0)
        return EntityQueries(tgt, reference, query_pos, attn_mask, padding)

    def relation_queries(self, h_sub: torch.Tensor, h_obj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        pairs = self.cfg.num_pairs
        content = (self.verb_tgt.weight[:pairs] + self.verb_tgt.weight[pairs:])[None]
        if self.cfg.relation_query == "mbf":
            content = content + self.verb_tgt_generator(h_sub, h_obj)
            return content, self.verb_query_embed.weight[None].expand(h_sub.shape[0], -1, -1)
        return content.expand(h_sub.shape[0], -1, -1), h_sub + h_obj

    # ---------------------------------------------------------------- entry points
    # The Tagger's forward also takes the given pairs: it is not a drop-in RLIPv2 detector (see `predict`).
    def forward(self, images: torch.Tensor, pixel_mask: torch.Tensor,  # type: ignore[override]
                obj_texts: list[str], rel_texts: list[str], pairs: Sequence[GivenPairs],
                label_embeds: torch.Tensor | None = None) -> RelationOutput:
        enc = self.encode(images, pixel_mask, obj_texts, rel_texts, label_embeds)
        return self.decode(enc, self.pair_queries(enc, pairs))

    @torch.no_grad()
    def score_candidates(self, images: torch.Tensor, pixel_mask: torch.Tensor, obj_texts: list[str],
                         rel_texts: list[str], pairs: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor],
                         labels: Sequence[torch.Tensor], max_groups: int = 16) -> torch.Tensor:
        """Confidence of every relation text for every candidate pair: [n_pairs, Lr] in (0, 1).

        Image b has objects `boxes[b]` [N_b, 4] (cxcywh in [0, 1]) with `labels[b]` [N_b] (indices
        into `obj_texts`) and candidate pairs `pairs[b]` [n_b, 2] (subject, object) object indices.
        Rows follow the images' pairs in order. Each image is encoded once; its pairs are decoded in
        groups of at most P (the number of pair slots), `max_groups` groups per decoder pass.
        """
        if not len(pairs) == len(boxes) == len(labels) == images.shape[0]:
            raise UserError(f"score_candidates: {images.shape[0]} images but {len(pairs)} pair lists, "
                            f"{len(boxes)} box lists and {len(labels)} label lists")
        was_training = self.training
        self.eval()
        try:
            # pre-encoded labels, as the original's tagger inference: no label padding mask under compat
            enc = self.encode(images, pixel_mask, obj_texts, rel_texts, self.encode_labels(obj_texts, rel_texts))
            groups: list[tuple[int, Pairs]] = []
            for b, (p, bx, lb) in enumerate(zip(pairs, boxes, labels)):
                p = torch.as_tensor(p, dtype=torch.long).reshape(-1, 2)
                if p.numel() and (p.min() < 0 or p.max() >= bx.shape[0]):
                    raise UserError(f"image {b}: candidate pairs index objects outside its {bx.shape[0]} boxes")
                for chunk in p.split(self.cfg.num_pairs):
                    s, o = chunk[:, 0].to(bx.device), chunk[:, 1].to(bx.device)
                    groups.append((b, Pairs(bx[s], bx[o], lb[s], lb[o])))
            scores = []
            for start in range(0, len(groups), max_groups):
                part = groups[start:start + max_groups]
                idx = torch.tensor([b for b, _ in part], device=enc.memory.device)
                sub_enc = _select_images(enc, idx)
                out = self.decode(sub_enc, self.pair_queries(sub_enc, [g for _, g in part]))
                rel = out.pred_rel_logits.float().sigmoid()
                scores += [rel[k, :g.sub_boxes.shape[0]] for k, (_, g) in enumerate(part)]
            if not scores:
                return torch.zeros(0, len(rel_texts), device=enc.memory.device)
            return torch.cat(scores)
        finally:
            self.train(was_training)


def _select_images(enc: Encoded, idx: torch.Tensor) -> Encoded:
    """The encoder outputs of images `idx` (repeats allowed: several pair groups of one image)."""
    return replace(enc, memory=enc.memory[idx], memory_padding_mask=enc.memory_padding_mask[idx],
                   valid_ratios=enc.valid_ratios[idx], text_states=[s[idx] for s in enc.text_states])


def build_tagger(cfg: ModelConfig, pretrained: bool = True, noise: TaggerNoise | None = None) -> RelationTagger:
    """The Relation Tagger of `cfg` (e.g. `named_config("tagger_r50")`)."""
    return RelationTagger(cfg, pretrained=pretrained, noise=noise)
