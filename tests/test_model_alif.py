"""ALIF: gating, padding invariance (default) and the original's no-op masks (compat)."""
import dataclasses

import torch

from rlipv2_scale.models.alif import AlifBlock, AlifEncoder
from rlipv2_scale.models.config import named_config


def _block(gate: str = "vxac") -> AlifBlock:
    torch.manual_seed(0)
    block = AlifBlock(v_dim=16, l_dim=24, embed_dim=32, num_heads=4, gate=gate).eval()
    for p in block.parameters():   # non-trivial norms and biases
        p.data.add_(0.1 * torch.randn_like(p))
    return block


def test_gate_at_zero_leaves_vision_equal_to_its_normalised_input():
    block = _block()
    v, l, pos = torch.randn(2, 7, 16), torch.randn(2, 5, 24), torch.randn(2, 7, 16)
    with torch.no_grad():
        block.gamma_v.zero_()
        v_new, l_new = block(v, l, pos)
    torch.testing.assert_close(v_new, block.layer_norm_v(v))
    assert not torch.allclose(l_new, block.layer_norm_l(l))   # the other direction still updates


def test_vxac_uses_only_the_first_gate_element_and_glip_every_channel():
    v, l, pos = torch.randn(1, 6, 16), torch.randn(1, 4, 24), torch.randn(1, 6, 16)
    vxac = _block("vxac")
    with torch.no_grad():
        ref_v, ref_l = vxac(v, l, pos)
        vxac.gamma_v[1:] = 5.0
        vxac.gamma_l[1:] = -3.0
        v2, l2 = vxac(v, l, pos)
    torch.testing.assert_close(v2, ref_v)
    torch.testing.assert_close(l2, ref_l)
    glip = _block("glip")
    with torch.no_grad():
        glip.gamma_v.zero_()
        glip.gamma_v[3] = 1.0   # only channel 3 of the vision stream gets an update
        v3, _ = glip(v, l, pos)
    diff = (v3 - glip.layer_norm_v(v)).abs().amax(dim=(0, 1))
    assert diff[3] > 1e-4 and torch.all(diff[torch.arange(16) != 3] == 0)


def test_padded_labels_and_image_tokens_do_not_change_the_block_outputs():
    block = _block()
    v, l, pos = torch.randn(2, 7, 16), torch.randn(2, 5, 24), torch.randn(2, 7, 16)
    v_pad = torch.cat([v, 50 * torch.randn(2, 3, 16)], 1)
    pos_pad = torch.cat([pos, torch.randn(2, 3, 16)], 1)
    l_pad = torch.cat([l, 50 * torch.randn(2, 4, 24)], 1)
    v_mask = torch.zeros(2, 10, dtype=torch.bool)
    v_mask[:, 7:] = True
    l_mask = torch.zeros(2, 9, dtype=torch.bool)
    l_mask[:, 5:] = True
    with torch.no_grad():
        ref_v, ref_l = block(v, l, pos)
        out_v, out_l = block(v_pad, l_pad, pos_pad, v_mask, l_mask)
        # without masks (the original's behaviour) the padding leaks into the real tokens
        leak_v, leak_l = block(v_pad, l_pad, pos_pad)
    torch.testing.assert_close(out_v[:, :7], ref_v)
    torch.testing.assert_close(out_l[:, :5], ref_l)
    assert not torch.allclose(leak_v[:, :7], ref_v, atol=1e-3)
    assert not torch.allclose(leak_l[:, :5], ref_l, atol=1e-3)


def _encoder_inputs(cfg, b=2):
    shapes = torch.tensor([[8, 8], [4, 4], [2, 2], [1, 1]])
    s = int((shapes[:, 0] * shapes[:, 1]).sum())
    starts = torch.cat([torch.zeros(1, dtype=torch.long), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    src, pos = torch.randn(b, s, cfg.d_model), torch.randn(b, s, cfg.d_model)
    pad = torch.zeros(b, s, dtype=torch.bool)
    ratios = torch.ones(b, 4, 2)
    return src, pos, pad, shapes, starts, ratios


def test_encoder_padded_labels_change_no_output_by_default_but_do_in_compat_mode():
    cfg = named_config("tiny")
    torch.manual_seed(0)
    src, pos, pad, shapes, starts, ratios = _encoder_inputs(cfg)
    lang = torch.randn(2, 5, cfg.text.hidden_size)
    lang_padded = torch.cat([lang, 10 * torch.randn(2, 3, cfg.text.hidden_size)], 1)
    lang_mask = torch.zeros(2, 8, dtype=torch.bool)
    lang_mask[:, 5:] = True
    last = src.shape[1] - 1
    for compat in (False, True):
        torch.manual_seed(1)
        enc = AlifEncoder(dataclasses.replace(cfg, compat_original=compat)).eval()
        with torch.no_grad():
            mem, states = enc(src, pos, pad, shapes, starts, ratios, lang, None, last)
            mem_p, states_p = enc(src, pos, pad, shapes, starts, ratios, lang_padded, lang_mask, last)
        assert len(states) == cfg.fusion_rounds
        same = torch.allclose(mem, mem_p, atol=1e-5) and all(
            torch.allclose(a, b[:, :5], atol=1e-5) for a, b in zip(states, states_p))
        assert same == (not compat)


def test_encoder_fuses_only_the_last_level_before_the_first_layer():
    """With the vision layers skipped, fusion rewrites exactly the coarsest level's tokens."""
    cfg = named_config("tiny")
    torch.manual_seed(0)
    src, pos, pad, shapes, starts, ratios = _encoder_inputs(cfg)
    enc = AlifEncoder(cfg).eval()
    enc.layers = torch.nn.ModuleList(_Identity() for _ in enc.layers)
    lang = torch.randn(2, 5, cfg.text.hidden_size)
    with torch.no_grad():
        mem, _ = enc(src, pos, pad, shapes, starts, ratios, lang, None, src.shape[1] - 1)
    torch.testing.assert_close(mem[:, :-1], src[:, :-1])
    assert not torch.allclose(mem[:, -1], src[:, -1])


class _Identity(torch.nn.Module):
    def forward(self, src, *args):
        return src
