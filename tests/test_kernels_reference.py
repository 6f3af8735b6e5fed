"""PyTorch references of the kernels package and its dispatch (no Triton involved)."""
import math

import pytest
import torch

from rlipv2_scale.errors import UserError
from rlipv2_scale.kernels import alif_bi_attention, ms_deform_attn, resolve_backend


def _levels(shapes):
    shapes = torch.tensor(shapes, dtype=torch.long)
    sizes = shapes.prod(1)
    return shapes, torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]]), int(sizes.sum())


def _naive_msda(value, shapes, starts, loc, attn):
    """Scalar loops over the Deformable-DETR definition (pixel = loc * W - 0.5, zero outside)."""
    n, _, m, d = value.shape
    _, lq, _, levels, points, _ = loc.shape
    out = torch.zeros(n, lq, m, d, dtype=torch.float64)
    for b in range(n):
        for q in range(lq):
            for h in range(m):
                for lvl in range(levels):
                    hl, wl = shapes[lvl].tolist()
                    for p in range(points):
                        x = loc[b, q, h, lvl, p, 0].item() * wl - 0.5
                        y = loc[b, q, h, lvl, p, 1].item() * hl - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        for xi, yi in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
                            if 0 <= xi < wl and 0 <= yi < hl:
                                wgt = (1 - abs(x - xi)) * (1 - abs(y - yi))
                                tok = starts[lvl].item() + yi * wl + xi
                                out[b, q, h] += attn[b, q, h, lvl, p].item() * wgt * value[b, tok, h].double()
    return out.view(n, lq, m * d)


def test_msda_reference_matches_the_definition_on_edges_and_outside():
    torch.manual_seed(0)
    shapes, starts, s = _levels([[3, 5], [2, 2], [1, 3]])
    value = torch.randn(2, s, 2, 3, dtype=torch.float64)
    loc = torch.rand(2, 4, 2, 3, 2, 2, dtype=torch.float64) * 1.6 - 0.3  # some points outside the map
    loc[0, 0, 0, 0, 0] = torch.tensor([0.0, 1.0])   # corners of the map
    loc[1, 3, 1, 2, 1] = torch.tensor([1.0, 0.0])
    loc[0, 1, 1, 1, 0] = torch.tensor([0.25, 0.75])  # exactly on pixel centres of the 2x2 level
    attn = torch.rand(2, 4, 2, 3, 2, dtype=torch.float64)
    out = ms_deform_attn(value, shapes, starts, loc, attn, backend="torch")
    torch.testing.assert_close(out, _naive_msda(value, shapes, starts, loc, attn), rtol=1e-12, atol=1e-12)


def test_msda_hand_computed_centre_sample_is_the_mean_of_four_pixels():
    value = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)  # one 2x2 map, one head, D = 1
    shapes, starts, _ = _levels([[2, 2]])
    loc = torch.full((1, 1, 1, 1, 1, 2), 0.5)
    out = ms_deform_attn(value, shapes, starts, loc, torch.full((1, 1, 1, 1, 1), 2.0), backend="torch")
    assert out.item() == pytest.approx(2.0 * 2.5)
    # a sample a whole map away reads zeros only
    out = ms_deform_attn(value, shapes, starts, loc + 2.0, torch.ones(1, 1, 1, 1, 1), backend="torch")
    assert out.item() == 0.0


def test_msda_rejects_inconsistent_shapes():
    shapes, starts, s = _levels([[2, 2]])
    with pytest.raises(UserError, match="sum\\(H\\*W\\) = 4"):
        ms_deform_attn(torch.zeros(1, s + 1, 1, 4), shapes, starts, torch.zeros(1, 3, 1, 1, 2, 2),
                       torch.zeros(1, 3, 1, 1, 2))
    with pytest.raises(UserError, match="attention_weights"):
        ms_deform_attn(torch.zeros(1, s, 1, 4), shapes, starts, torch.zeros(1, 3, 1, 1, 2, 2),
                       torch.zeros(1, 3, 1, 1, 3))
    with pytest.raises(UserError, match="backward 'gather' is unknown"):
        ms_deform_attn(torch.zeros(1, s, 1, 4), shapes, starts, torch.zeros(1, 3, 1, 1, 2, 2),
                       torch.zeros(1, 3, 1, 1, 2), backward="gather")


