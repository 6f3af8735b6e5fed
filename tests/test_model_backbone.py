"""Backbones: level strides and channels, padding masks, frozen parts as the original."""
import pytest
import torch
from torch import nn

from rlipv2_scale.errors import ConfigError
from rlipv2_scale.models.backbone import Backbone
from rlipv2_scale.models.config import BackboneConfig, named_config


def test_tiny_backbone_levels_masks_and_everything_trainable():
    bb = Backbone(named_config("tiny").backbone)
    mask = torch.zeros(2, 128, 96, dtype=torch.bool)
    mask[1, :, 48:] = True
    levels = bb(torch.randn(2, 3, 128, 96), mask)
    assert [tuple(f.shape) for f, _ in levels] == [(2, 32, 16, 12), (2, 64, 8, 6), (2, 128, 4, 3)]
    assert bb.num_channels == [32, 64, 128]
    for (_, m), w in zip(levels, (12, 6, 3)):
        assert not m[0].any() and m[1, :, : w // 2].logical_not().all() and m[1, :, w - 1].all()
    assert all(p.requires_grad for p in bb.parameters())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in bb.modules())


def test_resnet50_freezes_stem_and_layer1_and_all_batchnorms():
    with torch.device("meta"):
        bb = Backbone(named_config("r50").backbone, pretrained=False)
    params = dict(bb.named_parameters())
    assert not params["body.conv1.weight"].requires_grad
    assert not params["body.layer1.0.conv1.weight"].requires_grad
    assert params["body.layer2.0.conv1.weight"].requires_grad
    buffers = dict(bb.named_buffers())
    assert "body.layer3.0.bn1.weight" in buffers and "body.layer3.0.bn1.weight" not in params
    assert bb.num_channels == [512, 1024, 2048]


def test_swin_accepts_any_size_and_freezes_norms_and_position_tables():
    cfg = BackboneConfig(name="swin_tiny", pretrained_weights=None)
    bb = Backbone(cfg, pretrained=False).eval()
    with torch.no_grad():
        levels = bb(torch.randn(1, 3, 70, 90), torch.zeros(1, 70, 90, dtype=torch.bool))
    # patch 4 (padded to 72x92 -> 18x23), then halving with ceil
    assert [tuple(f.shape) for f, _ in levels] == [(1, 192, 9, 12), (1, 384, 5, 6), (1, 768, 3, 3)]
    frozen = {n for n, p in bb.named_parameters() if not p.requires_grad}
    assert "norms.0.weight" in frozen and "body.layers.0.blocks.0.attn.relative_position_bias_table" in frozen
    assert all("norm" in n or "relative_position_bias_table" in n for n in frozen)
    assert "body.layers.0.blocks.0.attn.qkv.weight" not in frozen


def test_mismatched_pretrained_weights_id_is_a_config_error():
    with pytest.raises(ConfigError, match="not a checkpoint of 'resnet50'"):
        Backbone(BackboneConfig(name="resnet50", pretrained_weights="resnet18.tv_in1k"), pretrained=False)


def test_pad_then_shift_swin_block_equals_timm_on_window_multiples_and_pads_before_shifting():
    from timm.models.swin_transformer import SwinTransformerBlock

    from rlipv2_scale.models.backbone import PadThenShiftSwinBlock

    torch.manual_seed(0)
    block = SwinTransformerBlock(dim=8, input_resolution=(14, 14), num_heads=2, window_size=7, shift_size=3,
                                 always_partition=True, dynamic_mask=True).eval()
    x = torch.randn(1, 14, 14, 8)
    with torch.no_grad():
        timm_out = block._attn(x)
        block.__class__ = PadThenShiftSwinBlock
        torch.testing.assert_close(block._attn(x), timm_out)
        # 10x10 is padded to 14x14: the original semantics equal running the padded map, then cropping
        y = torch.randn(1, 10, 10, 8)
        padded = torch.nn.functional.pad(y, (0, 0, 0, 4, 0, 4))
        torch.testing.assert_close(block._attn(y), block._attn(padded)[:, :10, :10])


def test_pretrained_backbone_weights_not_cached_offline_are_a_user_error_naming_them_and_the_fixes(
        empty_offline_hub):
    from rlipv2_scale.errors import UserError

    with torch.device("meta"), pytest.raises(UserError) as err:
        Backbone(named_config("r50").backbone, pretrained=True)
    msg = str(err.value)
    assert "'resnet50.tv_in1k' (model.backbone.pretrained_weights)" in msg
    assert "huggingface-cli download timm/resnet50.tv_in1k" in msg
    assert "model.backbone.pretrained_weights=null" in msg and "\n" not in msg
    with torch.device("meta"):   # without pretrained weights nothing is fetched
        Backbone(named_config("r50").backbone, pretrained=False)
