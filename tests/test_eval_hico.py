"""HICO-DET evaluator: one hand-computed case per protocol rule (each fails if the quirk is "fixed"),
equality with the per-candidate loop implementation, property tests, input validation."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlipv2_scale.errors import UserError
from rlipv2_scale.eval.ap import eleven_point_ap
from rlipv2_scale.eval.files import read_relations, read_unseen_triplets
from rlipv2_scale.eval.hico import evaluate_hico, evaluate_hico_files
from rlipv2_scale.eval.relation_json import RelationFile, _whole, rank_within_images
from rlipv2_scale.eval.triplet_nms import TripletNMS
from rlipv2_scale.labels.space import LabelSpace, hico_label_space

from hico_loops import evaluate_hico_loops, expand_per_query
from relation_data import random_relation_data, to_per_query, toy_label_space

# objects: 0 person, 1 cup, 2 ball; verbs: 0 hold, 1 throw, 2 look; "throw cup" is not a valid pair
VALID = np.ones((3, 3))
VALID[1, 1] = 0.0
SPACE = LabelSpace(objects=("person", "cup", "ball"), verbs=("hold", "throw", "look"), valid=VALID,
                   zero_shot_splits={"held-out": ((0, 2, 0),)}, name="test")
PERSON, CUP, BALL = 0, 1, 2
HOLD, THROW, LOOK = 0, 1, 2
P0 = [0.0, 200.0, 99.0, 299.0]  # 100 x 100 with +1 areas
C0 = [100.0, 0.0, 199.0, 99.0]
ONE = pytest.approx(1.0, abs=1e-12)  # 11 x (1 / 11) sums to 1.0000000000000002, as in the reference


def gt_image(name, boxes, hois):
    return {"file_name": name, "annotations": [{"bbox": b, "category_id": c} for b, c in boxes],
            "hoi_annotation": [{"subject_id": s, "object_id": o, "category_id": v} for s, o, v in hois]}


def pred_image(name, boxes, cands):
    return {"file_name": name, "predictions": [{"bbox": b, "category_id": c} for b, c in boxes],
            "hoi_prediction": [{"subject_id": s, "object_id": o, "category_id": v, "score": sc}
                               for s, o, v, sc in cands]}


def ev(gt, preds, **kw):
    kw.setdefault("label_space", SPACE)
    return evaluate_hico(gt, preds, **kw)


def shifted(box, dx):
    return [box[0] + dx, box[1], box[2] + dx, box[3]]


# ---------------------------------------------------------------------------------------------- rules

def test_perfect_prediction_is_one():
    gt = [gt_image("a", [(P0, PERSON), (C0, CUP)], [(0, 1, HOLD), (0, 1, LOOK)])]
    pred = [pred_image("a", [(P0, PERSON), (C0, CUP)], [(0, 1, HOLD, 0.9), (0, 1, LOOK, 0.8)])]
    res = ev(gt, pred)
    assert res["mAP"] == ONE and res["mean_max_recall"] == ONE and res["n_triplets"] == 2


def test_scores_are_multiplied_by_the_valid_matrix_before_the_top_k():
    gt = [gt_image("a", [(P0, PERSON), (C0, CUP)], [(0, 1, HOLD)])]
    # "throw cup" is invalid: its 0.9 becomes 0, so the true "hold cup" (0.5) wins the only slot
    pred = [pred_image("a", [(P0, PERSON), (C0, CUP)], [(0, 1, THROW, 0.9), (0, 1, HOLD, 0.5)])]
    assert ev(gt, pred, top_k=1)["mAP"] == ONE


def test_top_k_keeps_listed_order_on_equal_scores():
    gt = [gt_image("a", [(P0, PERSON), (C0, CUP)], [(0, 1, HOLD)])]
    boxes = [(P0, PERSON), (C0, CUP), (P0, PERSON), ([400.0, 400.0, 450.0, 450.0], CUP)]
    wrong = [(2, 3, HOLD, 0.5)] * 100  # same score, boxes that match nothing
    first = [pred_image("a", boxes, [(0, 1, HOLD, 0.5)] + wrong)]
    last = [pred_image("a", boxes, wrong + [(0, 1, HOLD, 0.5)])]
    assert ev(gt, first)["mean_max_recall"] == ONE  # position 0 of 101: kept
    assert ev(gt, last)["mean_max_recall"] == 0.0  # position 100 of 101: cut by the top 100


def test_greedy_matching_has_no_fallback_to_the_next_best_pair():
    c1 = [110.0, 0.0, 209.0, 99.0]  # IoU(C0, c1) = 90*100 / (2*10000 - 9000) = 0.818
    gt = [gt_image("a", [(P0, PERSON), (C0, CUP), (c1, CUP)], [(0, 1, HOLD), (0, 2, HOLD)])]
    # two candidates on exactly (P0, C0): both prefer the first pair (quality 1 > 0.818)
    pred = [pred_image("a", [(P0, PERSON), (C0, CUP)], [(0, 1, HOLD, 0.9), (0, 1, HOLD, 0.8)])]
    # default: the second candidate's best pair is taken -> false positive: tp [1, 0] of 2
    # rec [0.5, 0.5], prec [1, 0.5]: the 6 points 0 .. 0.5 get precision 1 -> 6 / 11
    assert ev(gt, pred)["mAP"] == pytest.approx(6 / 11, abs=1e-15)
    assert ev(gt, pred, strict=True)["mAP"] == ONE  # the strict protocol falls back to (P0, c1)


def test_equal_quality_goes_to_the_first_annotated_pair():
    c0, c1 = [100.0, 0.0, 199.0, 99.0], [140.0, 0.0, 239.0, 99.0]
    between = [120.0, 0.0, 219.0, 99.0]  # IoU 80*100 / 12000 = 2/3 with both; IoU(c0, c1) = 0.43
    gt = [gt_image("a", [(P0, PERSON), (c0, CUP), (c1, CUP)], [(0, 1, HOLD), (0, 2, HOLD)])]
    pred = [pred_image("a", [(P0, PERSON), (between, CUP), (c1, CUP)], [(0, 1, HOLD, 0.9), (0, 2, HOLD, 0.8)])]
    # the tie goes to pair 0, which leaves pair 1 free for the second candidate: both true
    assert ev(gt, pred)["mAP"] == ONE
    swapped = [gt_image("a", [(P0, PERSON), (c0, CUP), (c1, CUP)], [(0, 2, HOLD), (0, 1, HOLD)])]
    # annotated the other way round, the tie takes (P0, c1) and the second candidate finds it taken
    assert ev(swapped, pred)["mAP"] == pytest.approx(6 / 11, abs=1e-15)


def test_iou_uses_plus_one_areas():
    g, p = [0.0, 0.0, 2.0, 2.0], [1.0, 0.0, 3.0, 2.0]
    # +1 areas: inter 2*3 = 6, union 9 + 9 - 6 = 12 -> exactly 0.5 (continuous IoU would be 1/3)
    gt = [gt_image("a", [(P0, PERSON), (g, CUP)], [(0, 1, HOLD)])]
    pred = [pred_image("a", [(P0, PERSON), (p, CUP)], [(0, 1, HOLD, 0.9)])]
    assert ev(gt, pred)["mAP"] == ONE
    assert ev(gt, pred, strict=True)["mAP"] == 0.0


def test_intersection_test_has_no_plus_one():
    line = [150.0, 0.0, 150.0, 99.0]  # zero width: identical boxes still overlap 0
    gt = [gt_image("a", [(P0, PERSON), (line, CUP)], [(0, 1, HOLD)])]
    pred = [pred_image("a", [(P0, PERSON), (line, CUP)], [(0, 1, HOLD, 0.9)])]
    assert ev(gt, pred)["mAP"] == 0.0


def test_box_categories_must_agree():
    gt = [gt_image("a", [(P0, PERSON), (C0, CUP)], [(0, 1, HOLD)])]
    pred = [pred_image("a", [(P0, PERSON), (C0, BALL)], [(0, 1, HOLD, 0.9)])]
    assert ev(gt, pred)["mAP"] == 0.0


def test_triplets_absent_from_the_ground_truth_are_skipped():
    gt = [gt_image("a", [(P0, PERSON), (C0, CUP)], [(0, 1, HOLD)])]
    pred = [pred_image("a", [(P0, PERSON), (C0, CUP), (C0, BALL)], [(0, 2, THROW, 0.99), (0, 1, HOLD, 0.5)])]
    res = ev(gt, pred)
    assert res["mAP"] == ONE and res["n_triplets"] == 1  # "throw ball" neither averaged nor counted


def test_predictions_on_images_without_ground_truth_boxes_are_ignored():
    gt = [gt_image("a", [(P0, PERSON), (C0, CUP)], [(0, 1, HOLD)]), gt_image("empty", [], [])]
    pred = [pred_image("a", [(P0, PERSON), (C0, CUP)], [(0, 1, HOLD, 0.5)]),
            pred_image("empty", [(P0, PERSON), (C0, CUP)], [(0, 1, HOLD, 0.9)])]
    assert ev(gt, pred)["mAP"] == ONE
    # strict: a false positive ranked first -> precision 0.5 at every recall point
    assert ev(gt, pred, strict=True)["mAP"] == pytest.approx(0.5, abs=1e-15)
    # an image *with* boxes but no annotated pair does count its predictions (false positive first)
    gt_boxes_only = [gt[0], gt_image("empty", [(P0, PERSON)], [])]
    assert ev(gt_boxes_only, pred)["mAP"] == pytest.approx(0.5, abs=1e-15)


def test_eleven_points_are_numpy_arange_values():
    # 10 ground-truth pairs, 3 found: recall 0.3 exactly does not reach arange's 0.30000000000000004
    boxes = [(shifted(P0, 300 * k), PERSON) for k in range(10)] + [(shifted(C0, 300 * k), CUP) for k in range(10)]
    gt = [gt_image("a", boxes, [(k, 10 + k, HOLD) for k in range(10)])]
    pred = [pred_image("a", boxes, [(k, 10 + k, HOLD, 0.9 - 0.1 * k) for k in range(3)])]
    assert ev(gt, pred)["mAP"] == pytest.approx(3 / 11, abs=1e-15)
    assert ev(gt, pred, strict=True)["mAP"] == pytest.approx(4 / 11, abs=1e-15)
    assert eleven_point_ap(np.array([0.3]), np.array([1.0])) == pytest.approx(3 / 11, abs=1e-15)


def test_equal_scores_across_images_rank_like_numpy_default_argsort():
    # 25 single-candidate images of one triplet: scores 0.5 x 20 then 0.7 x 5; the true ones vary
    scores = [0.5] * 20 + [0.7] * 5
    hit = [k % 3 == 0 for k in range(25)]
    gt, pred = [], []
    for k in range(25):
        gt.append(gt_image(f"i{k}", [(P0, PERSON), (C0, CUP)], [(0, 1, HOLD)]))
        obj = C0 if hit[k] else shifted(C0, 60)
        pred.append(pred_image(f"i{k}", [(P0, PERSON), (obj, CUP)], [(0, 1, HOLD, scores[k])]))

    def ap_with(order):
        tp = np.cumsum(np.array(hit)[order])
        return eleven_point_ap(tp / 25, tp / np.arange(1, 26))

    s = np.array(scores)
    default, stable = ap_with(np.argsort(-s)), ap_with(np.argsort(-s, kind="stable"))
    if default == stable:
        pytest.skip("numpy's default sort happens to be stable on this input and machine")
    assert ev(gt, pred)["mAP"] == default
    assert ev(gt, pred, strict=True)["mAP"] == stable


def test_rare_is_fewer_than_ten_training_instances():
    gt = [gt_image("a", [(P0, PERSON), (C0, CUP), (C0, BALL)], [(0, 1, HOLD), (0, 2, HOLD), (0, 1, LOOK)])]
    pred = [pred_image("a", [(P0, PERSON), (C0, CUP), (C0, BALL)], [(0, 1, HOLD, 0.9), (0, 2, HOLD, 0.8)])]

    def train_with(n_hold_cup, n_hold_ball):
        return [gt_image(f"t{k}", [(P0, PERSON), (C0, CUP), (C0, BALL)],
                         [(0, 1, HOLD)] * (k < n_hold_cup) + [(0, 2, HOLD)] * (k < n_hold_ball)) for k in range(12)]

    res = ev(gt, pred, train=train_with(9, 10))  # hold-cup rare (9), hold-ball non-rare (10), look-cup unseen
    assert res["mAP_rare"] == ONE and res["mAP_non_rare"] == ONE
    assert (res["n_rare"], res["n_non_rare"], res["n_not_in_train"]) == (1, 1, 1)
    assert res["mAP"] == pytest.approx(2 / 3, abs=1e-15)  # the never-trained triplet counts in full only
    res = ev(gt, pred, train=train_with(10, 10))
    assert res["mAP_rare"] is None and res["n_non_rare"] == 2


def test_zero_shot_reports_unseen_and_seen():
    gt = [gt_image("a", [(P0, PERSON), (C0, CUP), (C0, BALL)], [(0, 1, HOLD), (0, 2, HOLD)])]
    pred = [pred_image("a", [(P0, PERSON), (C0, CUP), (C0, BALL)], [(0, 1, HOLD, 0.9)])]
    res = ev(gt, pred, zero_shot="held-out")  # unseen: (person, ball, hold)
    assert res["mAP_unseen"] == 0.0 and res["mAP_seen"] == ONE and res["mAP"] == pytest.approx(0.5)
    assert ev(gt, pred, zero_shot=[(0, 1, 0)])["mAP_unseen"] == ONE
    with pytest.raises(UserError, match="unknown zero-shot split"):
        ev(gt, pred, zero_shot="UC-RF")


def test_zero_shot_with_any_subject():
    space = LabelSpace(objects=SPACE.objects, verbs=SPACE.verbs, valid=VALID, subject_index=None)
    gt = [gt_image("a", [(C0, CUP), (P0, BALL)], [(0, 1, LOOK), (1, 0, HOLD)])]  # cup-look-ball, ball-hold-cup
    pred = [pred_image("a", [(C0, CUP), (P0, BALL)], [(0, 1, LOOK, 0.9)])]
    res = evaluate_hico(gt, pred, label_space=space, zero_shot=[(CUP, BALL, LOOK)])
    assert res["mAP_unseen"] == ONE and res["mAP_seen"] == 0.0 and res["n_seen"] == 1


def test_hico_label_space_and_splits():
    space = hico_label_space()
    assert (space.n_objects, space.n_verbs, int(space.valid.sum())) == (80, 117, 600)
    assert {k: len(v) for k, v in space.zero_shot_splits.items()} == {"UC-RF": 120, "UC-NF": 120, "UO": 100}
    gt = [gt_image("a", [(P0, 1), (C0, 47)], [(0, 1, 37)])]  # COCO ids: person 1, cup 47; verb 37 = hold
    pred = [pred_image("a", [(P0, 1), (C0, 47)], [(0, 1, 37, 0.3)])]
    assert evaluate_hico(gt, pred, zero_shot="UC-RF")["mAP"] == ONE


@pytest.mark.parametrize("top_k", [1, 2, 3, 100])
def test_per_query_form_equals_the_listed_form(top_k):
    boxes = [(P0, PERSON), (P0, PERSON), (C0, CUP), (shifted(C0, 50), BALL)]
    gt = [gt_image("a", [(P0, PERSON), (C0, CUP)], [(0, 1, HOLD), (0, 1, LOOK)])]
    verb_scores = np.array([[0.2, 0.9, 0.4], [0.6, 0.6, 0.1]])
    listed = [(q, 2 + q, v, float(verb_scores[q, v])) for q in range(2) for v in range(3)]
    a = ev(gt, [pred_image("a", boxes, listed)], top_k=top_k)
    raw = [{"file_name": "a", "boxes": [b for b, _ in boxes], "labels": [c for _, c in boxes],
            "verb_scores": verb_scores.tolist(), "sub_ids": [0, 1], "obj_ids": [2, 3]}]
    b = ev(gt, raw, top_k=top_k)  # "throw cup" masked to 0; the two 0.6 tie at the cut of top 1
    assert a["mAP"] == b["mAP"] and a["per_triplet"] == b["per_triplet"]


def test_listed_and_per_query_entries_mix_in_one_file():
    space = toy_label_space(seed=1)
    gt, pred = random_relation_data(space, 6, 20, n_queries=5, seed=7, empty_fraction=0.0)
    per_query = to_per_query(pred, space, seed=3)  # some images per query, the others listed
    listed = [expand_per_query(p, space) for p in per_query]
    mixed = [per_query[k] if k % 2 else listed[k] for k in range(len(pred))]
    a, b = evaluate_hico(gt, listed, label_space=space), evaluate_hico(gt, mixed[::-1], label_space=space)
    assert a["per_triplet"] == b["per_triplet"] and a["mAP"] == b["mAP"]
    loop = evaluate_hico_loops(gt, listed, label_space=space)
    assert a["mAP"] > 0 and a["mAP"] == pytest.approx(loop["mAP"], abs=1e-9)


def test_triplet_nms_is_an_option():
    off = shifted(C0, 34)  # IoU with C0 = 66 / 134 = 0.4925: no match, but sqrt(0.4925) > 0.7 suppresses
    gt = [gt_image("a", [(P0, PERSON), (C0, CUP)], [(0, 1, HOLD)])]
    pred = [pred_image("a", [(P0, PERSON), (off, CUP), (C0, CUP)], [(0, 1, HOLD, 0.9), (0, 2, HOLD, 0.8)])]
    assert ev(gt, pred)["mAP"] == pytest.approx(0.5, abs=1e-15)
    assert ev(gt, pred, nms=TripletNMS())["mAP"] == 0.0
    assert ev(gt, pred, nms=TripletNMS(threshold=0.71))["mAP"] == pytest.approx(0.5, abs=1e-15)


# ----------------------------------------------------------------------------- reference equality

@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("nms", [None, TripletNMS()])
def test_equals_the_loop_implementation(seed, nms):
    space = toy_label_space(seed=seed) if seed % 2 else hico_label_space()
    gt, pred = random_relation_data(space, 40, 40, n_queries=12, seed=seed)
    train, _ = random_relation_data(space, 60, 0, n_queries=1, seed=seed + 100)
    a = evaluate_hico(gt, pred, train=train, label_space=space, nms=nms)
    b = evaluate_hico_loops(gt, pred, train=train, label_space=space, nms=nms)
    for key in ("mAP", "mean_max_recall", "mAP_rare", "mAP_non_rare"):
        assert (a[key] is None) == (b[key] is None)
        if a[key] is not None:
            assert abs(a[key] - b[key]) <= 1e-9, key
    by_index = {tuple(t["index"]): t["ap"] for t in a["per_triplet"]}
    assert by_index == pytest.approx(b["ap"], abs=1e-9)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n_images=st.integers(1, 12), n_candidates=st.integers(0, 120))
def test_equals_the_loop_implementation_on_random_sizes(seed, n_images, n_candidates):
    space = toy_label_space(seed=seed % 3)
    gt, pred = random_relation_data(space, n_images, n_candidates, n_queries=6, seed=seed, empty_fraction=0.2)
    a = evaluate_hico(gt, pred, label_space=space)
    b = evaluate_hico_loops(gt, pred, label_space=space)
    assert (a["mAP"] is None) == (b["mAP"] is None)
    if a["mAP"] is not None:
        assert abs(a["mAP"] - b["mAP"]) <= 1e-9 and abs(a["mean_max_recall"] - b["mean_max_recall"]) <= 1e-9


# ---------------------------------------------------------------------------------- properties

@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000))
def test_perfect_predictions_score_one(seed):
    space = toy_label_space(seed=seed % 5)
    gt, _ = random_relation_data(space, 6, 0, n_queries=1, seed=seed, empty_fraction=0.3)
    pred = [pred_image(g["file_name"], [(a["bbox"], a["category_id"]) for a in g["annotations"]],
                       [(h["subject_id"], h["object_id"], h["category_id"], 1.0) for h in g["hoi_annotation"]])
            for g in gt]
    res = evaluate_hico(gt, pred, label_space=space)
    if res["n_triplets"]:
        # duplicated annotations can never all be found, exactly as in the reference
        dup = any(len({(h["subject_id"], h["object_id"], h["category_id"]) for h in g["hoi_annotation"]})
                  < len(g["hoi_annotation"]) for g in gt)
        assert dup or res["mAP"] == ONE


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), lower=st.floats(0.0, 0.999))
def test_a_lower_scored_false_positive_never_raises_ap(seed, lower):
    space = toy_label_space(seed=seed % 5)
    gt, pred = random_relation_data(space, 5, 8, n_queries=4, seed=seed, empty_fraction=0.0)
    # strict ranks equal scores stably; the default's unstable argsort may reshuffle existing ties
    # when an element is added, which can move AP either way
    before = evaluate_hico(gt, pred, label_space=space, strict=True)
    # a candidate on boxes far from everything, scored below every existing one of its image
    img = pred[0]
    floor = min([h["score"] for h in img["hoi_prediction"]] + [1.0])
    far = [{"bbox": [5000.0, 5000.0, 5010.0, 5010.0], "category_id": c["category_id"]} for c in img["predictions"][:2]]
    h = gt[0]["hoi_annotation"][0]
    extra = dict(img, predictions=img["predictions"] + far, hoi_prediction=img["hoi_prediction"] + [
        {"subject_id": len(img["predictions"]), "object_id": len(img["predictions"]) + 1,
         "category_id": h["category_id"], "score": floor * lower}])
    after = evaluate_hico(gt, [extra] + pred[1:], label_space=space, strict=True)
    for t0, t1 in zip(before["per_triplet"], after["per_triplet"]):
        assert t1["ap"] <= t0["ap"] + 1e-12


# --------------------------------------------------------------------------------- validation

def _ok():
    return ([gt_image("a.jpg", [(P0, PERSON), (C0, CUP)], [(0, 1, HOLD)])],
            [pred_image("a.jpg", [(P0, PERSON), (C0, CUP)], [(0, 1, HOLD, 0.5)])])


@pytest.mark.parametrize("mutate, message", [
    (lambda g, p: p[0].update(file_name="b.jpg"), r"'b.jpg'.*not in the ground truth"),
    (lambda g, p: p[0]["hoi_prediction"][0].update(subject_id=7), r"'a.jpg'.*hoi_prediction\[0\].subject_id = 7.*out of range"),
    (lambda g, p: p[0]["predictions"][1].update(bbox=[1, 2, 3]), r"'a.jpg'.*predictions\[1\].bbox must be 4 numbers"),
    (lambda g, p: p[0]["hoi_prediction"][0].update(score=float("nan")), r"'a.jpg'.*hoi_prediction\[0\].score"),
    (lambda g, p: p[0]["predictions"][0].update(category_id=99), r"'a.jpg'.*predictions\[0\].category_id = 99"),
    (lambda g, p: p[0]["hoi_prediction"][0].update(category_id=3), r"'a.jpg'.*hoi_prediction\[0\].category_id = 3"),
    (lambda g, p: g[0]["hoi_annotation"][0].update(object_id=2), r"ground truth for image 'a.jpg'.*object_id = 2"),
    (lambda g, p: g[0]["annotations"][0].update(bbox="x"), r"ground truth for image 'a.jpg'.*annotations\[0\].bbox"),
    (lambda g, p: p.append(dict(p[0])), r"'a.jpg' twice"),
])
@pytest.mark.parametrize("from_files", [False, True])
def test_bad_input_names_the_image_and_field(mutate, message, from_files, tmp_path):
    gt, pred = _ok()
    mutate(gt, pred)
    with pytest.raises(UserError, match=message):
        if from_files:  # the columnar fast path must not score it: the error names the same entry
            evaluate_hico_files(*_write(tmp_path, gt=gt, pred=pred), label_space=SPACE)
        else:
            ev(gt, pred)


def _write(folder, **files) -> list:
    """Each object as `name`.json (the stdlib's dump, as users write them); their paths."""
    for name, data in files.items():
        (folder / f"{name}.json").write_text(json.dumps(data))
    return [folder / f"{name}.json" for name in files]


@pytest.mark.parametrize("seed", [0, 1])
def test_files_take_the_columnar_path_and_give_identical_numbers(seed, tmp_path):
    space = hico_label_space()
    gt, pred = random_relation_data(space, 60, 120, n_queries=40, seed=seed)
    train, _ = random_relation_data(space, 80, 0, n_queries=1, seed=seed + 7)
    paths = _write(tmp_path, gt=gt, pred=pred, train=train)
    for path, keys, score in zip(paths, [("annotations", "hoi_annotation"), ("predictions", "hoi_prediction"),
                                         ("annotations", "hoi_annotation")], (False, True, False)):
        assert isinstance(read_relations(path, "x", space, *keys, with_score=score), RelationFile)
    got = evaluate_hico_files(*paths[:2], train=paths[2], zero_shot="UC-RF")
    assert got == evaluate_hico(gt, pred, train=train, zero_shot="UC-RF")
    loops = evaluate_hico_loops(gt, pred, train=train)
    assert abs(got["mAP"] - loops["mAP"]) <= 1e-9 and abs(got["mAP_rare"] - loops["mAP_rare"]) <= 1e-9


@pytest.mark.parametrize("edit", [
    lambda g, p: p[0]["predictions"][0].update(category_id=float(p[0]["predictions"][0]["category_id"])),  # 1.0
    lambda g, p: p[1]["hoi_prediction"][0].update(score=1),  # an int score
    lambda g, p: p[2].pop("hoi_prediction"),  # no relations
    lambda g, p: g[3].update(extra_field=[1, {"x": None}]),  # unknown fields are ignored, as json.load's path
    lambda g, p: p.__setitem__(4, to_per_query_json(p[4])),  # a per-query entry among listed ones
])
def test_files_in_other_valid_forms_score_as_their_objects(edit, tmp_path):
    space = hico_label_space()
    gt, pred = random_relation_data(space, 8, 30, n_queries=10, seed=5)
    edit(gt, pred)
    assert evaluate_hico_files(*_write(tmp_path, gt=gt, pred=pred)) == evaluate_hico(gt, pred)


def to_per_query_json(entry: dict) -> dict:
    q = to_per_query([entry], hico_label_space())[0]
    return {k: np.asarray(v).tolist() if k != "file_name" else v for k, v in q.items()}


@pytest.mark.parametrize("text, message", [
    ('[{"file_name": "a.jpg", "predictions": [{"bbox": [0, 0, 9, 9], "category_id": "cup"}]}]',
     r"^predictions for image 'a.jpg': predictions\[0\].category_id must be an integer, got a string$"),
    ('[{"file_name": "a.jpg", "predictions": [{"bbox": [0, 0, 9, 9], "category_id": true}]}]',
     r"^predictions for image 'a.jpg': predictions\[0\].category_id must be an integer, got a boolean$"),
    ('[{"file_name": "a.jpg", "predictions": [{"bbox": [0, 0, 9, 9], "category_id": 1}], '
     '"hoi_prediction": [{"subject_id": 0, "object_id": 0, "category_id": 0, "score": "0.5"}]}]',
     r"^predictions for image 'a.jpg': hoi_prediction\[0\].score must be a number, got a string$"),
    ('[{"file_name": "a.jpg", "predictions": [{"bbox": null, "category_id": 1}]}]',
     r"'a.jpg'.*predictions\[0\].bbox must be 4 numbers"),
    ('[{"file_name": "a.jpg", "predictions": [{"bbox": [0, 0, 9, NaN], "category_id": 1}]}]',
     r"'a.jpg'.*predictions\[0\].bbox has a non-finite value"),
    ('[{"file_name": "a.jpg", "predictions": [], "hoi_prediction": [{"subject_id": 0}]}]',
     r"'a.jpg'.*hoi_prediction\[0\].subject_id = 0 is out of range"),
    ('[{"file_name": "a.jpg", "predictions": [{"bbox": [0, 0, 9, 9], "category_id": 1}]}',
     r"predictions file .* is not valid JSON"),
])
def test_malformed_prediction_files_name_the_entry(text, message, tmp_path):
    (gt_path,) = _write(tmp_path, gt=[gt_image("a.jpg", [(P0, PERSON)], [])])
    (tmp_path / "pred.json").write_text(text)
    with pytest.raises(UserError, match=message):
        evaluate_hico_files(gt_path, tmp_path / "pred.json", label_space=SPACE)


def test_zero_shot_file_forms(tmp_path):
    space = hico_label_space()
    f = tmp_path / "split.json"
    f.write_text(json.dumps({"unseen_hoi_index": [0]}))  # HOI 1: board airplane
    assert read_unseen_triplets(f, space) == ((0, 4, 4),)
    f.write_text(json.dumps([[0, 4, 4], [0, 47, 36]]))
    assert read_unseen_triplets(f, space) == ((0, 4, 4), (0, 47, 36))
    f.write_text(json.dumps([[0, 4]]))
    with pytest.raises(UserError, match="not \\(subject index, object index, verb index\\)"):
        read_unseen_triplets(f, space)


def test_malformed_training_file(tmp_path):
    gt, pred = _ok()
    train = [gt_image("t", [(P0, PERSON)], [(0, 3, HOLD)])]
    with pytest.raises(UserError, match="training annotations for image 't'.*out of range"):
        ev(gt, pred, train=train)
    with pytest.raises(UserError, match="training annotations for image 't'.*out of range"):
        evaluate_hico_files(*_write(tmp_path, gt=gt, pred=pred, train=train)[:2], train=tmp_path / "train.json",
                            label_space=SPACE)


# ------------------------------------------------------------------------------ per-image ranking

@pytest.mark.parametrize("lengths", [[3, 0, 5, 5, 1], [1] * 30 + [400], [7]])  # padded rows; uneven: one global sort
@pytest.mark.parametrize("top_k", [None, 1, 4])
def test_rank_within_images_is_a_stable_descending_sort_per_image(lengths, top_k):
    rng = np.random.default_rng(len(lengths))
    seg_len = np.array(lengths)
    seg_img = rng.permutation(len(lengths)) * 2  # images listed out of order, not contiguous ids
    score = rng.integers(0, 4, seg_len.sum()).astype(np.float64)  # many ties
    got = rank_within_images(seg_img, seg_len, score, top_k)
    starts = np.cumsum(seg_len) - seg_len
    expected = []
    for s in np.argsort(seg_img):
        idx = sorted(range(starts[s], starts[s] + seg_len[s]), key=lambda i: -score[i])  # Python's sort is stable
        expected += idx[:top_k]
    assert got.tolist() == expected


def test_whole_numbers_are_checked_by_a_round_trip():
    assert _whole(np.array([0.0, -3.0, 2.0 ** 62])).tolist() == [0, -3, 2 ** 62]
    for bad in (0.5, np.nan, np.inf, -np.inf, 1e30):
        assert _whole(np.array([1.0, bad])) is None


# ------------------------------------------------------------------- audit: malformed inputs never score

def _files(tmp_path, gt, pred, **kw):
    kw.setdefault("label_space", hico_label_space())
    return evaluate_hico_files(*_write(tmp_path, gt=gt, pred=pred), **kw)


def _rename(entry: dict, old: str, new: str) -> None:
    entry[new] = entry.pop(old)


@pytest.mark.parametrize("objects", [False, True])
def test_misnamed_relation_keys_are_errors_naming_the_key(objects, tmp_path):
    score = evaluate_hico if objects else (lambda g, p: _files(tmp_path, g, p))
    gt, pred = random_relation_data(hico_label_space(), 6, 20, n_queries=6, seed=1)
    bad = json.loads(json.dumps(pred))
    for p in bad:
        _rename(p, "hoi_prediction", "hoi_predictions")
    with pytest.raises(UserError, match=r"^predictions for image 'img_000000.jpg': the entry has no 'hoi_prediction' "
                                        r"key; it has 'hoi_predictions' instead"):
        score(gt, bad)
    bad = json.loads(json.dumps(gt))
    _rename(bad[2], "hoi_annotation", "hoi_annotations")
    with pytest.raises(UserError, match=r"^ground truth for image 'img_000002.jpg': the entry has no 'hoi_annotation' "
                                        r"key; it has 'hoi_annotations' instead"):
        score(bad, pred)
    bad = json.loads(json.dumps(gt))
    del bad[1]["annotations"]  # was: "hoi_annotation[0].subject_id = 0 is out of range (the image has 0 boxes)"
    with pytest.raises(UserError, match=r"^ground truth for image 'img_000001.jpg': the entry has no 'annotations' "
                                        r"key$"):
        score(bad, pred)


def test_missing_predictions_warn_and_are_counted(tmp_path):
    gt, pred = random_relation_data(hico_label_space(), 20, 20, n_queries=6, seed=2)
    full = _files(tmp_path, gt, pred)
    assert full["n_images_without_predictions"] == 0 and full["warnings"] == []
    part = _files(tmp_path, gt, pred[:5])
    assert part["n_images_without_predictions"] == 15
    assert part["warnings"] == [
        "15 of 20 ground-truth images have no predictions (scored as no detections); give every test image an "
        "entry, even one without candidates"]
    # scored as images without detections: the same numbers as entries without candidates
    empty = [{"file_name": p["file_name"], "predictions": []} for p in pred[5:]]
    assert {k: v for k, v in part.items() if k not in ("warnings", "n_images_without_predictions")} == \
        {k: v for k, v in evaluate_hico(gt, pred[:5] + empty).items() if k not in ("warnings",
                                                                                   "n_images_without_predictions")}
    none = _files(tmp_path, gt, [])
    assert none["mAP"] == 0.0 and none["n_images_without_predictions"] == 20
    assert none["warnings"][0].startswith("the predictions list no image: 20 of 20 ground-truth images")


@pytest.mark.parametrize("text, message", [
    ('{"unseen_hoi_index": [-1]}', r"unseen_hoi_index\[0\] = -1 is not an integer in \[0, 600\)"),
    ('{"unseen_hoi_index": [600]}', r"unseen_hoi_index\[0\] = 600 is not an integer"),
    ('{"unseen_hoi_index": [1.0]}', r"unseen_hoi_index\[0\] = 1.0 is not an integer"),
    ('{"unseen_hoi_index": [true]}', r"unseen_hoi_index\[0\] = True is not an integer"),
    ('{"unseen_hoi_index": []}', r"unseen_hoi_index must be a non-empty list"),
    ('[[0, 47.9, 36.5]]', r"entry 0 = \[0, 47.9, 36.5\] is not \(subject index"),
    ('[[0, 4, 4], ["0", "47", "36"]]', r"entry 1 = \['0', '47', '36'\] is not"),
    ('[[true, 1, 2]]', r"entry 0 = \[True, 1, 2\] is not"),
    ('[[0, -1, 2]]', r"entry 0 = \[0, -1, 2\] is not"),
    ('[]', r"the list is empty"),
    ('{"unseen_triplets": []}', r"unseen_triplets is empty"),
    ('{"unseen_triplets": [[0, 1]]}', r"unseen_triplets\[0\] = \[0, 1\] is not"),
])
def test_zero_shot_files_with_malformed_entries_are_refused(text, message, tmp_path):
    f = tmp_path / "split.json"
    f.write_text(text)
    with pytest.raises(UserError, match=r"^zero-shot split '.*split.json': " + message):
        read_unseen_triplets(f, hico_label_space())


@pytest.mark.parametrize("value, message", [
    ("UC-XX", r"^zero-shot split 'UC-XX' is neither a split name of 'hico-det' \(UC-NF, UC-RF, UO\) nor an "
              r"existing file$"),
    ("uc-rf", r"\(UC-NF, UC-RF, UO\).*did you mean 'UC-RF'\?"),
])
def test_zero_shot_value_like_a_split_name_lists_the_splits(value, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=message):
        read_unseen_triplets(value, hico_label_space())
    with pytest.raises(UserError, match="zero-shot split file .* does not exist"):  # a path stays a path
        read_unseen_triplets("splits/uc-xx.json", hico_label_space())


def _per_query_entry(**change) -> dict:
    entry = {"file_name": "a", "boxes": [P0, C0], "labels": [PERSON, CUP],
             "verb_scores": [[0.9, 0.1, 0.2]], "sub_ids": [0], "obj_ids": [1]}
    entry.update(change)
    return entry


@pytest.mark.parametrize("change, message", [
    (dict(labels=[0, 1.5]), r"labels\[1\] must be an integer, got 1.5"),
    (dict(labels=["0", "1"]), r"labels\[0\] must be an integer, got '0'"),
    (dict(labels=[True, 1]), r"labels\[0\] must be an integer, got True"),
    (dict(labels="01"), r"'labels' must be a list of numbers"),
    (dict(boxes=[[str(x) for x in P0], C0]), r"boxes\[0\]\[0\] must be a number, got '0.0'"),
    (dict(boxes=[P0, C0[:3]]), r"boxes rows differ in length \(boxes\[0\] has 4 values, boxes\[1\] has 3\)"),
    (dict(boxes=[P0, "abcd"]), r"boxes\[1\] must be a list of numbers, got 'abcd'"),
    (dict(sub_ids=[True]), r"sub_ids\[0\] must be an integer, got True"),
    (dict(sub_ids="0"), r"'sub_ids' must be a list of numbers"),
    (dict(obj_ids=[0.5]), r"obj_ids\[0\] must be an integer, got 0.5"),
    (dict(verb_scores=[[0.9, "0.1", 0.2]]), r"verb_scores\[0\]\[1\] must be a number, got '0.1'"),
    (dict(verb_scores=[[0.9, 0.1, 0.2], [0.5]], sub_ids=[0, 0], obj_ids=[1, 1]),
     r"verb_scores rows differ in length"),
    (dict(verb_scores=[[0.9, False, 0.2]]), r"verb_scores\[0\]\[1\] must be a number, got False"),
    (dict(boxes=[P0, [100.0, 100.0, 50.0, 50.0]]), r"boxes\[1\] = \[100.0, 100.0, 50.0, 50.0\] has x2 < x1"),
])
def test_malformed_per_query_predictions_are_one_error(change, message, tmp_path):
    gt = [gt_image("a", [(P0, PERSON), (C0, CUP)], [(0, 1, HOLD)])]
    assert ev(gt, [_per_query_entry()])["mAP"] == ONE  # the well-formed entry scores
    for score in (lambda p: ev(gt, p), lambda p: _files(tmp_path, gt, p, label_space=SPACE)):
        with pytest.raises(UserError, match=r"^predictions for image 'a': " + message):
            score([_per_query_entry(**change)])


NEGATIVE = [100.0, 100.0, 50.0, 50.0]  # [x, y, w, h] read as [x1, y1, x2, y2]


@pytest.mark.parametrize("box", [NEGATIVE, [0.0, 100.0, 50.0, 50.0], [100.0, 0.0, 50.0, 50.0]])
def test_boxes_of_negative_size_are_refused(box, tmp_path):
    gt = [gt_image("a", [(P0, PERSON), (C0, CUP)], [(0, 1, HOLD)])]
    pred = [pred_image("a", [(P0, PERSON), (C0, CUP)], [(0, 1, HOLD, 0.9)])]
    bad_gt = [gt_image("a", [(P0, PERSON), (box, CUP)], [(0, 1, HOLD)])]
    bad_pred = [pred_image("a", [(box, PERSON), (C0, CUP)], [(0, 1, HOLD, 0.9)])]
    for score in (ev, lambda g, p: _files(tmp_path, g, p, label_space=SPACE)):
        with pytest.raises(UserError, match=r"^ground truth for image 'a': annotations\[1\].bbox = .* has x2 < x1 or "
                                            r"y2 < y1"):
            score(bad_gt, pred)
        with pytest.raises(UserError, match=r"^predictions for image 'a': predictions\[0\].bbox = .* has x2 < x1"):
            score(gt, bad_pred)
    zero = [150.0, 0.0, 150.0, 99.0]  # zero size stays valid (it occurs in the datasets)
    assert ev([gt_image("a", [(P0, PERSON), (zero, CUP)], [(0, 1, HOLD)])], pred)["mAP"] == 0.0
