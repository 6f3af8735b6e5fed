import math

import pytest
import torch
import torch.nn.functional as F

from rlipv2_scale.errors import ConfigError
from rlipv2_scale.models.losses import (
    LossConfig,
    SetCriterion,
    hard_focal_loss,
    relation_pseudo_targets,
    soft_focal_loss,
)

from targets import make_target


def tiny_case():
    """1 image, 2 query pairs, 1 GT pair; query 0 is the match (identity matching)."""
    outputs = {
        "pred_sub_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]]]),
        "pred_obj_boxes": torch.tensor([[[0.2, 0.2, 0.2, 0.2], [0.8, 0.8, 0.1, 0.1]]]),
        "pred_sub_logits": torch.tensor([[[0.0, math.log(3.0), 0.0], [1.0, 0.0, 2.0]]]),
        "pred_obj_logits": torch.tensor([[[math.log(2.0), 0.0, 0.0], [0.0, 0.0, 0.0]]]),
        "pred_rel_logits": torch.tensor([[[0.0, math.log(3.0)], [math.log(1 / 3), 0.0]]]),
    }
    # sub GIoU 0.25 (L1 0.4), obj GIoU -1/3 (L1 0.4), see test_matcher
    target = make_target([0.5, 0.5, 0.4, 0.4], [0.6, 0.2, 0.2, 0.2], [0], [1], [[1.0, 0.0]])
    return outputs, target


def test_classification_is_weighted_mean_ce_with_no_objects_weight():
    outputs, target = tiny_case()
    crit = SetCriterion(LossConfig(matching="identity", pseudo_targets=False))
    losses = crit(outputs, [target])
    # subject: query 0 -> class 0 (p = 1/5), query 1 -> "no objects" (index 2), weight 0.1
    sub1 = -F.log_softmax(torch.tensor([1.0, 0.0, 2.0]), 0)[2].item()
    ce_sub = (1.0 * -math.log(1 / 5) + 0.1 * sub1) / 1.1
    # object: query 0 -> class 1 (p = 1/4), query 1 -> "no objects" (p = 1/3)
    ce_obj = (1.0 * -math.log(1 / 4) + 0.1 * -math.log(1 / 3)) / 1.1
    assert losses["loss_ce"].item() == pytest.approx(ce_sub + ce_obj, rel=1e-5)
    assert losses["sub_class_error"].item() == pytest.approx(100.0)  # argmax is class 1
    assert losses["obj_class_error"].item() == pytest.approx(100.0)  # argmax is class 0

    no_sub = SetCriterion(LossConfig(matching="identity", pseudo_targets=False, subject_class=False))
    assert no_sub(outputs, [target])["loss_ce"].item() == pytest.approx(ce_obj, rel=1e-5)


def test_box_losses_and_normalisation():
    outputs, target = tiny_case()
    crit = SetCriterion(LossConfig(matching="identity", pseudo_targets=False))
    losses = crit(outputs, [target])
    assert losses["loss_sub_bbox"].item() == pytest.approx(0.4, rel=1e-5)
    assert losses["loss_sub_giou"].item() == pytest.approx(0.75, rel=1e-5)
    # object terms divide by (#non-zero object boxes + 1e-4)
    assert losses["loss_obj_bbox"].item() == pytest.approx(0.4 / 1.0001, rel=1e-5)
    assert losses["loss_obj_giou"].item() == pytest.approx((1 + 1 / 3) / 1.0001, rel=1e-5)
    # subject terms divide by the given number of pairs (clamped at 1)
    halved = crit(outputs, [target], num_pairs=2.0)
    assert halved["loss_sub_bbox"].item() == pytest.approx(0.2, rel=1e-5)
    assert crit(outputs, [target], num_pairs=0.0)["loss_sub_bbox"].item() == pytest.approx(0.4, rel=1e-5)


def test_no_object_box_is_excluded_from_object_box_losses():
    outputs, _ = tiny_case()
    target = make_target([0.5, 0.5, 0.4, 0.4], [0.0, 0.0, 0.0, 0.0], [0], [1], [[1.0, 0.0]])
    losses = SetCriterion(LossConfig(matching="identity", pseudo_targets=False))(outputs, [target])
    assert losses["loss_obj_bbox"].item() == 0.0
    assert losses["loss_obj_giou"].item() == 0.0
    assert losses["loss_sub_bbox"].item() == pytest.approx(0.4, rel=1e-5)