def _alif_params(dv, dl, inner, gen):
    def lin(o, i):
        return torch.randn(o, i, generator=gen, dtype=torch.float64) / math.sqrt(i), \
            torch.randn(o, generator=gen, dtype=torch.float64) * 0.1
    (wq, bq), (wk, bk), (wvv, bvv), (wvl, bvl) = lin(inner, dv), lin(inner, dl), lin(inner, dv), lin(inner, dl)
    (wov, bov), (wol, bol) = lin(dv, inner), lin(dl, inner)
    return [wq, bq, wk, bk, wvv, bvv, wvl, bvl, wov, bov, wol, bol]


def _naive_alif(v, l, pos, params, gate_v, gate_l, heads, v_pad, l_pad):
    """Per image and head with explicit loops over the shared logit matrix."""
    wq, bq, wk, bk, wvv, bvv, wvl, bvl, wov, bov, wol, bol = params
    hd = wq.shape[0] // heads
    v_out, l_out = v.clone(), l.clone()
    for b in range(v.shape[0]):
        q = ((v[b] + pos[b]) @ wq.T + bq) * hd ** -0.5
        k, vv, vl = l[b] @ wk.T + bk, v[b] @ wvv.T + bvv, l[b] @ wvl.T + bvl
        ov, ol = [], []
        for h in range(heads):
            sl = slice(h * hd, (h + 1) * hd)
            a = q[:, sl] @ k[:, sl].T  # [Nv, Lt], shared by both directions
            pv = torch.softmax(a.masked_fill(l_pad[b][None, :], -math.inf), dim=1)
            pl = torch.softmax(a.T.masked_fill(v_pad[b][None, :], -math.inf), dim=1)
            ov.append(pv @ vl[:, sl])
            ol.append(pl @ vv[:, sl])
        v_out[b] = v[b] + gate_v * (torch.cat(ov, 1) @ wov.T + bov)
        l_out[b] = l[b] + gate_l * (torch.cat(ol, 1) @ wol.T + bol)
    return v_out, l_out


