"""Fused ALIF in Triton: the masked attention core (forward, backward, split-K, in-kernel dropout)
and the whole gated bidirectional block as one autograd function.

ALIF's two directions are two attentions over one logit matrix `A = scale * Q K^T`: the vision
direction is `attn(Q, K, Vl)` (softmax over labels), the language direction `attn(K, Q, Vv)`
(softmax over image tokens of `A^T`). Each call streams key blocks through an online softmax and
keeps only the row log-sum-exp, so the logits never reach global memory. The many-keys case
(200 labels reading 22k image tokens when every level is fused) splits the keys over several
programs per query block (split-K) and merges the partial results by their log-sum-exps; the
backward splits the same way and accumulates into fp32 buffers with atomics.

Tensors stay in the projections' `[B, N, heads * D]` layout: the kernels read and write heads
through strides, so no transposing copy is made in either direction. On a GPU 16-bit inputs go
to the tensor cores as they are (fp32 accumulation, probabilities rounded to the input dtype for
the second product, as FlashAttention does); the interpreter cannot multiply 16-bit tiles
correctly, so there every tile is cast to fp32 first.

Dropout uses Triton's counter-based RNG (`tl.rand(seed, offset)` with offset = query * Nk + key
and one seed per (image, head)), so the backward regenerates the forward's mask exactly.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# [B,N,H*D] <-> [B,H,N,D] views; merging a [B,H,N,D] view of a [B,N,H,D] tensor copies nothing
from rlipv2_scale.kernels.heads import merge_heads, split_heads

STORE, ADD, ATOMIC = 0, 1, 2  # how a kernel writes a gradient another kernel may also write


@triton.jit
def _key_valid(kmask_ptrs, cols, Nk, HAS_MASK: tl.constexpr):
    valid = cols < Nk
    if HAS_MASK:
        valid = valid & (tl.load(kmask_ptrs, mask=cols < Nk, other=1) == 0)
    return valid


@triton.jit
def _logits(q, kt, valid, scale, PREC: tl.constexpr):
    """Scaled logits of a query tile against a key tile [D, N]; out-of-range and padded keys -inf."""
    return tl.where(valid[None, :], tl.dot(q, kt, input_precision=PREC) * scale, float("-inf"))


@triton.jit
def _safe_lse(lse):
    """A row without valid keys has lse = -inf; +inf makes its probabilities exp(s - lse) zero."""
    return tl.where(lse == float("-inf"), float("inf"), lse)


@triton.jit
def _keep(seed, bh, rows, cols, Nk, dropout_p):
    offs = rows[:, None] * Nk + cols[None, :]
    return tl.rand(seed + bh, offs) >= dropout_p


@triton.jit
def _write(ptrs, val, mask, MODE: tl.constexpr):
    if MODE == 2:
        tl.atomic_add(ptrs, val, mask=mask, sem="relaxed")
    elif MODE == 1:  # this program owns the rows: a plain read-modify-write after an earlier kernel
        old = tl.load(ptrs, mask=mask, other=0.0).to(val.dtype)
        tl.store(ptrs, (old + val).to(ptrs.dtype.element_ty), mask=mask)
    else:
        tl.store(ptrs, val.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed"])  # a fresh seed per call must not recompile
def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, kmask_ptr, o_ptr, lse_ptr,
                     sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, sos,
                     H, Nq, Nk, D, scale, blocks_per_split, seed, dropout_p,
                     HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
                     PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    rmask = rows < Nq
    q = tl.load(q_ptr + b * sqb + h * sqh + rows.to(tl.int64)[:, None] * sqn + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0).to(DOT)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    kbase = k_ptr + b * skb + h * skh
    vbase = v_ptr + b * svb + h * svh
    n_start = split * blocks_per_split * BLOCK_N
    n_end = tl.minimum(n_start + blocks_per_split * BLOCK_N, Nk)
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        kt = tl.load(kbase + cols.to(tl.int64)[None, :] * skn + d[:, None],
                     mask=(cols < Nk)[None, :] & dmask[:, None], other=0.0).to(DOT)
        s = _logits(q, kt, _key_valid(kmask_ptr + b * Nk + cols, cols, Nk, HAS_MASK), scale, PREC).to(ACC)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no valid key so far
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DROPOUT:
            p = tl.where(_keep(seed, bh, rows, cols, Nk, dropout_p), p / (1.0 - dropout_p), 0.0)
        vt = tl.load(vbase + cols.to(tl.int64)[:, None] * svn + d[None, :],
                     mask=(cols < Nk)[:, None] & dmask[None, :], other=0.0).to(DOT)
        # accumulating inside the product keeps one accumulator tile in registers
        acc = tl.dot(p.to(DOT), vt, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + split * sos + b * sob + h * soh + rows.to(tl.int64)[:, None] * son + d[None, :],
             o.to(o_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
    # lse is laid out [splits, B*H, Nq]
    lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    tl.store(lse_ptr + (split * tl.num_programs(1) + bh) * Nq + rows.to(tl.int64), lse, mask=rmask)


@triton.jit(do_not_specialize=["seed"])
def _attn_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, kmask_ptr, do_ptr, o_ptr, lse_ptr, delta_ptr, dq_ptr,
                        sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sob, soh, son,
                        sgb, sgh, sgn, H, Nq, Nk, D, scale, blocks_per_split, seed, dropout_p,
                        HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, MODE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """dq of one query block; also writes delta = rowsum(dO * O), which the dk/dv kernel reads
    (launched after this one). Several key splits write the same delta values: harmless."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < Nq
    r64 = rows.to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    tile = rmask[:, None] & dmask[None, :]
    q = tl.load(q_ptr + b * sqb + h * sqh + r64[:, None] * sqn + d[None, :], mask=tile, other=0.0).to(DOT)
    do = tl.load(do_ptr + b * sdb + h * sdh + r64[:, None] * sdn + d[None, :], mask=tile, other=0.0)
    o = tl.load(o_ptr + b * sob + h * soh + r64[:, None] * son + d[None, :], mask=tile, other=0.0)
    delta = tl.sum(do.to(ACC) * o.to(ACC), axis=1)
    tl.store(delta_ptr + bh * Nq + r64, delta, mask=rmask)
    do = do.to(DOT)
    lse = _safe_lse(tl.load(lse_ptr + bh * Nq + r64, mask=rmask, other=0.0))
    kbase = k_ptr + b * skb + h * skh
    vbase = v_ptr + b * svb + h * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    n_start = split * blocks_per_split * BLOCK_N
    n_end = tl.minimum(n_start + blocks_per_split * BLOCK_N, Nk)
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        c64 = cols.to(tl.int64)
        k = tl.load(kbase + c64[:, None] * skn + d[None, :], mask=(cols < Nk)[:, None] & dmask[None, :],
                    other=0.0).to(DOT)
        s = _logits(q, tl.trans(k), _key_valid(kmask_ptr + b * Nk + cols, cols, Nk, HAS_MASK), scale,
                    PREC).to(ACC)
        p = tl.where(rmask[:, None], tl.exp(s - lse[:, None]), 0.0)
        vt = tl.load(vbase + c64[None, :] * svn + d[:, None], mask=(cols < Nk)[None, :] & dmask[:, None],
                     other=0.0).to(DOT)
        dp = tl.dot(do, vt, input_precision=PREC).to(ACC)
        if DROPOUT:
            dp = tl.where(_keep(seed, bh, rows, cols, Nk, dropout_p), dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(DOT), k, dq, input_precision=PREC)
    _write(dq_ptr + b * sgb + h * sgh + r64[:, None] * sgn + d[None, :], dq * scale, tile, MODE)