def test_soft_focal_loss_hand_computed():
    logits = torch.tensor([[0.0, math.log(3.0), -2.0]])
    t = torch.tensor([[0.6, 0.0, 0.0]])
    p = [0.5, 0.75, 1 / (1 + math.e ** 2)]
    terms = [
        (0.6 - p[0]) ** 2 * (0.6 * math.log(p[0]) + 0.4 * math.log(1 - p[0])),
        p[1] ** 2 * math.log(1 - p[1]),
        p[2] ** 2 * math.log(1 - p[2]),
    ]
    assert soft_focal_loss(logits, t).item() == pytest.approx(-sum(terms) / 1, rel=1e-5)
    # no positives: the plain sum
    assert soft_focal_loss(logits, torch.zeros_like(t)).item() == pytest.approx(
        -(p[0] ** 2 * math.log(0.5) + sum(terms[1:])), rel=1e-5)
    # extreme logits stay finite (clamped probabilities)
    assert torch.isfinite(soft_focal_loss(torch.tensor([[100.0, -100.0]]), torch.tensor([[0.0, 1.0]])))


def test_hard_focal_loss_hand_computed():
    logits = torch.tensor([[0.0, math.log(3.0), -2.0, 0.0]])
    t = torch.tensor([[1.0, 0.0, 0.0, 0.5]])
    p = [0.5, 0.75, 1 / (1 + math.e ** 2), 0.5]
    pos = math.log(p[0]) * (1 - p[0]) ** 2
    neg = math.log(1 - p[1]) * p[1] ** 2 + math.log(1 - p[2]) * p[2] ** 2 + math.log(0.5) * 0.25 * 0.5 ** 4
    assert hard_focal_loss(logits, t).item() == pytest.approx(-(pos + neg), rel=1e-5)
    t2 = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    pos2 = math.log(p[0]) * 0.25 + math.log(p[1]) * 0.25 ** 2
    neg2 = math.log(1 - p[2]) * p[2] ** 2 + math.log(0.5) * 0.25
    assert hard_focal_loss(logits, t2).item() == pytest.approx(-(pos2 + neg2) / 2, rel=1e-5)


def embeds_on_a_line(xs, dim=8):
    e = torch.zeros(len(xs), dim)
    e[:, 0] = torch.tensor(xs, dtype=torch.float32)
    return e


def test_relation_pseudo_targets_hand_computed():
    emb = embeds_on_a_line([0.0, 1.0, 3.0, 10.0])
    # Distances from text 0: [0, 1, 3, 10] -> S_0 = [10, 9, 7, 0] -> /10 -> positive zeroed
    u = relation_pseudo_targets(torch.tensor([[1.0, 0, 0, 0]]), emb, threshold=0.3)
    torch.testing.assert_close(u, torch.tensor([[0.0, 0.9, 0.7, 0.0]]))
    # Two positives: S_0 + S_1 = [10,9,7,0] + [8,9,7,0] = [18,18,14,0] -> /18
    u = relation_pseudo_targets(torch.tensor([[1.0, 1, 0, 0]]), emb, threshold=0.3)
    torch.testing.assert_close(u, torch.tensor([[0.0, 0.0, 14 / 18, 0.0]]))
    # Threshold: from text 3, S_3 = [0, 1, 3, 10] -> [0, .1, .3, 1]
    u = relation_pseudo_targets(torch.tensor([[0.0, 0, 0, 1]]), emb, threshold=0.2)
    torch.testing.assert_close(u, torch.tensor([[0.0, 0.0, 0.3, 0.0]]))
    u = relation_pseudo_targets(torch.tensor([[0.0, 0, 0, 1]]), emb, threshold=0.05)
    torch.testing.assert_close(u, torch.tensor([[0.0, 0.1, 0.3, 0.0]]))
    # A pair without positives gets no pseudo-targets (and no NaN)
    u = relation_pseudo_targets(torch.zeros(1, 4), emb, threshold=0.3)
    torch.testing.assert_close(u, torch.zeros(1, 4))


