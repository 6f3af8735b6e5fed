"""Names of this implementation's parameters in the original RLIPv2 checkpoints (for importing them).

Every parameter and buffer maps to exactly one original key of the same shape (tested against the
original's state-dict layouts). Not covered here: the original's duplicate entries of the box MLPs
inside its decoders (aliases of the top-level ones), `relative_position_index` buffers (recomputed
by timm), and Swin's patch-merging weights, which timm orders differently
(`timm.models.swin_transformer.checkpoint_filter_fn` converts them).
"""
from __future__ import annotations

import re

_TRANSFORMER = ("level_embed", "text_encoder.", "encoder.", "resizer.", "ho_decoder.", "verb_decoder.",
                "verb_tgt_generator.", "reference_points_sub.", "reference_points_obj.", "coord_proj.", "verb_tgt.")
_RENAMES = (
    (re.compile(r"^classifier\.projection\."), "projection_text."),
    (re.compile(r"^classifier\.bias_obj$"), "bias_obj_a"),
    (re.compile(r"^classifier\.bias_rel$"), "bias_pred_a"),
    (re.compile(r"^encoder\.fusion_layers\.(\d+)\.(layer_norm_[vl]\.|gamma_[vl]$)"), r"encoder.VLFuse_layers.\1.b_attn.\2"),
    (re.compile(r"^encoder\.fusion_layers\.(\d+)\."), r"encoder.VLFuse_layers.\1.b_attn.attn."),
    (re.compile(r"^backbone\.norms\.(\d+)\."), lambda m: f"backbone.0.body.norm{int(m.group(1)) + 1}."),
    # timm puts patch merging at the start of stages 1-3, the original at the end of stages 0-2
    (re.compile(r"^backbone\.body\.layers\.(\d+)\.downsample\."),
     lambda m: f"backbone.0.body.layers.{int(m.group(1)) - 1}.downsample."),
    (re.compile(r"^backbone\.body\."), "backbone.0.body."),
)


def original_key(name: str, variant: str = "parseda") -> str:
    """The original checkpoint's key for parameter / buffer `name` of `RLIPv2` (`variant` of its config)."""
    for pattern, repl in _RENAMES:
        new, n = pattern.subn(repl, name, count=1)
        if n:
            name = new
            break
    if name.startswith(_TRANSFORMER):
        if variant == "parsed" and name.startswith("encoder."):   # the ParSeD code names it ho_encoder
            name = "ho_" + name
        name = "transformer." + name
    return name
