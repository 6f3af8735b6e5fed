"""Fused masked attention core of ALIF in Triton: forward and backward, split-K, in-kernel dropout.

ALIF's two directions are two attentions over one logit matrix `A = scale * Q K^T`: the vision
direction is `attn(Q, K, Vl)` (softmax over labels), the language direction `attn(K, Q, Vv)`
(softmax over image tokens of `A^T`). Each call streams key blocks through an online softmax and
keeps only the row log-sum-exp, so the logits never reach global memory. The many-keys case
(200 labels reading 22k image tokens when every level is fused) splits the keys over several
programs per query block (split-K) and merges the partial results by their log-sum-exps; the
backward splits the same way and accumulates into fp32 buffers.

Dropout uses Triton's counter-based RNG (`tl.rand(seed, offset)` with offset = query * Nk + key
and one seed per (image, head)), so the backward regenerates the forward's mask exactly.
Inputs of any float dtype are cast to fp32 (fp64 stays fp64) before `tl.dot` and arithmetic.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


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


@triton.jit(do_not_specialize=["seed"])  # a fresh seed per call must not recompile
def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, kmask_ptr, o_ptr, lse_ptr,
                     sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                     H, Nq, Nk, D, scale, blocks_per_split, seed, dropout_p,
                     HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
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
                mask=rmask[:, None] & dmask[None, :], other=0.0).to(ACC)
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
                     mask=(cols < Nk)[None, :] & dmask[:, None], other=0.0).to(ACC)
        s = _logits(q, kt, _key_valid(kmask_ptr + b * Nk + cols, cols, Nk, HAS_MASK), scale, PREC)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no valid key so far
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DROPOUT:
            p = tl.where(_keep(seed, bh, rows, cols, Nk, dropout_p), p / (1.0 - dropout_p), 0.0)
        vt = tl.load(vbase + cols.to(tl.int64)[:, None] * svn + d[None, :],
                     mask=(cols < Nk)[:, None] & dmask[None, :], other=0.0).to(ACC)
        acc = acc * alpha[:, None] + tl.dot(p, vt, input_precision=PREC)
        m_i = m_new
    # o and lse are laid out [splits, B*H, Nq, (D)]; one split writes the final output directly
    out_row = (split * tl.num_programs(1) + bh) * Nq + rows.to(tl.int64)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + out_row[:, None] * D + d[None, :], o.to(o_ptr.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])
    lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    tl.store(lse_ptr + out_row, lse, mask=rmask)


@triton.jit(do_not_specialize=["seed"])  # a fresh seed per call must not recompile
def _attn_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, kmask_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                          sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
                          H, Nq, Nk, D, scale, blocks_per_split, seed, dropout_p,
                          HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, ATOMIC: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          ACC: tl.constexpr, PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    b = bh // H
    h = bh % H
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < Nk
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    kbase = k_ptr + b * skb + h * skh
    # keys as [D, N] (for q @ k^T) and values as [N, D]
    kt = tl.load(kbase + cols.to(tl.int64)[None, :] * skn + d[:, None], mask=cmask[None, :] & dmask[:, None],
                 other=0.0).to(ACC)
    valid = _key_valid(kmask_ptr + b * Nk + cols, cols, Nk, HAS_MASK)
    v = tl.load(v_ptr + b * svb + h * svh + cols.to(tl.int64)[:, None] * svn + d[None, :],
                mask=cmask[:, None] & dmask[None, :], other=0.0).to(ACC)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    m_start = split * blocks_per_split * BLOCK_M
    m_end = tl.minimum(m_start + blocks_per_split * BLOCK_M, Nq)
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < Nq
        r64 = rows.to(tl.int64)
        q = tl.load(q_ptr + b * sqb + h * sqh + r64[:, None] * sqn + d[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0).to(ACC)
        do = tl.load(do_ptr + b * sdb + h * sdh + r64[:, None] * sdn + d[None, :],
                     mask=rmask[:, None] & dmask[None, :], other=0.0).to(ACC)
        lse = _safe_lse(tl.load(lse_ptr + bh * Nq + r64, mask=rmask, other=0.0))
        delta = tl.load(delta_ptr + bh * Nq + r64, mask=rmask, other=0.0)
        s = _logits(q, kt, valid, scale, PREC)
        p = tl.where(rmask[:, None], tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        if DROPOUT:
            keep = _keep(seed, bh, rows, cols, Nk, dropout_p)
            pd = tl.where(keep, p / (1.0 - dropout_p), 0.0)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        else:
            pd = p
        dv += tl.dot(tl.trans(pd), do, input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds), q, input_precision=PREC)
    dk = dk * scale
    offs = (bh * Nk + cols.to(tl.int64))[:, None] * D + d[None, :]
    omask = cmask[:, None] & dmask[None, :]
    if ATOMIC:
        tl.atomic_add(dk_ptr + offs, dk, mask=omask, sem="relaxed")
        tl.atomic_add(dv_ptr + offs, dv, mask=omask, sem="relaxed")
    else:
        tl.store(dk_ptr + offs, dk, mask=omask)
        tl.store(dv_ptr + offs, dv, mask=omask)


@triton.jit(do_not_specialize=["seed"])  # a fresh seed per call must not recompile
def _attn_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, kmask_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
                        sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
                        H, Nq, Nk, D, scale, blocks_per_split, seed, dropout_p,
                        HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, ATOMIC: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        ACC: tl.constexpr, PREC: tl.constexpr):
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
    q = tl.load(q_ptr + b * sqb + h * sqh + r64[:, None] * sqn + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0).to(ACC)
    do = tl.load(do_ptr + b * sdb + h * sdh + r64[:, None] * sdn + d[None, :],
                 mask=rmask[:, None] & dmask[None, :], other=0.0).to(ACC)
    lse = _safe_lse(tl.load(lse_ptr + bh * Nq + r64, mask=rmask, other=0.0))
    delta = tl.load(delta_ptr + bh * Nq + r64, mask=rmask, other=0.0)
    kbase = k_ptr + b * skb + h * skh
    vbase = v_ptr + b * svb + h * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    n_start = split * blocks_per_split * BLOCK_N
    n_end = tl.minimum(n_start + blocks_per_split * BLOCK_N, Nk)
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        c64 = cols.to(tl.int64)
        k = tl.load(kbase + c64[:, None] * skn + d[None, :], mask=(cols < Nk)[:, None] & dmask[None, :],
                    other=0.0).to(ACC)
        s = _logits(q, tl.trans(k), _key_valid(kmask_ptr + b * Nk + cols, cols, Nk, HAS_MASK), scale, PREC)
        p = tl.where(rmask[:, None], tl.exp(s - lse[:, None]), 0.0)
        vt = tl.load(vbase + c64[None, :] * svn + d[:, None], mask=(cols < Nk)[None, :] & dmask[:, None],
                     other=0.0).to(ACC)
        dp = tl.dot(do, vt, input_precision=PREC)
        if DROPOUT:
            dp = tl.where(_keep(seed, bh, rows, cols, Nk, dropout_p), dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds, k, input_precision=PREC)
    dq = dq * scale
    offs = (bh * Nq + r64)[:, None] * D + d[None, :]
    if ATOMIC:
        tl.atomic_add(dq_ptr + offs, dq, mask=rmask[:, None] & dmask[None, :], sem="relaxed")
    else:
        tl.store(dq_ptr + offs, dq, mask=rmask[:, None] & dmask[None, :])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _config(head_dim: int, dtype: torch.dtype) -> dict:
    block_d = max(16, triton.next_power_of_2(head_dim))
    stages = 2
    if _interpreting():  # programs run one by one: the largest tiles are the fastest
        block_m = block_n = 32
        warps = 4
    elif block_d >= 256:
        # fp32 tiles of 256 channels (ALIF's head dim): at 16 x 16 the sm_90 builds of all three
        # kernels fit the registers (32 x 32 spills several KB per thread); fp32 inputs keep
        # more live values in the full-precision products and need 8 warps for that
        block_m, block_n = 16, 16
        warps, stages = (8, 2) if dtype in (torch.float32, torch.float64) else (4, 1)
    else:
        block_m, block_n, warps = 64, 32, 4
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    # 16-bit inputs are exact in tf32, so only the fp32 probabilities lose bits there
    prec = "tf32" if dtype in (torch.float16, torch.bfloat16) else "ieee"
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, ACC=acc, PREC=prec, num_warps=warps,
                num_stages=stages)


def _num_splits(base_programs: int, loop_blocks: int, requested: int | None) -> tuple[int, int]:
    """(splits, blocks per split): enough programs to fill the GPU (about 4 waves of 132 SMs)."""
    if requested is None:
        requested = 1 if _interpreting() else max(1, 528 // max(base_programs, 1))
    splits = max(1, min(requested, loop_blocks))
    per_split = triton.cdiv(loop_blocks, splits)
    return triton.cdiv(loop_blocks, per_split), per_split


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def attention_forward(q, k, v, kmask, scale, dropout_p, seed, splits=None):
    """Returns (out [B,H,Nq,D] in q's dtype, lse [B*H, Nq] fp32/fp64)."""
    bsz, heads, nq, dim = q.shape
    nk = k.shape[2]
    cfg = _config(dim, q.dtype)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    m_blocks = triton.cdiv(nq, cfg["BLOCK_M"])
    n_splits, per_split = _num_splits(m_blocks * bsz * heads, triton.cdiv(nk, cfg["BLOCK_N"]), splits)
    if n_splits == 1:
        out = torch.empty(bsz, heads, nq, dim, device=q.device, dtype=q.dtype)
    else:
        out = torch.empty(n_splits, bsz, heads, nq, dim, device=q.device, dtype=acc_dtype)
    lse = torch.empty(n_splits, bsz * heads, nq, device=q.device, dtype=acc_dtype)
    grid = (m_blocks, bsz * heads, n_splits)
    _attn_fwd_kernel[grid](q, k, v, kmask if kmask is not None else q, out, lse,
                           *_strides(q), *_strides(k), *_strides(v),
                           heads, nq, nk, dim, scale, per_split, seed, dropout_p,
                           HAS_MASK=kmask is not None, DROPOUT=dropout_p > 0.0, **cfg)
    if n_splits == 1:
        return out, lse[0]
    # merge the key splits by their log-sum-exps
    total = torch.logsumexp(lse, dim=0)
    weights = torch.exp(lse - total.masked_fill(total == float("-inf"), 0.0)).view(n_splits, bsz, heads, nq, 1)
    return (out * weights).sum(0).to(q.dtype), total


def attention_backward(q, k, v, kmask, out, lse, grad_out, scale, dropout_p, seed, splits=None):
    bsz, heads, nq, dim = q.shape
    nk = k.shape[2]
    cfg = _config(dim, q.dtype)
    buf = torch.float64 if q.dtype == torch.float64 else torch.float32
    grad_out = _last_dim_contiguous(grad_out)
    delta = (grad_out.to(buf) * out.to(buf)).sum(-1).reshape(bsz * heads, nq)
    kmask_arg = kmask if kmask is not None else q
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(grad_out))
    flags = dict(HAS_MASK=kmask is not None, DROPOUT=dropout_p > 0.0)
    m_blocks = triton.cdiv(nq, cfg["BLOCK_M"])
    n_blocks = triton.cdiv(nk, cfg["BLOCK_N"])

    kv_splits, per_split = _num_splits(n_blocks * bsz * heads, m_blocks, splits)
    dk = (torch.zeros if kv_splits > 1 else torch.empty)(bsz, heads, nk, dim, device=q.device, dtype=buf)
    dv = (torch.zeros if kv_splits > 1 else torch.empty)(bsz, heads, nk, dim, device=q.device, dtype=buf)
    _attn_bwd_dkdv_kernel[(n_blocks, bsz * heads, kv_splits)](
        q, k, v, kmask_arg, grad_out, lse, delta, dk, dv, *common, heads, nq, nk, dim, scale, per_split,
        seed, dropout_p, ATOMIC=kv_splits > 1, **flags, **cfg)

    q_splits, per_split = _num_splits(m_blocks * bsz * heads, n_blocks, splits)
    dq = (torch.zeros if q_splits > 1 else torch.empty)(bsz, heads, nq, dim, device=q.device, dtype=buf)
    _attn_bwd_dq_kernel[(m_blocks, bsz * heads, q_splits)](
        q, k, v, kmask_arg, grad_out, lse, delta, dq, *common, heads, nq, nk, dim, scale, per_split,
        seed, dropout_p, ATOMIC=q_splits > 1, **flags, **cfg)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class FusedAttention(torch.autograd.Function):
    """softmax_keys(scale q k^T, padded keys masked) [dropout] @ v without materialising the logits."""

    @staticmethod
    def forward(ctx, q, k, v, key_pad_mask, scale, dropout_p, seed, splits):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        kmask = key_pad_mask.to(torch.int8).contiguous() if key_pad_mask is not None else None
        out, lse = attention_forward(q, k, v, kmask, scale, dropout_p, seed, splits)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.kmask, ctx.scale, ctx.dropout_p, ctx.seed, ctx.splits = kmask, scale, dropout_p, seed, splits
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(q, k, v, ctx.kmask, out, lse, grad_out, ctx.scale, ctx.dropout_p,
                                        ctx.seed, ctx.splits)
        return dq, dk, dv, None, None, None, None, None


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_pad_mask: torch.Tensor | None,
                    scale: float, dropout_p: float = 0.0, seed: int | None = None,
                    splits: int | None = None) -> torch.Tensor:
    """q [B,H,Nq,D], k/v [B,H,Nk,D], key_pad_mask [B,Nk] bool (True = padding) or None.

    `seed` fixes the dropout mask (drawn from torch's generator when None); `splits` forces the
    number of key splits (tests), otherwise it is chosen to fill the GPU.
    """
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if dropout_p > 0.0 else 0
    return FusedAttention.apply(q, k, v, key_pad_mask, scale, dropout_p, seed, splits)