@triton.jit(do_not_specialize=["seed"])
def _attn_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, kmask_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                          sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
                          sgb, sgh, sgn, shb, shh, shn, H, Nq, Nk, D, scale, blocks_per_split, seed, dropout_p,
                          HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, MODE_K: tl.constexpr,
                          MODE_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    b = bh // H
    h = bh % H
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < Nk
    c64 = cols.to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    # keys as [D, N] (for q @ k^T) and values as [N, D]
    kt = tl.load(k_ptr + b * skb + h * skh + c64[None, :] * skn + d[:, None], mask=cmask[None, :] & dmask[:, None],
                 other=0.0).to(DOT)
    valid = _key_valid(kmask_ptr + b * Nk + cols, cols, Nk, HAS_MASK)
    v = tl.load(v_ptr + b * svb + h * svh + c64[:, None] * svn + d[None, :],
                mask=cmask[:, None] & dmask[None, :], other=0.0).to(DOT)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    m_start = split * blocks_per_split * BLOCK_M
    m_end = tl.minimum(m_start + blocks_per_split * BLOCK_M, Nq)
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < Nq
        r64 = rows.to(tl.int64)
        q = tl.load(q_ptr + b * sqb + h * sqh + r64[:, None] * sqn + d[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0).to(DOT)
        do = tl.load(do_ptr + b * sdb + h * sdh + r64[:, None] * sdn + d[None, :],
                     mask=rmask[:, None] & dmask[None, :], other=0.0).to(DOT)
        lse = _safe_lse(tl.load(lse_ptr + bh * Nq + r64, mask=rmask, other=0.0))
        delta = tl.load(delta_ptr + bh * Nq + r64, mask=rmask, other=0.0)
        s = _logits(q, kt, valid, scale, PREC).to(ACC)
        p = tl.where(rmask[:, None], tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC).to(ACC)
        if DROPOUT:
            keep = _keep(seed, bh, rows, cols, Nk, dropout_p)
            pd = tl.where(keep, p / (1.0 - dropout_p), 0.0)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        else:
            pd = p
        dv = tl.dot(tl.trans(pd.to(DOT)), do, dv, input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dk = tl.dot(tl.trans(ds.to(DOT)), q, dk, input_precision=PREC)
    omask = cmask[:, None] & dmask[None, :]
    _write(dk_ptr + b * sgb + h * sgh + c64[:, None] * sgn + d[None, :], dk * scale, omask, MODE_K)
    _write(dv_ptr + b * shb + h * shh + c64[:, None] * shn + d[None, :], dv, omask, MODE_V)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_HALF = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# Tiles on a GPU at ALIF's head dim (256), per kernel and input width, as (BLOCK_M, BLOCK_N, warps,
# stages). 16-bit: the fastest correct ones of `kernels/bench/alif_tiles.py` on an H200
# (benchmarks/results/gpu/alif_tiles_nvidia_h200.json; 8-warp dk/dv tiles with 64 keys came out
# wrong there and are avoided). fp32: small tiles that fit the registers without spilling.
WIDE_TILES = {
    ("fwd", 16): (128, 64, 8, 2), ("dq", 16): (64, 16, 4, 2), ("dkdv", 16): (64, 32, 4, 2),
    ("fwd", 32): (16, 16, 8, 2), ("dq", 32): (16, 16, 8, 2), ("dkdv", 32): (16, 16, 8, 2),
}
FP32_PRECISION = "ieee"  # fp32 inputs: full-precision products (the tests hold them to 1e-5)


def _config(head_dim: int, dtype: torch.dtype, kernel: str = "fwd") -> dict:
    """Launch configuration of `kernel` ("fwd" | "dq" | "dkdv") for this head dim and input dtype."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    if _interpreting():  # programs run one by one: the largest tiles are the fastest
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=block_d, ACC=acc, DOT=acc, PREC="ieee", num_warps=4,
                    num_stages=2)
    bits = 16 if dtype in _HALF else 32
    if block_d >= 128:
        block_m, block_n, warps, stages = WIDE_TILES[(kernel, bits)]
    else:
        block_m, block_n, warps, stages = 64, 32, 4, 2
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, ACC=acc, DOT=_HALF.get(dtype, acc),
                PREC=FP32_PRECISION if bits == 32 else "ieee", num_warps=warps, num_stages=stages)


def _num_splits(base_programs: int, loop_blocks: int, requested: int | None,
                target_programs: int = 264, min_loop: int = 8) -> tuple[int, int]:
    """(splits, blocks per split). Long loops over few programs split until `target_programs`
    are running, keeping at least 4 blocks per split; loops under `min_loop` blocks never split
    (the merge, or the zeroed fp32 buffers and casts, would cost more launches than it saves). The
    forward aims at two waves of 132 SMs, since its splits
    are merged through an fp32 buffer per split; the backward's splits only add a small [Nk, D]
    tile atomically, so it aims at eight: the H200 tile search showed the backward dominating,
    with its long-loop kernels (dk/dv over 22k image tokens, dq of the labels) running 1-2
    programs per SM."""
    if loop_blocks == 0:  # nothing to loop over (no keys): one program, whose loop is empty
        return 1, 1
    if requested is None:
        if _interpreting() or loop_blocks < min_loop:
            requested = 1
        else:
            requested = min(max(1, target_programs // max(base_programs, 1)), loop_blocks // 4)
    splits = max(1, min(requested, loop_blocks))
    per_split = triton.cdiv(loop_blocks, splits)
    return triton.cdiv(loop_blocks, per_split), per_split


BACKWARD_PROGRAMS = 8 * 132


def _bhn(x: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, token) strides of a [B, H, N, D] view with a unit last stride."""
    assert x.stride(-1) == 1
    return x.stride(0), x.stride(1), x.stride(2)


def _kmask(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else mask.contiguous().view(torch.int8)  # same bytes, no copy


def _flags(kmask, dropout_p: float) -> dict:
    return dict(HAS_MASK=kmask is not None, DROPOUT=dropout_p > 0.0)


def core_forward(q, k, v, kmask, scale: float, dropout_p: float, seed: int, splits: int | None = None):
    """q [B,H,Nq,D], k/v [B,H,Nk,D] views (unit last stride), kmask int8 [B,Nk] or None.

    Returns (out [B,H,Nq,D] view of a [B,Nq,H,D] tensor in q's dtype, lse [B*H,Nq] fp32/fp64)."""
    bsz, heads, nq, dim = q.shape
    nk = k.shape[2]
    cfg = _config(dim, q.dtype, "fwd")
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if nq == 0 or nk == 0:  # an empty label set: nothing to read, a zero update (as the reference)
        out = torch.zeros(bsz, nq, heads, dim, device=q.device, dtype=q.dtype).transpose(1, 2)
        return out, torch.full((bsz * heads, nq), float("-inf"), device=q.device, dtype=acc_dtype)
    m_blocks = triton.cdiv(nq, cfg["BLOCK_M"])
    n_splits, per_split = _num_splits(m_blocks * bsz * heads, triton.cdiv(nk, cfg["BLOCK_N"]), splits)
    if n_splits == 1:
        out = torch.empty(bsz, nq, heads, dim, device=q.device, dtype=q.dtype)
    else:
        out = torch.empty(n_splits, bsz, nq, heads, dim, device=q.device, dtype=acc_dtype)
    lse = torch.empty(n_splits, bsz * heads, nq, device=q.device, dtype=acc_dtype)
    ob = out.view(-1, nq, heads, dim)
    _attn_fwd_kernel[(m_blocks, bsz * heads, n_splits)](
        q, k, v, kmask if kmask is not None else q, out, lse, *_bhn(q), *_bhn(k), *_bhn(v),
        ob.stride(0), ob.stride(2), ob.stride(1), bsz * ob.stride(0), heads, nq, nk, dim, scale, per_split,
        seed, dropout_p, **_flags(kmask, dropout_p), **cfg)
    if n_splits == 1:
        return out.transpose(1, 2), lse[0]
    # merge the key splits by their log-sum-exps
    total = torch.logsumexp(lse, dim=0)
    weights = torch.exp(lse - total.masked_fill(total == float("-inf"), 0.0))
    weights = weights.view(n_splits, bsz, heads, nq).transpose(2, 3).unsqueeze(-1)
    return (out * weights).sum(0).to(q.dtype).transpose(1, 2), total


def _splits_dq(q, k, splits):
    cfg = _config(q.shape[3], q.dtype, "dq")
    m_blocks = triton.cdiv(q.shape[2], cfg["BLOCK_M"])
    return cfg, m_blocks, _num_splits(m_blocks * q.shape[0] * q.shape[1], triton.cdiv(k.shape[2], cfg["BLOCK_N"]),
                                      splits, BACKWARD_PROGRAMS, 32)


def _splits_dkdv(q, k, splits):
    cfg = _config(q.shape[3], q.dtype, "dkdv")
    n_blocks = triton.cdiv(k.shape[2], cfg["BLOCK_N"])
    return cfg, n_blocks, _num_splits(n_blocks * q.shape[0] * q.shape[1], triton.cdiv(q.shape[2], cfg["BLOCK_M"]),
                                      splits, BACKWARD_PROGRAMS, 32)


def _grad_buffer(like: torch.Tensor, atomic: bool) -> torch.Tensor:
    """A [B,N,H,D] gradient seen as [B,H,N,D]: fp32 zeros when atomics add into it."""
    b, h, n, d = like.shape
    if atomic:
        buf = torch.float64 if like.dtype == torch.float64 else torch.float32
        return torch.zeros(b, n, h, d, device=like.device, dtype=buf).transpose(1, 2)
    return torch.empty(b, n, h, d, device=like.device, dtype=like.dtype).transpose(1, 2)


def core_backward(q, k, v, kmask, out, lse, grad_out, scale, dropout_p, seed, splits, dq, dk, dv,
                  mode_q: int, mode_k: int, mode_v: int) -> None:
    """Writes (or adds, per mode) the gradients of q, k, v into the [B,H,N,D] views dq, dk, dv."""
    bsz, heads, nq, dim = q.shape
    nk = k.shape[2]
    if nq == 0 or nk == 0:  # no logits: every gradient from this direction is zero
        for grad, mode in ((dq, mode_q), (dk, mode_k), (dv, mode_v)):
            if mode == STORE:
                grad.zero_()
        return
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    flags = _flags(kmask, dropout_p)
    kmask_arg = kmask if kmask is not None else q
    delta = torch.empty(bsz * heads, nq, device=q.device, dtype=lse.dtype)
    cfg, m_blocks, (q_splits, per_split) = _splits_dq(q, k, splits)
    _attn_bwd_dq_kernel[(m_blocks, bsz * heads, q_splits)](
        q, k, v, kmask_arg, grad_out, out, lse, delta, dq, *_bhn(q), *_bhn(k), *_bhn(v), *_bhn(grad_out),
        *_bhn(out), *_bhn(dq), heads, nq, nk, dim, scale, per_split, seed, dropout_p, MODE=mode_q, **flags, **cfg)
    cfg, n_blocks, (kv_splits, per_split) = _splits_dkdv(q, k, splits)
    _attn_bwd_dkdv_kernel[(n_blocks, bsz * heads, kv_splits)](
        q, k, v, kmask_arg, grad_out, lse, delta, dk, dv, *_bhn(q), *_bhn(k), *_bhn(v), *_bhn(grad_out),
        *_bhn(dk), *_bhn(dv), heads, nq, nk, dim, scale, per_split, seed, dropout_p,
        MODE_K=mode_k, MODE_V=mode_v, **flags, **cfg)


def _draw_seed(dropout_p: float) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,)).item()) if dropout_p > 0.0 else 0


