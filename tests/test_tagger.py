import dataclasses

import pytest
import torch

from rlipv2_scale.data.batch import Target
from rlipv2_scale.errors import ConfigError, UserError
from rlipv2_scale.models.build import build_model
from rlipv2_scale.models.config import named_config
from rlipv2_scale.models.heads import inverse_sigmoid
from rlipv2_scale.models.losses import SetCriterion
from rlipv2_scale.models.outputs import OUTPUT_KEYS
from rlipv2_scale.models.summary import model_summary
from rlipv2_scale.models.tagger import (
    Pairs,
    RelationTagger,
    TaggerNoise,
    add_negative_pairs,
    duplicate_entity_mask,
    flip_labels,
    jitter_boxes,
    tagger_loss_config,
)

OBJ = ["person", "cup", "ball", "no objects"]
REL = ["hold", "kick", "ride"]


def tiny_tagger_config(**overrides):
    return dataclasses.replace(named_config("tiny_tagger"), **overrides)


@pytest.fixture(scope="module")
def tagger():
    torch.manual_seed(0)
    return build_model(tiny_tagger_config(), pretrained=False)


@pytest.fixture(scope="module")
def images():
    gen = torch.Generator().manual_seed(1)
    imgs = torch.randn(2, 3, 64, 80, generator=gen)
    mask = torch.zeros(2, 64, 80, dtype=torch.bool)
    mask[1, :, 56:] = True
    return imgs, mask


def person_holding_cup():
    person = torch.tensor([0.5, 0.5, 0.2, 0.4])
    # pairs 0 and 1 share the same subject entity (person box, label 0)
    return Pairs(sub_boxes=torch.stack([person, person]),
                 obj_boxes=torch.tensor([[0.3, 0.3, 0.1, 0.1], [0.7, 0.6, 0.2, 0.2]]),
                 sub_labels=torch.tensor([0, 0]), obj_labels=torch.tensor([1, 2]))


def no_pairs():
    return Pairs(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, dtype=torch.long),
                 torch.zeros(0, dtype=torch.long))


def test_forward_shapes_gradients_and_frozen_learned_queries(tagger, images):
    tagger.train()
    out = tagger(*images, OBJ, REL, [person_holding_cup(), no_pairs()])
    p = tagger.cfg.num_pairs
    assert out.pred_sub_boxes.shape == (2, p, 4) and out.pred_rel_logits.shape == (2, p, len(REL))
    assert out.pred_obj_logits.shape == (2, p, len(OBJ))
    assert len(out.aux_outputs) == tagger.cfg.dec_layers - 1
    for key in OUTPUT_KEYS:
        assert torch.isfinite(getattr(out, key)).all(), key
    tagger.zero_grad()
    (out.pred_rel_logits.sum() + out.pred_sub_boxes.sum()).backward()
    for name in ("coord_proj.weight", "verb_tgt.weight", "reference_points_sub.weight", "reference_points_obj.weight"):
        grad = dict(tagger.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert not tagger.query_embed.weight.requires_grad


def test_queries_are_built_from_the_given_boxes_and_labels(tagger, images):
    tagger.eval()
    with torch.no_grad():
        enc = tagger.encode(*images, OBJ, REL)
        q = tagger.pair_queries(enc, [person_holding_cup(), no_pairs()])
    p = tagger.cfg.num_pairs
    given = person_holding_cup()
    states = enc.text_states[-1]
    # subject of pair k -> slot k, object -> slot P + k
    torch.testing.assert_close(q.tgt[0, 1], states[0, 0])
    torch.testing.assert_close(q.tgt[0, p + 1], states[0, 2])
    torch.testing.assert_close(q.query_pos[0, p], tagger.coord_proj(inverse_sigmoid(given.obj_boxes[0])))
    torch.testing.assert_close(q.reference[0, 0], tagger.reference_points_sub(q.query_pos[0, 0]).sigmoid())
    # unused slots are zero and masked; an image without pairs keeps slot 0 visible
    assert q.tgt[0, 2:p].abs().sum() == 0 and q.query_pos[0, p + 2:].abs().sum() == 0
    expected_pad = torch.ones(2, 2 * p, dtype=torch.bool)
    expected_pad[0, [0, 1, p, p + 1]] = False
    expected_pad[1, 0] = False
    assert torch.equal(q.padding_mask, expected_pad)
    assert q.self_attn_mask is None   # the duplicate-entity mask is a training-time device


def test_duplicate_entity_mask():
    labels = torch.tensor([[0, 0, 1, -1]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2], [0.0, 0.0, 0.0, 0.0]]])
    valid = torch.tensor([[True, True, True, False]])
    mask = duplicate_entity_mask(labels, boxes, valid)[0]
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0, 1] = expected[1, 0] = True   # same label and box; slot 2 has another label, slot 3 is unused
    assert torch.equal(mask, expected)


