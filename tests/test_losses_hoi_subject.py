"""The subject-label quirk of HOI fine-tuning (`datasets/hico.py`, `datasets/vcoco.py`): the original's HICO-DET / V-COCO datasets
give every subject the class target 1 ("bicycle") instead of the person (0). `LossConfig.hoi_person_index`
reproduces it with `compat_original` and targets the person without, in the loss and in the matching."""
import math

import pytest
import torch
import torch.nn.functional as F

from rlipv2_scale.errors import ConfigError
from rlipv2_scale.models.losses import LossConfig, SetCriterion, subject_target_index

from targets import make_target

# object texts: 0 "person", 1 "bicycle", 2 "cup", 3 "no objects"
SUB_LOGITS = [[math.log(6.0), 0.0, 0.0, 0.0],    # query 0: person (p = 2/3)
              [0.0, math.log(3.0), 0.0, 0.0]]    # query 1: bicycle (p = 1/2), less sure: the two cases differ


def case():
    """Two queries identical except their subject class; one GT pair whose subject is a person."""
    box = [0.5, 0.5, 0.2, 0.2]
    outputs = {
        "pred_sub_boxes": torch.tensor([[box, box]]), "pred_obj_boxes": torch.tensor([[box, box]]),
        "pred_sub_logits": torch.tensor([SUB_LOGITS]),
        "pred_obj_logits": torch.tensor([[[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0]]]),
        "pred_rel_logits": torch.zeros(1, 2, 2),
    }
    return outputs, make_target(box, box, [0], [2], [[1.0, 0.0]])


def expected_sub_ce(matched: int, target: int) -> float:
    """Weighted-mean CE of the subject logits: the matched query targets `target`, the other
    "no objects" (weight 0.1)."""
    logits = torch.tensor(SUB_LOGITS)
    classes = torch.tensor([3, 3])
    classes[matched] = target
    return F.cross_entropy(logits, classes, torch.tensor([1.0, 1.0, 1.0, 0.1])).item()


def expected_obj_ce(matched: int) -> float:
    logits = torch.tensor([[0.0, 0.0, 1.0, 0.0]] * 2)
    classes = torch.tensor([3, 3])
    classes[matched] = 2
    return F.cross_entropy(logits, classes, torch.tensor([1.0, 1.0, 1.0, 0.1])).item()


def test_subject_target_index():
    assert subject_target_index(0, compat_original=True) == 1
    assert subject_target_index(0, compat_original=False) == 0
    assert subject_target_index(5, compat_original=False) == 5


@pytest.mark.parametrize("compat, target", [(True, 1), (False, 0)])
def test_hoi_subject_target_in_matching_and_loss(compat, target):
    """Matching follows the subject class (query 1 "bicycle" with the quirk, query 0 "person" without)
    and the cross-entropy targets that class."""
    outputs, gt = case()
    crit = SetCriterion(LossConfig(pseudo_targets=False, aux_loss=False, hoi_person_index=0, compat_original=compat))
    losses = crit(outputs, [gt])
    matched = target   # the query that predicts the target class wins the class cost
    assert losses["loss_ce"].item() == pytest.approx(expected_sub_ce(matched, target) + expected_obj_ce(matched),
                                                     rel=1e-5)
    assert losses["sub_class_error"].item() == 0.0   # the matched query's argmax is the target class
    assert gt.sub_labels.tolist() == [0]             # the caller's targets are left as they are
    other = SetCriterion(LossConfig(pseudo_targets=False, aux_loss=False, hoi_person_index=0,
                                    compat_original=not compat))(outputs, [gt])
    assert abs(other["loss_ce"].item() - losses["loss_ce"].item()) > 0.1


def test_without_hoi_subjects_the_annotated_classes_are_kept_even_with_compat():
    """Pre-training / Open Images: the subject keeps its annotated class whatever compat_original says."""
    outputs, gt = case()
    losses = SetCriterion(LossConfig(pseudo_targets=False, aux_loss=False, compat_original=True))(outputs, [gt])
    assert losses["loss_ce"].item() == pytest.approx(expected_sub_ce(0, 0) + expected_obj_ce(0), rel=1e-5)


def test_hoi_person_index_errors():
    with pytest.raises(ConfigError, match="hoi_person_index"):
        LossConfig(hoi_person_index=-1)
    outputs, gt = case()
    crit = SetCriterion(LossConfig(pseudo_targets=False, hoi_person_index=3))   # "no objects" is not a class
    with pytest.raises(ValueError, match="not one of the 3 object texts"):
        crit(outputs, [gt])
