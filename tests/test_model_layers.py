"""Building blocks against hand-computed values: position encodings, MSDA, heads, fusion."""
import math

import pytest
import torch

from rlipv2_scale.models.deformable import DeformableEncoderLayer, MSDeformAttn
from rlipv2_scale.models.heads import PRIOR_BIAS, LabelSimilarity, inverse_sigmoid, refine_boxes
from rlipv2_scale.models.parse import MultiBranchFusion
from rlipv2_scale.models.position import SinePositionEncoding, box_sine_embedding


def test_sine_position_encoding_hand_values():
    mask = torch.zeros(1, 1, 2, dtype=torch.bool)
    pos = SinePositionEncoding(num_feats=2)(mask)[0, :, 0]   # [4 channels, 2 columns]: y_sin, y_cos, x_sin, x_cos
    expected = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0], [-1.0, 1.0]])   # y=2pi; x=pi, 2pi
    torch.testing.assert_close(pos, expected, atol=1e-4, rtol=0)
    shifted = SinePositionEncoding(num_feats=2, offset=-0.5)(mask)[0, :, 0]
    torch.testing.assert_close(shifted[2:, 0], torch.tensor([1.0, 0.0]), atol=1e-4, rtol=0)   # x = pi/2
    padded = torch.tensor([[[False, True]]])   # the valid width is 1: column 0 is at the far edge
    torch.testing.assert_close(SinePositionEncoding(2)(padded)[0, 2:, 0, 0], torch.tensor([0.0, 1.0]),
                               atol=1e-4, rtol=0)


def test_box_sine_embedding_order_is_y_x_w_h():
    box = torch.tensor([[0.25, 0.5, 0.125, 1.0]])
    emb = box_sine_embedding(box, num_feats=2)[0]
    r = math.sqrt(0.5)
    expected = torch.tensor([0.0, -1.0, 1.0, 0.0, r, r, 0.0, 1.0])
    torch.testing.assert_close(emb, expected, atol=1e-5, rtol=0)
    assert box_sine_embedding(torch.rand(3, 5, 4), 128).shape == (3, 5, 512)


def _identity_msda(n_points: int = 2) -> MSDeformAttn:
    attn = MSDeformAttn(d_model=4, n_levels=1, n_heads=1, n_points=n_points)
    with torch.no_grad():
        for lin in (attn.value_proj, attn.output_proj):
            lin.weight.copy_(torch.eye(4))
            lin.bias.zero_()
        attn.sampling_offsets.bias.zero_()
    return attn


def test_msda_samples_the_pixel_under_a_point_reference():
    attn = _identity_msda()
    value = torch.arange(16 * 4, dtype=torch.float32).view(1, 16, 4)   # a 4x4 map, token = row*4 + col
    shapes, starts = torch.tensor([[4, 4]]), torch.tensor([0])
    ref = torch.tensor([[[[1.5 / 4, 2.5 / 4]]]])   # centre of (row 2, col 1)
    out = attn(torch.zeros(1, 1, 4), ref, value, shapes, starts)
    torch.testing.assert_close(out[0, 0], value[0, 2 * 4 + 1])
    pad = torch.zeros(1, 16, dtype=torch.bool)
    pad[0, 9] = True   # padded values read as zero
    torch.testing.assert_close(attn(torch.zeros(1, 1, 4), ref, value, shapes, starts, pad)[0, 0], torch.zeros(4))


def test_msda_box_reference_offsets_scale_with_half_the_box():
    attn = _identity_msda(n_points=1)
    with torch.no_grad():
        attn.sampling_offsets.bias.copy_(torch.tensor([1.0, 0.0]))   # x offset of one "half box"
    value = torch.arange(16 * 4, dtype=torch.float32).view(1, 16, 4)
    box = torch.tensor([[[[1.5 / 4, 0.5 / 4, 2 / 4, 1 / 4]]]])   # cx at col 1, w = 2 columns
    out = attn(torch.zeros(1, 1, 4), box, value, torch.tensor([[4, 4]]), torch.tensor([0]))
    torch.testing.assert_close(out[0, 0], value[0, 0 * 4 + 2])   # cx + w/2 = col 2


def test_encoder_reference_points_are_pixel_centres_of_the_valid_area():
    ref = DeformableEncoderLayer.reference_points(torch.tensor([[2, 2]]), torch.ones(1, 1, 2))
    expected = torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])
    torch.testing.assert_close(ref[0, :, 0], expected)
    half = DeformableEncoderLayer.reference_points(torch.tensor([[2, 2]]), torch.tensor([[[0.5, 1.0]]]))
    # normalised by the valid width (1 column), then scaled back by the level's valid ratio
    torch.testing.assert_close(half[0, :, 0, 0], torch.tensor([0.25, 0.75, 0.25, 0.75]))


def test_label_similarity_hand_value():
    head = LabelSimilarity(2)
    with torch.no_grad():
        head.projection.weight.copy_(torch.eye(2))
        head.projection.bias.zero_()
        head.bias_obj.copy_(torch.tensor([0.0, 1.0]))
    text = head.project(torch.tensor([[[3.0, 4.0]]]))   # normalised [0.6, 0.8] / 2
    logits = head.logits(torch.tensor([[[1.0, 0.0]]]), head.bias_obj, text)
    torch.testing.assert_close(logits, torch.tensor([[[0.7 + PRIOR_BIAS]]]))
    assert PRIOR_BIAS == pytest.approx(-4.59512, abs=1e-5)


def test_box_refinement_and_inverse_sigmoid():
    x = torch.tensor([-3.0, 0.0, 2.0])
    torch.testing.assert_close(inverse_sigmoid(x.sigmoid()), x, atol=1e-4, rtol=0)
    ref4 = torch.tensor([[0.2, 0.3, 0.4, 0.5]])
    torch.testing.assert_close(refine_boxes(torch.zeros(1, 4), ref4), ref4)
    ref2 = torch.tensor([[0.2, 0.7]])
    torch.testing.assert_close(refine_boxes(torch.zeros(1, 4), ref2), torch.tensor([[0.2, 0.7, 0.5, 0.5]]))


def test_multi_branch_fusion_hand_value():
    mbf = MultiBranchFusion(d_model=2, width=1, branches=2)
    with torch.no_grad():
        for k, (w1, w2, w3) in enumerate((([1.0, 0.0], [0.0, 1.0], [1.0, -1.0]), ([1.0, 1.0], [1.0, 1.0], [0.5, 0.5]))):
            mbf.fc_1[k].weight.copy_(torch.tensor([w1]))
            mbf.fc_2[k].weight.copy_(torch.tensor([w2]))
            mbf.fc_3[k].weight.copy_(torch.tensor([w3]).T)
            for lin in (mbf.fc_1[k], mbf.fc_2[k], mbf.fc_3[k]):
                lin.bias.zero_()
    a, b = torch.tensor([2.0, 1.0]), torch.tensor([3.0, -5.0])
    # branch 0: relu(2 * -5) = 0 -> [0, 0]; branch 1: relu(3 * -2) = 0 -> [0, 0]
    torch.testing.assert_close(mbf(a, b), torch.zeros(2))
    b = torch.tensor([3.0, 4.0])
    # branch 0: relu(2 * 4) = 8 -> [8, -8]; branch 1: relu(3 * 7) = 21 -> [10.5, 10.5]; relu(sum)
    torch.testing.assert_close(mbf(a, b), torch.tensor([18.5, 2.5]))
