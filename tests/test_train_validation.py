"""The validation hook end to end on one rank: it scores the validation shards' images against their
records' ground truth through `inference.evaluate_relations` (the path of `eval --checkpoint`):
perfect predictions score 100 mAP, displaced ones 0, any-subject scoring credits non-person subjects."""
from __future__ import annotations

import io

import pytest
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn

from rlipv2_scale.data.schema import ImageInfo, Object, Relation, RelationalRecord
from rlipv2_scale.data.shards import write_shards
from rlipv2_scale.errors import UserError
from rlipv2_scale.inference import ShardImages, ground_truth_entry, label_space_for
from rlipv2_scale.train.config import run_config_from_dict
from rlipv2_scale.train.launch import DistInfo
from rlipv2_scale.train.validation import RelationValidation

OBJECTS = ["person", "cup", "dog"]
VERBS = ["hold", "ride", "look at"]
SLOTS = 4
H, W = 48, 64


@pytest.fixture(scope="module", autouse=True)
def process_group(tmp_path_factory):
    if not dist.is_initialized():
        store = tmp_path_factory.mktemp("pg") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield


def record(i: int, subject: str = "person") -> RelationalRecord:
    buf = io.BytesIO()
    Image.new("RGB", (W, H), (10 * i, 40, 90)).save(buf, format="JPEG")
    boxes = [(8.0 + i, 6.0, 24.0 + i, 30.0), (30.0, 10.0, 50.0, 20.0), (10.0, 30.0, 20.0, 40.0)]
    names = [subject, OBJECTS[1 + i % 2], "dog"]
    rels = [Relation(0, 1, VERBS[i % 3]), Relation(0, 2, VERBS[(i + 1) % 3]), Relation(0, 2, VERBS[(i + 2) % 3])]
    return RelationalRecord(ImageInfo(f"img{i}", "synthetic", "val", W, H, f"img{i}.jpg"),
                            [Object(b, n) for b, n in zip(boxes, names)], rels, image_bytes=buf.getvalue())


def shards(tmp_path, subject: str = "person"):
    out = tmp_path / f"val_{subject}"
    write_shards([record(i, subject) for i in range(5)], out)
    return out


class Oracle(nn.Module):
    """Outputs the ground truth of the dataset's images in order (optionally with displaced boxes)."""

    def __init__(self, dataset: ShardImages, shift: float = 0.0):
        super().__init__()
        self.cfg = run_config_from_dict({"model": {"name": "tiny"}, "data": {"sources": [{"name": "x", "local": "u"}]}
                                         }).model
        self.records = list(dataset.records)
        self.shift = shift
        self.weight = nn.Parameter(torch.zeros(1))

    def encode_labels(self, obj_texts, rel_texts):
        return torch.zeros(len(obj_texts) + len(rel_texts), 4)

    def forward(self, images, pixel_mask, obj_texts, rel_texts, label_embeds=None):
        batch = [self.records.pop(0) for _ in range(images.shape[0])]
        b, lo, lr = len(batch), len(obj_texts), len(rel_texts)
        out = {"pred_sub_boxes": torch.full((b, SLOTS, 4), 0.1), "pred_obj_boxes": torch.full((b, SLOTS, 4), 0.1),
               "pred_sub_logits": torch.full((b, SLOTS, lo), -10.0), "pred_obj_logits": torch.full((b, SLOTS, lo), -10.0),
               "pred_rel_logits": torch.full((b, SLOTS, lr), -10.0)}
        out["pred_sub_logits"][..., -1] = 10.0
        out["pred_obj_logits"][..., -1] = 10.0

        def cxcywh(box):
            x1, y1, x2, y2 = box
            return torch.tensor([(x1 + x2) / 2 / W, (y1 + y2) / 2 / H, (x2 - x1) / W, (y2 - y1) / H]) + self.shift

        for i, r in enumerate(batch):
            pairs = sorted({(x.subject, x.object) for x in r.relations})
            for k, (s, o) in enumerate(pairs):
                out["pred_sub_boxes"][i, k], out["pred_obj_boxes"][i, k] = cxcywh(r.objects[s].box), cxcywh(r.objects[o].box)
                out["pred_sub_logits"][i, k, -1] = out["pred_obj_logits"][i, k, -1] = -10.0
                out["pred_sub_logits"][i, k, obj_texts.index(r.objects[s].name)] = 10.0
                out["pred_obj_logits"][i, k, obj_texts.index(r.objects[o].name)] = 10.0
                for x in r.relations:
                    if (x.subject, x.object) == (s, o):
                        out["pred_rel_logits"][i, k, rel_texts.index(x.predicate)] = 10.0
        return out


def hook_for(val_dir, subject: str = "auto") -> RelationValidation:
    cfg = run_config_from_dict({
        "model": {"name": "tiny"}, "data": {"sources": [{"name": "x", "local": "unused"}]},
        "eval": {"data": {"sources": [{"name": "val", "local": str(val_dir)}], "fixed_obj_labels": OBJECTS,
                          "fixed_rel_labels": VERBS, "batch_size": 2}, "nms": False, "subject": subject}})
    return RelationValidation(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))


def test_ground_truth_entry_is_the_records_absolute_boxes(tmp_path):
    space = label_space_for(OBJECTS, VERBS)
    entry = ground_truth_entry(record(0), space)
    assert entry["annotations"][0] == {"bbox": [8.0, 6.0, 24.0, 30.0], "category_id": 0}
    assert entry["hoi_annotation"] == [{"subject_id": 0, "object_id": 1, "category_id": 0},
                                       {"subject_id": 0, "object_id": 2, "category_id": 1},
                                       {"subject_id": 0, "object_id": 2, "category_id": 2}]
    with pytest.raises(UserError, match="outside the evaluation label lists"):
        ground_truth_entry(record(0, subject="cat"), space)


def test_perfect_predictions_score_100_and_displaced_ones_0(tmp_path):
    hook = hook_for(shards(tmp_path))
    result = hook(Oracle(hook._dataset()), step=7)
    assert result["mAP"] == pytest.approx(100.0) and result["images"] == 5.0
    assert hook(Oracle(hook._dataset(), shift=0.3), step=7)["mAP"] == pytest.approx(0.0)


def test_any_subject_credits_triplets_whose_subject_is_not_a_person(tmp_path):
    dogs = shards(tmp_path, subject="dog")
    any_hook, hoi_hook = hook_for(dogs, subject="any"), hook_for(dogs)
    # the HOI rule (person subjects only) cannot find these triplets; scene-graph scoring can
    assert any_hook(Oracle(any_hook._dataset()), step=1)["mAP"] == pytest.approx(100.0)
    assert hoi_hook(Oracle(hoi_hook._dataset()), step=1)["mAP"] < 50.0
    assert label_space_for(OBJECTS, VERBS, "any").subject_index is None
    assert label_space_for(OBJECTS, VERBS).subject_index == 0
