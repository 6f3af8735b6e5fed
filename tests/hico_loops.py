"""A plain per-candidate loop implementation of the default HICO-DET protocol.

Used only as the baseline of `benchmarks/eval_speed.py` and as the oracle that `eval.hico` is tested
against: it walks images, candidates and ground-truth pairs one at a time with Python floats, the way
the community evaluator does, so that a vectorisation mistake in `eval.hico` shows up as a
difference. Like the community code it first fills the IoU table of every ground-truth box with every
predicted box of the image, then loops over candidates. It expects valid input (no validation) in the community JSON form, ids of the label
space. See `eval.hico` for the rules.
"""
from __future__ import annotations

import numpy as np

from rlipv2_scale.eval.triplet_nms import TripletNMS
from rlipv2_scale.labels.space import LabelSpace, hico_label_space


def _iou(gt_box, pred_box) -> float:
    gx1, gy1, gx2, gy2 = gt_box
    px1, py1, px2, py2 = pred_box
    area_sum = (gx2 - gx1 + 1) * (gy2 - gy1 + 1) + (px2 - px1 + 1) * (py2 - py1 + 1)
    top, bottom = max(gy1, py1), min(gy2, py2)
    left, right = max(gx1, px1), min(gx2, px2)
    if top >= bottom or left >= right:  # no +1 here, unlike the areas
        return 0.0
    inter = (bottom - top + 1) * (right - left + 1)
    return inter / (area_sum - inter)


def _eleven_point(rec: list[float], prec: list[float]) -> float:
    ap = 0.0
    for t in np.arange(0.0, 1.1, 0.1):
        reached = [p for r, p in zip(rec, prec) if r >= t]
        ap = ap + (max(reached) if reached else 0) / 11.0
    return ap


def _nms_order(hois: list[dict], boxes: list[dict], nms: TripletNMS) -> list[dict]:
    """The original's triplet NMS, one kept candidate against the rest at a time."""
    groups: dict[tuple, list[int]] = {}
    for k, h in enumerate(hois):
        key = (boxes[h["subject_id"]]["category_id"], boxes[h["object_id"]]["category_id"], h["category_id"])
        groups.setdefault(key, []).append(k)
    kept = []
    for members in groups.values():
        scores = np.array([hois[k]["score"] for k in members], dtype=np.float64)
        order = list(scores.argsort()[::-1])
        while order:
            i, rest = order[0], order[1:]
            kept.append(hois[members[i]])
            si, oi = boxes[hois[members[i]]["subject_id"]]["bbox"], boxes[hois[members[i]]["object_id"]]["bbox"]
            # numpy's power: NaN (not a complex number) for the negative ratios of inverted boxes
            order = [j for j in rest if np.power(_nms_overlap(si, boxes[hois[members[j]]["subject_id"]]["bbox"]), nms.alpha)
                     * np.power(_nms_overlap(oi, boxes[hois[members[j]]["object_id"]]["bbox"]), nms.beta) <= nms.threshold]
    return kept


