"""Open Images SGG metrics: hand-computed R@50, triplet-weighted wmAP, phrase detection and its quirks."""
from __future__ import annotations

import json

import pytest

from rlipv2_scale.errors import UserError
from rlipv2_scale.eval.files import read_predictions
from rlipv2_scale.eval.oi_sgg import evaluate_oi_sgg, evaluate_oi_sgg_files, oi_label_space
from rlipv2_scale.eval.relation_json import RelationFile

from relation_data import random_relation_data

S1, O1, O2 = [0.0, 0.0, 99.0, 99.0], [100.0, 0.0, 199.0, 99.0], [300.0, 0.0, 399.0, 99.0]
FAR_S, FAR_O = [1000.0, 1000.0, 1099.0, 1099.0], [1100.0, 1000.0, 1199.0, 1099.0]
MAN, HORSE, HAT = 0, 1, 2
RIDE, WEAR = 0, 1


def gt_image(name, boxes, rels):
    return {"file_name": name, "annotations": [{"bbox": b, "category_id": c} for b, c in boxes],
            "rel_annotations": [{"subject_id": s, "object_id": o, "category_id": p} for s, o, p in rels]}


def pred_image(name, boxes, rels):
    return {"file_name": name, "predictions": [{"bbox": b, "category_id": c} for b, c in boxes],
            "rel_predictions": [{"subject_id": s, "object_id": o, "category_id": p, "score": sc} for s, o, p, sc in rels]}


GT_BOXES = [(S1, MAN), (O1, HORSE), (O2, HAT)]
GT = [gt_image("a", GT_BOXES, [(0, 1, RIDE), (0, 2, RIDE)])]  # triplets X = man-ride-horse, Y = man-ride-hat
PRED_BOXES = GT_BOXES + [(FAR_S, MAN), (FAR_O, HORSE)]


def test_perfect_predictions():
    res = evaluate_oi_sgg(GT, [pred_image("a", GT_BOXES, [(0, 1, RIDE, 0.9), (0, 2, RIDE, 0.8)])])
    for key in ("recall@50", "wmAP_rel", "wmAP_phr", "score_wtd"):
        assert res[key] == pytest.approx(1.0), key


def test_wmap_weights_each_triplet_by_its_ground_truth_count():
    boxes = [(S1, MAN), (O1, HORSE), (O2, HAT), ([500.0, 0, 599, 99], HORSE), ([700.0, 0, 799, 99], HORSE)]
    gt = [gt_image("a", boxes, [(0, 1, RIDE), (0, 3, RIDE), (0, 4, RIDE), (0, 2, WEAR)])]
    pred = [pred_image("a", boxes, [(0, 1, RIDE, 0.9), (0, 3, RIDE, 0.8), (0, 4, RIDE, 0.7)])]  # the hat missed
    res = evaluate_oi_sgg(gt, pred)
    assert res["wmAP_rel"] == pytest.approx(3 / 4) and res["mAP_rel@100"] == pytest.approx(1 / 2)
    assert res["recall@50"] == pytest.approx(3 / 4)
    assert res["score_wtd"] == pytest.approx(0.2 * res["recall@50"] + 0.4 * res["wmAP_rel"] + 0.4 * res["wmAP_phr"])


def test_phrase_detection_matches_the_union_box():
    # the subject box is too small for relation detection, the union box still overlaps >= 0.5
    small = [60.0, 20.0, 99.0, 79.0]
    pred = [pred_image("a", [(small, MAN), (O1, HORSE)], [(0, 1, RIDE, 0.9)])]
    gt = [gt_image("a", GT_BOXES[:2], [(0, 1, RIDE)])]
    res = evaluate_oi_sgg(gt, pred)
    assert res["wmAP_rel"] == 0.0 and res["wmAP_phr"] == pytest.approx(1.0)


def test_sorted_phrases_are_matched_with_unsorted_overlaps():
    # ranked: a (X, 0.9), b (Y, 0.8), c (X, 0.7, far away); NMS groups them a, c | b, then the phrase
    # matcher re-sorts to a, b, c but reads the overlaps of a, c, b: b (Y) gets c's (none) and c (X)
    # gets b's (the Y ground truth) -> Y AP 0, X AP 1 -> wmAP_phr 0.5; without NMS nothing moves
    rels = [(0, 1, RIDE, 0.9), (0, 2, RIDE, 0.8), (3, 4, RIDE, 0.7)]
    pred = [pred_image("a", PRED_BOXES, rels)]
    with_nms, without = evaluate_oi_sgg(GT, pred), evaluate_oi_sgg(GT, pred, nms=False)
    assert with_nms["wmAP_phr"] == pytest.approx(0.5) and without["wmAP_phr"] == pytest.approx(1.0)
    assert with_nms["wmAP_rel"] == pytest.approx(1.0) and without["wmAP_rel"] == pytest.approx(1.0)


def test_images_without_boxes_count_phrases_but_not_relations():
    gt = GT + [gt_image("empty", [], [])]
    pred = [pred_image("a", GT_BOXES, [(0, 1, RIDE, 0.5), (0, 2, RIDE, 0.5)]),
            pred_image("empty", GT_BOXES, [(0, 1, RIDE, 0.95)])]
    res = evaluate_oi_sgg(gt, pred)
    assert res["wmAP_rel"] == pytest.approx(1.0)
    # X: a false phrase (0.95) before the true one: precision 0.5 at every point; Y: 1 -> weighted 0.75
    assert res["wmAP_phr"] == pytest.approx(0.75)