def test_training_mask_blocks_duplicates_for_every_head(tagger, images):
    tagger.train()
    with torch.no_grad():
        enc = tagger.encode(*images, OBJ, REL)
        q = tagger.pair_queries(enc, [person_holding_cup(), person_holding_cup()])
    nq, heads = tagger.cfg.num_queries, tagger.cfg.num_heads
    assert q.self_attn_mask.shape == (2 * heads, nq, nq)
    per_image = q.self_attn_mask.view(2, heads, nq, nq)
    assert per_image[:, :, 0, 1].all() and per_image[:, :, 1, 0].all()   # the shared person subject
    assert per_image.sum() == 2 * heads * 2

    compat = build_model(tiny_tagger_config(compat_original=True), pretrained=False).train()
    with torch.no_grad():
        enc = compat.encode(*images, OBJ, REL)
        q = compat.pair_queries(enc, [person_holding_cup(), person_holding_cup()])
    assert not q.self_attn_mask.any()   # [QUIRK]: any unused slot switched the mask off


def test_noise_only_in_training(tagger, images):
    with torch.no_grad():
        tagger.eval()
        enc = tagger.encode(*images, OBJ, REL)
        pairs = [person_holding_cup(), person_holding_cup()]
        clean = tagger.pair_queries(enc, pairs)
        again = tagger.pair_queries(enc, pairs)
        torch.testing.assert_close(clean.query_pos, again.query_pos)
        tagger.train()
        torch.manual_seed(0)
        noised = tagger.pair_queries(enc, pairs)
        assert not torch.allclose(noised.query_pos, clean.query_pos)
        tagger.noise = TaggerNoise(box=0.0, label=0.0)
        silent = tagger.pair_queries(enc, pairs)
        torch.testing.assert_close(silent.query_pos, clean.query_pos)
        torch.testing.assert_close(silent.tgt, clean.tgt)
        # label noise never picks "no objects" (the last object text)
        tagger.noise = TaggerNoise(box=0.0, label=1.0)
        states = enc.text_states[-1]
        for _ in range(20):
            q = tagger.pair_queries(enc, pairs)
            used = q.tgt[0, [0, 1]]
            assert not torch.isclose(used, states[0, len(OBJ) - 1]).all(-1).any()
    tagger.noise = TaggerNoise()


def test_jitter_and_flip_bounds():
    torch.manual_seed(0)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4]]).repeat(500, 1)
    noised = jitter_boxes(boxes, 0.4)
    assert ((noised[:, 0] - 0.5).abs() <= 0.4 * 0.1 + 1e-6).all()
    assert ((noised[:, 1] - 0.5).abs() <= 0.4 * 0.2 + 1e-6).all()
    assert ((noised[:, 3] - 0.4).abs() <= 0.4 * 0.4 + 1e-6).all()
    assert noised.std(0).min() > 0
    assert torch.equal(jitter_boxes(torch.zeros(3, 4), 0.4), torch.zeros(3, 4))   # "no object" stays
    labels = torch.zeros(2000, dtype=torch.long)
    flipped = flip_labels(labels, 0.2, 5)
    assert flipped.max() < 5 and 0.1 < (flipped != 0).float().mean() < 0.25   # 0.2 * 4/5 expected
    assert torch.equal(flip_labels(labels, 0.0, 5), labels)


def test_score_candidates_shapes_ranges_and_grouping(tagger, images):
    tagger.train()
    gen = torch.Generator().manual_seed(2)
    boxes = [torch.rand(6, 4, generator=gen) * 0.4 + 0.2, torch.rand(3, 4, generator=gen) * 0.4 + 0.2]
    labels = [torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0, 0, 1])]
    all_pairs = torch.tensor([(s, o) for s in range(6) for o in range(6) if s != o])   # 30 > P = 10
    pairs = [all_pairs[:23], torch.tensor([[0, 2], [1, 2]])]
    scores = tagger.score_candidates(*images, OBJ, REL, pairs, boxes, labels)
    assert tagger.training   # mode restored
    assert scores.shape == (25, len(REL)) and ((scores > 0) & (scores < 1)).all()
    # groups of at most P pairs, decoded independently: chunk by chunk gives the same scores
    parts = [tagger.score_candidates(images[0][:1], images[1][:1], OBJ, REL, [chunk], boxes[:1], labels[:1])
             for chunk in all_pairs[:23].split(tagger.cfg.num_pairs)]
    torch.testing.assert_close(scores[:23], torch.cat(parts), atol=1e-5, rtol=1e-4)
    one_by_one = tagger.score_candidates(*images, OBJ, REL, pairs, boxes, labels, max_groups=1)
    torch.testing.assert_close(scores, one_by_one, atol=1e-5, rtol=1e-4)
    # the scores are the sigmoid of the eval-mode relation logits of the same pairs
    tagger.eval()
    with torch.no_grad():
        given = Pairs(boxes[1][[0, 1]], boxes[1][[2, 2]], labels[1][[0, 1]], labels[1][[2, 2]])
        out = tagger(images[0][1:], images[1][1:], OBJ, REL, [given])
    torch.testing.assert_close(scores[23:], out.pred_rel_logits[0, :2].sigmoid(), atol=1e-5, rtol=1e-4)
    with pytest.raises(UserError, match="outside"):
        tagger.score_candidates(*images, OBJ, REL, [torch.tensor([[0, 9]]), pairs[1]], boxes, labels)


