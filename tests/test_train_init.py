"""Initialising a fine-tuning run from pre-trained weights with fewer queries (200 → 128 style)."""
from __future__ import annotations

import pytest
import torch

from rlipv2_scale.errors import UserError
from rlipv2_scale.models.artifacts import load_state
from rlipv2_scale.models.build import build_model
from rlipv2_scale.train.config import run_config_from_dict
from rlipv2_scale.train.engine import _fit_query_rows


def cfg(queries: int):
    return run_config_from_dict({"model": {"name": "tiny", "num_queries": queries},
                                 "data": {"sources": [{"name": "x", "local": "unused"}]}})


def test_pretrained_queries_are_cut_to_the_fine_tuning_count():
    torch.manual_seed(0)
    big = build_model(cfg(20).model, pretrained=False).state_dict()
    small_cfg = cfg(12)
    small = build_model(small_cfg.model, pretrained=False)
    with pytest.raises(UserError, match="shape mismatch"):
        load_state(small, big, "pretrained")
    fitted = _fit_query_rows(big, small, small_cfg)
    load_state(small, fitted, "pretrained")
    changed = [k for k in big if big[k].shape != fitted[k].shape]
    assert changed
    for k in changed:
        rows = small.state_dict()[k].shape[0]
        if rows == 12:     # first 6 subject rows, then the first 6 object rows (old half at 10)
            assert torch.equal(small.state_dict()[k], torch.cat([big[k][:6], big[k][10:16]]))
        else:              # relation queries: one per pair
            assert rows == 6 and torch.equal(small.state_dict()[k], big[k][:6])