def test_relation_targets_combine_quality_and_pseudo_labels():
    outputs, target = tiny_case()
    outputs["pred_rel_logits"] = torch.tensor([[[0.0, 0.5, -1.0], [0.3, -0.2, 0.1]]])
    target.rel_labels = torch.tensor([[1.0, 0.0, 0.0]])
    outputs["rel_text_embeds"] = embeds_on_a_line([0.0, 1.0, 10.0])
    quality = (min(0.25, -1 / 3) + 1) / 2  # RQL: (min GIoU + 1) / 2
    # u from text 0: S_0 = [10, 9, 0] / 10 -> [0, 0.9, 0]
    expected_t = torch.zeros(1, 2, 3)
    expected_t[0, 0] = torch.tensor([1.0, 0.9, 0.0]) * quality
    expected = soft_focal_loss(outputs["pred_rel_logits"], expected_t)
    losses = SetCriterion(LossConfig(matching="identity"))(outputs, [target])
    assert losses["loss_rel"].item() == pytest.approx(expected.item(), rel=1e-5)

    expected_t[0, 0] = torch.tensor([1.0, 0.0, 0.0]) * quality
    no_pseudo = SetCriterion(LossConfig(matching="identity", pseudo_targets=False))(outputs, [target])
    assert no_pseudo["loss_rel"].item() == pytest.approx(soft_focal_loss(outputs["pred_rel_logits"], expected_t).item(), rel=1e-5)

    hard_t = torch.zeros(1, 2, 3)
    hard_t[0, 0, 0] = 1
    hard = SetCriterion(LossConfig(matching="identity", rel_loss="focal", pseudo_targets=False))(outputs, [target])
    assert hard["loss_rel"].item() == pytest.approx(hard_focal_loss(outputs["pred_rel_logits"], hard_t).item(), rel=1e-5)


def test_pseudo_targets_are_detached_unless_compat_original():
    outputs, target = tiny_case()
    outputs["pred_rel_logits"] = torch.randn(1, 2, 3)
    target.rel_labels = torch.tensor([[1.0, 0.0, 0.0]])
    for compat in (False, True):
        emb = (embeds_on_a_line([0.0, 1.0, 10.0]) + 0.01 * torch.randn(3, 8)).requires_grad_()
        outs = dict(outputs, rel_text_embeds=emb)
        loss = SetCriterion(LossConfig(matching="identity", compat_original=compat))(outs, [target])["loss"]
        if compat:
            (grad,) = torch.autograd.grad(loss, emb)
            assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        else:
            assert not loss.requires_grad


def random_outputs(b, p, lo, lr, gen, requires_grad=False):
    def boxes():
        return torch.cat([torch.rand(b, p, 2, generator=gen) * 0.6 + 0.2,
                          torch.rand(b, p, 2, generator=gen) * 0.3 + 0.05], -1)
    out = {
        "pred_sub_boxes": boxes(), "pred_obj_boxes": boxes(),
        "pred_sub_logits": torch.randn(b, p, lo, generator=gen),
        "pred_obj_logits": torch.randn(b, p, lo, generator=gen),
        "pred_rel_logits": torch.randn(b, p, lr, generator=gen),
    }
    return {k: v.requires_grad_(requires_grad) for k, v in out.items()}


def random_targets(lo, lr, gen, sizes=(3, 1)):
    targets = []
    for n in sizes:
        sub = torch.cat([torch.rand(n, 2, generator=gen) * 0.6 + 0.2, torch.rand(n, 2, generator=gen) * 0.3 + 0.05], -1)
        obj = torch.cat([torch.rand(n, 2, generator=gen) * 0.6 + 0.2, torch.rand(n, 2, generator=gen) * 0.3 + 0.05], -1)
        rel = torch.zeros(n, lr)
        rel[torch.arange(n), torch.randint(0, lr, (n,), generator=gen)] = 1
        targets.append(make_target(sub, obj, torch.randint(0, lo - 1, (n,), generator=gen),
                                   torch.randint(0, lo - 1, (n,), generator=gen), rel))
    return targets