def test_input_errors(tagger, images):
    too_many = Pairs(torch.rand(11, 4), torch.rand(11, 4), torch.zeros(11, dtype=torch.long),
                     torch.zeros(11, dtype=torch.long))
    with pytest.raises(UserError, match="pair slots"):
        tagger(*images, OBJ, REL, [too_many, no_pairs()])
    bad_label = dataclasses.replace(person_holding_cup(), obj_labels=torch.tensor([1, 7]))
    with pytest.raises(UserError, match="object texts"):
        tagger(*images, OBJ, REL, [bad_label, no_pairs()])
    with pytest.raises(ConfigError, match="parsed"):
        RelationTagger(dataclasses.replace(tiny_tagger_config(), variant="parseda"), pretrained=False)


def make_target(num_boxes: int, pos: list[tuple[int, int]], num_rel: int = 3) -> Target:
    boxes = torch.rand(num_boxes, 4) * 0.5 + 0.2
    labels = torch.arange(num_boxes) % 3
    s = torch.tensor([p[0] for p in pos], dtype=torch.long)
    o = torch.tensor([p[1] for p in pos], dtype=torch.long)
    rel = torch.zeros(len(pos), num_rel)
    rel[:, 0] = 1
    return Target(0, (100, 100), (100, 100), boxes, labels, s, o, boxes[s], boxes[o], labels[s], labels[o], rel)


def test_add_negative_pairs():
    gen = torch.Generator().manual_seed(0)
    target = make_target(4, [(0, 1), (2, 3)])
    filled = add_negative_pairs(target, 10, gen)
    assert filled.sub_index[:2].tolist() == [0, 2] and filled.obj_index[:2].tolist() == [1, 3]
    assert len(filled.sub_index) == 10
    negatives = list(zip(filled.sub_index[2:].tolist(), filled.obj_index[2:].tolist()))
    assert len(set(negatives)) == 8 and all(s != o for s, o in negatives)
    assert not {(0, 1), (2, 3)} & set(negatives)
    assert filled.rel_labels[2:].abs().sum() == 0 and filled.rel_labels[:2].sum() == 2
    torch.testing.assert_close(filled.obj_boxes[5], target.boxes[filled.obj_index[5]])
    assert torch.equal(filled.sub_labels, target.labels[filled.sub_index])
    # every possible ordered pair used when there are fewer than the slots: 4 * 3 = 12
    assert len(add_negative_pairs(target, 50, gen).sub_index) == 12
    many = make_target(5, [(s, o) for s in range(5) for o in range(5) if s != o])
    sampled = add_negative_pairs(many, 6, gen)
    assert len(sampled.sub_index) == 6 and sampled.rel_labels.sum() == 6


def test_tagger_loss_pairs_query_i_with_given_pair_i(tagger, images):
    tagger.train()
    targets = [add_negative_pairs(make_target(4, [(0, 1)]), 5), add_negative_pairs(make_target(3, [(2, 0)]), 5)]
    out = tagger(*images, OBJ, REL, targets)
    crit = SetCriterion(tagger_loss_config())
    losses = crit(out, targets)
    assert torch.isfinite(losses["loss"])
    l1 = sum((out.pred_sub_boxes[b, :len(t.sub_boxes)] - t.sub_boxes).abs().sum() for b, t in enumerate(targets))
    assert losses["loss_sub_bbox"].item() == pytest.approx(l1.item() / 10, rel=1e-5)
    losses["loss"].backward()


def test_tagger_r50_parameter_total_on_meta_device():
    summary = model_summary(named_config("tagger_r50"))
    assert summary["total"] == 206_642_164
    groups = summary["groups"]
    assert groups["coord_proj"] == 4 * 256 + 256
    assert groups["verb_tgt"] == 200 * 256
    assert groups["query_embed"] == 200 * 768