@pytest.mark.parametrize("backend", ["torch", "eager"])   # the SDPA core and the eager reference
@pytest.mark.parametrize("vector_gates", [False, True])
def test_alif_reference_matches_per_head_loops(vector_gates, backend):
    gen = torch.Generator().manual_seed(1)
    b, nv, lt, dv, dl, inner, heads = 2, 6, 4, 8, 12, 16, 4
    params = _alif_params(dv, dl, inner, gen)
    v, l, pos = (torch.randn(b, n, c, generator=gen, dtype=torch.float64) for n, c in ((nv, dv), (lt, dl), (nv, dv)))
    v_pad = torch.tensor([[0, 0, 0, 0, 1, 1], [0] * 6], dtype=torch.bool)
    l_pad = torch.tensor([[0, 0, 0, 1], [0, 1, 1, 1]], dtype=torch.bool)
    gate_v = torch.rand(dv, generator=gen, dtype=torch.float64) if vector_gates else torch.tensor(0.25)
    gate_l = torch.rand(dl, generator=gen, dtype=torch.float64) if vector_gates else torch.tensor(0.5)
    got = alif_bi_attention(v, l, pos, *params, gate_v, gate_l, heads, v_pad_mask=v_pad, l_pad_mask=l_pad,
                            backend=backend)
    want = _naive_alif(v, l, pos, params, gate_v, gate_l, heads, v_pad, l_pad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_alif_padding_does_not_change_valid_outputs_and_zero_gate_is_identity():
    gen = torch.Generator().manual_seed(2)
    dv, dl, inner, heads = 8, 12, 16, 2
    params = _alif_params(dv, dl, inner, gen)
    v, l, pos = (torch.randn(1, n, c, generator=gen, dtype=torch.float64) for n, c in ((5, dv), (3, dl), (5, dv)))
    gate = torch.tensor(0.3, dtype=torch.float64)
    base_v, base_l = alif_bi_attention(v, l, pos, *params, gate, gate, heads, backend="torch")
    def pad(x, n):
        return torch.cat([x, torch.randn(1, n, x.shape[2], generator=gen, dtype=torch.float64) * 50], 1)

    v_pad = torch.tensor([[0] * 5 + [1] * 3], dtype=torch.bool)
    l_pad = torch.tensor([[0] * 3 + [1] * 2], dtype=torch.bool)
    got_v, got_l = alif_bi_attention(pad(v, 3), pad(l, 2), pad(pos, 3), *params, gate, gate, heads,
                                     v_pad_mask=v_pad, l_pad_mask=l_pad, backend="torch")
    torch.testing.assert_close(got_v[:, :5], base_v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_l[:, :3], base_l, rtol=1e-12, atol=1e-12)
    zero = torch.tensor(0.0, dtype=torch.float64)
    same_v, _ = alif_bi_attention(v, l, pos, *params, zero, gate, heads, backend="torch")
    assert torch.equal(same_v, v)


def test_alif_all_labels_padded_gives_zero_update_and_finite_gradients():
    gen = torch.Generator().manual_seed(3)
    params = [p.requires_grad_() for p in _alif_params(4, 6, 8, gen)]
    v = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    l = torch.randn(1, 2, 6, dtype=torch.float64, requires_grad=True)
    gate = torch.tensor(1.0, dtype=torch.float64)
    v_new, l_new = alif_bi_attention(v, l, torch.zeros_like(v), *params, gate, gate, 2,
                                     l_pad_mask=torch.ones(1, 2, dtype=torch.bool), backend="torch")
    # no label to read: the vision update is the output projection's bias only
    torch.testing.assert_close(v_new, v + params[9], rtol=0, atol=1e-12)
    (v_new.sum() + l_new.sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in [v, l, *params])


def _alif_grads(backend, tensors, heads, v_pad, l_pad, dropout_p=0.0):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    v_new, l_new = alif_bi_attention(*leaves, heads, v_pad_mask=v_pad, l_pad_mask=l_pad, dropout_p=dropout_p,
                                     training=dropout_p > 0, backend=backend)
    gen = torch.Generator().manual_seed(99)
    ((v_new * torch.randn(v_new.shape, generator=gen)).sum()
     + (l_new * torch.randn(l_new.shape, generator=gen)).sum()).backward()
    return [v_new, l_new] + [t.grad for t in leaves]


@pytest.mark.parametrize("labels", [5, 0])   # 0: an empty label set
@pytest.mark.parametrize("vector_gates", [False, True])
def test_alif_sdpa_path_equals_the_eager_reference_in_fp32(vector_gates, labels):
    gen = torch.Generator().manual_seed(4)
    b, nv, dv, dl, inner, heads = 3, 7, 8, 12, 16, 2
    tensors = [v.float() for v in _alif_params(dv, dl, inner, gen)]
    v, l, pos = (torch.randn(b, n, c, generator=gen) for n, c in ((nv, dv), (labels, dl), (nv, dv)))
    gate_v = torch.rand(dv, generator=gen) if vector_gates else torch.tensor(0.25)
    gate_l = torch.rand(dl, generator=gen) if vector_gates else torch.tensor(0.5)
    tensors = [v, l, pos, *tensors, gate_v, gate_l]
    v_pad = torch.zeros(b, nv, dtype=torch.bool)
    v_pad[1] = True            # an image whose tokens are all padded: its labels read nothing
    v_pad[2, 4:] = True
    l_pad = torch.zeros(b, labels, dtype=torch.bool)
    if labels:
        l_pad[0] = True        # an image whose labels are all padded
        l_pad[2, 3:] = True
    got = _alif_grads("torch", tensors, heads, v_pad, l_pad)
    want = _alif_grads("eager", tensors, heads, v_pad, l_pad)
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.isfinite(g).all(), i
        torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-6, msg=f"output/gradient {i}")
    # all keys padded: the update is the output projection's bias alone (attention read nothing)
    b_ov, b_ol = tensors[12], tensors[14]
    torch.testing.assert_close(got[1][1], l[1] + gate_l * b_ol, rtol=1e-6, atol=1e-6)
    if labels:
        torch.testing.assert_close(got[0][0], v[0] + gate_v * b_ov, rtol=1e-6, atol=1e-6)


def test_alif_sdpa_path_applies_dropout_only_in_training():
    gen = torch.Generator().manual_seed(5)
    tensors = [t.float() for t in _alif_params(8, 12, 16, gen)]
    v, l, pos = (torch.randn(2, n, c, generator=gen) for n, c in ((6, 8), (4, 12), (6, 8)))
    tensors = [v, l, pos, *tensors, torch.tensor(0.5), torch.tensor(0.5)]
    plain = _alif_grads("eager", tensors, 2, None, None)
    dropped = _alif_grads("torch", tensors, 2, None, None, dropout_p=0.5)
    assert (dropped[0] - plain[0]).abs().max() > 1e-3
    with torch.no_grad():   # no autograd: no dropout, as the reference
        out = alif_bi_attention(*tensors, 2, dropout_p=0.5, training=True, backend="torch")
    torch.testing.assert_close(out[0], plain[0], rtol=2e-5, atol=2e-6)