def test_aux_losses_have_their_own_matching_and_enter_the_total():
    gen = torch.Generator().manual_seed(0)
    lo, lr = 5, 4
    outputs = random_outputs(2, 6, lo, lr, gen, requires_grad=True)
    outputs["aux_outputs"] = [random_outputs(2, 6, lo, lr, gen, requires_grad=True) for _ in range(2)]
    outputs["rel_text_embeds"] = torch.randn(lr, 16, generator=gen)
    targets = random_targets(lo, lr, gen)
    crit = SetCriterion()
    losses = crit(outputs, targets)
    for i, aux in enumerate(outputs["aux_outputs"]):
        alone = crit(dict(aux, rel_text_embeds=outputs["rel_text_embeds"]), targets)
        for k in crit.weight_dict:
            assert losses[f"{k}_{i}"].item() == pytest.approx(alone[k].item(), rel=1e-5), k
    expected = sum(w * losses[k + s] for s in ("", "_0", "_1") for k, w in crit.weight_dict.items())
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    losses["loss"].backward()
    for layer in [outputs, *outputs["aux_outputs"]]:
        for k in ("pred_sub_boxes", "pred_obj_boxes", "pred_sub_logits", "pred_obj_logits", "pred_rel_logits"):
            assert layer[k].grad is not None and torch.isfinite(layer[k].grad).all()
    without_aux = SetCriterion(LossConfig(aux_loss=False))(outputs, targets)
    assert "loss_ce_0" not in without_aux


def test_bf16_outputs_give_fp32_losses_and_nan_propagates():
    gen = torch.Generator().manual_seed(1)
    outputs = random_outputs(2, 5, 4, 3, gen)
    outputs["rel_text_embeds"] = torch.randn(3, 8, generator=gen)
    targets = random_targets(4, 3, gen, sizes=(2, 0))
    bf16 = {k: v.bfloat16() for k, v in outputs.items()}
    fp32 = {k: v.float() for k, v in bf16.items()}
    crit = SetCriterion()
    a, b = crit(bf16, targets), crit(fp32, targets)
    assert a["loss"].dtype == torch.float32
    assert a["loss"].item() == pytest.approx(b["loss"].item(), rel=1e-6)
    outputs["pred_sub_boxes"][0, 0, 0] = float("nan")
    assert not torch.isfinite(crit(outputs, targets)["loss"])


def test_empty_batch_gives_finite_zero_box_losses():
    gen = torch.Generator().manual_seed(2)
    outputs = random_outputs(1, 4, 4, 3, gen, requires_grad=True)
    targets = random_targets(4, 3, gen, sizes=(0,))
    losses = SetCriterion(LossConfig(pseudo_targets=False))(outputs, targets)
    assert losses["loss_sub_bbox"].item() == 0.0 and losses["loss_obj_giou"].item() == 0.0
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()


def test_config_errors():
    with pytest.raises(ConfigError, match="pseudo_targets"):
        LossConfig(rel_loss="focal", pseudo_targets=True)
    with pytest.raises(ConfigError, match="pseudo_threshold"):
        LossConfig(pseudo_threshold=1.5)
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(KeyError, match="rel_text_embeds"):
        SetCriterion()(random_outputs(1, 4, 4, 3, gen), random_targets(4, 3, gen, sizes=(1,)))


def _num_pairs_worker(rank: int, world_size: int, port: int, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        outputs, target = tiny_case()
        # rank 0 holds 1 GT pair, rank 1 holds 3 copies of it -> (1 + 3) / 2 = 2 pairs per rank
        targets = [target] if rank == 0 else [target, target, target]
        outputs = {k: v.expand(len(targets), *v.shape[1:]) for k, v in outputs.items()}
        losses = SetCriterion(LossConfig(matching="identity", pseudo_targets=False))(outputs, targets)
        queue.put((rank, losses["loss_sub_bbox"].item()))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_subject_box_losses_normalise_by_pairs_averaged_over_ranks():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_num_pairs_worker, args=(2, port, queue), nprocs=2, start_method="spawn")
    results = dict(queue.get(timeout=60) for _ in range(2))
    # L1 per matched pair is 0.4: rank 0 sums 0.4, rank 1 sums 1.2; both divide by 2
    assert results[0] == pytest.approx(0.2, rel=1e-5)
    assert results[1] == pytest.approx(0.6, rel=1e-5)