class FusedAttention(torch.autograd.Function):
    """softmax_keys(scale q k^T, padded keys masked) [dropout] @ v without materialising the logits."""

    @staticmethod
    def forward(ctx, q, k, v, key_pad_mask, scale, dropout_p, seed, splits):
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        kmask = _kmask(key_pad_mask)
        out, lse = core_forward(q, k, v, kmask, scale, dropout_p, seed, splits)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.kmask, ctx.scale, ctx.dropout_p, ctx.seed, ctx.splits = kmask, scale, dropout_p, seed, splits
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        atomic_q = _splits_dq(q, k, ctx.splits)[2][0] > 1
        atomic_kv = _splits_dkdv(q, k, ctx.splits)[2][0] > 1
        grads = [_grad_buffer(q, atomic_q), _grad_buffer(k, atomic_kv), _grad_buffer(v, atomic_kv)]
        modes = [ATOMIC if atomic else STORE for atomic in (atomic_q, atomic_kv, atomic_kv)]
        core_backward(q, k, v, ctx.kmask, out, lse, grad_out, ctx.scale, ctx.dropout_p, ctx.seed, ctx.splits,
                      *grads, *modes)
        return (*(g.to(t.dtype) for g, t in zip(grads, (q, k, v))), None, None, None, None, None)


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_pad_mask: torch.Tensor | None,
                    scale: float, dropout_p: float = 0.0, seed: int | None = None,
                    splits: int | None = None) -> torch.Tensor:
    """One direction: q [B,H,Nq,D], k/v [B,H,Nk,D], key_pad_mask [B,Nk] bool (True = padding) or None.

    `seed` fixes the dropout mask (drawn from torch's generator when None); `splits` forces the
    number of key splits (tests), otherwise it is chosen to fill the GPU.
    """
    seed = _draw_seed(dropout_p) if seed is None else seed
    return FusedAttention.apply(q, k, v, key_pad_mask, scale, dropout_p, seed, splits)


