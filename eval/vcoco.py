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
import math
import numbers
import pickle
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rlipv2_scale.errors import UserError
from rlipv2_scale.eval.ap import area_ap
from rlipv2_scale.eval.files import read_coco_instances, read_json

OVERLAP = 0.5

# How the inputs are named in errors; evaluate_vcoco_files names the files instead.
SOURCES = {"vcoco": "V-COCO annotations", "coco": "COCO instances", "image_ids": "the image-id list",
           "detections": "detections"}


def _integer(value: Any) -> int | None:
    """`value` as an int when it is a whole number (1, 1.0, np.int64), else None ("1", 1.7, None, True)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    number = float(value)
    return int(number) if math.isfinite(number) and number.is_integer() else None


def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _whole(column: np.ndarray) -> bool:
    return column.dtype.kind in "iu" or (column.dtype.kind == "f" and bool(np.all(np.mod(column, 1) == 0)))


def _annotations_ok(anns: list) -> bool:
    """Whether every annotation has whole-number ids, a numeric area and 4 finite bbox numbers: one
    pass per field in numpy (a real instances file holds ~10^5 of them)."""
    try:
        ids = [np.array([a[key] for a in anns]) for key in ("id", "image_id", "category_id")]
        area = np.array([a["area"] for a in anns])
        boxes = np.array([a["bbox"] for a in anns])
    except (KeyError, TypeError, ValueError):
        return False
    return (all(_whole(c) and c.shape == (len(anns),) for c in ids) and area.dtype.kind in "iuf"
            and area.shape == (len(anns),) and not np.isnan(area).any() and boxes.dtype.kind in "iuf"
            and boxes.shape == (len(anns), 4) and bool(np.isfinite(boxes).all()))


def _check_coco(coco: Any, where: str) -> None:
    """What pycocotools' index and the toolkit read of a COCO instances file, checked before they do:
    they fail with a bare KeyError / TypeError on anything else."""
    if not isinstance(coco, dict):
        raise UserError(f"{where}: expected a COCO instances object {{images, annotations, categories}}, got a "
                        f"{type(coco).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise UserError(f"{where}: {key!r} is {'missing' if key not in coco else 'not a list'}; a COCO instances "
                            f"file has lists 'images', 'annotations' and 'categories' (instances_vcoco_all_2014.json)")
    for k, c in enumerate(coco["categories"]):
        if not isinstance(c, dict) or _integer(c.get("id")) is None:
            raise UserError(f"{where}: categories[{k}] needs an integer 'id', got {c!r:.80}")
    for k, img in enumerate(coco["images"]):
        if not isinstance(img, dict) or _integer(img.get("id")) is None:
            raise UserError(f"{where}: images[{k}] needs an integer 'id', got {img!r:.80}")
        for key in ("width", "height"):
            if not _number(img.get(key)) or not img[key] > 0:
                raise UserError(f"{where}: image {img['id']} (images[{k}]) needs a positive {key!r}, got "
                                f"{img.get(key)!r}")
    if _annotations_ok(coco["annotations"]):
        return
    for k, a in enumerate(coco["annotations"]):   # find the first bad one, naming it
        if not isinstance(a, dict):
            raise UserError(f"{where}: annotations[{k}] must be an object, got {a!r:.80}")
        for key in ("id", "image_id", "category_id"):
            if _integer(a.get(key)) is None:
                raise UserError(f"{where}: annotations[{k}] needs an integer {key!r}, got {a.get(key)!r}")
        bbox = a.get("bbox")
        if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
                or not all(_number(v) and math.isfinite(v) for v in bbox)):
            raise UserError(f"{where}: annotation {a['id']} (annotations[{k}]): bbox must be 4 finite numbers "
                            f"[x, y, width, height], got {bbox!r}")
        if not _number(a.get("area")) or math.isnan(a["area"]):
            raise UserError(f"{where}: annotation {a['id']} (annotations[{k}]) needs a numeric 'area', got "
                            f"{a.get('area')!r}")


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

    def __init__(self, vcoco: list[dict], coco: dict, image_ids: Sequence[int], sources: dict[str, str] = SOURCES):
        from pycocotools.coco import COCO

        self.actions, self.roles = [], []
        tables = []
        where = sources["vcoco"]
        if not isinstance(vcoco, list):
            raise UserError(f"{where}: expected a list of actions (vcoco_test.json), got a {type(vcoco).__name__}")
        for k, a in enumerate(vcoco):
            try:
                roles = list(a["role_name"])
                table = {"role_object_id": np.asarray(a["role_object_id"]).reshape(len(roles), -1).T,
                         "ann_id": np.asarray(a["ann_id"]).reshape(-1), "label": np.asarray(a["label"]).reshape(-1),
                         "image_id": np.asarray(a["image_id"]).reshape(-1)}
                self.actions.append(a["action_name"])
                self.roles.append(roles)
            except (KeyError, TypeError, ValueError) as exc:
                raise UserError(f"{where}: action entry {k} is malformed ({exc!r}); expected action_name, "
                                f"role_name, image_id, ann_id, label, role_object_id") from None
            n = len(table["image_id"])
            for key, column in table.items():
                if len(column) != n:
                    expected = f"{len(roles)} x {n} (one per role and annotated person)" if key == "role_object_id" \
                        else f"{n} (one per annotated person)"
                    raise UserError(f"{where}: action {a['action_name']!r} (entry {k}) has {column.size} {key!r} values "
                                    f"for {n} image_id values; expected {expected}")
                if column.size and (column.dtype.kind not in "iuf" or not np.all(np.mod(column, 1) == 0)):
                    raise UserError(f"{where}: action {a['action_name']!r} (entry {k}): {key!r} must hold whole "
                                    f"numbers, got {column.ravel()[:5].tolist()!r}")
            tables.append(table)
        if not tables:
            raise UserError(f"{where}: no actions (expected the list of vcoco_test.json)")
        listed = [_integer(i) for i in image_ids]
        if None in listed:
            bad = next(i for i, v in zip(image_ids, listed) if v is None)
            raise UserError(f"{sources['image_ids']}: image id {bad!r} is not a whole number")
        ids = np.asarray(listed, dtype=np.int64)
        uniq, counts = np.unique(ids, return_counts=True)
        if np.any(counts > 1):
            dup = uniq[counts > 1].tolist()
            raise UserError(f"{sources['image_ids']}: image id(s) {dup[:5]} listed more than once; list each image "
                            f"of the split once")
        annotated = np.unique(tables[0]["image_id"])
        if not np.array_equal(annotated, np.sort(ids)):
            missing = sorted(set(annotated.tolist()) - set(ids.tolist()))[:5]
            extra = sorted(set(ids.tolist()) - set(annotated.tolist()))[:5]
            raise UserError(f"{sources['image_ids']} ({len(ids)} ids) and {sources['vcoco']} ({len(annotated)} images) "
                            f"disagree: annotated but not listed {missing}, listed but not annotated {extra}")
        _check_coco(coco, sources["coco"])
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
                raise UserError(f"{sources['coco']}: image {image_id} of the split is not in the COCO instances file")
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
            unknown = [o for o, _ in valid if o["category_id"] not in contiguous]
            if unknown:
                raise UserError(f"{sources['coco']}: annotation {unknown[0]['id']} (image {image_id}) has category_id "
                                f"{unknown[0]['category_id']}, which 'categories' does not list")
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
                        raise UserError(f"{where}: person annotation {obj['id']} has {len(rows)} positive "
                                        f"rows for action {self.actions[i]!r} (expected one)")
                    actions[ix, i] = 1
                    rids = t["role_object_id"][rows[0]]
                    for j in range(1, len(rids)):
                        if rids[j] == 0:
                            continue
                        if rids[j] not in valid_ids:
                            raise UserError(f"{where}: the {self.roles[i][j]!r} object {rids[j]} of action "
                                            f"{self.actions[i]!r} (image {image_id}) is not a valid COCO annotation of "
                                            f"that image")
                        role_id[ix, i, j - 1] = valid_ids.index(rids[j])
            self.images.append({"id": image_id, "boxes": boxes, "classes": classes, "actions": actions,
                                "role_id": role_id})


def _detection_values(items: list[tuple[int, dict]], image_id: int, key: str, width: int, where: str) -> np.ndarray:
    """[n, width] array of `det[key]` for the (file index, detection) pairs of one image: numbers only,
    where numpy would turn "0.9" and None into floats silently."""
    try:
        values = np.array([det[key] for _, det in items])
    except KeyError:
        k = next(k for k, det in items if key not in det)
        raise UserError(f"{where}: detection {k} (image {image_id}) has no {key!r} entry: every detection needs a "
                        f"person_box [x1, y1, x2, y2] and a [x1, y1, x2, y2, score] for each action-role") from None
    except ValueError:   # ragged: one of them is not `width` long
        values = np.zeros((0,), dtype=object)
    if values.dtype.kind not in "iuf" or values.shape != (len(items), width):
        what = "[x1, y1, x2, y2]" if width == 4 else "[x1, y1, x2, y2, score]"
        for k, det in items:
            v = det[key]
            v = v.tolist() if isinstance(v, np.ndarray) else v
            if not isinstance(v, (list, tuple)) or len(v) != width or not all(_number(x) for x in v):
                raise UserError(f"{where}: detection {k} (image {image_id}): {key!r} must be {width} numbers {what}, "
                                f"got {v!r:.120}")
        raise UserError(f"{where}: detections of image {image_id}: {key!r} must be {width} numbers {what}")
    return values


def _detections_by_image(dets: list[dict], actions: list[str], roles: list[list[str]],
                         where: str = SOURCES["detections"]) -> dict:
    """image_id -> (agent boxes [n, 4], role table [n, 5 * n_actions, 2]) in the file's order.

    The person box must be finite numbers; in an action-role entry NaN keeps the toolkit's meaning
    (a NaN box: no object, a NaN score: no detection for that role), infinity is refused."""
    if not isinstance(dets, list):
        raise UserError(f"{where}: expected a list of detections (one object per image and person), got a "
                        f"{type(dets).__name__}")
    keys = [(a, j, f"{actions[a]}_{r}") for a in range(len(actions)) for j, r in enumerate(roles[a]) if r != "agent"]
    grouped: dict[int, list[tuple[int, dict]]] = defaultdict(list)
    for k, det in enumerate(dets):
        if not isinstance(det, dict) or "image_id" not in det or "person_box" not in det:
            raise UserError(f"{where}: detection {k} needs 'image_id' and 'person_box'")
        image_id = _integer(det["image_id"])
        if image_id is None:
            raise UserError(f"{where}: detection {k} has image_id {det['image_id']!r}; it must be the integer COCO "
                            f"image id")
        grouped[image_id].append((k, det))
    out = {}
    for image_id, items in grouped.items():   # image by image: each one's detections stay in the CPU caches
        table = np.zeros((len(items), 5 * len(actions), 2), dtype=np.float32)
        agents = _detection_values(items, image_id, "person_box", 4, where).astype(np.float32)
        if not np.isfinite(agents).all():
            i = int(np.flatnonzero(~np.isfinite(agents).all(axis=1))[0])
            raise UserError(f"{where}: detection {items[i][0]} (image {image_id}) has person_box "
                            f"{agents[i].tolist()}; it must be 4 finite numbers [x1, y1, x2, y2]")
        for a, j, key in keys:
            table[:, 5 * a: 5 * a + 5, j - 1] = _detection_values(items, image_id, key, 5, where)
        if np.isinf(table).any():
            i, col, r = (int(x[0]) for x in np.nonzero(np.isinf(table)))
            key = next(key for a, j, key in keys if a == col // 5 and j - 1 == r)
            raise UserError(f"{where}: detection {items[i][0]} (image {image_id}) has {key!r} "
                            f"{table[i, 5 * (col // 5): 5 * (col // 5) + 5, r].tolist()}; box and score must be "
                            f"finite (NaN box: no object, NaN score: no detection)")
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


def evaluate_vcoco(vcoco: list[dict], coco: dict, image_ids: Sequence[int], detections: list[dict], *,
                   sources: dict[str, str] | None = None) -> dict:
    """Role AP of `detections`; `sources` names the inputs in errors (keys of SOURCES: the files read)."""
    sources = {**SOURCES, **(sources or {})}
    ann = _Annotations(vcoco, coco, image_ids, sources)
    dets = _detections_by_image(detections, ann.actions, ann.roles, sources["detections"])
    unknown = sorted(set(dets) - {img["id"] for img in ann.images})
    if unknown:
        raise UserError(f"{sources['detections']}: detections name {len(unknown)} image(s) outside the split, e.g. {unknown[:3]}")
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
    """The split's image ids, one whole number per line (vcoco_test.ids), each once."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image-id file {str(path)!r} does not exist")
    ids: list[int] = []
    seen: dict[int, int] = {}
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        for word in line.split():
            try:
                value = float(word)
            except ValueError:
                value = math.nan
            if not (math.isfinite(value) and value.is_integer()):
                raise UserError(f"image-id file {str(path)!r}, line {line_no}: {word!r} is not an image id; the file "
                                f"holds one whole-number image id per line")
            image_id = int(word) if word.lstrip("+-").isdigit() else int(value)
            if image_id in seen:
                raise UserError(f"image-id file {str(path)!r}, line {line_no}: image id {image_id} is listed again "
                                f"(first on line {seen[image_id]}); list each image once")
            seen[image_id] = line_no
            ids.append(image_id)
    return ids


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
    print(f"rlipv2: warning: unpickling '{path}' (--trust-pickle): this can run code from the file",
          file=sys.stderr, flush=True)
    try:
        with path.open("rb") as f:
            return pickle.load(f)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as exc:
        raise UserError(f"detections file {str(path)!r} is not a readable pickle ({exc})") from None


def evaluate_vcoco_files(vcoco: str | Path, coco: str | Path, image_ids: str | Path, detections: str | Path,
                         trust_pickle: bool = False) -> dict:
    sources = {"vcoco": f"V-COCO annotations file {str(vcoco)!r}", "coco": f"COCO instances file {str(coco)!r}",
               "image_ids": f"image-id file {str(image_ids)!r}", "detections": f"detections file {str(detections)!r}"}
    return evaluate_vcoco(read_json(vcoco, "V-COCO annotations"), read_coco_instances(coco),
                          read_image_ids(image_ids), read_detections(detections, trust_pickle), sources=sources)
