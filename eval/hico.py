"""HICO-DET mAP (Default setting), vectorised, bit-compatible with the QPIC-family evaluator.

The published protocol, quirks included (each has a test that fails if it is "fixed"):
  1. Per image, every candidate's score is multiplied by the valid verb-object matrix, and the top
     100 are kept (stable sort: equal scores keep their listed order).
  2. A triplet is (subject category, object category, verb). Candidates whose triplet does not occur
     in the test ground truth are skipped; candidates on images without any ground-truth box are
     ignored altogether (the reference compares a list with tuples there, so nothing is recorded).
  3. Greedy matching by descending score: among ground-truth pairs of the same verb whose subject and
     object boxes both reach IoU >= 0.5 (same category), take the one with the largest
     min(IoU_sub, IoU_obj), ties to annotation order, *without* looking at whether it is already
     matched: if it is, the candidate is a false positive (no fallback to the next best).
  4. IoU uses +1-pixel areas while the intersection test has no +1 (`eval.boxes.pixel_iou`).
  5. Per triplet, candidates of all images are ranked with `numpy.argsort(-score)` (the default,
     unstable sort, which decides the order of equal scores), and AP is the 11-point interpolation
     at `numpy.arange(0, 1.1, 0.1)` (`eval.ap`). mAP averages over the triplets present in the
     test ground truth (AP 0 for those never predicted); mean max recall likewise.
  6. Rare = fewer than 10 instances in the training annotations. Triplets of the test set that never
     occur in training are neither rare nor non-rare (they still count in the full mAP).
  7. Zero-shot: unseen = the split's triplets; seen = the label space's other valid
     (subject, object, verb) combinations, as the original defines them (with a label space whose
     `subject_index` is None: every other test triplet).

Arithmetic is float64 on the boxes as given; the original's in-training path first casts ground-truth
boxes to float32 tensors, which can move an IoU that sits within ~1e-7 of 0.5 across the threshold.

`strict=True` is a documented, non-comparable variant that fixes the quirks: matching falls back to
the best *unmatched* ground truth, IoU is the plain continuous one, predictions on images without
boxes count as false positives, ties rank by image then listed order, and the 11 points are k/10.

Triplet NMS is part of the original post-processing, not of this evaluator: pass `nms=TripletNMS()`
to apply it to each image's top-100 before matching (as `--use_nms_filter` does).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from rlipv2_scale.errors import UserError
from rlipv2_scale.eval.ap import eleven_point_ap
from rlipv2_scale.eval.boxes import continuous_iou, pixel_iou
from rlipv2_scale.eval.files import read_ground_truth, read_predictions
from rlipv2_scale.eval.relation_json import (
    Candidates,
    GroundTruth,
    RelationFile,
    flatten_relations,
    load_candidates,
    load_ground_truth,
    missing_predictions,
)
from rlipv2_scale.eval.triplet_nms import TripletNMS
from rlipv2_scale.labels.space import LabelSpace, hico_label_space

TOP_K = 100
IOU_THRESHOLD = 0.5
RARE_BELOW = 10


@dataclass
class Ranked:
    """Per-candidate outcome in processing order: triplet row, score, true positive."""
    triplet: np.ndarray
    score: np.ndarray
    tp: np.ndarray


def count_training_triplets(train: list[dict] | RelationFile, space: LabelSpace) -> dict[int, int]:
    """Triplet code -> number of training instances (the rare / non-rare split)."""
    try:  # all images at once; anything odd goes to the per-relation loop, which names it
        f = train.flat if isinstance(train, RelationFile) else flatten_relations(train, space, "annotations",
                                                                                 "hoi_annotation")
        codes, counts = np.unique(space.triplet_code(f.box_cat[f.sub], f.box_cat[f.obj], f.verb), return_counts=True)
        return dict(zip(codes.tolist(), counts.tolist()))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):
        pass
    obj_table, verb_table = space.id_lookup("object"), space.id_lookup("verb")
    counts: dict[int, int] = {}
    for i, entry in enumerate(train):
        name = entry.get("file_name", f"#{i}") if isinstance(entry, dict) else f"#{i}"
        try:
            anns, rels = entry["annotations"], entry["hoi_annotation"]
            cats = [int(a["category_id"]) for a in anns]
            for j, r in enumerate(rels):
                s, o, v = int(r["subject_id"]), int(r["object_id"]), int(r["category_id"])
                if not (0 <= s < len(cats) and 0 <= o < len(cats)):
                    raise UserError(f"training annotations for image {name!r}: hoi_annotation[{j}] refers to a "
                                    f"box out of range (the image has {len(cats)} boxes)")
                codes = [obj_table[c] if 0 <= c < len(obj_table) else -1 for c in (cats[s], cats[o])]
                vi = verb_table[v] if 0 <= v < len(verb_table) else -1
                if min(codes) < 0 or vi < 0:
                    raise UserError(f"training annotations for image {name!r}: hoi_annotation[{j}] has a category "
                                    f"outside the label space")
                key = int(space.triplet_code(codes[0], codes[1], vi))
                counts[key] = counts.get(key, 0) + 1
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"training annotations for image {name!r} are malformed ({exc!r}); expected the "
                            f"QPIC form with 'annotations' and 'hoi_annotation'") from None
    return counts


def order_within_images(cand: Candidates, nms: TripletNMS | None, space: LabelSpace) -> Candidates:
    """Apply the optional triplet NMS; return candidates in the matcher's processing order."""
    if nms is None or len(cand.img) == 0:
        return cand
    code = space.triplet_code(cand.box_cat[cand.sub], cand.box_cat[cand.obj], cand.verb)
    bounds = np.flatnonzero(np.diff(cand.img)) + 1
    keep_all = []
    for idx in np.split(np.arange(len(cand.img)), bounds):
        kept = idx[nms.keep(code[idx], cand.boxes[cand.sub[idx]], cand.boxes[cand.obj[idx]], cand.score[idx])]
        keep_all.append(kept[np.argsort(-cand.score[kept], kind="stable")])  # the matcher's stable re-sort
    k = np.concatenate(keep_all)
    return Candidates(cand.img[k], cand.sub[k], cand.obj[k], cand.verb[k], cand.score[k], cand.boxes, cand.box_cat)


