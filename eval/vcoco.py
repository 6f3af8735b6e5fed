"""V-COCO role AP (scenarios 1 and 2), as the official toolkit's `vsrl_eval.py` computes it.

Inputs are the official ones: `vcoco_test.json` (per action: image_id, ann_id, label, role_name,
role_object_id), the COCO instances file, the image-id list of the split, and detections in the
official format: one dict per (image, person) with `image_id`, `person_box` [x1, y1, x2, y2],
`{action}_agent` (a score) and `{action}_{role}` ([x1, y1, x2, y2, score]; NaN box = no object).

The rules, kept as published:
  * ground-truth boxes: COCO xywh -> x2 = x1 + max(0, w - 1), clipped to the image, kept when the
    segment area is positive and the box is more than one pixel; person = the first COCO category;
    persons that are not V-COCO annotated are "ignored";
  * per action-role and image, detections go by descending score; each takes the ground-truth person
    of largest overlap (first on ties; even with zero overlap) and is *skipped* when that person is
    ignored; it is a true positive when that person does the action, agent and role overlap >= 0.5
    and the person is not yet covered. Without a ground-truth role object, scenario 1 requires an
    empty role prediction (zeros or NaN) and scenario 2 accepts anything;
  * AP is the VOC area under the precision envelope; the toolkit works in float32 (boxes, scores,
    cumulative counts, the per-role AP table) with NumPy 1.x promotion, which is reproduced here;
  * the reported means: over the role APs, and the same without "point" ((25 * mean - AP_point) / 24).

Where the official script stops with an exception, this one goes on and says what was missing
(`"warnings"`): an action-role without any detection gets AP 0, one without ground-truth positives
is left out of the means, detections on an image without a ground-truth person are false positives.
Inconsistent annotation files (ids, missing COCO images or objects) raise `UserError`.
"""
from __future__ import annotations

import contextlib
import io
import pickle
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rlipv2_scale.errors import UserError
from rlipv2_scale.eval.ap import area_ap
from rlipv2_scale.eval.files import read_coco_instances, read_json

OVERLAP = 0.5


