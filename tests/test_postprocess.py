import json
import math

import numpy as np
import pytest
import torch

from rlipv2_scale.errors import UserError
from rlipv2_scale.eval.triplet_nms import TripletNMS
from rlipv2_scale.labels.space import LabelSpace, hico_label_space
from rlipv2_scale.models.postprocess import ImageTriplets, PostProcess, to_hico_json, triplet_nms


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def two_pair_outputs():
    """1 image, 2 pairs, 3 object classes + "no objects", 2 relations.

    pair 0: subject class 0 (person) p=0.5, object class 2 p=0.8, relations sigmoid [0.9, 0.2]
    pair 1: subject class 1 p=0.6, object class 1 p=0.4, relations sigmoid [0.5, 0.7]
    """
    def logits(probs):  # probs over the 4 classes (incl. "no objects") -> log-probabilities
        return torch.tensor(probs).log()

    return {
        "pred_sub_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.25, 0.5, 0.5]]]),
        "pred_obj_boxes": torch.tensor([[[0.1, 0.2, 0.2, 0.2], [0.75, 0.75, 0.5, 0.5]]]),
        "pred_sub_logits": torch.stack([logits([0.5, 0.2, 0.2, 0.1]), logits([0.1, 0.6, 0.2, 0.1])])[None],
        "pred_obj_logits": torch.stack([logits([0.05, 0.05, 0.8, 0.1]), logits([0.3, 0.4, 0.1, 0.2])])[None],
        "pred_rel_logits": torch.tensor([[[logit(0.9), logit(0.2)], [logit(0.5), logit(0.7)]]]),
    }


def test_hoi_scores_ranking_and_boxes():
    (res,) = PostProcess(mode="hoi")(two_pair_outputs(), [(200, 100)])
    # scores = s_rel * s_obj: pair 0 -> [0.72, 0.16]; pair 1 -> [0.2, 0.28]
    assert res.pair_index.tolist() == [0, 1, 1, 0]
    assert res.rel_index.tolist() == [0, 1, 0, 1]
    torch.testing.assert_close(res.scores, torch.tensor([0.72, 0.28, 0.2, 0.16]))
    # subject fixed to person in HOI mode; objects argmax without "no objects"
    assert res.sub_labels.tolist() == [0, 0] and res.obj_labels.tolist() == [2, 1]
    # cxcywh (0.5, 0.5, 0.2, 0.4) on an image of H=200, W=100 -> (40, 60, 60, 140)
    torch.testing.assert_close(res.sub_boxes[0], torch.tensor([40.0, 60.0, 60.0, 140.0]))
    torch.testing.assert_close(res.obj_boxes[1], torch.tensor([50.0, 100.0, 100.0, 200.0]))


def test_sgg_scores_include_the_subject_and_keep_its_class():
    (res,) = PostProcess(mode="sgg", top_k=2)(two_pair_outputs(), [(200, 100)])
    # scores = s_rel * s_obj * s_sub: pair 0 -> [0.36, 0.08]; pair 1 -> [0.12, 0.168]
    torch.testing.assert_close(res.scores, torch.tensor([0.36, 0.168]))
    assert res.pair_index.tolist() == [0, 1] and res.rel_index.tolist() == [0, 1]
    assert res.sub_labels.tolist() == [0, 1]
    assert len(res) == 2


def test_no_objects_class_is_never_predicted():
    outputs = two_pair_outputs()
    outputs["pred_obj_logits"][0, 1] = torch.tensor([0.0, 0.0, 0.0, 10.0])
    (res,) = PostProcess()(outputs, [(10, 10)])
    assert res.obj_labels[1].item() in (0, 1, 2)
    assert res.obj_scores[1].item() == pytest.approx(math.exp(0) / (3 + math.exp(10)), rel=1e-5)


def test_nf_zero_shot_filter_keeps_person_subjects_only():
    (res,) = PostProcess(mode="hoi", zero_shot_nf=True)(two_pair_outputs(), [(10, 10)])
    assert set(res.pair_index.tolist()) == {0}
    torch.testing.assert_close(res.scores, torch.tensor([0.72, 0.16]))
    # no person subject at all: nothing left, also through NMS
    outputs = two_pair_outputs()
    outputs["pred_sub_logits"][0, 0] = torch.tensor([0.1, 0.5, 0.2, 0.2]).log()
    (res,) = PostProcess(mode="hoi", zero_shot_nf=True, nms=TripletNMS())(outputs, [(10, 10)])
    assert len(res) == 0


def test_validity_mask_drops_illegal_relation_object_combinations():
    valid = np.ones((2, 3))
    valid[0, 1] = 0  # relation 0 with object class 1 is illegal: drops (pair 1, rel 0)
    (res,) = PostProcess(valid=valid)(two_pair_outputs(), [(10, 10)])
    assert list(zip(res.pair_index.tolist(), res.rel_index.tolist())) == [(0, 0), (1, 1), (0, 1)]
    with pytest.raises(UserError, match="validity mask"):
        PostProcess(valid=np.ones((3, 3)))(two_pair_outputs(), [(10, 10)])