def _pairs(gt: GroundTruth, gt_row: np.ndarray, cand: Candidates, cand_row: np.ndarray, n_rows: int,
           strict: bool):
    """Every (candidate, ground-truth pair) of the same image and triplet, with both IoUs. (Same triplet =
    same verb and same box categories: the only pairs whose IoUs can both be nonzero.)"""
    gt_key = gt.rel_img * n_rows + gt_row
    gt_order = np.argsort(gt_key, kind="stable")  # within a key: annotation order
    sorted_key = gt_key[gt_order]
    c_key = cand.img * n_rows + cand_row
    lo = np.searchsorted(sorted_key, c_key, "left")
    n = np.searchsorted(sorted_key, c_key, "right") - lo
    pair_c = np.repeat(np.arange(len(c_key)), n)
    start = np.cumsum(n) - n
    pair_h = gt_order[lo[pair_c] + np.arange(len(pair_c)) - start[pair_c]]
    iou = continuous_iou if strict else pixel_iou
    iou_s = iou(gt.boxes[gt.rel_sub[pair_h]], cand.boxes[cand.sub[pair_c]])
    iou_o = iou(gt.boxes[gt.rel_obj[pair_h]], cand.boxes[cand.obj[pair_c]])
    return pair_c, pair_h, iou_s, iou_o


def _match(gt: GroundTruth, gt_row: np.ndarray, cand: Candidates, cand_row: np.ndarray, n_rows: int,
           strict: bool) -> np.ndarray:
    """True-positive flag per candidate (candidates in processing order, image-major); `*_row` is the
    triplet (row of the ground-truth triplets) of each relation and candidate."""
    pair_c, pair_h, iou_s, iou_o = _pairs(gt, gt_row, cand, cand_row, n_rows, strict)
    elig = (iou_s >= IOU_THRESHOLD) & (iou_o >= IOU_THRESHOLD)
    pair_c, pair_h, quality = pair_c[elig], pair_h[elig], np.minimum(iou_s, iou_o)[elig]
    tp = np.zeros(len(cand.img), dtype=bool)
    if len(pair_c) == 0:
        return tp
    if strict:
        return _match_with_fallback(pair_c, pair_h, quality, tp)
    # best pair per candidate: largest quality, first in annotation order on ties
    order = np.lexsort((np.arange(len(pair_c)), -quality, pair_c))
    first = np.unique(pair_c[order], return_index=True)[1]
    best_c, best_h = pair_c[order][first], pair_h[order][first]  # ascending candidate = processing order
    # the ground truth goes to the first candidate that picks it; later ones are false positives
    winners = np.unique(best_h, return_index=True)[1]
    tp[best_c[winners]] = True
    return tp


