"""The evaluation hook end to end on one rank: perfect predictions score 100 mAP, displaced ones 0,
each validation image counts once."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from rlipv2_scale.data.batch import NO_OBJECTS, Batch, Target
from rlipv2_scale.train.config import run_config_from_dict
from rlipv2_scale.train.launch import DistInfo
from rlipv2_scale.train.validation import HicoValidation, ground_truth_entry, label_space_for

OBJECTS = ["person", "cup", "dog"]
VERBS = ["hold", "ride", "look at"]
SLOTS = 4


@pytest.fixture(scope="module", autouse=True)
def process_group(tmp_path_factory):
    if not dist.is_initialized():
        store = tmp_path_factory.mktemp("pg") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield


def target(i: int) -> Target:
    boxes = torch.tensor([[0.3, 0.4, 0.2, 0.4], [0.6, 0.5, 0.3, 0.2], [0.2, 0.7, 0.1, 0.1]])
    boxes[:, :2] += 0.02 * i
    rel = torch.zeros(2, len(VERBS))
    rel[0, i % 3] = 1
    rel[1, (i + 1) % 3] = 1
    rel[1, (i + 2) % 3] = 1
    sub, obj = torch.tensor([0, 0]), torch.tensor([1, 2])
    labels = torch.tensor([0, 1 + i % 2, 2])
    return Target(image_id=f"img{i}", orig_size=(480, 640), size=(96, 128), boxes=boxes, labels=labels,
                  sub_index=sub, obj_index=obj, sub_boxes=boxes[sub], obj_boxes=boxes[obj], sub_labels=labels[sub],
                  obj_labels=labels[obj], rel_labels=rel)


class Oracle(nn.Module):
    """Outputs the targets of the batches it is given, in order (optionally with displaced boxes)."""

    def __init__(self, batches: list[Batch], shift: float = 0.0):
        super().__init__()
        self.queue = [b.targets for b in batches]
        self.shift = shift
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, images, pixel_mask, obj_texts, rel_texts):
        targets = self.queue.pop(0)
        b, lo, lr = len(targets), len(obj_texts), len(rel_texts)
        out = {"pred_sub_boxes": torch.full((b, SLOTS, 4), 0.1), "pred_obj_boxes": torch.full((b, SLOTS, 4), 0.1),
               "pred_sub_logits": torch.full((b, SLOTS, lo), -10.0), "pred_obj_logits": torch.full((b, SLOTS, lo), -10.0),
               "pred_rel_logits": torch.full((b, SLOTS, lr), -10.0)}
        out["pred_sub_logits"][..., -1] = 10.0
        out["pred_obj_logits"][..., -1] = 10.0
        for i, t in enumerate(targets):
            n = t.sub_boxes.shape[0]
            out["pred_sub_boxes"][i, :n] = t.sub_boxes + self.shift
            out["pred_obj_boxes"][i, :n] = t.obj_boxes + self.shift
            for k in range(n):
                out["pred_sub_logits"][i, k, -1] = out["pred_obj_logits"][i, k, -1] = -10.0
                out["pred_sub_logits"][i, k, t.sub_labels[k]] = 10.0
                out["pred_obj_logits"][i, k, t.obj_labels[k]] = 10.0
            out["pred_rel_logits"][i, :n] = torch.where(t.rel_labels > 0, 10.0, -10.0)
        return out


def hook_with(batches: list[Batch], subject: str = "auto") -> HicoValidation:
    cfg = run_config_from_dict({
        "model": {"name": "tiny"}, "data": {"sources": [{"name": "x", "local": "unused"}]},
        "eval": {"data": {"sources": [{"name": "val", "local": "unused"}], "fixed_obj_labels": OBJECTS,
                          "fixed_rel_labels": VERBS}, "nms": False, "subject": subject}})
    hook = HicoValidation(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    hook.loader = batches
    return hook


def batches() -> list[Batch]:
    out = []
    for j in range(2):
        targets = [target(2 * j), target(2 * j + 1)]
        out.append(Batch(images=torch.zeros(2, 3, 96, 128), pixel_mask=torch.zeros(2, 96, 128, dtype=torch.bool),
                         targets=targets, obj_texts=OBJECTS + [NO_OBJECTS], rel_texts=list(VERBS)))
    # the last image again, as streaming's padding of a rank's share repeats samples
    out.append(Batch(images=torch.zeros(1, 3, 96, 128), pixel_mask=torch.zeros(1, 96, 128, dtype=torch.bool),
                     targets=[target(3)], obj_texts=OBJECTS + [NO_OBJECTS], rel_texts=list(VERBS)))
    return out


def test_ground_truth_entry_is_absolute_xyxy_of_the_original_image():
    space = label_space_for(OBJECTS, VERBS)
    entry = ground_truth_entry(target(0), space)
    assert entry["annotations"][0] == {"bbox": [128.0, 96.0, 256.0, 288.0], "category_id": 0}
    assert entry["hoi_annotation"] == [{"subject_id": 0, "object_id": 1, "category_id": 0},
                                       {"subject_id": 0, "object_id": 2, "category_id": 1},
                                       {"subject_id": 0, "object_id": 2, "category_id": 2}]


def test_perfect_predictions_score_100_and_displaced_ones_0():
    data = batches()
    result = hook_with(data)(Oracle(data), step=7)
    assert result["mAP"] == pytest.approx(100.0) and result["images"] == 4.0
    data = batches()
    assert hook_with(data)(Oracle(data, shift=0.3), step=7)["mAP"] == pytest.approx(0.0)


def test_any_subject_credits_triplets_whose_subject_is_not_a_person():
    def dog_subjects(data):
        for batch in data:
            for t in batch.targets:
                t.labels[0] = 2          # the subject box is a dog now
                t.sub_labels[:] = 2
        return data
    # the HOI rule (person subjects only) cannot find these triplets; scene-graph scoring can
    assert hook_with(dog_subjects(batches()), subject="any")(Oracle(dog_subjects(batches())), step=1)["mAP"] \
        == pytest.approx(100.0)
    assert hook_with(dog_subjects(batches()))(Oracle(dog_subjects(batches())), step=1)["mAP"] < 50.0
    assert label_space_for(OBJECTS, VERBS, "any").subject_index is None
    assert label_space_for(OBJECTS, VERBS).subject_index == 0
