import itertools
import math

import pytest
import torch

from rlipv2_scale.models import box_ops
from rlipv2_scale.models.matcher import HungarianMatcher, relation_cost

from targets import make_target


def random_outputs(b, p, lo, lr, gen):
    def boxes():
        c = torch.rand(b, p, 2, generator=gen) * 0.6 + 0.2
        wh = torch.rand(b, p, 2, generator=gen) * 0.3 + 0.05
        return torch.cat([c, wh], -1)
    return {
        "pred_sub_boxes": boxes(), "pred_obj_boxes": boxes(),
        "pred_sub_logits": torch.randn(b, p, lo, generator=gen),
        "pred_obj_logits": torch.randn(b, p, lo, generator=gen),
        "pred_rel_logits": torch.randn(b, p, lr, generator=gen),
    }


def random_target(n, lo, lr, gen, no_object=False):
    c = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=gen) * 0.3 + 0.05
    sub = torch.cat([c, wh], -1)
    obj = torch.cat([c.flip(-1), wh], -1)
    if no_object:
        obj[0] = 0
    rel = (torch.rand(n, lr, generator=gen) < 0.4).float()
    return make_target(sub, obj, torch.randint(0, lo - 1, (n,), generator=gen),
                       torch.randint(0, lo - 1, (n,), generator=gen), rel)


@pytest.mark.parametrize("seed", range(6))
def test_matching_is_optimal_against_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    p, lo, lr = 5, 4, 3
    outputs = random_outputs(2, p, lo, lr, gen)
    targets = [random_target(3, lo, lr, gen, no_object=seed % 2 == 0), random_target(2, lo, lr, gen)]
    matcher = HungarianMatcher()
    indices, costs = matcher(outputs, targets, return_costs=True)
    for (rows, cols), c, t in zip(indices, costs, targets):
        n = t.sub_boxes.shape[0]
        assert len(rows) == len(cols) == n
        assert sorted(cols.tolist()) == list(range(n))
        total = c["total"]
        got = total[rows, cols].sum().item()
        best = min(
            sum(total[q, j].item() for j, q in enumerate(perm))
            for perm in itertools.permutations(range(p), n)
        )
        assert got == pytest.approx(best, abs=1e-5)


def test_cost_terms_hand_checked():
    # subject: pred (0.4,0.4)-(0.6,0.6) inside GT (0.3,0.3)-(0.7,0.7): IoU = GIoU = 0.04/0.16
    # object: pred (0.1,0.1)-(0.3,0.3) beside GT (0.5,0.1)-(0.7,0.3): IoU 0, hull 0.12, union 0.08
    outputs = {
        "pred_sub_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2]]]),
        "pred_obj_boxes": torch.tensor([[[0.2, 0.2, 0.2, 0.2]]]),
        "pred_sub_logits": torch.tensor([[[0.0, math.log(3.0), 0.0]]]),
        "pred_obj_logits": torch.tensor([[[0.0, math.log(3.0), 0.0]]]),
        "pred_rel_logits": torch.tensor([[[0.0, math.log(3.0)]]]),
    }
    target = make_target([0.5, 0.5, 0.4, 0.4], [0.6, 0.2, 0.2, 0.2], [0], [1], [1.0, 0.0])
    _, (c,) = HungarianMatcher()(outputs, [target], return_costs=True)
    assert c["class_sub"].item() == pytest.approx(-0.2, abs=1e-6)
    assert c["class_obj"].item() == pytest.approx(-0.6, abs=1e-6)
    # positives: p=0.5 over 1 positive; negatives: (1-0.75) over 1 negative
    assert c["rel"].item() == pytest.approx(-(0.5 / 1.0001 + 0.25 / 1.0001) / 2, abs=1e-6)
    assert c["bbox_sub"].item() == pytest.approx(0.4, abs=1e-6)
    assert c["bbox_obj"].item() == pytest.approx(0.4, abs=1e-6)
    assert c["giou_sub"].item() == pytest.approx(0.25, abs=1e-6)
    assert c["giou_obj"].item() == pytest.approx(-1 / 3, abs=1e-6)
    assert c["giou"].item() == pytest.approx(1 / 3, abs=1e-6)
    expected = -0.2 - 0.6 - 0.375 / 1.0001 + 2.5 * 0.4 + 1 / 3
    assert c["total"].item() == pytest.approx(expected, abs=1e-5)

    # Without the subject class term.
    _, (c2,) = HungarianMatcher(subject_class=False)(outputs, [target], return_costs=True)
    assert c2["total"].item() == pytest.approx(expected + 0.2, abs=1e-5)


