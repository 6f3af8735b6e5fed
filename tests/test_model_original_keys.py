"""One-to-one correspondence with the original checkpoints' state-dict layout (key names and shapes)."""
import dataclasses
import json
from importlib import resources

import pytest
import torch

from rlipv2_scale.models.config import named_config
from rlipv2_scale.models.original_keys import original_key
from rlipv2_scale.models.rlipv2 import RLIPv2

LAYOUTS = resources.files("rlipv2_scale.models") / "original_layouts"   # the released models' layouts
TAGGER_ONLY = {"transformer.coord_proj.weight", "transformer.coord_proj.bias", "transformer.verb_tgt.weight"}


def _original(name: str) -> dict[str, tuple]:
    layout = json.loads((LAYOUTS / f"{name}.json").read_text())
    return {k["key"]: tuple(k["shape"]) for k in layout["keys"]
            if "alias_of" not in k and not k["key"].endswith("relative_position_index")}


@pytest.mark.parametrize("name", ["r50", "swin_t", "tagger_r50"])
def test_every_tensor_maps_to_one_original_key_of_the_same_shape(name):
    cfg = named_config(name)
    original = _original(name)
    if cfg.tagger:   # the tagger's own query builders live in models/tagger.py
        cfg = dataclasses.replace(cfg, tagger=False)
        original = {k: v for k, v in original.items() if k not in TAGGER_ONLY}
    with torch.device("meta"):
        model = RLIPv2(cfg, pretrained=False)
    ours = {original_key(k, cfg.variant): tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(ours) == len(model.state_dict())   # injective
    assert sorted(set(ours) - set(original)) == []
    assert sorted(set(original) - set(ours)) == []
    assert {k: (ours[k], original[k]) for k in ours if ours[k] != original[k]} == {}