def _overlap(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """[n_pred, n_gt] overlaps of the toolkit's `get_overlap` (+1 areas), float32 as it computes them."""
    g, p = gt[None, :, :], pred[:, None, :]
    iw = np.maximum(np.minimum(g[..., 2], p[..., 2]) - np.maximum(g[..., 0], p[..., 0]) + np.float32(1), np.float32(0))
    ih = np.maximum(np.minimum(g[..., 3], p[..., 3]) - np.maximum(g[..., 1], p[..., 1]) + np.float32(1), np.float32(0))
    inters = iw * ih
    # the prediction's area is a scalar expression there: float64 under NumPy 1.x, cast back to float32
    pred_area = ((p[..., 2] - p[..., 0]).astype(np.float64) + 1.0) * ((p[..., 3] - p[..., 1]).astype(np.float64) + 1.0)
    gt_area = (g[..., 2] - g[..., 0] + np.float32(1)) * (g[..., 3] - g[..., 1] + np.float32(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return inters / (pred_area.astype(np.float32) + gt_area - inters)


class _Annotations:
    """The toolkit's ground-truth tables, per image of the split."""

    def __init__(self, vcoco: list[dict], coco: dict, image_ids: Sequence[int]):
        from pycocotools.coco import COCO

        self.actions, self.roles = [], []
        tables = []
        for k, a in enumerate(vcoco):
            try:
                roles = list(a["role_name"])
                tables.append({
                    "role_object_id": np.asarray(a["role_object_id"]).reshape(len(roles), -1).T,
                    "ann_id": np.asarray(a["ann_id"]).reshape(-1), "label": np.asarray(a["label"]).reshape(-1),
                    "image_id": np.asarray(a["image_id"]).reshape(-1)})
                self.actions.append(a["action_name"])
                self.roles.append(roles)
            except (KeyError, TypeError, ValueError) as exc:
                raise UserError(f"V-COCO annotations: action entry {k} is malformed ({exc!r}); expected action_name, "
                                f"role_name, image_id, ann_id, label, role_object_id") from None
        if not tables:
            raise UserError("V-COCO annotations are empty")
        ids = np.asarray(image_ids, dtype=np.int64)
        annotated = np.unique(tables[0]["image_id"])
        if not np.array_equal(annotated, np.sort(ids)):
            missing = sorted(set(annotated.tolist()) - set(ids.tolist()))[:5]
            extra = sorted(set(ids.tolist()) - set(annotated.tolist()))[:5]
            raise UserError(f"the image-id list ({len(ids)} ids) and the V-COCO annotations ({len(annotated)} images) "
                            f"disagree: annotated but not listed {missing}, listed but not annotated {extra}")
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            api = COCO()
            api.dataset = coco
            api.createIndex()
        contiguous = {c: i + 1 for i, c in enumerate(api.getCatIds())}  # file order, as the toolkit
        vcoco_anns = set(tables[0]["ann_id"].tolist())
        positive: list[dict[int, list[int]]] = []  # per action: person annotation -> its label-1 rows
        for t in tables:
            rows: dict[int, list[int]] = defaultdict(list)
            for k in np.flatnonzero(t["label"] == 1).tolist():
                rows[int(t["ann_id"][k])].append(k)
            positive.append(rows)
        self.images = []
        for image_id in ids.tolist():
            if image_id not in api.imgs:
                raise UserError(f"image {image_id} of the split is not in the COCO instances file")
            info = api.imgs[image_id]
            valid, valid_ids = [], []
            for obj in api.loadAnns(api.getAnnIds(imgIds=image_id, iscrowd=None)):
                if obj.get("ignore", 0) == 1:
                    continue
                x1, y1, w, h = obj["bbox"]
                x2, y2 = x1 + np.maximum(0.0, w - 1.0), y1 + np.maximum(0.0, h - 1.0)
                x1, y1, x2, y2 = (np.minimum(lim - 1.0, np.maximum(0.0, v)) for v, lim in
                                  ((x1, info["width"]), (y1, info["height"]), (x2, info["width"]), (y2, info["height"])))
                if obj["area"] > 0 and x2 > x1 and y2 > y1:
                    valid.append((obj, [x1, y1, x2, y2]))
                    valid_ids.append(obj["id"])
            boxes = np.array([b for _, b in valid], dtype=np.float32).reshape(-1, 4)
            classes = np.array([contiguous[o["category_id"]] for o, _ in valid], dtype=np.int32)
            actions = -np.ones((len(valid), len(tables)), dtype=np.int32)
            role_id = -np.ones((len(valid), len(tables), 2), dtype=np.int32)
            for ix, (obj, _) in enumerate(valid):
                if obj["id"] not in vcoco_anns:
                    continue
                actions[ix] = 0
                for i, t in enumerate(tables):
                    rows = positive[i].get(obj["id"], [])
                    if len(rows) == 0:
                        continue
                    if len(rows) > 1:
                        raise UserError(f"V-COCO annotations: person annotation {obj['id']} has {len(rows)} positive "
                                        f"rows for action {self.actions[i]!r} (expected one)")
                    actions[ix, i] = 1
                    rids = t["role_object_id"][rows[0]]
                    for j in range(1, len(rids)):
                        if rids[j] == 0:
                            continue
                        if rids[j] not in valid_ids:
                            raise UserError(f"V-COCO annotations: the {self.roles[i][j]!r} object {rids[j]} of action "
                                            f"{self.actions[i]!r} (image {image_id}) is not a valid COCO annotation of "
                                            f"that image")
                        role_id[ix, i, j - 1] = valid_ids.index(rids[j])
            self.images.append({"id": image_id, "boxes": boxes, "classes": classes, "actions": actions,
                                "role_id": role_id})


def _detections_by_image(dets: list[dict], actions: list[str], roles: list[list[str]]) -> dict:
    """image_id -> (agent boxes [n, 4], role table [n, 5 * n_actions, 2]) in the file's order."""
    keys = [(a, j, f"{actions[a]}_{r}") for a in range(len(actions)) for j, r in enumerate(roles[a]) if r != "agent"]
    grouped: dict[int, list[dict]] = defaultdict(list)
    for k, det in enumerate(dets):
        if not isinstance(det, dict) or "image_id" not in det or "person_box" not in det:
            raise UserError(f"detection {k} needs 'image_id' and 'person_box'")
        grouped[int(det["image_id"])].append((k, det))
    out = {}
    for image_id, items in grouped.items():
        table = np.zeros((len(items), 5 * len(actions), 2), dtype=np.float32)
        try:
            agents = np.array([det["person_box"] for _, det in items], dtype=np.float32).reshape(len(items), 4)
            for a, j, key in keys:
                table[:, 5 * a: 5 * a + 5, j - 1] = np.array([det[key] for _, det in items], dtype=np.float32)
        except KeyError as exc:
            k = next(k for k, det in items if exc.args[0] not in det)
            raise UserError(f"detection {k} (image {image_id}) has no {exc.args[0]!r} entry: every detection needs "
                            f"a [x1, y1, x2, y2, score] for each action-role") from None
        except (ValueError, TypeError) as exc:
            raise UserError(f"detections of image {image_id}: a box or score is malformed ({exc}); person_box is "
                            f"[x1, y1, x2, y2], each action-role [x1, y1, x2, y2, score]") from None
        out[image_id] = (agents, table)
    return out


def _role_ap(ann: _Annotations, dets: dict, scenario: int, warnings: list[str]) -> np.ndarray:
    n_actions = len(ann.actions)
    tp = defaultdict(list)
    sc = defaultdict(list)
    npos = np.zeros(n_actions, dtype=np.float32)
    empty = (np.zeros((0, 4), np.float32), np.zeros((0, 5 * n_actions, 2), np.float32))
    no_person = set()
    for img in ann.images:
        person = np.flatnonzero(img["classes"] == 1)
        gt_boxes, gt_actions = img["boxes"][person], img["actions"][person]
        ignore = np.any(gt_actions == -1, axis=1)
        npos += np.sum(gt_actions == 1, axis=0).astype(np.float32)
        agents, table = dets.get(img["id"], empty)
        overlaps = _overlap(gt_boxes, agents) if len(gt_boxes) else None
        for a in range(n_actions):
            for r in range(len(ann.roles[a]) - 1):
                scores = table[:, 5 * a + 4, r]
                valid = np.flatnonzero(~np.isnan(scores))
                order = valid[scores[valid].argsort()[::-1]]
                if len(order) == 0:
                    continue
                if overlaps is None:  # the toolkit fails here (argmax of nothing): false positives
                    no_person.add(img["id"])
                    sc[a, r].append(scores[order])
                    tp[a, r].append(np.zeros(len(order), bool))
                    continue
                jmax = overlaps[order].argmax(axis=1)
                ovmax = overlaps[order].max(axis=1)
                keep = ~ignore[jmax]
                order, jmax, ovmax = order[keep], jmax[keep], ovmax[keep]
                role_boxes = table[order, 5 * a: 5 * a + 4, r]
                gt_role = img["role_id"][person[jmax], a, r]
                has_role = gt_role > -1
                ov_role = np.zeros(len(order), np.float32)
                if has_role.any():
                    ov_role[has_role] = np.diagonal(_overlap(img["boxes"][gt_role[has_role]], role_boxes[has_role]))
                if scenario == 1:
                    no_pred = np.all(role_boxes == 0.0, axis=1) | np.all(np.isnan(role_boxes), axis=1)
                    ov_role[~has_role] = no_pred[~has_role].astype(np.float32)
                else:
                    ov_role[~has_role] = 1.0
                with np.errstate(invalid="ignore"):
                    ok = (gt_actions[jmax, a] == 1) & (ovmax >= OVERLAP) & (ov_role >= OVERLAP)
                hit = np.zeros(len(order), bool)
                cand = np.flatnonzero(ok)
                hit[cand[np.unique(jmax[cand], return_index=True)[1]]] = True  # first one covers the person
                sc[a, r].append(scores[order])
                tp[a, r].append(hit)
    if no_person:
        warnings.append(f"{len(no_person)} image(s) with detections have no ground-truth person (e.g. "
                        f"{sorted(no_person)[:3]}); the official script fails there, they count as false positives")
    role_ap = np.full((n_actions, 2), np.nan, dtype=np.float32)
    for a in range(n_actions):
        for r in range(len(ann.roles[a]) - 1):
            name = f"{ann.actions[a]}-{ann.roles[a][r + 1]}"
            if npos[a] == 0:
                warnings.append(f"{name}: no ground-truth positives, AP undefined and left out of the means")
                continue
            a_sc = np.concatenate(sc[a, r]).astype(np.float32) if sc[a, r] else np.zeros(0, np.float32)
            if len(a_sc) == 0:
                warnings.append(f"{name}: no detections (the official script fails here); AP = 0")
                role_ap[a, r] = 0.0
                continue
            hit = np.concatenate(tp[a, r])
            idx = a_sc.argsort()[::-1]
            a_tp = np.cumsum(hit[idx].astype(np.float32))
            a_fp = np.cumsum((~hit[idx]).astype(np.float32))
            rec = a_tp / np.float32(npos[a])
            prec = a_tp / np.maximum(a_tp + a_fp, np.float32(np.finfo(np.float64).eps))
            role_ap[a, r] = area_ap(rec, prec)
    return role_ap


def evaluate_vcoco(vcoco: list[dict], coco: dict, image_ids: Sequence[int], detections: list[dict]) -> dict:
    ann = _Annotations(vcoco, coco, image_ids)
    dets = _detections_by_image(detections, ann.actions, ann.roles)
    unknown = sorted(set(dets) - {img["id"] for img in ann.images})
    if unknown:
        raise UserError(f"detections name {len(unknown)} image(s) outside the split, e.g. {unknown[:3]}")
    out: dict = {"warnings": []}
    names = [f"{ann.actions[a]}-{ann.roles[a][r + 1]}" for a in range(len(ann.actions))
             for r in range(len(ann.roles[a]) - 1)]
    point = [(a, 0) for a in range(len(ann.actions)) if ann.actions[a] == "point" and len(ann.roles[a]) > 1]
    for scenario in (1, 2):
        role_ap = _role_ap(ann, dets, scenario, out["warnings"] if scenario == 1 else [])
        flat = [role_ap[a, r] for a in range(len(ann.actions)) for r in range(len(ann.roles[a]) - 1)]
        mean = np.nanmean(role_ap) if not np.isnan(flat).all() else np.float32(np.nan)
        n_valid = int(np.sum(~np.isnan(flat)))
        if point and not np.isnan(role_ap[point[0]]):
            no_point = (float(mean) * n_valid - float(role_ap[point[0]])) / (n_valid - 1) if n_valid > 1 else None
        else:
            no_point = float(mean) if n_valid else None
        out[f"AP_role_s{scenario}"] = None if np.isnan(mean) else float(mean)
        out[f"AP_role_s{scenario}_no_point"] = no_point
        out[f"per_role_s{scenario}"] = {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, flat)}
    return out


def read_image_ids(path: str | Path) -> list[int]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image-id file {str(path)!r} does not exist")
    try:
        return [int(float(x)) for x in path.read_text().split()]
    except ValueError:
        raise UserError(f"image-id file {str(path)!r} must hold one numeric image id per line") from None


def read_detections(path: str | Path, trust_pickle: bool = False) -> Any:
    """JSON, or the pickle the official V-COCO export writes. Unpickling runs whatever the file names,
    so a pickle is read only when the user vouches for it (`--trust-pickle`)."""
    path = Path(path)
    if path.suffix not in (".pkl", ".pickle"):
        return read_json(path, "detections")
    if not path.is_file():
        raise UserError(f"detections file {str(path)!r} does not exist")
    if not trust_pickle:
        raise UserError(f"detections file {str(path)!r} is a pickle, and reading one can run code from it; give "
                        "the detections as JSON, or pass --trust-pickle if you trust the file")
    warnings.warn(f"unpickling '{path}' (--trust-pickle): this can run code from the file")
    try:
        with path.open("rb") as f:
            return pickle.load(f)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as exc:
        raise UserError(f"detections file {str(path)!r} is not a readable pickle ({exc})") from None


def evaluate_vcoco_files(vcoco: str | Path, coco: str | Path, image_ids: str | Path, detections: str | Path,
                         trust_pickle: bool = False) -> dict:
    return evaluate_vcoco(read_json(vcoco, "V-COCO annotations"), read_coco_instances(coco),
                          read_image_ids(image_ids), read_detections(detections, trust_pickle))
