"""Cases for the Triton kernels against the PyTorch references.

Run by `tests/test_kernels_triton.py` in a fresh process with `TRITON_INTERPRET=1` (the
interpreter must be on before Triton is first imported, so it cannot share a process with other
tests), and by `kernels/bench/gpu_check.sh` on a CUDA device as the correctness gate. Directly:
`TRITON_INTERPRET=1 python -m pytest tests/kernels_triton_cases.py`.
"""
import os

import pytest
import torch

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
if not INTERPRETER and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 (set before Triton is imported) or a CUDA device",
                allow_module_level=True)
triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from rlipv2_scale.kernels import (  # noqa: E402
    alif_bi_attention,
    attention_core_reference,
    ms_deform_attn,
    ms_deform_attn_triton,  # noqa: E402
)
from rlipv2_scale.kernels.alif_triton import _keep, fused_alif_block, fused_attention  # noqa: E402

DEVICE = "cpu" if INTERPRETER else "cuda"
needs_fp64_dot = pytest.mark.skipif(not INTERPRETER, reason="fp64 tl.dot is checked in the interpreter only")


def on_device(*tensors):
    return [t.to(DEVICE) if t is not None else None for t in tensors]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def _levels(shapes):
    shapes = torch.tensor(shapes, dtype=torch.long)
    sizes = shapes.prod(1)
    return shapes, torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]]), int(sizes.sum())


def _msda_inputs(n, lq, m, d, levels, points, dtype, gen):
    shapes, starts, s = _levels(levels)
    value = torch.randn(n, s, m, d, generator=gen, dtype=dtype)
    loc = torch.rand(n, lq, m, len(levels), points, 2, generator=gen, dtype=dtype) * 1.5 - 0.25
    loc[0, 0, 0, 0, 0] = torch.tensor([0.0, 1.0])  # map corners and edges
    loc[-1, -1, -1, -1, -1] = torch.tensor([1.0, 0.0])
    loc[0, lq // 2, 0, -1, 0] = torch.tensor([0.5, 0.0])
    loc[-1, 0, 0, 0, -1] = torch.tensor([-0.6, 1.7])  # far outside: reads zeros
    attn = torch.rand(n, lq, m, len(levels), points, generator=gen, dtype=dtype)
    return shapes, starts, value, loc, attn


def _run_msda(backend, shapes, starts, value, loc, attn, grad_out, backward=None):
    shapes, starts, grad_out = on_device(shapes, starts, grad_out)
    leaves = [t.to(DEVICE).requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], backend=backend, backward=backward)
    out.backward(grad_out)
    return [t.cpu() for t in [out] + [t.grad for t in leaves]]


# The backward variants: "atomic"; "dense_coarse" with every test level dense (they are all
# small); and "mixed": dense only up to 12 pixels, so levels of both kinds meet in one call.
VARIANTS = ["atomic", "dense_coarse", "mixed"]


@pytest.fixture
def variant(request, monkeypatch):
    if request.param == "mixed":
        monkeypatch.setattr(ms_deform_attn_triton, "DENSE_MAX_PIXELS", 12)
        return "dense_coarse"
    return request.param


