"""Open Images v6 scene-graph metrics as RLIPv2's evaluator (`oi_sgg_eval.py`) computes them.

Two passes over the predictions, keeping the top 50 and the top 100 relations per image (by score,
stable on ties; no valid-combination matrix). In each pass, as the original with its default
`--use_nms_filter`: triplet NMS (0.7 / 1 / 0.5, `eval.triplet_nms`), then phrases (the union box of
subject and object, category = the triplet) and a per-category phrase NMS at IoU 0.5.

* Relation detection (RelD) is matched exactly like HICO-DET's default protocol (`eval.hico`):
  subject and object IoU >= 0.5 with the same categories and predicate, greedy without fallback,
  triplets absent from the ground truth skipped, images without ground-truth boxes ignored.
* Phrase detection (PhrD): union-box IoU >= 0.5 with the same triplet category. Two quirks of the
  original are kept: the phrases are re-sorted by score *after* their overlaps were computed, and the
  k-th phrase of the sorted list is matched with the overlaps of the k-th phrase of the unsorted list;
  on images without ground-truth boxes, phrase predictions count as false positives (relations are
  ignored there).
* Per triplet category: 11-point AP at `numpy.arange(0, 1.1, 0.1)`; `wmAP` weights each by its share of
  ground-truth relations (per *triplet*, as RLIPv2 does, not per predicate).
* `recall@50` = true positives / ground-truth relations of the top-50 pass; `wmAP_rel`, `wmAP_phr` from
  the top-100 pass; `score_wtd = 0.2 recall@50 + 0.4 wmAP_rel + 0.4 wmAP_phr`.

The original fails on an image that has boxes but no relation (no ground-truth phrase to compare
with); here its phrase predictions are false positives and the result says so in "warnings".
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from rlipv2_scale.eval.boxes import pairwise_pixel_iou, pixel_iou
from rlipv2_scale.eval.files import read_ground_truth, read_predictions
from rlipv2_scale.eval.hico import Ranked, rank_candidates, triplet_ap
from rlipv2_scale.eval.relation_json import (
    Candidates,
    GroundTruth,
    RelationFile,
    load_candidates,
    load_ground_truth,
    missing_predictions,
)
from rlipv2_scale.eval.triplet_nms import TripletNMS, grouped_nms
from rlipv2_scale.labels.space import LabelSpace

N_OBJECTS, N_PREDICATES = 288, 30
PHRASE_NMS = 0.5


def oi_label_space(n_objects: int = N_OBJECTS, n_predicates: int = N_PREDICATES) -> LabelSpace:
    """Open Images v6 SGG: ids are 0-based category indices (objects and predicates)."""
    return LabelSpace(objects=tuple(str(i) for i in range(n_objects)), verbs=tuple(str(i) for i in range(n_predicates)),
                      valid=np.ones((n_predicates, n_objects)), name="open-images-v6")


def _union(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.stack([np.minimum(a[:, 0], b[:, 0]), np.minimum(a[:, 1], b[:, 1]),
                     np.maximum(a[:, 2], b[:, 2]), np.maximum(a[:, 3], b[:, 3])], axis=1)


def _one_pass(g: GroundTruth, cand: Candidates, space: LabelSpace, top_k: int, nms: bool, warnings: list[str]):
    first = np.searchsorted(cand.img, cand.img, "left")
    in_top = (np.arange(len(cand.img)) - first) < top_k
    gt_code = space.triplet_code(g.box_cat[g.rel_sub], g.box_cat[g.rel_obj], g.rel_verb)
    gt_phrase_box = _union(g.boxes[g.rel_sub], g.boxes[g.rel_obj])
    has_boxes = np.diff(g.box_offset) > 0
    rel_order, per_image, phr = [], [], {"row": [], "score": [], "tp": []}
    bad_images = 0
    images, starts = np.unique(cand.img, return_index=True)  # candidates are grouped by image
    for img, lo, hi in zip(images, starts, list(starts[1:]) + [len(cand.img)]):
        idx = np.arange(lo, hi)[in_top[lo:hi]]
        code = space.triplet_code(cand.box_cat[cand.sub[idx]], cand.box_cat[cand.obj[idx]], cand.verb[idx])
        if nms:
            idx_g = idx[TripletNMS().keep(code, cand.boxes[cand.sub[idx]], cand.boxes[cand.obj[idx]], cand.score[idx])]
        else:
            idx_g = idx
        rel_order.append(idx_g[np.argsort(-cand.score[idx_g], kind="stable")])  # the matcher's re-sort
        p_code = space.triplet_code(cand.box_cat[cand.sub[idx_g]], cand.box_cat[cand.obj[idx_g]], cand.verb[idx_g])
        p_box = _union(cand.boxes[cand.sub[idx_g]], cand.boxes[cand.obj[idx_g]])
        p_score = cand.score[idx_g]
        if nms:
            k = grouped_nms(p_code, lambda m, b=p_box: pairwise_pixel_iou(b[m]), p_score, PHRASE_NMS)
            p_code, p_box, p_score = p_code[k], p_box[k], p_score[k]
        per_image.append((int(img), p_code, p_box, p_score))
    order = np.concatenate(rel_order) if rel_order else np.zeros(0, np.int64)
    rel = Candidates(cand.img[order], cand.sub[order], cand.obj[order], cand.verb[order], cand.score[order],
                     cand.boxes, cand.box_cat)
    codes, n_gt, ranked = rank_candidates(g, rel, space, strict=False)
    row_of = {int(c): r for r, c in enumerate(codes)}

    rel_bounds = np.searchsorted(g.rel_img, np.arange(g.n_images + 1))  # relations are in image order
    for img, p_code, p_box, p_score in per_image:
        gt_idx = np.arange(rel_bounds[img], rel_bounds[img + 1])
        if has_boxes[img] and len(p_code) and len(gt_idx) == 0:
            bad_images += 1
        if has_boxes[img] and len(p_code) and len(gt_idx):
            same = gt_code[gt_idx][:, None] == p_code[None, :]
            iou = np.where(same, pixel_iou(gt_phrase_box[gt_idx][:, None, :], p_box[None, :, :]), 0.0)
            srt = np.argsort(-p_score, kind="stable")
            taken = np.zeros(len(gt_idx), bool)
            for k, j in enumerate(srt):
                col = iou[:, k]  # the overlaps of the *unsorted* k-th phrase, as the original looks them up
                row = row_of.get(int(p_code[j]))
                if row is None:
                    continue
                ok = col >= 0.5
                hit = False
                if ok.any():
                    best = int(np.flatnonzero(ok)[np.argmax(col[ok])])
                    hit = not taken[best]
                    taken[best] = True
                phr["row"].append(row)
                phr["score"].append(p_score[j])
                phr["tp"].append(hit)
        else:
            for c, s in zip(p_code, p_score):
                row = row_of.get(int(c))
                if row is not None:
                    phr["row"].append(row)
                    phr["score"].append(s)
                    phr["tp"].append(False)
    if bad_images:
        warnings.append(f"{bad_images} image(s) have boxes but no ground-truth relation (the original fails there); "
                        f"their phrase predictions count as false positives")
    ap_rel, _, n_tp = triplet_ap(n_gt, ranked)
    phrases = Ranked(np.asarray(phr["row"], np.int64), np.asarray(phr["score"], np.float64),
                     np.asarray(phr["tp"], bool))
    ap_phr, _, _ = triplet_ap(n_gt, phrases)
    return n_gt, ap_rel, n_tp, ap_phr


def _weighted(ap: np.ndarray, n_gt: np.ndarray) -> float:
    total = int(n_gt.sum())
    out = 0
    for a, n in zip(ap.tolist(), n_gt.tolist()):  # the original's order and arithmetic
        out += a * n / total
    return float(out)


def evaluate_oi_sgg_files(gt: str | Path, pred: str | Path, *, nms: bool = True,
                          label_space: LabelSpace | None = None) -> dict:
    """`evaluate_oi_sgg` of files, listed-form files decoded straight into columns (`files.read_relations`)."""
    space = label_space or oi_label_space()
    return evaluate_oi_sgg(read_ground_truth(gt, space, "rel_annotations"),
                           read_predictions(pred, space, "rel_predictions"), nms=nms, label_space=space)


def evaluate_oi_sgg(gt: list[dict] | RelationFile, preds: list[dict] | RelationFile, *, nms: bool = True,
                    label_space: LabelSpace | None = None) -> dict:
    """Ground truth {file_name, annotations, rel_annotations}; predictions {file_name, predictions,
    rel_predictions [{subject_id, object_id, category_id, score}]} or the per-query form."""
    space = label_space or oi_label_space()
    g = load_ground_truth(gt, space, rel_key="rel_annotations")
    cand = load_candidates(preds, g, space, top_k=100, use_valid=False, rel_key="rel_predictions")
    n_missing, warnings = missing_predictions(g, cand)
    out: dict = {"n_images_without_predictions": n_missing}
    for k in (50, 100):
        n_gt, ap_rel, n_tp, ap_phr = _one_pass(g, cand, space, k, nms, warnings if k == 100 else [])
        total = int(n_gt.sum())
        out[f"recall@{k}"] = float(n_tp.sum() / total) if total else None
        out[f"mAP_rel@{k}"] = float(np.mean(ap_rel)) if total else None
        out[f"mAP_phr@{k}"] = float(np.mean(ap_phr)) if total else None
        out[f"wmAP_rel@{k}"] = _weighted(ap_rel, n_gt) if total else None
        out[f"wmAP_phr@{k}"] = _weighted(ap_phr, n_gt) if total else None
    out["wmAP_rel"], out["wmAP_phr"] = out["wmAP_rel@100"], out["wmAP_phr@100"]
    parts = (out["recall@50"], out["wmAP_rel"], out["wmAP_phr"])
    out["score_wtd"] = None if None in parts else 0.2 * parts[0] + 0.4 * parts[1] + 0.4 * parts[2]
    out["n_triplets"] = len(n_gt)
    out["nms"] = nms
    out["warnings"] = warnings
    return out
