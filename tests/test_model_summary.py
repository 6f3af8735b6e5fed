"""Parameter counts against the original RLIPv2 models (built on the meta device)."""
import dataclasses
import importlib.util
import json

import pytest

from rlipv2_scale.cli import main
from rlipv2_scale.models.config import named_config
from rlipv2_scale.models.summary import model_summary

# Measured on the original code (`models/hoi.py`; checkpoint layouts).
TOTALS = {"r50": 213_700_624, "swin_t": 214_243_658, "swin_l": 383_834_468, "swin_l_hico": 383_797_316,
          "tagger_r50": 206_642_164}
COMMON_FFN2048 = {"text_encoder": 124_645_632, "alif": 18_911_232, "language_layers": 21_263_616,
                  "encoder": 7_693_056, "entity_decoder": 4_966_272, "relation_decoder": 4_966_272,
                  "box_heads": 1_591_344, "multi_branch_fusion": 201_216, "text_resizer": 197_376,
                  "level_embed": 1024, "classifier": 66_304}
BACKBONE = {"r50": (23_454_912, 5_639_168), "swin_t": (27_520_506, 2_116_608), "swin_l": (194_997_780, 4_230_144),
            "swin_l_hico": (194_997_780, 4_230_144)}
# The original's frozen parts: R50 conv1 + layer1; Swin norms, position tables. The 6 relation-decoder
# box refiners receive no gradient in the original; here they are frozen explicitly.
FROZEN = {"r50": 222_400, "swin_t": 49_242, "swin_l": 184_020, "swin_l_hico": 184_020}
REFINERS = 6 * 132_612


@pytest.mark.parametrize("name", ["r50", "swin_t", "swin_l", "swin_l_hico"])
def test_parseda_totals_and_groups_match_the_original(name):
    s = model_summary(named_config(name))
    assert s["total"] == TOTALS[name]
    backbone, proj = BACKBONE[name]
    nq = named_config(name).num_queries
    expected = {**COMMON_FFN2048, "backbone": backbone, "input_proj": proj, "tgt_embed": nq * 256,
                "verb_tgt_embed": nq * 256, "refpoint_embed": nq * 4}
    assert s["groups"] == expected
    assert s["trainable"] == s["total"] - FROZEN[name] - REFINERS


def test_parsed_tagger_base_matches_the_original_tagger_minus_its_query_builders():
    """The Relation Tagger = ParSeD (FFN 1024, GLIP gate) + coord_proj Linear(4, 256) + verb_tgt [200, 256]."""
    cfg = dataclasses.replace(named_config("tagger_r50"), tagger=False)
    s = model_summary(cfg)
    assert s["total"] == TOTALS["tagger_r50"] - (4 * 256 + 256) - 200 * 256
    g = s["groups"]
    assert g["encoder"] == 4_541_184 and g["entity_decoder"] == g["relation_decoder"] == 3_061_632
    assert "multi_branch_fusion" not in g and g["query_embed"] == 200 * 768


@pytest.mark.skipif(importlib.util.find_spec("rlipv2_scale.models.tagger") is None, reason="tagger module absent")
def test_tagger_total_matches_the_original():
    assert model_summary(named_config("tagger_r50"))["total"] == TOTALS["tagger_r50"]


def test_cli_model_summary_json(capsys):
    assert main(["model", "summary", "r50", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"] == "r50" and out["total"] == TOTALS["r50"]
    assert sum(out["groups"].values()) == out["total"]


def test_cli_model_summary_rejects_unknown_config(capsys):
    assert main(["model", "summary", "r51"]) == 2
    assert "neither a named model config" in capsys.readouterr().err


@pytest.mark.parametrize("line, named", [("num_queries: -4", "'num_queries': -4"), ("d_model: 0", "'d_model': 0"),
                                         ("num_queries: 0", "'num_queries': 0")])
def test_cli_model_summary_rejects_sizes_below_one_in_one_line(tmp_path, capsys, line, named):
    cfg = tmp_path / "model.yaml"
    cfg.write_text(f"name: tiny\n{line}\n")
    assert main(["model", "summary", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model sizes must be positive" in err and named in err