@pytest.mark.parametrize("variant", VARIANTS, indirect=True)
@pytest.mark.parametrize("n,lq,m,d,levels,points,dtype", [
    (2, 9, 2, 4, [[5, 7], [3, 4], [1, 2]], 3, torch.float32),
    (1, 70, 3, 6, [[4, 4], [2, 3]], 2, torch.float32),      # heads and D not powers of 2, several programs
    (3, 5, 1, 8, [[6, 2], [1, 1], [3, 5], [2, 2]], 1, torch.float32),
    (1, 37, 2, 4, [[9, 8], [2, 5]], 2, torch.float32),      # a level larger than one pixel chunk
    (2, 6, 2, 4, [[5, 7], [3, 4]], 2, torch.float64),
])
def test_msda_forward_and_gradients_match_reference(n, lq, m, d, levels, points, dtype, variant):
    gen = torch.Generator().manual_seed(lq)
    shapes, starts, value, loc, attn = _msda_inputs(n, lq, m, d, levels, points, dtype, gen)
    # a non-contiguous output gradient, as a transposing caller would hand back
    grad_out = torch.randn(lq, n, m * d, generator=gen, dtype=dtype).transpose(0, 1)
    # the reference in fp64 (the tolerance is the kernel's own rounding)
    want = _run_msda("torch", shapes, starts, *(t.double() for t in (value, loc, attn)), grad_out.double())
    want = [w.to(dtype) for w in want]
    got = _run_msda("triton", shapes, starts, value, loc, attn, grad_out, backward=variant)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for name, g, w in zip(("output", "value", "locations", "weights"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert rel_err(g, w) <= tol, name


@pytest.mark.parametrize("variant", VARIANTS, indirect=True)
def test_msda_value_gradient_sums_colliding_samples(variant):
    """Every query samples the same point: grad_value needs every atomic add of the tile."""
    shapes, starts, s = _levels([[3, 3]])
    value = torch.randn(1, s, 2, 4)
    loc = torch.full((1, 40, 2, 1, 2, 2), 0.4)
    attn = torch.rand(1, 40, 2, 1, 2)
    grad_out = torch.randn(1, 40, 8)
    want = _run_msda("torch", shapes, starts, value, loc, attn, grad_out)
    got = _run_msda("triton", shapes, starts, value, loc, attn, grad_out, backward=variant)
    assert rel_err(got[1], want[1]) <= 1e-5


@pytest.mark.parametrize("variant", VARIANTS[:2], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_msda_half_precision_inputs_keep_their_dtype(dtype, variant):
    gen = torch.Generator().manual_seed(5)
    shapes, starts, value, loc, attn = _msda_inputs(2, 7, 2, 8, [[5, 7], [3, 4]], 2, torch.float32, gen)
    value, loc, attn = (t.to(dtype) for t in (value, loc, attn))
    grad_out = torch.randn(2, 7, 16, generator=gen).to(dtype)
    want = _run_msda("torch", shapes, starts, *(t.float() for t in (value, loc, attn)), grad_out.float())
    got = _run_msda("triton", shapes, starts, value, loc, attn, grad_out, backward=variant)
    for g, w in zip(got, want):
        assert g.dtype == dtype
        assert rel_err(g, w) <= 2e-2


@pytest.mark.parametrize("variant", VARIANTS[:2], indirect=True)
def test_msda_mixed_dtypes_as_under_autocast(variant):
    """bf16 values with fp32 locations and weights: output in bf16, each gradient in its input's dtype."""
    gen = torch.Generator().manual_seed(6)
    shapes, starts, value, loc, attn = _msda_inputs(1, 6, 2, 8, [[5, 7], [3, 4]], 2, torch.float32, gen)
    value = value.to(torch.bfloat16)
    grad_out = torch.randn(1, 6, 16, generator=gen).to(torch.bfloat16)
    want = _run_msda("torch", shapes, starts, value, loc, attn, grad_out)
    got = _run_msda("triton", shapes, starts, value, loc, attn, grad_out, backward=variant)
    for g, w, dtype in zip(got, want, (torch.bfloat16, torch.bfloat16, torch.float32, torch.float32)):
        assert g.dtype == w.dtype == dtype
        assert rel_err(g, w) <= 1e-2


@pytest.mark.parametrize("variant", VARIANTS[:2], indirect=True)
def test_msda_without_queries_returns_empty(variant):
    shapes, starts, s = _levels([[2, 2]])
    value = torch.randn(1, s, 1, 4, device=DEVICE, requires_grad=True)
    out = ms_deform_attn(value, shapes.to(DEVICE), starts.to(DEVICE), torch.zeros(1, 0, 1, 1, 2, 2, device=DEVICE),
                         torch.zeros(1, 0, 1, 1, 2, device=DEVICE), backend="triton", backward=variant)
    assert out.shape == (1, 0, 4)
    out.sum().backward()
    assert torch.equal(value.grad, torch.zeros_like(value))


def _attn_inputs(b, h, nq, nk, d, dtype, gen, masked):
    q, k, v = (torch.randn(b, h, n, d, generator=gen, dtype=dtype) for n in (nq, nk, nk))
    mask = None
    if masked:
        mask = torch.rand(b, nk, generator=gen) < 0.3
        mask[0] = True  # an image whose keys are all padded
        mask[-1, 0] = False
    return q, k, v, mask


def _run_attn(fn, q, k, v, grad_out):
    leaves = [t.to(DEVICE).requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad_out.to(DEVICE))
    return [t.cpu() for t in [out] + [t.grad for t in leaves]]


@pytest.mark.parametrize("b,h,nq,nk,d,splits,masked,dtype", [
    (2, 2, 40, 20, 24, 1, True, torch.float32),
    (2, 2, 40, 20, 24, 2, True, torch.float32),     # split-K for the backward's dk/dv too
    (2, 1, 20, 100, 16, 3, True, torch.float32),    # the language direction: few queries, many keys
    (1, 3, 33, 70, 8, 4, False, torch.float32),
    (1, 2, 33, 50, 8, 2, True, torch.float64),
])
def test_attention_core_matches_reference(b, h, nq, nk, d, splits, masked, dtype):
    gen = torch.Generator().manual_seed(nq + nk)
    if dtype == torch.float64 and not INTERPRETER:
        pytest.skip("fp64 tl.dot is checked in the interpreter only")
    q, k, v, mask = _attn_inputs(b, h, nq, nk, d, dtype, gen, masked)
    mask = on_device(mask)[0]
    grad_out = torch.randn(b, h, nq, d, generator=gen, dtype=dtype)
    want = _run_attn(lambda *t: attention_core_reference(*t, mask, 0.3, 0.0, False), q, k, v, grad_out)
    got = _run_attn(lambda *t: fused_attention(*t, mask, 0.3, splits=splits), q, k, v, grad_out)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for name, g, w in zip(("output", "q", "k", "v"), got, want):
        assert rel_err(g, w) <= tol, name


@pytest.mark.parametrize("nq,nk", [(0, 5), (6, 0)])   # no queries; no keys (an empty label set)
def test_attention_core_without_queries_or_keys(nq, nk):
    gen = torch.Generator().manual_seed(3)
    q, k, v, mask = _attn_inputs(2, 2, nq, nk, 8, torch.float32, gen, masked=False)
    grad_out = torch.randn(2, 2, nq, 8, generator=gen)
    want = _run_attn(lambda *t: attention_core_reference(*t, None, 0.3, 0.0, False), q, k, v, grad_out)
    got = _run_attn(lambda *t: fused_attention(*t, None, 0.3), q, k, v, grad_out)
    for name, g, w in zip(("output", "q", "k", "v"), got, want):
        assert g.shape == w.shape and torch.equal(g, torch.zeros_like(g)) == torch.equal(w, torch.zeros_like(w)), name
        assert torch.allclose(g, w), name


@triton.jit
def _fill_keep_mask(out_ptr, seed, nq, nk, p, BQ: tl.constexpr, BK: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BQ)
    cols = tl.arange(0, BK)
    keep = _keep(seed, bh, rows, cols, nk, p)
    tl.store(out_ptr + bh * nq * nk + rows[:, None] * nk + cols[None, :], keep.to(tl.int8),
             mask=(rows < nq)[:, None] & (cols < nk)[None, :])


def _keep_mask(seed, bh, nq, nk, p):
    """Materialise the kernels' dropout keep-mask with the same `_keep` device function."""
    out = torch.zeros(bh, nq, nk, dtype=torch.int8, device=DEVICE)
    _fill_keep_mask[(bh,)](out, seed, nq, nk, p, BQ=triton.next_power_of_2(nq), BK=triton.next_power_of_2(nk))
    return out.bool()


@pytest.mark.parametrize("splits", [1, 3])
def test_attention_dropout_is_the_same_mask_in_forward_and_backward(splits):
    gen = torch.Generator().manual_seed(7)
    b, h, nq, nk, d, p, seed = 2, 2, 24, 40, 8, 0.3, 1234
    q, k, v, mask = _attn_inputs(b, h, nq, nk, d, torch.float32, gen, masked=True)
    mask = mask.to(DEVICE)
    keep = _keep_mask(seed, b * h, nq, nk, p).view(b, h, nq, nk)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.05

    def reference(q, k, v):
        logits = (q @ k.transpose(-1, -2) * 0.3).masked_fill(mask[:, None, None, :], float("-inf"))
        probs = torch.softmax(logits, -1).masked_fill(mask[:, None, None, :].all(-1, keepdim=True), 0.0)
        return (probs * keep / (1 - p)) @ v

    grad_out = torch.randn(b, h, nq, d, generator=gen)
    want = _run_attn(reference, q, k, v, grad_out)
    got = _run_attn(lambda *t: fused_attention(*t, mask, 0.3, dropout_p=p, seed=seed, splits=splits),
                    q, k, v, grad_out)
    for name, g, w in zip(("output", "q", "k", "v"), got, want):
        assert rel_err(g, w) <= 1e-5, name


def _alif_case(gen, vector_gates, dtype=torch.float32):
    b, nv, lt, dv, dl, inner, heads = 2, 40, 12, 16, 24, 32, 2

    def lin(o, i):
        return [torch.randn(o, i, generator=gen, dtype=dtype) / i ** 0.5,
                torch.randn(o, generator=gen, dtype=dtype) * 0.1]
    params = lin(inner, dv) + lin(inner, dl) + lin(inner, dv) + lin(inner, dl) + lin(dv, inner) + lin(dl, inner)
    v, l, pos = (torch.randn(b, n, c, generator=gen, dtype=dtype) for n, c in ((nv, dv), (lt, dl), (nv, dv)))
    gate_v = torch.rand(dv, generator=gen, dtype=dtype) if vector_gates else torch.tensor(0.25, dtype=dtype)
    gate_l = torch.rand(dl, generator=gen, dtype=dtype) if vector_gates else torch.tensor(0.4, dtype=dtype)
    v_pad = torch.zeros(b, nv, dtype=torch.bool)
    v_pad[1, 30:] = True
    l_pad = torch.zeros(b, lt, dtype=torch.bool)
    l_pad[0, 9:] = True
    return [v, l, pos, *params, gate_v, gate_l], heads, v_pad, l_pad


@pytest.mark.parametrize("vector_gates", [False, True])
def test_alif_bi_attention_triton_matches_torch_with_every_gradient(vector_gates):
    gen = torch.Generator().manual_seed(11)
    tensors, heads, v_pad, l_pad = _alif_case(gen, vector_gates)
    w_v = torch.randn(2, 40, 16, generator=gen)
    w_l = torch.randn(2, 12, 24, generator=gen)
    v_pad, l_pad, w_v, w_l = on_device(v_pad, l_pad, w_v, w_l)
    results = []
    for backend in ("torch", "triton"):
        leaves = [t.to(DEVICE).requires_grad_() for t in tensors]
        v_new, l_new = alif_bi_attention(*leaves, heads, v_pad_mask=v_pad, l_pad_mask=l_pad, backend=backend)
        ((v_new * w_v).sum() + (l_new * w_l).sum()).backward()
        results.append([t.cpu() for t in [v_new, l_new] + [t.grad for t in leaves]])
    names = ["v_new", "l_new", "v", "l", "v_pos", "w_q", "b_q", "w_k", "b_k", "w_vv", "b_vv", "w_vl", "b_vl",
             "w_ov", "b_ov", "w_ol", "b_ol", "gate_v", "gate_l"]
    for name, g, w in zip(names, results[1], results[0]):
        assert rel_err(g, w) <= 1e-5, name


def test_alif_triton_with_an_empty_label_set_matches_torch():
    """No labels: the image reads nothing (its update is the output bias), the label side is empty."""
    gen = torch.Generator().manual_seed(14)
    tensors, heads, v_pad, _ = _alif_case(gen, False)
    tensors[1] = tensors[1][:, :0]
    l_pad = torch.zeros(2, 0, dtype=torch.bool)
    v_pad, l_pad = on_device(v_pad, l_pad)
    results = []
    for backend in ("eager", "triton"):
        leaves = [t.to(DEVICE).requires_grad_() for t in tensors]
        v_new, l_new = alif_bi_attention(*leaves, heads, v_pad_mask=v_pad, l_pad_mask=l_pad, backend=backend)
        assert l_new.shape == (2, 0, 24)
        (v_new.square().sum() + l_new.sum()).backward()
        results.append([t.cpu() for t in [v_new] + [t.grad for t in leaves]])
    for i, (g, w) in enumerate(zip(results[1], results[0])):
        assert g.shape == w.shape and (g.numel() == 0 or rel_err(g, w) <= 1e-5), i


@pytest.mark.parametrize("splits", [2, 3])
def test_fused_alif_block_with_split_k_accumulates_both_directions(splits):
    """Forced key splits: q and k gradients are then summed by atomics from both directions."""
    gen = torch.Generator().manual_seed(13)
    tensors, heads, v_pad, l_pad = _alif_case(gen, False)
    v_pad, l_pad = on_device(v_pad, l_pad)
    results = []
    for run in ("reference", "fused"):
        leaves = [t.to(DEVICE).requires_grad_() for t in tensors]
        if run == "reference":
            outs = alif_bi_attention(*leaves, heads, v_pad_mask=v_pad, l_pad_mask=l_pad, backend="torch")
        else:
            outs = fused_alif_block(*leaves, heads, v_pad, l_pad, splits=splits)
        (outs[0].square().sum() + outs[1].sum()).backward()
        results.append([t.cpu() for t in list(outs) + [t.grad for t in leaves]])
    for i, (g, w) in enumerate(zip(results[1], results[0])):
        assert rel_err(g, w) <= 1e-5, i


def test_alif_triton_dropout_only_in_training():
    gen = torch.Generator().manual_seed(12)
    tensors, heads, v_pad, l_pad = _alif_case(gen, False)
    tensors = on_device(*tensors)
    v_pad, l_pad = on_device(v_pad, l_pad)
    kw = dict(v_pad_mask=v_pad, l_pad_mask=l_pad, dropout_p=0.5, backend="triton")
    evaluated = alif_bi_attention(*tensors, heads, training=False, **kw)
    reference = alif_bi_attention(*tensors, heads, v_pad_mask=v_pad, l_pad_mask=l_pad, backend="torch")
    assert all(rel_err(a, b) <= 1e-5 for a, b in zip(evaluated, reference))
    trained = alif_bi_attention(*tensors, heads, training=True, **kw)
    assert all(rel_err(a, b) > 1e-3 for a, b in zip(trained, reference))


@pytest.mark.parametrize("op,backend", [("ms_deform_attn", "triton"), ("ms_deform_attn", "triton_dense"),
                                        ("alif_bi_attention", "triton")])
def test_benchmark_rows_check_forward_and_gradients_against_fp64(op, backend):
    """The accuracy check `rlipv2 bench kernels` runs before timing (and before writing a path into
    the dispatch table), on tiny cases of its own builders."""
    from rlipv2_scale.kernels.bench import microbench

    if op == "ms_deform_attn":
        case = microbench._msda_case("encoder", (40, 56), None, 1, torch.float32, DEVICE)
    else:
        case = microbench._alif_case("original", 6, 8, 1, torch.float32, DEVICE)
    errors = microbench.check_case(case, backend)
    assert errors["rel_err_vs_fp64"] <= 1e-5 and 0 < errors["grad_rel_err_vs_fp64"] <= 1e-5, errors
    assert microbench.accurate(errors, "fp32")