def make_triplets(sub, obj, labels, scores):
    n = len(sub)
    return ImageTriplets(
        sub_boxes=torch.tensor(sub, dtype=torch.float32), obj_boxes=torch.tensor(obj, dtype=torch.float32),
        sub_labels=torch.zeros(n, dtype=torch.long), obj_labels=torch.tensor(labels),
        sub_scores=torch.ones(n), obj_scores=torch.ones(n),
        pair_index=torch.arange(n), rel_index=torch.zeros(n, dtype=torch.long), scores=torch.tensor(scores),
    )


def test_triplet_nms_suppresses_overlapping_duplicates_of_the_same_triplet_only():
    box = [0.0, 0.0, 99.0, 99.0]
    shifted = [5.0, 0.0, 104.0, 99.0]  # IoU with box (+1 convention): 95*100 / (2*10000 - 9500)
    far = [300.0, 300.0, 399.0, 399.0]
    t = make_triplets(
        sub=[box, shifted, shifted, far], obj=[box, shifted, shifted, box],
        labels=[1, 1, 2, 1], scores=[0.9, 0.8, 0.7, 0.6],
    )
    kept = triplet_nms(t, TripletNMS(threshold=0.7, alpha=1.0, beta=0.5))
    # 1 overlaps 0 (same class): IoU^1.5 = 0.905^1.5 = 0.86 > 0.7 -> dropped; 2 has another object
    # class; 3's subject is far away.
    assert kept.pair_index.tolist() == [0, 2, 3]
    torch.testing.assert_close(kept.scores, torch.tensor([0.9, 0.7, 0.6]))
    # A higher threshold keeps everything.
    assert triplet_nms(t, TripletNMS(threshold=0.9)).pair_index.tolist() == [0, 1, 2, 3]

    (res,) = PostProcess(nms=TripletNMS())(two_pair_outputs(), [(10, 10)])
    assert len(res) == 4  # no duplicates there


def test_hico_json_format_with_a_synthetic_label_space():
    labels = LabelSpace(objects=("person", "cup", "ball"), verbs=("hold", "kick"), valid=np.ones((2, 3)),
                        object_ids=(1, 2, 3), verb_ids=(1, 2))
    (res,) = PostProcess.for_label_space(labels, mode="hoi")(two_pair_outputs(), [(200, 100)])
    (image,) = to_hico_json([res], ["img_000.jpg"], labels)
    json.dumps(image)  # plain JSON types only
    assert image["file_name"] == "img_000.jpg"
    hois = image["hoi_prediction"]
    assert [h["score"] for h in hois] == pytest.approx([0.72, 0.28, 0.2, 0.16])
    assert [h["category_id"] for h in hois] == [1, 2, 1, 2]
    first = hois[0]
    assert image["predictions"][first["subject_id"]] == {"bbox": [40.0, 60.0, 60.0, 140.0], "category_id": 1}
    assert image["predictions"][first["object_id"]]["category_id"] == 3  # "ball"
    # each used box written once: 2 pairs -> 2 subjects + 2 objects
    assert len(image["predictions"]) == 4
    with pytest.raises(UserError, match="file names"):
        to_hico_json([res], [], labels)


def test_hico_det_is_the_default_label_space():
    outputs = {k: v.repeat(1, 1, 1) for k, v in two_pair_outputs().items()}
    outputs["pred_obj_logits"] = torch.randn(1, 2, 81)
    outputs["pred_sub_logits"] = torch.randn(1, 2, 81)
    outputs["pred_rel_logits"] = torch.randn(1, 2, 117)
    (res,) = PostProcess.for_label_space()(outputs, [(480, 640)])
    valid = hico_label_space().valid
    for p, r in zip(res.pair_index.tolist(), res.rel_index.tolist()):
        assert valid[r, res.obj_labels[p]] == 1   # only legal (verb, object) combinations survive
    (image,) = to_hico_json([res], ["HICO_test2015_00000001.jpg"])
    assert all(1 <= h["category_id"] <= 117 for h in image["hoi_prediction"])
    assert image["predictions"][image["hoi_prediction"][0]["subject_id"]]["category_id"] == 1   # COCO person


def test_json_round_trip_through_the_hico_evaluator():
    """Outputs that reproduce the ground truth exactly score mAP 1 in the evaluator."""
    from rlipv2_scale.eval.hico import evaluate_hico

    space = LabelSpace(objects=("person", "cup", "ball"), verbs=("hold", "kick"), valid=np.ones((2, 3)),
                       object_ids=(1, 2, 3), verb_ids=(1, 2))
    outputs = two_pair_outputs()   # pair 0: (person, ball, hold) is the top triplet
    (res,) = PostProcess.for_label_space(space)(outputs, [(200, 100)])
    gt = [{"file_name": "a.jpg",
           "annotations": [{"bbox": res.sub_boxes[0].tolist(), "category_id": 1},
                           {"bbox": res.obj_boxes[0].tolist(), "category_id": 3}],
           "hoi_annotation": [{"subject_id": 0, "object_id": 1, "category_id": 1}]}]
    result = evaluate_hico(gt, to_hico_json([res], ["a.jpg"], space), label_space=space)
    assert result["mAP"] == pytest.approx(1.0)
