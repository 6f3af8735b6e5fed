"""Model configs: named configs, strict loading, consistency checks."""
import pytest

from rlipv2_scale.config import from_dict, to_dict
from rlipv2_scale.errors import ConfigError
from rlipv2_scale.models.config import NAMED_CONFIGS, ModelConfig, named_config


@pytest.mark.parametrize("name", NAMED_CONFIGS)
def test_named_configs_round_trip_through_plain_data(name):
    cfg = named_config(name)
    assert cfg.name == name
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg


def test_named_configs_are_independent_copies():
    a = named_config("tiny")
    a.backbone.channels = (8, 8, 8, 8)
    assert named_config("tiny").backbone.channels == (16, 32, 64, 128)


def test_defaults_are_the_r50_config():
    assert ModelConfig() == named_config("r50")


def test_paper_settings():
    r50, tagger, hico = named_config("r50"), named_config("tagger_r50"), named_config("swin_l_hico")
    assert (r50.enc_layers, r50.dec_layers, r50.fusion_rounds, r50.num_queries, r50.ffn_dim) == (6, 3, 3, 200, 2048)
    assert (r50.alif.gate, r50.alif.gate_init, r50.alif.fusion) == ("vxac", 0.25, "last_level")
    assert (tagger.variant, tagger.ffn_dim, tagger.dropout, tagger.alif.gate) == ("parsed", 1024, 0.1, "glip")
    assert hico.num_queries == 128 and hico.position_offset == -0.5
    assert named_config("tiny").backbone.pretrained_weights is None


def test_unknown_names_and_inconsistent_depths_are_config_errors():
    with pytest.raises(ConfigError, match="unknown model config"):
        named_config("r101")
    with pytest.raises(ConfigError, match="unknown config key 'alif.gating'"):
        from_dict(ModelConfig, {"alif": {"gating": "tanh"}})
    with pytest.raises(ConfigError, match="dec_layers=2 must equal the number of fusion rounds"):
        from_dict(ModelConfig, {"enc_layers": 6, "dec_layers": 2})
    with pytest.raises(ConfigError, match="num_queries must be even"):
        from_dict(ModelConfig, {"num_queries": 7})
    # without fusion the decoder depth is free
    assert from_dict(ModelConfig, {"dec_layers": 2, "alif": {"fusion": "none"}}).fusion_rounds == 0
