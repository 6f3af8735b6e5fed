"""Typed model outputs: attribute and dict views agree, dicts convert, wrappers keep the type."""
import pytest
import torch

from rlipv2_scale.models.outputs import OUTPUT_KEYS, RelationOutput, RelationPredictions


def _layer(dtype=torch.float32) -> RelationPredictions:
    return RelationPredictions(*(torch.full((1, 2, 3), float(i), dtype=dtype) for i in range(len(OUTPUT_KEYS))))


def _output(dtype=torch.float32) -> RelationOutput:
    return RelationOutput(**_layer(dtype), aux_outputs=[_layer(dtype), _layer(dtype)],
                          rel_text_embeds=torch.ones(3, 4, dtype=dtype))


def test_output_keys_are_the_prediction_fields_in_order():
    assert OUTPUT_KEYS == ("pred_sub_boxes", "pred_obj_boxes", "pred_sub_logits", "pred_obj_logits",
                           "pred_rel_logits")


def test_the_dict_view_follows_the_fields():
    out = _output()
    assert list(out) == [*OUTPUT_KEYS, "aux_outputs", "rel_text_embeds"]
    assert out["pred_rel_logits"] is out.pred_rel_logits and set(out.aux_outputs[0]) == set(OUTPUT_KEYS)
    new = torch.zeros(1, 2, 3)
    out["pred_rel_logits"] = new           # as DeepSpeed's hooks replace a dict output's tensors
    assert out.pred_rel_logits is new
    out.pred_sub_boxes = new
    assert out["pred_sub_boxes"] is new
    out.rel_text_embeds = None             # unset fields are not keys, as in transformers' outputs
    assert "rel_text_embeds" not in out and out.rel_text_embeds is None
    with pytest.raises(KeyError, match="no field 'loss'"):
        out["loss"] = new


def test_of_converts_dicts_and_names_what_is_missing():
    out = _output()
    assert RelationOutput.of(out) is out
    original = {**{k: out[k] for k in OUTPUT_KEYS}, "aux_outputs": [dict(a) for a in out.aux_outputs], "extra": 1}
    converted = RelationOutput.of(original)
    assert type(converted) is RelationOutput and converted.rel_text_embeds is None
    assert all(type(a) is RelationPredictions for a in converted.aux_outputs)
    assert converted.aux_outputs[1].pred_obj_logits is out.aux_outputs[1].pred_obj_logits
    with pytest.raises(KeyError, match=r"lack \['pred_rel_logits'\]"):
        RelationPredictions.of({k: out[k] for k in OUTPUT_KEYS[:-1]})


def test_trainer_fp32_cast_keeps_the_output_typed():
    from rlipv2_scale.train.engine import _to_fp32

    out = _output(torch.bfloat16)
    cast = _to_fp32(out)
    assert type(cast) is RelationOutput and all(type(a) is RelationPredictions for a in cast.aux_outputs)
    assert cast.pred_rel_logits.dtype == cast.aux_outputs[1].pred_sub_boxes.dtype == torch.float32
    assert cast.rel_text_embeds.dtype == cast["pred_obj_boxes"].dtype == torch.float32
    assert out.pred_rel_logits.dtype == torch.bfloat16   # the model's output is left as it was


def test_zero3_hooks_reach_every_output_tensor():
    """ZeRO-3 wraps the tensors of a module's output to run its backward hooks; an output type it
    cannot look into would skip them."""
    utils = pytest.importorskip("deepspeed.runtime.zero.utils")
    out = _output()
    seen = []
    wrapped = utils.apply_to_tensors_only(lambda t: seen.append(t) or t.clone(), out)
    assert wrapped is out and len(seen) == 3 * len(OUTPUT_KEYS) + 1
    assert all(not any(x is t for x in seen) for t in (out.pred_rel_logits, out.aux_outputs[0].pred_sub_boxes))
