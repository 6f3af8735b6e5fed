"""RLIPv2 end to end on the tiny config: output contract, gradients, variants, label caching."""
import dataclasses

import pytest
import torch

from rlipv2_scale.errors import UserError
from rlipv2_scale.models.build import build_model
from rlipv2_scale.models.config import named_config
from rlipv2_scale.models.outputs import OUTPUT_KEYS, RelationOutput
from rlipv2_scale.models.rlipv2 import RLIPv2, resize_query_rows

OBJ = ["person", "bicycle", "horse", "no objects"]
REL = ["ride", "hold", "sit on"]


def _inputs(b: int = 2, h: int = 96, w: int = 128):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(b, 3, h, w, generator=g)
    mask = torch.zeros(b, h, w, dtype=torch.bool)
    mask[-1, :, w - 30:] = True   # the last image is narrower and shorter than the batch
    mask[-1, h - 20:] = True
    images[mask[:, None].expand_as(images)] = 0
    return images, mask


def _tiny(**changes) -> RLIPv2:
    cfg = named_config("tiny")
    alif = changes.pop("alif", None)
    if alif:
        cfg.alif = dataclasses.replace(cfg.alif, **alif)
    torch.manual_seed(0)
    return build_model(dataclasses.replace(cfg, **changes))


def _total(out: RelationOutput) -> torch.Tensor:
    return sum(getattr(layer, k).float().square().mean() for layer in [out, *out.aux_outputs] for k in OUTPUT_KEYS)


def test_forward_shapes_and_ranges():
    model = _tiny()
    images, mask = _inputs()
    out = model(images, mask, OBJ, REL)
    assert isinstance(out, RelationOutput)
    p = model.cfg.num_pairs
    assert out.pred_sub_boxes.shape == out.pred_obj_boxes.shape == (2, p, 4)
    assert out.pred_sub_logits.shape == out.pred_obj_logits.shape == (2, p, len(OBJ))
    assert out.pred_rel_logits.shape == (2, p, len(REL))
    assert out.rel_text_embeds.shape == (len(REL), model.cfg.text.hidden_size)
    assert len(out.aux_outputs) == model.cfg.dec_layers - 1
    for layer in out.aux_outputs:
        assert set(layer) == set(OUTPUT_KEYS)
        assert layer.pred_rel_logits.shape == out.pred_rel_logits.shape
    for boxes in (out.pred_sub_boxes, out.pred_obj_boxes):
        assert ((boxes > 0) & (boxes < 1)).all()
    assert all(torch.isfinite(getattr(out, k)).all() for k in OUTPUT_KEYS)


def test_rel_text_embeds_are_the_pooled_prefusion_embeddings():
    model = _tiny().eval()
    images, mask = _inputs()
    with torch.no_grad():
        out = model(images, mask, OBJ, REL)
        alone = model.text_encoder.embed(REL)
    torch.testing.assert_close(out.rel_text_embeds, alone)


@pytest.mark.parametrize("changes", [
    {},
    {"compat_original": True},
    {"variant": "parsed"},
    {"variant": "parsed", "relation_query": "sum"},
    {"alif": {"fusion": "none"}},
    {"alif": {"fusion": "all_levels"}},
    {"alif": {"gate": "glip"}},
], ids=["parseda", "compat", "parsed_mbf", "parsed_sum", "no_fusion", "all_levels", "glip_gate"])
def test_every_trainable_parameter_receives_a_gradient(changes):
    model = _tiny(**changes)
    images, mask = _inputs()
    _total(model(images, mask, OBJ, REL)).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    # only the original's relation-decoder box refiners are frozen in the tiny (random) model
    assert frozen and all(n.split(".")[0] in ("sub_bbox_embed", "obj_bbox_embed") for n in frozen)
    assert {int(n.split(".")[1]) for n in frozen} == set(range(model.cfg.dec_layers, 2 * model.cfg.dec_layers))


