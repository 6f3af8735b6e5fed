"""Random ground truth and predictions in the QPIC-family JSON form, for tests and benchmarks.

Boxes are integer pixels, so touching boxes, identical boxes and equal IoUs occur; scores are
rounded to two decimals, so equal scores occur within and across images; some predicted boxes copy
ground truth, some are jittered, some have the wrong category; some images have no ground truth.
"""
from __future__ import annotations

import numpy as np

from rlipv2_scale.labels.space import LabelSpace


def _box(rng: np.random.Generator, size: int = 640) -> list[float]:
    x1, y1 = rng.integers(0, size - 40, 2)
    w, h = rng.integers(1, 200, 2)
    return [float(x1), float(y1), float(min(x1 + w, size)), float(min(y1 + h, size))]


def random_relation_data(space: LabelSpace, n_images: int, n_candidates: int = 100, *, n_queries: int = 100, seed: int = 0,
                         empty_fraction: float = 0.05) -> tuple[list[dict], list[dict]]:
    rng = np.random.default_rng(seed)
    verbs_of = [np.flatnonzero(space.valid[:, o]) for o in range(space.n_objects)]
    objects_with_verbs = [o for o in range(space.n_objects) if len(verbs_of[o])]
    s = space.subject_index
    gts, preds = [], []
    for i in range(n_images):
        name = f"img_{i:06d}.jpg"
        anns, hois = [], []
        if rng.random() >= empty_fraction:
            for _ in range(rng.integers(1, 4)):
                o = int(rng.choice(objects_with_verbs))
                anns += [{"bbox": _box(rng), "category_id": space.object_ids[s]},
                         {"bbox": _box(rng), "category_id": space.object_ids[o]}]
                for v in rng.choice(verbs_of[o], size=min(len(verbs_of[o]), rng.integers(1, 3)), replace=False):
                    hois.append({"subject_id": len(anns) - 2, "object_id": len(anns) - 1,
                                 "category_id": space.verb_ids[int(v)]})
            if hois and rng.random() < 0.2:
                hois.append(dict(hois[0]))  # duplicate annotations exist in real data
        gts.append({"file_name": name, "annotations": anns, "hoi_annotation": hois})

        # a DETR-style post-processor's output: query q has subject box q and object box Q + q
        pairs = [(h["subject_id"], h["object_id"]) for h in hois]
        src = [pairs[int(rng.integers(len(pairs)))] if pairs and rng.random() < 0.6 else None
               for _ in range(n_queries)]
        subs, objs = [], []
        for p in src:
            for out, k in ((subs, 0), (objs, 1)):
                if p is None:
                    out.append({"bbox": _box(rng), "category_id": space.object_ids[int(rng.integers(space.n_objects))]})
                    continue
                a = anns[p[k]]
                box = list(a["bbox"]) if rng.random() < 0.4 else [c + float(rng.integers(-12, 13)) for c in a["bbox"]]
                box[2:] = max(box[2], box[0]), max(box[3], box[1])  # jitter never inverts a box (an error)
                cat = a["category_id"] if rng.random() < 0.9 else space.object_ids[int(rng.integers(space.n_objects))]
                out.append({"bbox": box, "category_id": cat})
        hp = []
        for _ in range(n_candidates):
            q = int(rng.integers(n_queries))
            verbs = [h["category_id"] for h in hois if src[q] == (h["subject_id"], h["object_id"])]
            v = verbs[int(rng.integers(len(verbs)))] if verbs and rng.random() < 0.5 else \
                space.verb_ids[int(rng.integers(space.n_verbs))]
            hp.append({"subject_id": q, "object_id": n_queries + q, "category_id": v,
                       "score": round(float(rng.random()), 2)})
        preds.append({"file_name": name, "predictions": subs + objs, "hoi_prediction": hp})
    return gts, preds


def toy_label_space(n_objects: int = 4, n_verbs: int = 3, seed: int = 0) -> LabelSpace:
    """A small space (objects o0.., verbs v0..; about half the combinations valid) for tests."""
    rng = np.random.default_rng(seed)
    valid = (rng.random((n_verbs, n_objects)) < 0.6).astype(np.float64)
    valid[0, :] = 1.0  # every object has at least one verb
    return LabelSpace(objects=tuple(f"o{i}" for i in range(n_objects)), verbs=tuple(f"v{i}" for i in range(n_verbs)),
                      valid=valid, zero_shot_splits={"held-out": ((0, 1, 0),)}, name="toy")


def to_per_query(preds: list[dict], space: LabelSpace, *, seed: int = 0) -> list[dict]:
    """The same predictions in the per-query form (verb_scores Q x V): query q keeps its subject box q
    and object box Q + q; every other (query, verb) gets a small random score (many equal ones)."""
    rng = np.random.default_rng(seed)
    out = []
    obj_index = {c: k for k, c in enumerate(space.object_ids)}
    verb_index = {c: k for k, c in enumerate(space.verb_ids)}
    for p in preds:
        q = len(p["predictions"]) // 2
        scores = np.round(rng.random((q, space.n_verbs)) ** 6, 3)
        for h in p["hoi_prediction"]:
            scores[h["subject_id"], verb_index[h["category_id"]]] = h["score"]
        out.append({"file_name": p["file_name"], "boxes": [b["bbox"] for b in p["predictions"]],
                    "labels": [obj_index[b["category_id"]] for b in p["predictions"]],
                    "verb_scores": scores, "sub_ids": np.arange(q), "obj_ids": np.arange(q, 2 * q)})
    return out