def _nms_overlap(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    inter = w * h
    union = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.float64(inter) / np.float64(union)


def expand_per_query(entry: dict, space: LabelSpace) -> dict:
    """The per-query form (verb_scores Q x V, sub_ids, obj_ids, boxes, labels) as the community form:
    every (query, verb) becomes one listed candidate, query-major."""
    boxes = [{"bbox": list(map(float, b)), "category_id": space.object_ids[int(c)]}
             for b, c in zip(entry["boxes"], entry["labels"])]
    hois = []
    for q, row in enumerate(np.asarray(entry["verb_scores"], dtype=np.float64).tolist()):
        s, o = int(entry["sub_ids"][q]), int(entry["obj_ids"][q])
        for v, score in enumerate(row):
            hois.append({"subject_id": s, "object_id": o, "category_id": space.verb_ids[v], "score": score})
    return {"file_name": entry["file_name"], "predictions": boxes, "hoi_prediction": hois}


def evaluate_hico_loops(gt: list[dict], preds: list[dict], *, train: list[dict] | None = None,
                        label_space: LabelSpace | None = None, nms: TripletNMS | None = None,
                        top_k: int = 100) -> dict:
    space = label_space or hico_label_space()
    obj_index = {i: k for k, i in enumerate(space.object_ids)}
    verb_index = {i: k for k, i in enumerate(space.verb_ids)}
    pred_by_name = {p["file_name"]: (expand_per_query(p, space) if "verb_scores" in p else p) for p in preds}

    gt_triplets: list[tuple] = []
    n_gt: dict[tuple, int] = {}
    for img in gt:
        for h in img["hoi_annotation"]:
            anns = img["annotations"]
            t = (obj_index[anns[h["subject_id"]]["category_id"]], obj_index[anns[h["object_id"]]["category_id"]],
                 verb_index[h["category_id"]])
            if t not in n_gt:
                gt_triplets.append(t)
                n_gt[t] = 0
            n_gt[t] += 1

    hits: dict[tuple, list[int]] = {t: [] for t in gt_triplets}
    scores: dict[tuple, list[float]] = {t: [] for t in gt_triplets}
    for img in gt:
        pred = pred_by_name.get(img["file_name"])
        if pred is None or not img["annotations"]:
            continue  # predictions on images without ground-truth boxes are ignored
        boxes = pred["predictions"]
        cands = []
        for h in pred["hoi_prediction"]:
            valid = space.valid[verb_index[h["category_id"]], obj_index[boxes[h["object_id"]]["category_id"]]]
            cands.append(dict(h, score=h["score"] * valid))
        cands.sort(key=lambda c: c["score"], reverse=True)  # stable
        cands = cands[:top_k]
        if nms is not None:
            cands = _nms_order(cands, boxes, nms)
            cands.sort(key=lambda c: c["score"], reverse=True)
        anns, matched = img["annotations"], [False] * len(img["hoi_annotation"])
        # as the community evaluator: IoU of every ground-truth box with every predicted box first
        iou = [[_iou(g["bbox"], p["bbox"]) if g["category_id"] == p["category_id"] else 0.0 for p in boxes]
               for g in anns]
        for c in cands:
            sub_box, obj_box = boxes[c["subject_id"]], boxes[c["object_id"]]
            t = (obj_index[sub_box["category_id"]], obj_index[obj_box["category_id"]], verb_index[c["category_id"]])
            if t not in n_gt:
                continue
            best, best_quality = None, 0.0
            for k, h in enumerate(img["hoi_annotation"]):
                if h["category_id"] != c["category_id"]:
                    continue
                iou_s = iou[h["subject_id"]][c["subject_id"]]
                iou_o = iou[h["object_id"]][c["object_id"]]
                if iou_s >= 0.5 and iou_o >= 0.5 and min(iou_s, iou_o) > best_quality:
                    best, best_quality = k, min(iou_s, iou_o)
            # the best ground truth, even when already taken (then the candidate is a false positive)
            hit = best is not None and not matched[best]
            if hit:
                matched[best] = True
            hits[t].append(int(hit))
            scores[t].append(c["score"])

    ap, max_recall = {}, {}
    for t in gt_triplets:
        if not hits[t]:
            ap[t], max_recall[t] = 0.0, 0.0
            continue
        order = np.argsort(-np.array(scores[t]))
        tp = fp = 0
        rec, prec = [], []
        for k in order:
            tp += hits[t][k]
            fp += 1 - hits[t][k]
            rec.append(tp / n_gt[t])
            prec.append(tp / (tp + fp))
        ap[t] = _eleven_point(rec, prec)
        max_recall[t] = max(rec)

    out = {"mAP": float(np.mean([ap[t] for t in gt_triplets])) if gt_triplets else None,
           "mean_max_recall": float(np.mean([max_recall[t] for t in gt_triplets])) if gt_triplets else None,
           "mAP_rare": None, "mAP_non_rare": None, "ap": ap}
    if train is not None:
        counts: dict[tuple, int] = {}
        for img in train:
            anns = img["annotations"]
            for h in img["hoi_annotation"]:
                t = (obj_index[anns[h["subject_id"]]["category_id"]], obj_index[anns[h["object_id"]]["category_id"]],
                     verb_index[h["category_id"]])
                counts[t] = counts.get(t, 0) + 1
        rare = [ap[t] for t in gt_triplets if 0 < counts.get(t, 0) < 10]
        non_rare = [ap[t] for t in gt_triplets if counts.get(t, 0) >= 10]
        out["mAP_rare"] = float(np.mean(rare)) if rare else None
        out["mAP_non_rare"] = float(np.mean(non_rare)) if non_rare else None
    return out