def _match_with_fallback(pair_c: np.ndarray, pair_h: np.ndarray, quality: np.ndarray, tp: np.ndarray) -> np.ndarray:
    taken: set[int] = set()
    bounds = np.flatnonzero(np.diff(pair_c)) + 1
    for idx in np.split(np.arange(len(pair_c)), bounds):
        best, best_q = -1, -1.0
        for p in idx:  # annotation order; strict '>' keeps the first on ties
            h = int(pair_h[p])
            if h not in taken and quality[p] > best_q:
                best, best_q = h, quality[p]
        if best >= 0:
            taken.add(best)
            tp[pair_c[idx[0]]] = True
    return tp


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def evaluate_hico_files(gt: str | Path, pred: str | Path, *, train: str | Path | None = None,
                        label_space: LabelSpace | None = None, **options) -> dict:
    """`evaluate_hico` of files: listed-form files are decoded straight into columns (see
    `files.read_relations`), any other form read as JSON; same numbers, same one-line errors."""
    space = label_space or hico_label_space()
    return evaluate_hico(
        read_ground_truth(gt, space, "hoi_annotation"), read_predictions(pred, space, "hoi_prediction"),
        train=None if train is None else read_ground_truth(train, space, "hoi_annotation", "training annotations",
                                                           required=True),
        label_space=space, **options)


def evaluate_hico(gt: list[dict] | RelationFile, preds: list[dict] | RelationFile, *,
                  train: list[dict] | RelationFile | None = None,
                  zero_shot: str | Iterable[Sequence[int]] | None = None, label_space: LabelSpace | None = None,
                  strict: bool = False, nms: TripletNMS | None = None, top_k: int = TOP_K) -> dict:
    """HICO-DET-protocol mAP of `preds` against `gt` (both in the QPIC-family JSON form, see
    `eval.relation_json`). Returns fractions: "mAP", "mAP_rare", "mAP_non_rare" (None without
    `train`), "mean_max_recall", with `zero_shot` also "mAP_unseen" / "mAP_seen", plus counts and
    "per_triplet" (AP and max recall of every ground-truth triplet)."""
    space = label_space or hico_label_space()
    g = load_ground_truth(gt, space)
    cand = load_candidates(preds, g, space, top_k=top_k)
    n_missing, warnings = missing_predictions(g, cand)
    cand = order_within_images(cand, nms, space)
    ranked = rank_candidates(g, cand, space, strict)
    out = _summarise(g, ranked, space, train, zero_shot, strict)
    out["n_images_without_predictions"] = n_missing
    out["warnings"] = warnings
    return out


def rank_candidates(g: GroundTruth, cand: Candidates, space: LabelSpace, strict: bool) -> tuple[np.ndarray, np.ndarray, Ranked]:
    """Match the candidates; return ground-truth triplet codes and counts in order of appearance,
    and each kept candidate's triplet row, score and true-positive flag."""
    gt_code = space.triplet_code(g.box_cat[g.rel_sub], g.box_cat[g.rel_obj], g.rel_verb)
    codes, first, gt_row, n_gt = np.unique(gt_code, return_index=True, return_inverse=True, return_counts=True)
    appearance = np.argsort(first, kind="stable")  # the reference lists triplets in order of appearance
    c_code = space.triplet_code(cand.box_cat[cand.sub], cand.box_cat[cand.obj], cand.verb)
    row = np.searchsorted(codes, c_code)
    known = (row < len(codes)) & (codes[np.minimum(row, len(codes) - 1)] == c_code) if len(codes) else \
        np.zeros(len(c_code), bool)
    has_boxes = np.diff(g.box_offset) > 0
    if strict:
        keep = known  # every prediction counts, also on images without ground truth
    else:
        keep = known & has_boxes[cand.img]
    sub = Candidates(cand.img[keep], cand.sub[keep], cand.obj[keep], cand.verb[keep], cand.score[keep],
                     cand.boxes, cand.box_cat)
    tp = _match(g, gt_row.reshape(-1), sub, row[keep], len(codes), strict)
    return codes[appearance], n_gt[appearance], Ranked(np.argsort(appearance)[row[keep]], sub.score, tp)