def test_recall_at_50_uses_the_top_50_only():
    noise = [(3, 4, WEAR, 0.9)] * 60
    pred = [pred_image("a", PRED_BOXES, noise + [(0, 1, RIDE, 0.9), (0, 2, RIDE, 0.1)])]
    res = evaluate_oi_sgg(GT, pred, nms=False)
    assert res["recall@50"] == 0.0 and res["recall@100"] == pytest.approx(1.0)


def test_image_with_boxes_but_no_relation_is_reported():
    gt = GT + [gt_image("b", GT_BOXES, [])]
    pred = [pred_image("a", GT_BOXES, [(0, 1, RIDE, 0.5)]), pred_image("b", GT_BOXES, [(0, 1, RIDE, 0.9)])]
    res = evaluate_oi_sgg(gt, pred)
    assert any("no ground-truth relation" in w for w in res["warnings"])
    assert res["wmAP_phr"] == pytest.approx(0.25)  # X: false first, then true (0.5); Y: never predicted (0)


def test_bad_predictions_raise():
    with pytest.raises(UserError, match=r"'a'.*rel_predictions\[0\].score"):
        evaluate_oi_sgg(GT, [pred_image("a", GT_BOXES, [(0, 1, RIDE, float("nan"))])])
    with pytest.raises(UserError, match=r"category_id = 400"):
        evaluate_oi_sgg(GT, [pred_image("a", [(S1, 400)], [])])


def test_files_give_the_numbers_of_their_objects(tmp_path):
    space = oi_label_space()
    gt, pred = random_relation_data(space, 40, 120, n_queries=30, seed=2)
    gt = [{"file_name": g["file_name"], "annotations": g["annotations"], "rel_annotations": g["hoi_annotation"]}
          for g in gt]
    pred = [{"file_name": p["file_name"], "predictions": p["predictions"], "rel_predictions": p["hoi_prediction"]}
            for p in pred]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "pred.json").write_text(json.dumps(pred))
    assert isinstance(read_predictions(tmp_path / "pred.json", space, "rel_predictions"), RelationFile)
    assert evaluate_oi_sgg_files(tmp_path / "gt.json", tmp_path / "pred.json") == evaluate_oi_sgg(gt, pred)
    pred[7]["rel_predictions"][3]["score"] = float("nan")  # json.dump writes NaN: the fast decoder refuses it
    (tmp_path / "pred.json").write_text(json.dumps(pred))
    with pytest.raises(UserError, match=r"'img_000007.jpg'.*rel_predictions\[3\].score"):
        evaluate_oi_sgg_files(tmp_path / "gt.json", tmp_path / "pred.json")


def test_hico_form_files_are_refused_naming_the_key(tmp_path):
    """Predictions or ground truth in the HICO-DET form (hoi_prediction / hoi_annotation) used to score 0."""
    gt, pred = random_relation_data(oi_label_space(), 6, 20, n_queries=6, seed=4)
    oi_gt = [{"file_name": g["file_name"], "annotations": g["annotations"], "rel_annotations": g["hoi_annotation"]}
             for g in gt]
    oi_pred = [{"file_name": p["file_name"], "predictions": p["predictions"], "rel_predictions": p["hoi_prediction"]}
               for p in pred]
    for g, p, message in ((oi_gt, pred, r"^predictions for image 'img_000000.jpg': the entry has no 'rel_predictions' "
                                        r"key; it has 'hoi_prediction' instead: rename it to 'rel_predictions'$"),
                          (gt, oi_pred, r"^ground truth for image 'img_000000.jpg': the entry has no "
                                        r"'rel_annotations' key; it has 'hoi_annotation' instead")):
        with pytest.raises(UserError, match=message):
            evaluate_oi_sgg(g, p)
        (tmp_path / "gt.json").write_text(json.dumps(g))
        (tmp_path / "pred.json").write_text(json.dumps(p))
        with pytest.raises(UserError, match=message):
            evaluate_oi_sgg_files(tmp_path / "gt.json", tmp_path / "pred.json")


def test_missing_predictions_and_negative_boxes():
    gt = GT + [gt_image("b", GT_BOXES, [(0, 1, RIDE)])]
    res = evaluate_oi_sgg(gt, [pred_image("a", GT_BOXES, [(0, 1, RIDE, 0.9)])])
    assert res["n_images_without_predictions"] == 1
    assert res["warnings"][0].startswith("1 of 2 ground-truth images have no predictions")
    with pytest.raises(UserError, match=r"^predictions for image 'a': predictions\[1\].bbox = \[100.0, 100.0, 50.0, "
                                        r"50.0\] has x2 < x1 or y2 < y1"):
        evaluate_oi_sgg(GT, [pred_image("a", [(S1, MAN), ([100.0, 100.0, 50.0, 50.0], HORSE)], [])])
    with pytest.raises(UserError, match=r"^ground truth for image 'a': annotations\[0\].bbox .* has x2 < x1"):
        evaluate_oi_sgg([gt_image("a", [([10.0, 0.0, 5.0, 9.0], MAN)], [])], [])
