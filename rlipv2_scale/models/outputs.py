"""Typed model outputs, in the manner of transformers' `ModelOutput`s.

`RelationOutput` is what `RLIPv2` and the Relation Tagger return: the last decoder layer's
predictions, the earlier layers' in `aux_outputs` and the relation-text embeddings. Code reads the
fields by attribute. Each output is also the dict of its set fields (`out["pred_rel_logits"]`,
`.keys()`, `.items()`), as transformers' outputs are: DeepSpeed's ZeRO-3 hooks find the tensors of
dict outputs only (their backward hooks would otherwise miss the model's output), and code written
for the original's output dicts keeps working. Consumers take such dicts too (`RelationOutput.of`).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from torch import Tensor


class _FieldDict(dict):
    """A dataclass kept equal to the dict of its fields that are not None."""

    __dataclass_fields__: ClassVar[dict[str, Any]]   # set by @dataclass on the subclasses

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in self.__dataclass_fields__:
            if value is None:
                self.pop(name, None)
            else:
                super().__setitem__(name, value)

    def __setitem__(self, key: str, value: Any) -> None:
        # DeepSpeed replaces the tensors of a dict output in place, through this
        if key not in self.__dataclass_fields__:
            raise KeyError(f"{type(self).__name__} has no field {key!r}")
        setattr(self, key, value)


@dataclass
class RelationPredictions(_FieldDict):
    """The predictions of one decoder layer for P query pairs (Lo object texts, "no objects" last;
    Lr relation texts)."""

    pred_sub_boxes: Tensor    # [B, P, 4] subject boxes, cxcywh in [0, 1]
    pred_obj_boxes: Tensor    # [B, P, 4] object boxes, cxcywh in [0, 1]
    pred_sub_logits: Tensor   # [B, P, Lo] subject class logits over the object texts
    pred_obj_logits: Tensor   # [B, P, Lo] object class logits over the object texts
    pred_rel_logits: Tensor   # [B, P, Lr] relation logits over the relation texts (sigmoid)

    @classmethod
    def of(cls, outputs: Mapping[str, Any]) -> RelationPredictions:
        """`outputs` itself, or the predictions of a dict with the field names (the original's outputs)."""
        if isinstance(outputs, cls):
            return outputs
        missing = [k for k in OUTPUT_KEYS if k not in outputs]
        if missing:
            raise KeyError(f"model outputs lack {missing}; predictions need {list(OUTPUT_KEYS)}")
        return RelationPredictions(**{k: outputs[k] for k in OUTPUT_KEYS})


OUTPUT_KEYS = tuple(f.name for f in fields(RelationPredictions))


@dataclass
class RelationOutput(RelationPredictions):
    """The model's output: the last decoder layer's predictions and the rest."""

    aux_outputs: list[RelationPredictions] = field(default_factory=list)   # the earlier layers, first to last
    rel_text_embeds: Tensor | None = None   # [Lr, dl] pre-fusion pooled relation-text embeddings (RPL)

    @classmethod
    def of(cls, outputs: Mapping[str, Any]) -> RelationOutput:
        if isinstance(outputs, cls):
            return outputs
        return RelationOutput(**RelationPredictions.of(outputs),
                              aux_outputs=[RelationPredictions.of(a) for a in outputs.get("aux_outputs", [])],
                              rel_text_embeds=outputs.get("rel_text_embeds"))