def test_dispatch_picks_torch_on_cpu_and_rejects_bad_requests(monkeypatch):
    x = torch.zeros(1)
    assert resolve_backend("auto", x) == "torch"
    assert resolve_backend("torch", x) == "torch"
    with pytest.raises(UserError, match="unknown"):
        resolve_backend("cuda", x)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UserError, match="needs CUDA tensors"):
        resolve_backend("triton", x)
    monkeypatch.setattr("rlipv2_scale.kernels.dispatch.triton_importable", lambda: False)
    with pytest.raises(UserError, match="not installed"):
        resolve_backend("triton", x)


def test_auto_dispatch_reads_the_table_by_device_dtype_and_nearest_token_count(monkeypatch, tmp_path):
    import json
    from types import SimpleNamespace

    from rlipv2_scale.kernels import dispatch

    table = {"devices": {
        "sm_90": {"alif_bi_attention": {"bf16": {"273": "torch", "22223": "triton"}, "fp32": {"273": "eager"}}},
        "NVIDIA Special": {"alif_bi_attention": {"bf16": {"1000": "eager"}}}}}
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    monkeypatch.setattr(dispatch, "TABLE_PATH", path)
    dispatch.load_table.cache_clear()
    names = {0: ("NVIDIA H100 80GB HBM3", "sm_90"), 1: ("NVIDIA Special", "sm_90"), 2: ("Other", "sm_80")}
    monkeypatch.setattr(dispatch, "device_keys", names.get)

    def cuda(dtype, index=0):       # a CUDA tensor as the dispatch sees one, on a machine without a GPU
        return SimpleNamespace(is_cuda=True, dtype=dtype, device=SimpleNamespace(index=index))
    try:
        choose = dispatch.table_choice
        assert choose("alif_bi_attention", cuda(torch.bfloat16), 300) == "torch"
        assert choose("alif_bi_attention", cuda(torch.bfloat16), 5000) == "triton"   # nearer 22,223 (log scale)
        assert choose("alif_bi_attention", cuda(torch.bfloat16), 2000) == "torch"
        assert choose("alif_bi_attention", cuda(torch.float32), 22223) == "eager"
        assert choose("alif_bi_attention", cuda(torch.bfloat16, 1), 20) == "eager"   # the name before the class
        # a device the table does not name, and a dtype it has no entry for: the documented defaults
        assert choose("alif_bi_attention", cuda(torch.bfloat16, 2), 273) == "torch"
        assert choose("alif_bi_attention", cuda(torch.bfloat16, 2), 22223) == "triton"
        assert choose("alif_bi_attention", cuda(torch.float16), 22223) == "triton"
        assert choose("ms_deform_attn", cuda(torch.float32), 22223) == "atomic"
        monkeypatch.setattr("torch.is_autocast_enabled", lambda device: device == "cuda")
        monkeypatch.setattr("torch.get_autocast_dtype", lambda device: torch.bfloat16)
        assert choose("alif_bi_attention", cuda(torch.float32), 22223) == "triton"   # fp32 inputs, bf16 products
        with dispatch.override(alif_bi_attention="eager"):
            assert choose("alif_bi_attention", cuda(torch.float32), 22223) == "eager"
        assert choose("alif_bi_attention", cuda(torch.float32), 22223) == "triton"
    finally:
        dispatch.load_table.cache_clear()


def test_the_shipped_dispatch_table_names_only_known_choices():
    from rlipv2_scale.kernels import dispatch

    choices = {"alif_bi_attention": {"triton", "torch", "eager"}, "ms_deform_attn": {"atomic", "dense_coarse"}}
    table = dispatch.load_table()
    for device, ops in table["devices"].items():
        for op, by_dtype in ops.items():
            for dtype, entry in by_dtype.items():
                assert dtype in dispatch.DTYPE_NAMES.values(), (device, op, dtype)
                assert entry and all(int(k) > 0 and v in choices[op] for k, v in entry.items()), (device, op)


def test_alif_rejects_an_unknown_backend():
    gen = torch.Generator().manual_seed(6)
    tensors = [t.float() for t in _alif_params(8, 12, 16, gen)]
    v, l = torch.randn(1, 3, 8), torch.randn(1, 2, 12)
    with pytest.raises(UserError, match="unknown"):
        alif_bi_attention(v, l, v, *tensors, torch.tensor(0.1), torch.tensor(0.1), 2, backend="sdpa")


def test_auto_keeps_the_reference_alif_core_off_cuda(monkeypatch):
    """CPU runs (the demo, the tests) keep the eager core and its dropout draws under "auto"."""
    from rlipv2_scale.kernels import alif

    assert alif._choose("auto", torch.zeros(1, 2, 4), torch.zeros(1, 3, 4)) == "eager"
    assert alif._choose("torch", torch.zeros(1, 2, 4), torch.zeros(1, 3, 4)) == "torch"
