"""ALIF gated bidirectional attention (RLIPv2's vision <-> label-sequence exchange).

One shared logit matrix per head, `A = Q K^T` with `Q = W_q(v + v_pos) / sqrt(head_dim)` and
`K = W_k l`; the vision stream reads the labels through `softmax` over labels of `A`, the language
stream reads the image through `softmax` over image tokens of `A^T`. Both updates are projected
back, gated (a 0-dim gate: RLIPv2's "VXAc"; a per-channel vector: the Tagger's "GLIP" layer
scale) and added to the normalised inputs. Padded keys are masked; a query whose keys are all
padded reads nothing (zero update, never NaN).

This file holds the PyTorch paths: the eager reference (`attention_core_reference`: explicit
logits, masked softmax, products) and the default PyTorch core (`attention_core_sdpa`: the same
through `scaled_dot_product_attention`, one call per direction, fused kernels on CUDA). The
Triton path (`alif_triton.py`) runs the whole block as one autograd function whose attention
core is fused: the two directions are two masked attentions over the same Q/K pair with the
roles of queries and keys swapped, so the vision direction keeps row log-sum-exps over labels and
the language direction keeps row log-sum-exps of `A^T`, i.e. column log-sum-exps of `A` over
image tokens; neither writes the logit matrix.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rlipv2_scale.errors import UserError
from rlipv2_scale.kernels.dispatch import forced_choice, resolve_backend, table_choice
from rlipv2_scale.kernels.heads import merge_heads, split_heads

ALIF_BACKENDS = ("auto", "triton", "torch", "eager")


def attention_core_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_pad_mask: torch.Tensor | None,
                             scale: float, dropout_p: float, training: bool) -> torch.Tensor:
    """softmax_keys(scale * q k^T, padded keys masked) @ v, with probability dropout. q [B,H,Nq,d]."""
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    if key_pad_mask is None:
        probs = torch.softmax(logits, dim=-1)
    else:
        mask = key_pad_mask[:, None, None, :]
        probs = torch.softmax(logits.masked_fill(mask, float("-inf")), dim=-1)
        # a query whose keys are all padded reads nothing; masked_fill (not a product) keeps the
        # softmax's NaN for that row out of every gradient
        probs = probs.masked_fill(mask.all(dim=-1, keepdim=True), 0.0)
    if dropout_p > 0.0 and training and torch.is_grad_enabled():
        probs = F.dropout(probs, p=dropout_p, training=True)
    return torch.matmul(probs, v)


def attention_core_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_pad_mask: torch.Tensor | None,
                        scale: float, dropout_p: float, training: bool) -> torch.Tensor:
    """`attention_core_reference` through `F.scaled_dot_product_attention` (same arguments).

    SDPA backends disagree on a query whose keys are all padded (NaN or zero); such a row is given
    every key instead and its output zeroed afterwards, so no backend ever sees an empty row and
    the zeroed rows pass no gradient back."""
    p = dropout_p if (dropout_p > 0.0 and training and torch.is_grad_enabled()) else 0.0
    if key_pad_mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=scale)
    empty = key_pad_mask.all(dim=-1)                                     # [B]
    keep = ~(key_pad_mask & ~empty[:, None])                             # True = attend
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :], dropout_p=p, scale=scale)
    return out.masked_fill(empty[:, None, None, None], 0.0)


def _check(v: torch.Tensor, l: torch.Tensor, v_pos: torch.Tensor, num_heads: int, w_q: torch.Tensor,
           v_pad_mask: torch.Tensor | None, l_pad_mask: torch.Tensor | None, dropout_p: float) -> None:
    if v.dim() != 3 or l.dim() != 3 or v.shape[0] != l.shape[0]:
        raise UserError(f"alif_bi_attention: v must be [B, Nv, dv] and l [B, Lt, dl] with the same B, "
                        f"got {tuple(v.shape)} and {tuple(l.shape)}")
    if v_pos.shape != v.shape:
        raise UserError(f"alif_bi_attention: v_pos {tuple(v_pos.shape)} must match v {tuple(v.shape)}")
    if w_q.shape[0] % num_heads:
        raise UserError(f"alif_bi_attention: inner dim {w_q.shape[0]} is not divisible by num_heads={num_heads}")
    for name, mask, want in (("v_pad_mask", v_pad_mask, v.shape[:2]), ("l_pad_mask", l_pad_mask, l.shape[:2])):
        if mask is not None and (mask.dtype != torch.bool or mask.shape != want):
            raise UserError(f"alif_bi_attention: {name} must be a bool tensor of shape {tuple(want)} "
                            f"(True = padding), got {mask.dtype} {tuple(mask.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise UserError(f"alif_bi_attention: dropout_p must be in [0, 1), got {dropout_p}")


def _choose(backend: str, v: torch.Tensor, l: torch.Tensor) -> str:
    """"triton" | "torch" (SDPA core) | "eager" (the reference core) for this call."""
    if backend not in ALIF_BACKENDS:
        raise UserError(f"alif_bi_attention: backend {backend!r} is unknown; use one of {', '.join(ALIF_BACKENDS)}")
    if backend == "auto" and forced_choice("alif_bi_attention"):
        backend = forced_choice("alif_bi_attention")
    if backend == "eager":
        return "eager"
    resolved = resolve_backend(backend, v, l)
    if backend == "auto" and resolved == "triton":  # on CUDA: the path measured fastest (dispatch.py)
        return table_choice("alif_bi_attention", v, v.shape[1])
    if backend == "auto":
        # Off CUDA the reference core: CPU runs (tests, the demo) keep its dropout draws, so their
        # results stay those measured with it; SDPA's speed matters on GPUs.
        return "eager"
    return resolved


def alif_bi_attention(v: torch.Tensor, l: torch.Tensor, v_pos: torch.Tensor,
                      w_q: torch.Tensor, b_q: torch.Tensor | None, w_k: torch.Tensor, b_k: torch.Tensor | None,
                      w_vv: torch.Tensor, b_vv: torch.Tensor | None, w_vl: torch.Tensor, b_vl: torch.Tensor | None,
                      w_ov: torch.Tensor, b_ov: torch.Tensor | None, w_ol: torch.Tensor, b_ol: torch.Tensor | None,
                      gate_v: torch.Tensor, gate_l: torch.Tensor, num_heads: int,
                      v_pad_mask: torch.Tensor | None = None, l_pad_mask: torch.Tensor | None = None,
                      dropout_p: float = 0.0, training: bool = False,
                      backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Gated bidirectional attention between image tokens `v` [B,Nv,dv] and label tokens `l` [B,Lt,dl].

    `v`, `l` are the layer-normalised inputs, `v_pos` the positional embedding (query side only).
    Weights follow `nn.Linear` (`w_q`: [inner, dv], `w_ov`: [dv, inner], ...). Masks are bool with
    True on padding (None: no masking, the original's behaviour). Dropout on both attention
    probabilities applies only when `training` and autograd is enabled. Returns (v_new, l_new).
    `backend`: "auto" | "triton" (the fused block) | "torch" (SDPA core) | "eager" (the reference
    core); "auto" picks per device, dtype and image-token count (see dispatch.py).
    """
    _check(v, l, v_pos, num_heads, w_q, v_pad_mask, l_pad_mask, dropout_p)
    p = dropout_p if (training and torch.is_grad_enabled()) else 0.0
    choice = _choose(backend, v, l)
    if choice == "triton":
        from rlipv2_scale.kernels.alif_triton import fused_alif_block
        return fused_alif_block(v, l, v_pos, w_q, b_q, w_k, b_k, w_vv, b_vv, w_vl, b_vl, w_ov, b_ov, w_ol, b_ol,
                                gate_v, gate_l, num_heads, v_pad_mask, l_pad_mask, p)
    scale = (w_q.shape[0] // num_heads) ** -0.5
    q = split_heads(F.linear(v + v_pos, w_q, b_q), num_heads)
    k = split_heads(F.linear(l, w_k, b_k), num_heads)
    vv = split_heads(F.linear(v, w_vv, b_vv), num_heads)
    vl = split_heads(F.linear(l, w_vl, b_vl), num_heads)
    core = attention_core_reference if choice == "eager" else attention_core_sdpa
    out_v = core(q, k, vl, l_pad_mask, scale, p, training)
    out_l = core(k, q, vv, v_pad_mask, scale, p, training)
    v_new = v + gate_v * F.linear(merge_heads(out_v), w_ov, b_ov)
    l_new = l + gate_l * F.linear(merge_heads(out_l), w_ol, b_ol)
    return v_new, l_new