def _gate_grad(grad: torch.Tensor, update: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    prod = grad * update
    summed = prod.sum() if gate.dim() == 0 else prod.reshape(-1, gate.shape[-1]).sum(0)
    return summed.to(gate.dtype)


def _linear_grads(grad: torch.Tensor, inp: torch.Tensor, needs_w: bool, needs_b: bool):
    g2 = grad.reshape(-1, grad.shape[-1])
    gw = g2.t().mm(inp.reshape(-1, inp.shape[-1])) if needs_w else None
    gb = g2.sum(0) if needs_b else None
    return gw, gb


class FusedAlifBlock(torch.autograd.Function):
    """The whole gated bidirectional block with a hand-written backward: the projections, both
    attention directions in the fused kernels, the gates and the residuals. One autograd node,
    about half the launches of the eager block, which is what bounds it at the original shape."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")  # under autocast, the backward runs under it too
    def forward(ctx, v, l, v_pos, w_q, b_q, w_k, b_k, w_vv, b_vv, w_vl, b_vl, w_ov, b_ov, w_ol, b_ol,
                gate_v, gate_l, v_pad_mask, l_pad_mask, heads, dropout_p, splits):
        scale = (w_q.shape[0] // heads) ** -0.5
        seeds = (_draw_seed(dropout_p), _draw_seed(dropout_p))
        x = v + v_pos
        q, k = F.linear(x, w_q, b_q), F.linear(l, w_k, b_k)
        vv, vl = F.linear(v, w_vv, b_vv), F.linear(l, w_vl, b_vl)
        vmask, lmask = _kmask(v_pad_mask), _kmask(l_pad_mask)
        qh, kh = split_heads(q, heads), split_heads(k, heads)
        out_v, lse_v = core_forward(qh, kh, split_heads(vl, heads), lmask, scale, dropout_p, seeds[0], splits)
        out_l, lse_l = core_forward(kh, qh, split_heads(vv, heads), vmask, scale, dropout_p, seeds[1], splits)
        out_v, out_l = merge_heads(out_v), merge_heads(out_l)
        y_v, y_l = F.linear(out_v, w_ov, b_ov), F.linear(out_l, w_ol, b_ol)
        ctx.save_for_backward(v, l, x, q, k, vv, vl, out_v, out_l, lse_v, lse_l, y_v, y_l,
                              w_q, w_k, w_vv, w_vl, w_ov, w_ol, gate_v, gate_l)
        ctx.masks, ctx.seeds, ctx.scale = (vmask, lmask), seeds, scale
        ctx.heads, ctx.dropout_p, ctx.splits = heads, dropout_p, splits
        return torch.addcmul(v, gate_v, y_v), torch.addcmul(l, gate_l, y_l)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g_vnew, g_lnew):
        (v, l, x, q, k, vv, vl, out_v, out_l, lse_v, lse_l, y_v, y_l,
         w_q, w_k, w_vv, w_vl, w_ov, w_ol, gate_v, gate_l) = ctx.saved_tensors
        need = ctx.needs_input_grad
        heads, p, splits = ctx.heads, ctx.dropout_p, ctx.splits
        vmask, lmask = ctx.masks
        g_gate_v = _gate_grad(g_vnew, y_v, gate_v) if need[15] else None
        g_gate_l = _gate_grad(g_lnew, y_l, gate_l) if need[16] else None
        # under mixed dtypes (a wider gate) the updates' gradients go back to the projections' dtype
        gy_v, gy_l = (g_vnew * gate_v).to(y_v.dtype), (g_lnew * gate_l).to(y_l.dtype)
        g_vnew, g_lnew = g_vnew.to(v.dtype), g_lnew.to(l.dtype)
        g_wov, g_bov = _linear_grads(gy_v, out_v, need[11], need[12])
        g_wol, g_bol = _linear_grads(gy_l, out_l, need[13], need[14])
        d_out_v, d_out_l = gy_v.matmul(w_ov), gy_l.matmul(w_ol)

        # both directions write into shared gradients: q is the vision direction's query and the
        # language direction's key, k the other way round
        qh, kh, vvh, vlh = (split_heads(t, heads) for t in (q, k, vv, vl))
        dq_v, dkv_v = _splits_dq(qh, kh, splits)[2][0], _splits_dkdv(qh, kh, splits)[2][0]
        dq_l, dkv_l = _splits_dq(kh, qh, splits)[2][0], _splits_dkdv(kh, qh, splits)[2][0]
        atom_q, atom_k = dq_v > 1 or dkv_l > 1, dkv_v > 1 or dq_l > 1
        gq, gk = _grad_buffer(qh, atom_q), _grad_buffer(kh, atom_k)
        gvl, gvv = _grad_buffer(vlh, dkv_v > 1), _grad_buffer(vvh, dkv_l > 1)
        core_backward(qh, kh, vlh, lmask, split_heads(out_v, heads), lse_v, split_heads(d_out_v, heads), ctx.scale, p,
                      ctx.seeds[0], splits, gq, gk, gvl,
                      ATOMIC if atom_q else STORE, ATOMIC if atom_k else STORE, ATOMIC if dkv_v > 1 else STORE)
        core_backward(kh, qh, vvh, vmask, split_heads(out_l, heads), lse_l, split_heads(d_out_l, heads), ctx.scale, p,
                      ctx.seeds[1], splits, gk, gq, gvv,
                      ATOMIC if atom_k else ADD, ATOMIC if atom_q else ADD, ATOMIC if dkv_l > 1 else STORE)
        gq, gk, gvl, gvv = (merge_heads(g).to(t.dtype) for g, t in ((gq, q), (gk, k), (gvl, vl), (gvv, vv)))

        g_wq, g_bq = _linear_grads(gq, x, need[3], need[4])
        g_wk, g_bk = _linear_grads(gk, l, need[5], need[6])
        g_wvv, g_bvv = _linear_grads(gvv, v, need[7], need[8])
        g_wvl, g_bvl = _linear_grads(gvl, l, need[9], need[10])
        g_x = gq.matmul(w_q)
        g_v = torch.baddbmm(g_vnew + g_x, gvv, w_vv.expand(gvv.shape[0], -1, -1)) if need[0] else None
        g_l = torch.baddbmm(g_lnew, gk, w_k.expand(gk.shape[0], -1, -1)) if need[1] else None
        if g_l is not None:
            g_l.baddbmm_(gvl, w_vl.expand(gvl.shape[0], -1, -1))
        return (g_v, g_l, g_x if need[2] else None, g_wq, g_bq, g_wk, g_bk, g_wvv, g_bvv, g_wvl, g_bvl,
                g_wov, g_bov, g_wol, g_bol, g_gate_v, g_gate_l, None, None, None, None, None)


def fused_alif_block(v, l, v_pos, w_q, b_q, w_k, b_k, w_vv, b_vv, w_vl, b_vl, w_ov, b_ov, w_ol, b_ol,
                     gate_v, gate_l, num_heads: int, v_pad_mask=None, l_pad_mask=None, dropout_p: float = 0.0,
                     splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`alif_bi_attention`'s Triton path (same arguments; dropout_p already 0 outside training)."""
    return FusedAlifBlock.apply(v, l, v_pos, w_q, b_q, w_k, b_k, w_vv, b_vv, w_vl, b_vl, w_ov, b_ov, w_ol, b_ol,
                                gate_v, gate_l, v_pad_mask, l_pad_mask, num_heads, dropout_p, splits)