def triplet_ap(n_gt: np.ndarray, ranked: Ranked, strict: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AP, max recall and true-positive count of every ground-truth triplet (rows of `n_gt`)."""
    order = np.argsort(ranked.triplet, kind="stable")  # per triplet: image order, then processing order
    starts = np.searchsorted(ranked.triplet[order], np.arange(len(n_gt) + 1))
    ap, max_recall, n_tp = np.zeros(len(n_gt)), np.zeros(len(n_gt)), np.zeros(len(n_gt), np.int64)
    for t in range(len(n_gt)):
        idx = order[starts[t]:starts[t + 1]]
        if len(idx) == 0:
            continue
        score, hit = ranked.score[idx], ranked.tp[idx]
        srt = np.argsort(-score, kind="stable") if strict else np.argsort(-score)
        tp = np.cumsum(hit[srt].astype(np.int64))
        fp = np.cumsum((~hit[srt]).astype(np.int64))
        rec = tp / n_gt[t]
        prec = tp / (fp + tp)
        ap[t] = eleven_point_ap(rec, prec, exact_thresholds=strict)
        max_recall[t] = np.amax(rec)
        n_tp[t] = tp[-1]
    return ap, max_recall, n_tp


def _summarise(g: GroundTruth, ranked_all, space: LabelSpace, train, zero_shot, strict: bool) -> dict:
    codes, n_gt, ranked = ranked_all
    ap, max_recall, _ = triplet_ap(n_gt, ranked, strict)

    triplets = [space.decode(c) for c in codes]
    out: dict = {"protocol": "strict" if strict else "default", "mAP": _mean(ap.tolist()),
                 "mean_max_recall": _mean(max_recall.tolist()), "n_triplets": len(codes),
                 "n_images": g.n_images, "mAP_rare": None, "mAP_non_rare": None}
    if train is not None:
        counts = count_training_triplets(train, space)
        rare = [counts.get(int(c), 0) for c in codes]
        rare_ap = [a for a, n in zip(ap, rare) if 0 < n < RARE_BELOW]
        non_rare_ap = [a for a, n in zip(ap, rare) if n >= RARE_BELOW]
        out.update({"mAP_rare": _mean(rare_ap), "mAP_non_rare": _mean(non_rare_ap), "n_rare": len(rare_ap),
                    "n_non_rare": len(non_rare_ap), "n_not_in_train": sum(1 for n in rare if n == 0)})
    if zero_shot is not None:
        unseen = set(space.unseen_triplets(zero_shot))
        s = space.subject_index
        if s is None:
            seen = set(triplets) - unseen
        else:
            seen = {(s, int(o), int(v)) for v, o in zip(*np.nonzero(space.valid))} - unseen
        out.update({"zero_shot": zero_shot if isinstance(zero_shot, str) else "custom",
                    "mAP_unseen": _mean([a for a, t in zip(ap, triplets) if t in unseen]),
                    "mAP_seen": _mean([a for a, t in zip(ap, triplets) if t in seen]),
                    "n_unseen": sum(t in unseen for t in triplets), "n_seen": sum(t in seen for t in triplets)})
    out["per_triplet"] = [
        {"triplet": [space.objects[t[0]], space.objects[t[1]], space.verbs[t[2]]], "index": list(t),
         "n_gt": int(n), "ap": float(a), "max_recall": float(r)}
        for t, n, a, r in zip(triplets, n_gt, ap, max_recall)]
    return out