def test_precomputed_label_embeddings_give_the_same_outputs_and_eval_cache_is_reused():
    model = _tiny().eval()
    images, mask = _inputs()
    with torch.no_grad():
        first = model(images, mask, OBJ, REL)
        cached = model.encode_labels(OBJ, REL)
        assert model.encode_labels(OBJ, REL) is cached           # eval + no_grad: cached
        again = model(images, mask, OBJ, REL, label_embeds=cached)
    for key in OUTPUT_KEYS:
        torch.testing.assert_close(getattr(first, key), getattr(again, key))
    model.train()
    assert model.encode_labels(OBJ, REL) is not cached          # training never uses the cache
    with pytest.raises(UserError, match="label_embeds has"):
        model(images, mask, OBJ, REL[:2], label_embeds=cached)


def test_activation_checkpointing_does_not_change_outputs_or_gradients():
    images, mask = _inputs()
    plain = _tiny()
    ckpt = _tiny(checkpoint_encoder=True, alif={"checkpointing": True},
                 backbone=dataclasses.replace(named_config("tiny").backbone, checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    plain.eval()
    ckpt.eval()   # no dropout: outputs must match exactly
    outs = []
    for model in (plain, ckpt):
        with torch.enable_grad():
            model.train(False)
            model.encoder.training = True   # exercise the checkpointed path without dropout noise
            model.backbone.training = True
            out = model(images, mask, OBJ, REL)
            _total(out).backward()
        outs.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(outs[0][0].pred_rel_logits, outs[1][0].pred_rel_logits)
    assert outs[0][1].keys() == outs[1][1].keys()
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(grad, outs[1][1][name], rtol=1e-4, atol=1e-6)


def test_compat_relation_refiners_move_the_reference_only_in_compat_mode():
    """The frozen refiners change relation outputs only when used (compat); default ignores them."""
    images, mask = _inputs()
    for compat, should_change in ((False, False), (True, True)):
        model = _tiny(compat_original=compat).eval()
        with torch.no_grad():
            before = model(images, mask, OBJ, REL).pred_rel_logits
            for mlp in model.sub_bbox_embed[model.cfg.dec_layers:]:
                mlp.layers[-1].bias.fill_(1.0)
            after = model(images, mask, OBJ, REL).pred_rel_logits
        assert (not torch.allclose(before, after)) == should_change


def test_resize_query_rows_pairs_subjects_and_objects():
    weight = torch.arange(10.0)[:, None]   # rows 0-4 subjects, 5-9 objects
    assert resize_query_rows(weight, 6).flatten().tolist() == [0, 1, 2, 5, 6, 7]
    assert resize_query_rows(weight, 6, compat_original=True).flatten().tolist() == [0, 1, 2, 3, 4, 5]
    assert resize_query_rows(weight, 10) is weight
    with pytest.raises(UserError, match="cannot grow"):
        resize_query_rows(weight, 12)


def test_compat_label_padding_mask_follows_the_embedding_sign_in_training_not_on_given_embeds_in_eval():
    images, mask = _inputs()
    embeds = torch.randn(len(OBJ) + len(REL), 64)
    embeds[1] = -embeds[1].abs()
    embeds[2] = embeds[2].abs()
    for compat in (True, False):
        model = _tiny(compat_original=compat)
        seen = []
        forward = model.encoder.forward
        model.encoder.forward = lambda *args: (seen.append(args[7]), forward(*args))[1]
        model.train()
        model(images, mask, OBJ, REL, label_embeds=embeds)
        model.eval()
        with torch.no_grad():
            model(images, mask, OBJ, REL, label_embeds=embeds)
        if compat:
            assert seen[0].shape == (2, len(embeds)) and seen[0][0].tolist() == (embeds.sum(-1) <= 0).tolist()
            assert seen[0][0, 1] and not seen[0][0, 2]
        else:
            assert seen[0] is None
        assert seen[1] is None   # evaluation: never masked