def test_no_object_box_masks_l1_and_folds_giou_into_subject():
    outputs = {
        "pred_sub_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2]]]),
        "pred_obj_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2]]]),
        "pred_sub_logits": torch.zeros(1, 1, 3),
        "pred_obj_logits": torch.zeros(1, 1, 3),
        "pred_rel_logits": torch.zeros(1, 1, 2),
    }
    target = make_target([0.5, 0.5, 0.4, 0.4], [0.0, 0.0, 0.0, 0.0], [0], [2], [1.0, 0.0])
    _, (c,) = HungarianMatcher()(outputs, [target], return_costs=True)
    assert c["bbox_obj"].item() == 0.0
    assert c["bbox"].item() == pytest.approx(0.4, abs=1e-6)
    # GIoU of (0.4,0.4)-(0.6,0.6) with the degenerate box at the origin: -(0.36 - 0.04) / 0.36
    g_obj = -(0.36 - 0.04) / 0.36
    assert c["giou_obj"].item() == pytest.approx(g_obj, abs=1e-6)
    assert c["giou"].item() == pytest.approx(-g_obj - 0.25, abs=1e-6)


def test_matcher_picks_the_obvious_assignment_and_handles_empty_images():
    gt_sub = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.8, 0.8, 0.1, 0.1]])
    gt_obj = torch.tensor([[0.3, 0.2, 0.1, 0.1], [0.7, 0.8, 0.1, 0.1]])
    outputs = {
        # query 2 predicts GT pair 0, query 0 predicts GT pair 1, query 1 is far from both
        "pred_sub_boxes": torch.stack([gt_sub[1], torch.tensor([0.5, 0.1, 0.05, 0.05]), gt_sub[0]])[None].repeat(2, 1, 1),
        "pred_obj_boxes": torch.stack([gt_obj[1], torch.tensor([0.1, 0.5, 0.05, 0.05]), gt_obj[0]])[None].repeat(2, 1, 1),
        "pred_sub_logits": torch.zeros(2, 3, 3),
        "pred_obj_logits": torch.zeros(2, 3, 3),
        "pred_rel_logits": torch.zeros(2, 3, 2),
    }
    full = make_target(gt_sub, gt_obj, [0, 0], [1, 1], [[1.0, 0.0], [0.0, 1.0]])
    empty = make_target(torch.zeros(0, 4), torch.zeros(0, 4), [], [], torch.zeros(0, 2))
    (rows, cols), (rows_e, cols_e) = HungarianMatcher()(outputs, [full, empty])
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 2: 0}
    assert rows.dtype == torch.int64 and rows_e.numel() == 0 and cols_e.numel() == 0


def test_bf16_outputs_match_in_fp32_and_nan_does_not_crash():
    gen = torch.Generator().manual_seed(3)
    outputs = random_outputs(1, 6, 4, 3, gen)
    targets = [random_target(3, 4, 3, gen)]
    bf16 = {k: v.bfloat16() for k, v in outputs.items()}
    as_fp32 = {k: v.float() for k, v in bf16.items()}
    matcher = HungarianMatcher()
    _, (c,) = matcher(bf16, targets, return_costs=True)
    assert c["total"].dtype == torch.float32
    assert [x.tolist() for x in matcher(bf16, targets)[0]] == [x.tolist() for x in matcher(as_fp32, targets)[0]]

    outputs["pred_rel_logits"][0, 0, 0] = float("nan")
    rows, cols = matcher(outputs, targets)[0]
    assert len(rows) == 3


def test_mismatched_relation_columns_are_reported():
    gen = torch.Generator().manual_seed(0)
    outputs = random_outputs(1, 4, 4, 3, gen)
    with pytest.raises(ValueError, match="relation"):
        HungarianMatcher()(outputs, [random_target(2, 4, 5, gen)])


def test_relation_cost_formula():
    prob = torch.tensor([[0.9, 0.1, 0.2]])
    labels = torch.tensor([[1.0, 1.0, 0.0]])
    expected = -((0.9 + 0.1) / 2.0001 + 0.8 / 1.0001) / 2
    assert relation_cost(prob, labels).item() == pytest.approx(expected, abs=1e-6)


def test_paired_giou_agrees_with_pairwise_diagonal():
    gen = torch.Generator().manual_seed(1)
    a = box_ops.box_cxcywh_to_xyxy(torch.rand(7, 4, generator=gen) * 0.5 + 0.1)
    b = box_ops.box_cxcywh_to_xyxy(torch.rand(7, 4, generator=gen) * 0.5 + 0.1)
    torch.testing.assert_close(box_ops.paired_generalized_box_iou(a, b), box_ops.generalized_box_iou(a, b).diag())
    torch.testing.assert_close(box_ops.paired_box_iou(a, b), box_ops.box_iou(a, b).diag())
    cxcywh = torch.tensor([[0.5, 0.4, 0.2, 0.6]])
    torch.testing.assert_close(box_ops.box_cxcywh_to_xyxy(cxcywh), torch.tensor([[0.4, 0.1, 0.6, 0.7]]))
    torch.testing.assert_close(box_ops.box_xyxy_to_cxcywh(box_ops.box_cxcywh_to_xyxy(cxcywh)), cxcywh)
