"""Set criterion of RLIPv2 (the original's `models/hoi.py: SetCriterionHOI`): matching, then every loss term.

Terms (each also on every auxiliary decoder layer, with its own matching, suffixed `_{i}`):

- `loss_ce`: softmax cross-entropy of the subject and of the object logits over the object texts,
  unmatched predictions target the last class ("no objects", weight `eos_coef`). HOI fine-tuning
  (`hoi_person_index`) targets the person for every subject (index 1 with `compat_original`, [QUIRK]).
- `loss_rel`: relation loss. `soft_focal` (pre-training, most fine-tuning): quality focal loss on
  soft targets `(y + u)·s`, with RQL quality `s = (min(GIoU_sub, GIoU_obj) + 1) / 2` and RPL
  pseudo-targets `u` from the similarity of the relation texts. `focal`: CornerNet hard focal loss
  on the raw targets (V-COCO fine-tuning, the Relation Tagger).
- `loss_{sub,obj}_bbox` (L1) and `loss_{sub,obj}_giou` (1 - GIoU) on matched pairs.

`"loss"` is the weighted total. Everything is computed in fp32 whatever the outputs' dtype.
Non-finite outputs give a non-finite total (the trainer skips such steps); finite outputs never
give NaN (probabilities are clamped before the log).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from rlipv2_scale.data.batch import Target
from rlipv2_scale.errors import ConfigError
from rlipv2_scale.models.box_ops import box_cxcywh_to_xyxy, paired_generalized_box_iou
from rlipv2_scale.models.matcher import HungarianMatcher, Indices
from rlipv2_scale.models.outputs import OUTPUT_KEYS, RelationOutput, RelationPredictions

_PROB_EPS = 1e-6


def subject_target_index(person_index: int, compat_original: bool) -> int:
    """Subject class target of HICO-DET / V-COCO pairs (`LossConfig.hoi_person_index`: the loss and
    the matcher's subject-class cost). [QUIRK] the original's datasets used index 1 (the second
    object text, "bicycle" in the COCO order) instead of the person class. Post-processing is not
    affected: HOI post-processing fixes the subject to the person, and the NF zero-shot filter keeps
    pairs whose subject argmax is the person (index 0) in the original too."""
    return 1 if compat_original else person_index


@dataclass
class LossConfig:
    """Matching costs, loss weights and loss variants (defaults: RLIPv2 pre-training)."""

    # Matching (the original's `models/matcher.py: HungarianMatcherHOI`). `identity` pairs query i with the i-th ground-truth pair (Relation Tagger).
    matching: Literal["hungarian", "identity"] = "hungarian"
    cost_class: float = 1.0
    cost_rel: float = 1.0
    cost_bbox: float = 2.5
    cost_giou: float = 1.0
    subject_class: bool = True          # classify (and match on) the subject's class too
    # Weights of the total (the original's `models/detr.py: build`).
    weight_ce: float = 1.0
    weight_rel: float = 1.0
    weight_bbox: float = 2.5
    weight_giou: float = 1.0
    eos_coef: float = 0.1               # CE weight of the "no objects" class
    # Relation loss (the original's `models/hoi.py: SetCriterionHOI.loss_verb_labels`).
    rel_loss: Literal["soft_focal", "focal"] = "soft_focal"
    focal_beta: float = 2.0             # exponent of |t - p| in the soft focal loss
    pseudo_targets: bool = True         # RPL: text-similarity pseudo-targets (pre-training)
    pseudo_threshold: float = 0.3
    aux_loss: bool = True
    # HOI fine-tuning (HICO-DET, V-COCO): the object-text index of the person class. Every subject's
    # class target (loss and matching) becomes `subject_target_index(hoi_person_index, compat_original)`:
    # the person, or with compat_original index 1 as the original's datasets. None: the annotated classes.
    hoi_person_index: int | None = None
    # Reproduce the original's quirks (RPL targets not detached, HOI subject target index 1).
    compat_original: bool = False

    def __post_init__(self) -> None:
        if self.pseudo_targets and self.rel_loss != "soft_focal":
            raise ConfigError(
                "loss.pseudo_targets needs loss.rel_loss=soft_focal (pseudo-targets are soft); "
                "set loss.pseudo_targets=false for the hard focal loss"
            )
        if not 0.0 <= self.pseudo_threshold < 1.0:
            raise ConfigError(f"loss.pseudo_threshold must be in [0, 1), got {self.pseudo_threshold}")
        if self.eos_coef < 0:
            raise ConfigError(f"loss.eos_coef must be >= 0, got {self.eos_coef}")
        if self.hoi_person_index is not None and self.hoi_person_index < 0:
            raise ConfigError(f"loss.hoi_person_index must be an object-text index >= 0, got {self.hoi_person_index}")


def soft_focal_loss(logits: torch.Tensor, targets: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """Quality focal loss: -Σ |t - p|^β · BCE(p, t), normalised by the number of entries t > 0."""
    p = logits.sigmoid().clamp(_PROB_EPS, 1 - _PROB_EPS)
    loss = (targets - p).abs().pow(beta) * (targets * p.log() + (1 - targets) * (1 - p).log())
    return -loss.sum() / (targets > 0).sum().clamp(min=1)


def hard_focal_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CornerNet focal loss (γ = 2, negatives weighted by (1 - t)^4), normalised by #(t == 1)."""
    p = logits.sigmoid().clamp(_PROB_EPS, 1 - _PROB_EPS)
    pos = targets.eq(1)
    neg_weight = (1 - targets).pow(4) * targets.lt(1)
    pos_loss = (p.log() * (1 - p).pow(2) * pos).sum()
    neg_loss = ((1 - p).log() * p.pow(2) * neg_weight).sum()
    return -(pos_loss + neg_loss) / pos.sum().clamp(min=1)


def relation_pseudo_targets(
    rel_labels: torch.Tensor, rel_text_embeds: torch.Tensor, threshold: float = 0.3
) -> torch.Tensor:
    """RPL (the original's `models/hoi.py: RLIP_ParSeDA.forward`, `pseudo_verb`): pseudo-targets for
    the relation texts that are similar to a pair's positives.

    rel_labels [n, L] (multi-hot or confidences), rel_text_embeds [L, D] -> u [n, L] in [0, 1]:
    D_ij = ||R_i - R_j||, S_ij = max_k D_ik - D_ij, u = Σ_i y_i S_i,: / max, zero on the pair's
    positives and below `threshold`. Rows without positives give zeros.
    """
    emb = rel_text_embeds.float()
    dist_ = torch.cdist(emb[None], emb[None])[0]
    sim = dist_.max(dim=1, keepdim=True).values - dist_
    u = rel_labels.to(sim) @ sim
    peak = u.max(dim=1, keepdim=True).values
    u = torch.where(peak > 0, u / peak.clamp(min=torch.finfo(u.dtype).tiny), torch.zeros_like(u))
    u = u * (rel_labels <= 0)
    return u * (u > threshold)


def _global_num_pairs(targets: list[Target], device: torch.device) -> float:
    """Number of GT pairs averaged over ranks (every rank normalises by the same count), >= 1."""
    n = torch.tensor(float(sum(t.sub_boxes.shape[0] for t in targets)), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        n = n / dist.get_world_size()
    return max(n.item(), 1.0)


class SetCriterion(nn.Module):
    """`criterion(outputs, targets) -> dict` of every loss term, the logged errors and "loss"."""

    def __init__(self, cfg: LossConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or LossConfig()
        self.matcher = HungarianMatcher(
            cost_class=cfg.cost_class,
            cost_rel=cfg.cost_rel,
            cost_bbox=cfg.cost_bbox,
            cost_giou=cfg.cost_giou,
            subject_class=cfg.subject_class,
        )

    @property
    def weight_dict(self) -> dict[str, float]:
        """Weight of every un-suffixed loss term (aux terms `_{i}` share their base's weight)."""
        c = self.cfg
        return {
            "loss_ce": c.weight_ce,
            "loss_rel": c.weight_rel,
            "loss_sub_bbox": c.weight_bbox,
            "loss_obj_bbox": c.weight_bbox,
            "loss_sub_giou": c.weight_giou,
            "loss_obj_giou": c.weight_giou,
        }

    def subject_targets(self, targets: list[Target], num_classes: int) -> list[Target]:
        """The targets with every subject's class set for HOI fine-tuning (`hoi_person_index`)."""
        if self.cfg.hoi_person_index is None:
            return targets
        index = subject_target_index(self.cfg.hoi_person_index, self.cfg.compat_original)
        if index >= num_classes - 1:
            raise ValueError(f"HOI subject class target {index} is not one of the {num_classes - 1} object texts "
                             "(the last logit is \"no objects\")")
        return [replace(t, sub_labels=torch.full_like(t.sub_labels, index)) for t in targets]

    def match(self, outputs: RelationPredictions, targets: list[Target]) -> Indices:
        if self.cfg.matching == "identity":
            num_slots = outputs.pred_sub_boxes.shape[1]
            indices = []
            for t in targets:
                n = t.sub_boxes.shape[0]
                if n > num_slots:
                    raise ValueError(f"image {t.image_id}: {n} given pairs but only {num_slots} query slots")
                idx = torch.arange(n, dtype=torch.int64)
                indices.append((idx, idx))
            return indices
        return self.matcher(outputs, targets)

    def forward(
        self, outputs: RelationOutput | dict, targets: list[Target], num_pairs: float | None = None
    ) -> dict[str, torch.Tensor]:
        """Every loss term of the model's outputs (or a dict with their field names); `num_pairs` = GT
        pairs per rank for box-loss normalisation (computed with an all-reduce over ranks when not given)."""
        outputs = RelationOutput.of(outputs)
        device = outputs.pred_sub_boxes.device
        targets = self.subject_targets(targets, outputs.pred_sub_logits.shape[-1])
        if num_pairs is None:
            num_pairs = _global_num_pairs(targets, device)
        num_pairs = max(float(num_pairs), 1.0)

        pseudo = None
        if self.cfg.rel_loss == "soft_focal" and self.cfg.pseudo_targets:
            if outputs.rel_text_embeds is None:
                raise KeyError("loss.pseudo_targets needs outputs.rel_text_embeds [Lr, D] from the model")
            embeds = outputs.rel_text_embeds
            if not self.cfg.compat_original:
                embeds = embeds.detach()
            pseudo = [
                relation_pseudo_targets(t.rel_labels.to(device), embeds, self.cfg.pseudo_threshold)
                for t in targets
            ]

        layers: list[tuple[str, RelationPredictions]] = [("", outputs)]
        if self.cfg.aux_loss:
            layers += [(f"_{i}", aux) for i, aux in enumerate(outputs.aux_outputs)]
        losses: dict[str, torch.Tensor] = {}
        finite = []
        for suffix, layer in layers:
            layer = RelationPredictions(**{k: getattr(layer, k).float() for k in OUTPUT_KEYS})
            finite += [torch.isfinite(v.detach()).all() for v in layer.values()]
            indices = self.match(layer, targets)
            terms = self._layer_losses(layer, targets, indices, num_pairs, pseudo)
            losses.update({k + suffix: v for k, v in terms.items()})

        weights = self.weight_dict
        total = cast(torch.Tensor, sum(w * losses[k + s] for s, _ in layers for k, w in weights.items()))
        # A non-finite output that no loss term reads (an unmatched box) must still mark the step
        # non-finite for the trainer; torch.where keeps this free of a host sync.
        losses["loss"] = torch.where(torch.stack(finite).all(), total, torch.full_like(total, float("nan")))
        return losses

    def _layer_losses(
        self,
        out: RelationPredictions,
        targets: list[Target],
        indices: Indices,
        num_pairs: float,
        pseudo: list[torch.Tensor] | None,
    ) -> dict[str, torch.Tensor]:
        device = out.pred_sub_boxes.device
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)]).to(device)
        src_idx = torch.cat([src for src, _ in indices]).to(device)
        tgt = [(t, j.to(device)) for t, (_, j) in zip(targets, indices)]

        def gather(name: str) -> torch.Tensor:
            return torch.cat([getattr(t, name).to(device)[j] for t, j in tgt])

        terms: dict[str, torch.Tensor] = {}
        # Subject / object classification (the original's `models/hoi.py: SetCriterionHOI.loss_obj_labels`).
        ce = []
        for side in (("sub", "obj") if self.cfg.subject_class else ("obj",)):
            logits = out.pred_sub_logits if side == "sub" else out.pred_obj_logits
            num_classes = logits.shape[-1]
            weight = torch.ones(num_classes, device=device)
            weight[-1] = self.cfg.eos_coef
            labels = gather(f"{side}_labels")
            target_classes = torch.full(logits.shape[:2], num_classes - 1, dtype=torch.int64, device=device)
            target_classes[batch_idx, src_idx] = labels
            ce.append(F.cross_entropy(logits.transpose(1, 2), target_classes, weight))
            with torch.no_grad():
                matched = logits[batch_idx, src_idx]
                acc = (matched.argmax(-1) == labels).float().mean() if labels.numel() else torch.ones((), device=device)
                terms[f"{side}_class_error"] = 100 * (1 - acc)
        terms["loss_ce"] = cast(torch.Tensor, sum(ce))

        # Boxes (the original's `models/hoi.py: SetCriterionHOI.loss_sub_obj_boxes`).
        src_sub = out.pred_sub_boxes[batch_idx, src_idx]
        src_obj = out.pred_obj_boxes[batch_idx, src_idx]
        gt_sub = gather("sub_boxes").float()
        gt_obj = gather("obj_boxes").float()
        has_obj = (gt_obj != 0).any(dim=1)
        num_obj = has_obj.sum() + 1e-4
        giou_sub = paired_generalized_box_iou(box_cxcywh_to_xyxy(src_sub), box_cxcywh_to_xyxy(gt_sub))
        giou_obj = paired_generalized_box_iou(box_cxcywh_to_xyxy(src_obj), box_cxcywh_to_xyxy(gt_obj))
        terms["loss_sub_bbox"] = F.l1_loss(src_sub, gt_sub, reduction="sum") / num_pairs
        terms["loss_obj_bbox"] = (F.l1_loss(src_obj, gt_obj, reduction="none") * has_obj[:, None]).sum() / num_obj
        terms["loss_sub_giou"] = (1 - giou_sub).sum() / num_pairs
        terms["loss_obj_giou"] = ((1 - giou_obj) * has_obj).sum() / num_obj

        # Relations (the original's `models/hoi.py: SetCriterionHOI.loss_verb_labels`).
        rel_logits = out.pred_rel_logits
        matched_labels = gather("rel_labels").to(rel_logits)
        if matched_labels.shape[-1] != rel_logits.shape[-1]:
            raise ValueError(
                f"rel_labels have {matched_labels.shape[-1]} columns but pred_rel_logits scores "
                f"{rel_logits.shape[-1]} relation texts"
            )
        target_rel = torch.zeros_like(rel_logits)
        if self.cfg.rel_loss == "soft_focal":
            if pseudo is not None:
                matched_labels = matched_labels + torch.cat([u[j] for u, (_, j) in zip(pseudo, tgt)])
            with torch.no_grad():
                # RQL: a loosely localised pair is a weaker positive. Without an object box the
                # subject's GIoU stands for both.
                quality = (torch.minimum(giou_sub, torch.where(has_obj, giou_obj, giou_sub)) + 1) / 2
            target_rel = target_rel.index_put((batch_idx, src_idx), matched_labels * quality[:, None])
            terms["loss_rel"] = soft_focal_loss(rel_logits, target_rel, self.cfg.focal_beta)
        else:
            target_rel = target_rel.index_put((batch_idx, src_idx), matched_labels)
            terms["loss_rel"] = hard_focal_loss(rel_logits, target_rel)
        return terms
