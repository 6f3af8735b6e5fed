"""Behaviour that forward parity with the original RLIPv2 code depends on (`compat_original`).

The original applies its label padding mask (labels whose pooled RoBERTa vector sums to <= 0 are
padding for the in-encoder language layers) whenever it encodes the label texts itself, in
training and in evaluation mode alike; its evaluation engines (HOI evaluation, Relation Tagger
inference) pass pre-encoded embeddings with an all-False mask. Here: raw texts <-> the original's
raw-text input, `label_embeds` in eval mode <-> its pre-encoded input.
"""
import dataclasses

import torch

from rlipv2_scale.models.build import build_model
from rlipv2_scale.models.config import named_config

OBJ = ["person", "bicycle", "horse", "cup", "dog", "no objects"]
REL = ["ride", "hold", "sit on", "walk", "feed"]


def _inputs():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 96, 128, generator=g)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, :, 90:] = True
    images[mask[:, None].expand_as(images)] = 0
    return images, mask


def _mixed_sign_labels(model) -> torch.Tensor:
    """Shift the pooler bias so that the labels' pooled sums straddle 0 (some masked, some not)."""
    enc = model.text_encoder
    tok = enc.tokenizer(OBJ + REL, padding=True, return_tensors="pt")
    with torch.no_grad():
        first = enc(**tok).last_hidden_state[:, 0]
        enc.pooler.dense.bias -= enc.pooler.dense(first).mean(0)
        enc.clear_cache()
        sums = model.encode_labels(OBJ, REL).sum(-1)
    negative = sums <= 0
    assert negative.any() and not negative.all(), "the test needs both masked and unmasked labels"
    return negative


def _record_label_mask(model, seen: list) -> None:
    forward = model.encoder.forward
    model.encoder.forward = lambda *args: (seen.append(args[7]), forward(*args))[1]


def _tiny(compat: bool, tagger: bool = False):
    cfg = named_config("tiny_tagger" if tagger else "tiny")
    torch.manual_seed(0)
    return build_model(dataclasses.replace(cfg, compat_original=compat), pretrained=False).eval()


def test_compat_eval_with_raw_texts_masks_labels_by_sign_and_pre_encoded_labels_do_not():
    images, mask = _inputs()
    outs = {}
    for compat in (True, False):
        model = _tiny(compat)
        negative = _mixed_sign_labels(model)
        seen: list = []
        _record_label_mask(model, seen)
        with torch.no_grad():
            raw = model(images, mask, OBJ, REL)                                       # model encodes the texts
            pre = model(images, mask, OBJ, REL, label_embeds=model.encode_labels(OBJ, REL))   # pre-encoded
        if compat:
            assert seen[0].shape == (2, len(OBJ) + len(REL))
            assert seen[0][0].tolist() == seen[0][1].tolist() == negative.tolist()
        else:
            assert seen[0] is None
        assert seen[1] is None
        outs[compat] = (raw, pre)
    raw, pre = outs[True]
    # the mask changes what the language layers see: raw-text and pre-encoded forwards differ
    assert (raw.pred_rel_logits - pre.pred_rel_logits).abs().max() > 1e-4
    # without compat both inputs give the same model
    raw, pre = outs[False]
    torch.testing.assert_close(raw.pred_rel_logits, pre.pred_rel_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(raw.pred_obj_boxes, pre.pred_obj_boxes, rtol=0, atol=1e-6)


def test_compat_training_masks_labels_by_sign_whatever_the_input():
    images, mask = _inputs()
    model = _tiny(True)
    _mixed_sign_labels(model)
    model.train()
    seen: list = []
    forward = model.encoder.forward
    model.encoder.forward = lambda *args: (seen.append((args[6], args[7])), forward(*args))[1]
    with torch.no_grad():
        embeds = model.encode_labels(OBJ, REL)   # training: dropout, so compare with the vectors used
        model(images, mask, OBJ, REL)
        model(images, mask, OBJ, REL, label_embeds=embeds)
    for lang, pad in seen:
        assert pad is not None and torch.equal(pad, lang.sum(-1) <= 0)
    assert torch.equal(seen[1][1][0], embeds.sum(-1) <= 0)


def test_compat_tagger_inference_uses_pre_encoded_labels():
    """The original tagger inference passed pre-encoded label embeddings: no label mask there."""
    images, mask = _inputs()
    tagger = _tiny(True, tagger=True)
    _mixed_sign_labels(tagger)
    seen: list = []
    _record_label_mask(tagger, seen)
    boxes = [torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.3]])] * 2
    labels = [torch.tensor([0, 3])] * 2
    pairs = [torch.tensor([[0, 1]])] * 2
    scores = tagger.score_candidates(images, mask, OBJ, REL, pairs, boxes, labels)
    assert scores.shape == (2, len(REL))
    assert seen == [None]


def _all_negative_labels(model) -> None:
    """Shift the pooler bias until every label's pooled sum is <= 0 (the original masks them all)."""
    enc = model.text_encoder
    tok = enc.tokenizer(OBJ + REL, padding=True, return_tensors="pt")
    with torch.no_grad():
        first = enc(**tok).last_hidden_state[:, 0]
        enc.pooler.dense.bias -= enc.pooler.dense(first).mean(0)
        for _ in range(100):
            enc.clear_cache()
            if (model.encode_labels(OBJ, REL).sum(-1) <= 0).all():
                return
            enc.pooler.dense.bias -= 0.05
    raise AssertionError("could not make every pooled label sum negative")


def test_compat_language_layers_with_every_label_masked_attend_as_unmasked(monkeypatch):
    """The original's RoBERTa layers add transformers-4.5.1's -10000 to masked keys: when every label of an
    image is masked (all pooled sums <= 0) the constant shift cancels in the softmax and the layer attends as
    without a mask. finfo.min (newer transformers) would swamp the scores into uniform attention instead."""
    from rlipv2_scale.models import alif

    pad = torch.tensor([[True, False, True]])
    assert alif._extended_mask(pad, torch.float32, compat=True)[0, 0, 0].tolist() == [-10000.0, 0.0, -10000.0]
    assert alif._extended_mask(pad, torch.float32)[0, 0, 0, 0] == torch.finfo(torch.float32).min

    images, mask = _inputs()
    model = _tiny(True)
    _all_negative_labels(model)
    seen: list = []
    _record_label_mask(model, seen)
    with torch.no_grad():
        masked = model(images, mask, OBJ, REL).pred_rel_logits      # raw texts: every label masked
        embeds = model.encode_labels(OBJ, REL)
        unmasked = model(images, mask, OBJ, REL, label_embeds=embeds).pred_rel_logits   # no label mask
        assert seen[0].all() and seen[1] is None
        # equal up to the rounding of scores shifted by -10000 (float32 spacing ~1e-3 there)
        assert (masked - unmasked).abs().max() < 1e-3
        monkeypatch.setattr(alif, "ORIGINAL_MASK_VALUE", torch.finfo(torch.float32).min)
        swamped = model(images, mask, OBJ, REL).pred_rel_logits
    assert (swamped - unmasked).abs().max() > 1e-2
