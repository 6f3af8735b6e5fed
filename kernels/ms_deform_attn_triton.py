"""Triton forward and backward of multi-scale deformable attention.

One program handles one image and a block of `BLOCK_R` consecutive (query, head) rows, i.e. a
`[queries x heads, D]` tile, and loops over levels x points: every sample gathers its four
bilinear corners as `[rows, D]` tiles and accumulates in fp32. The backward recomputes the corner
weights, reduces the location and weight gradients over D in registers (each row is owned by one
program, so they are plain stores) and atomically adds the value gradient into an fp32 buffer that
is cast to the value dtype at the end (no bf16 atomics). Offsets are int64 throughout.

Two backward variants (`BACKWARDS`): "atomic" adds every corner of every sample into `grad_value`
(four [rows, D] atomic tiles per sample). On the coarse levels (13x21 and 25x42 pixels at
800x1333, read by all 22k queries) those adds collide on a few hundred addresses, and that is
what bounded the backward on an H100 (benchmarks/results/gpu/README.md). "dense_coarse" leaves
the levels of at most `DENSE_MAX_PIXELS` pixels to a second kernel: one program per (image,
head, block of queries) builds, per chunk of the level's pixels, the matrix of bilinear weights
W[query, pixel] = sum over points of the attention weight times that pixel's corner weight (zero
unless the pixel is one of the sample's four corners; corners outside the map are in no chunk)
and adds W^T @ grad_out to the chunk with one atomic per (pixel, channel): the tile's samples are
summed by a matrix product on chip instead of by colliding atomics in memory.

Valid from Triton 3.6 on (no block pointers, no `tl.tanh`), and under `TRITON_INTERPRET=1`.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _bilinear_setup(loc_ptr, attn_ptr, row, k, L, P, rmask, h, w, ACC: tl.constexpr):
    """Load one sample per row; return attention weight, corner origin and fractional parts."""
    lp = row * L * P + k
    x = tl.load(loc_ptr + lp * 2, mask=rmask, other=0.0).to(ACC)
    y = tl.load(loc_ptr + lp * 2 + 1, mask=rmask, other=0.0).to(ACC)
    a = tl.load(attn_ptr + lp, mask=rmask, other=0.0).to(ACC)
    # grid_sample's own arithmetic (grid = 2 loc - 1, pixel = (grid + 1) W/2 - 1/2), so that samples
    # on pixel centres fall on the same side of floor() as the reference
    ix = (x * 2.0 - 1.0 + 1.0) * (w.to(ACC) * 0.5) - 0.5
    iy = (y * 2.0 - 1.0 + 1.0) * (h.to(ACC) * 0.5) - 0.5
    x0f = tl.floor(ix)
    y0f = tl.floor(iy)
    return a, x0f.to(tl.int64), y0f.to(tl.int64), ix - x0f, iy - y0f


@triton.jit
def _corner_offsets(xi, yi, h, w, start, m, rmask, d, dmask, M, D):
    valid = rmask & (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    tok = start + yi * w + xi
    offs = (tok * M + m)[:, None] * D + d[None, :]
    return offs, valid[:, None] & dmask[None, :]


@triton.jit
def _msda_fwd_kernel(value_ptr, shapes_ptr, lsi_ptr, loc_ptr, attn_ptr, out_ptr, S, Lq, L, P,
                     M: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                     ACC: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    rg = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    rmask = rg < Lq * M
    m = rg % M
    row = n * Lq * M + rg
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    vbase = value_ptr + n * S * M * D
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    for lvl in range(L):
        h = tl.load(shapes_ptr + 2 * lvl)
        w = tl.load(shapes_ptr + 2 * lvl + 1)
        start = tl.load(lsi_ptr + lvl)
        for p in range(P):
            a, x0, y0, fx, fy = _bilinear_setup(loc_ptr, attn_ptr, row, lvl * P + p, L, P, rmask, h, w, ACC)
            o, msk = _corner_offsets(x0, y0, h, w, start, m, rmask, d, dmask, M, D)
            v00 = tl.load(vbase + o, mask=msk, other=0.0).to(ACC)
            o, msk = _corner_offsets(x0 + 1, y0, h, w, start, m, rmask, d, dmask, M, D)
            v01 = tl.load(vbase + o, mask=msk, other=0.0).to(ACC)
            o, msk = _corner_offsets(x0, y0 + 1, h, w, start, m, rmask, d, dmask, M, D)
            v10 = tl.load(vbase + o, mask=msk, other=0.0).to(ACC)
            o, msk = _corner_offsets(x0 + 1, y0 + 1, h, w, start, m, rmask, d, dmask, M, D)
            v11 = tl.load(vbase + o, mask=msk, other=0.0).to(ACC)
            top = v00 + (v01 - v00) * fx[:, None]
            bottom = v10 + (v11 - v10) * fx[:, None]
            acc += a[:, None] * (top + (bottom - top) * fy[:, None])
    out_offs = row[:, None] * D + d[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


@triton.jit
def _msda_bwd_kernel(value_ptr, shapes_ptr, lsi_ptr, loc_ptr, attn_ptr, gout_ptr,
                     gvalue_ptr, gloc_ptr, gattn_ptr, S, Lq, L, P, dense_max,
                     M: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                     ACC: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    rg = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    rmask = rg < Lq * M
    m = rg % M
    row = n * Lq * M + rg
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    vbase = value_ptr + n * S * M * D
    gvbase = gvalue_ptr + n * S * M * D
    go = tl.load(gout_ptr + row[:, None] * D + d[None, :], mask=rmask[:, None] & dmask[None, :],
                 other=0.0).to(ACC)
    for lvl in range(L):
        h = tl.load(shapes_ptr + 2 * lvl)
        w = tl.load(shapes_ptr + 2 * lvl + 1)
        start = tl.load(lsi_ptr + lvl)
        scatter = h * w > dense_max  # else `_msda_bwd_dense_kernel` writes this level's grad_value
        for p in range(P):
            k = lvl * P + p
            a, x0, y0, fx, fy = _bilinear_setup(loc_ptr, attn_ptr, row, k, L, P, rmask, h, w, ACC)
            gx = 1.0 - fx
            gy = 1.0 - fy
            ag = a[:, None] * go
            o00, m00 = _corner_offsets(x0, y0, h, w, start, m, rmask, d, dmask, M, D)
            o01, m01 = _corner_offsets(x0 + 1, y0, h, w, start, m, rmask, d, dmask, M, D)
            o10, m10 = _corner_offsets(x0, y0 + 1, h, w, start, m, rmask, d, dmask, M, D)
            o11, m11 = _corner_offsets(x0 + 1, y0 + 1, h, w, start, m, rmask, d, dmask, M, D)
            v00 = tl.load(vbase + o00, mask=m00, other=0.0).to(ACC)
            v01 = tl.load(vbase + o01, mask=m01, other=0.0).to(ACC)
            v10 = tl.load(vbase + o10, mask=m10, other=0.0).to(ACC)
            v11 = tl.load(vbase + o11, mask=m11, other=0.0).to(ACC)
            sampled = (gy * gx)[:, None] * v00 + (gy * fx)[:, None] * v01 \
                + (fy * gx)[:, None] * v10 + (fy * fx)[:, None] * v11
            d_fx = gy[:, None] * (v01 - v00) + fy[:, None] * (v11 - v10)
            d_fy = gx[:, None] * (v10 - v00) + fx[:, None] * (v11 - v01)
            wf = w.to(ACC)
            hf = h.to(ACC)
            lp = row * L * P + k
            tl.store(gattn_ptr + lp, tl.sum(sampled * go, axis=1), mask=rmask)
            tl.store(gloc_ptr + lp * 2, tl.sum(d_fx * ag, axis=1) * wf, mask=rmask)
            tl.store(gloc_ptr + lp * 2 + 1, tl.sum(d_fy * ag, axis=1) * hf, mask=rmask)
            if scatter:
                tl.atomic_add(gvbase + o00, (gy * gx)[:, None] * ag, mask=m00, sem="relaxed")
                tl.atomic_add(gvbase + o01, (gy * fx)[:, None] * ag, mask=m01, sem="relaxed")
                tl.atomic_add(gvbase + o10, (fy * gx)[:, None] * ag, mask=m10, sem="relaxed")
                tl.atomic_add(gvbase + o11, (fy * fx)[:, None] * ag, mask=m11, sem="relaxed")


@triton.jit
def _msda_bwd_dense_kernel(shapes_ptr, lsi_ptr, loc_ptr, attn_ptr, gout_ptr, gvalue_ptr, S, Lq, L, P, dense_max,
                           M: tl.constexpr, D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_PIX: tl.constexpr,
                           BLOCK_D: tl.constexpr, ACC: tl.constexpr, USE_DOT: tl.constexpr, PREC: tl.constexpr):
    """grad_value of the levels with at most `dense_max` pixels, for one image, head and query block."""
    nm = tl.program_id(0).to(tl.int64)
    n = nm // M
    m = nm % M
    q = tl.program_id(1).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q).to(tl.int64)
    qmask = q < Lq
    row = (n * Lq + q) * M + m
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    go = tl.load(gout_ptr + row[:, None] * D + d[None, :], mask=qmask[:, None] & dmask[None, :],
                 other=0.0).to(ACC)
    gvbase = gvalue_ptr + n * S * M * D
    for lvl in range(L):
        h = tl.load(shapes_ptr + 2 * lvl)
        w = tl.load(shapes_ptr + 2 * lvl + 1)
        start = tl.load(lsi_ptr + lvl)
        hw = h * w
        if hw <= dense_max:
            for pix0 in range(0, hw, BLOCK_PIX):
                pix = pix0 + tl.arange(0, BLOCK_PIX).to(tl.int64)
                pmask = pix < hw
                px = pix % w
                py = pix // w
                wts = tl.zeros([BLOCK_Q, BLOCK_PIX], dtype=ACC)
                for p in range(P):
                    a, x0, y0, fx, fy = _bilinear_setup(loc_ptr, attn_ptr, row, lvl * P + p, L, P, qmask, h, w,
                                                        ACC)
                    # the same corner weights as the scattering kernel: 1 - f at the corner, f one
                    # pixel on, zero elsewhere (corners outside the map are not in any chunk)
                    dx = px[None, :] - x0[:, None]
                    dy = py[None, :] - y0[:, None]
                    tx = tl.where(dx == 0, 1.0 - fx[:, None], tl.where(dx == 1, fx[:, None], 0.0))
                    ty = tl.where(dy == 0, 1.0 - fy[:, None], tl.where(dy == 1, fy[:, None], 0.0))
                    wts += a[:, None] * tx * ty
                if USE_DOT:
                    g = tl.dot(tl.trans(wts), go, input_precision=PREC)
                else:  # fp64: a broadcast product (no fp64 tensor-core dot to rely on)
                    g = tl.sum(wts[:, :, None] * go[:, None, :], axis=0)
                offs = ((start + pix) * M + m)[:, None] * D + d[None, :]
                tl.atomic_add(gvbase + offs, g, mask=pmask[:, None] & dmask[None, :], sem="relaxed")


BACKWARDS = ("atomic", "dense_coarse")
# Levels of at most this many pixels take the dense backward: at 800x1333 the two coarsest
# (273 and 1,050 pixels), each read by every query; the 50x84 level (4,200) stays scattered.
DENSE_MAX_PIXELS = 2048
# (queries, pixels, warps) per program of the dense kernel on a GPU: sm_90 ptxas, no spills in bf16
# or fp32 (tests/test_kernels_compile.py); 64x64 with 4 warps spilled. Not yet timed on a GPU.
DENSE_TILE = (64, 64, 8)


def _launch_config(rows: int, images: int, backward: bool) -> tuple[int, int]:
    """(query x head rows per program, warps). The gather-bound kernels want many resident warps,
    so tiles stay small enough for several programs per SM (sm_90 ptxas: forward 32 rows x 8 warps
    ~80 registers, backward 16 rows x 4 warps ~145, no spills); the decoder call (a few hundred
    queries) takes 16-row tiles to spread over the SMs. The interpreter runs programs one by one,
    so there the biggest tile is the fastest."""
    if _interpreting():
        return 128, 4
    if backward or rows * images < (1 << 17):
        return 16, 4
    return 32, 4


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _buffer_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


class MSDeformAttnFunction(torch.autograd.Function):
    """Autograd wrapper: gradients for value, sampling locations and attention weights."""

    @staticmethod
    def forward(ctx, value, shapes, level_start, locations, weights, variant="atomic"):
        value = value.contiguous()
        locations = locations.contiguous()
        weights = weights.contiguous()
        shapes = shapes.to(device=value.device, dtype=torch.int64).contiguous()
        level_start = level_start.to(device=value.device, dtype=torch.int64).contiguous()
        n, s, m, d = value.shape
        _, lq, _, levels, points, _ = locations.shape
        out = torch.empty(n, lq, m * d, device=value.device, dtype=value.dtype)
        ctx.save_for_backward(value, shapes, level_start, locations, weights)
        ctx.variant = variant
        if out.numel() == 0:
            return out
        block_r, warps = _launch_config(lq * m, n, backward=False)
        acc = _acc_dtype(_buffer_dtype(value, locations, weights))
        grid = (n, triton.cdiv(lq * m, block_r))
        _msda_fwd_kernel[grid](value, shapes, level_start, locations, weights, out, s, lq, levels, points,
                               M=m, D=d, BLOCK_R=block_r, BLOCK_D=triton.next_power_of_2(d), ACC=acc,
                               num_warps=warps)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        value, shapes, level_start, locations, weights = ctx.saved_tensors
        grad_out = grad_out.contiguous()  # callers may hand a transposed / expanded gradient
        n, s, m, d = value.shape
        _, lq, _, levels, points, _ = locations.shape
        buf = _buffer_dtype(value, locations, weights)
        grad_value = torch.zeros(value.shape, device=value.device, dtype=buf)
        grad_loc = torch.empty(locations.shape, device=value.device, dtype=buf)  # every row is written
        grad_attn = torch.empty(weights.shape, device=value.device, dtype=buf)
        block_r, warps = _launch_config(lq * m, n, backward=True)
        grid = (n, triton.cdiv(lq * m, block_r))
        dense_max = DENSE_MAX_PIXELS if ctx.variant == "dense_coarse" else -1
        if grad_out.numel():  # no queries: nothing to launch, every gradient is empty or zero
            _msda_bwd_kernel[grid](value, shapes, level_start, locations, weights, grad_out,
                                   grad_value, grad_loc, grad_attn, s, lq, levels, points, dense_max,
                                   M=m, D=d, BLOCK_R=block_r, BLOCK_D=triton.next_power_of_2(d),
                                   ACC=_acc_dtype(buf), num_warps=warps)
            if dense_max > 0:
                _dense_backward(shapes, level_start, locations, weights, grad_out, grad_value, dense_max)
        return (grad_value.to(value.dtype), None, None, grad_loc.to(locations.dtype), grad_attn.to(weights.dtype),
                None)


def _dense_backward(shapes, level_start, locations, weights, grad_out, grad_value, dense_max: int) -> None:
    n, s, m, d = grad_value.shape
    _, lq, _, levels, points, _ = locations.shape
    block_q, block_pix, warps = (32, 32, 4) if _interpreting() else DENSE_TILE
    acc = _acc_dtype(grad_value.dtype)
    wide = grad_value.dtype == torch.float64
    # 16-bit inputs: TF32 products round less than the bf16 gradient they produce; fp32 inputs keep
    # fp32 accuracy with three TF32 products; the interpreter computes in full precision anyway
    prec = "ieee" if _interpreting() else ("tf32" if grad_out.dtype in (torch.float16, torch.bfloat16) else "tf32x3")
    _msda_bwd_dense_kernel[(n * m, triton.cdiv(lq, block_q))](
        shapes, level_start, locations, weights, grad_out, grad_value, s, lq, levels, points, dense_max,
        M=m, D=d, BLOCK_Q=block_q, BLOCK_PIX=block_pix, BLOCK_D=max(16, triton.next_power_of_2(d)), ACC=acc,
        USE_DOT=not wide, PREC=prec, num_warps=warps)
