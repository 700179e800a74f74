"""Fused Interleaved Head Attention (IHA): flash-attention-style forward and backward in Triton.

Math (see `reference.iha_attention`, the oracle): from q, k, v [B, H_in, N, d] and mixing tensors
mix_q, mix_k, mix_v [H_in, H_out, P], output head h has P pseudo-tokens per token,

    q~[b, h, i] = sum_m mix_q[m, h, p] * q[b, m, n]        i = n*P + p  (virtual position)

(k~, v~ alike), rotated by cos/sin [N*P, d/2] at their virtual positions when given. Softmax
attention with scale 1/sqrt(d) runs over the N*P virtual tokens under the mask (`causal`,
`token_causal`, optional sliding `window`; see `reference.iha_allowed`), giving o~ [B, H_out, N*P, d],
and the P outputs of each token are collapsed:

    per head  collapse [H_out, P]:        o[b, h, n] = sum_p collapse[h, p] * o~[b, h, n*P + p]
    global    collapse [H_out, H_out*P]:  o[b, h, n] = sum_{m,p} collapse[h, m*P + p] * o~[b, m, n*P + p]

How it runs. Tiles are token aligned: a tile of BLOCK_T tokens is BLOCK_R = BLOCK_T * P_PAD rows,
row r = t * P_PAD + p (P_PAD = next power of two >= P; rows with p >= P are padding, masked out), so
every pseudo-token of a token lies in one tile and the collapse is a reduction inside the tile.

- forward (`_iha_fwd_kernel`), one program per (query tile, b, h): q~ is formed in registers from
  the H_in query heads (a sum of H_in scaled row loads), then the program walks the key tiles its
  mask can reach (tiles that are fully masked by causality or the window are never visited), forms
  k~ and v~ the same way, and runs the online softmax. The epilogue divides by the softmax sum,
  writes the base-2 logsumexp per virtual row ([B, H_out, N*P] fp32, no d) and applies the per-head
  collapse, writing o [B, H_out, N, d]. Nothing of size [B, H_out, N*P, d] is written.
- backward, two kernels that recompute q~, k~, v~ on the fly:
  1. `_iha_bwd_dq_kernel`, one program per (query tile, b, h): recomputes o~ for its rows (one
     forward sweep), stores Dp = <do, o~> per row ([B, H_out, N*P] fp32; D = collapse * Dp is the
     softmax-backward row term and Dp summed over (b, n) is the collapse gradient), then sweeps the
     keys again for dq~. dq~ is rotated back and pushed through the mixing: dq[b, m] receives
     sum_p mix_q[m, h, p] dq~ by fp32 atomic adds (each program adds H_in [BLOCK_T, d] tiles),
     and dmix_q[m, h, p] = sum_{b,n} <q[b, m, n], dq~[b, h, n*P + p]> is written as one partial per
     program, summed on the host (deterministic).
  2. `_iha_bwd_dkv_kernel`, one program per (key tile, b, h): the usual flash-attention dk~ / dv~
     sweep over the queries that can see the tile, then the same scatter for dk, dv, dmix_k, dmix_v.
  The backward therefore costs about 4.5 forward passes of matmuls (FA2: 2.5), the price of never
  storing o~; dq, dk, dv are accumulated with atomics (not bitwise deterministic run to run).

Global collapse: the kernel cannot apply it in its epilogue (output head h needs o~ of every head),
so in that mode the forward kernel writes o~ [B, H_out, N*P, d] (P times the output) and torch
applies the collapse as a matmul; backward forms do~ the same way and saves o~. This is the one mode
that materialises a P-times tensor; the per-head mode never does.

Numerics: mixing, rotary, softmax and all accumulations in fp32; dot operands in the input dtype
(bf16/fp16 tensor cores on a GPU; fp32 inputs use exact-fp32 dots, not tf32). Under
TRITON_INTERPRET=1 the dot operands are rounded to the input dtype and then upcast
(UPCAST_DOT), because the interpreter's bf16 dot is broken (see kernels/_utils.py).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import reference
from ._utils import check_device, interpreting, new_output, next_power_of_2
from .aot import KernelLaunch, LaunchConfig, signature

__all__ = ["iha_attention", "IhaAttentionFunction"]

OP = "iha_attention"
LOG2E = 1.4426950408889634


# ---- device helpers ------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, ELEM: tl.constexpr, FP32_DOT: tl.constexpr):
    """a @ b with operands rounded to the input dtype ELEM; fp32 accumulation.

    FP32_DOT: fp32 inputs (exact fp32 dot, not tf32) or the interpreter (bf16 operands upcast after
    rounding, since the interpreter's bf16 dot is wrong)."""
    a = a.to(ELEM)
    b = b.to(ELEM)
    if FP32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _tile_rows(tok0, seq_len, P, BLOCK_T: tl.constexpr, P_PAD: tl.constexpr):
    """Row r = t * P_PAD + p of a token-aligned tile: (token, pseudo index, virtual position, valid)."""
    offs_r = tl.arange(0, BLOCK_T * P_PAD)
    tok = tok0 + offs_r // P_PAD
    p = offs_r % P_PAD
    valid = (p < P) & (tok < seq_len)
    return tok, p, tok * P + p, valid


@triton.jit
def _pseudo_rows(x_ptr, stride_xh, stride_xn, stride_xd, mix_ptr, stride_mi, stride_mo, stride_mp,
                 h, tok, p, valid, offs_c, mask_c1, mask_c2, D1, heads_in,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The two column halves of x~[r] = sum_m mix[m, h, p(r)] * x[m, tok(r)] for the rows of a tile.

    x_ptr points at x[b]; returns fp32 [BLOCK_R, BLOCK_C] tiles for columns [0, D1) and [D1, d).
    Padding rows get mixing weight 0, so they are exact zeros."""
    rows = tok.to(tl.int64)[:, None] * stride_xn
    cols1 = (offs_c.to(tl.int64) * stride_xd)[None, :]
    cols2 = ((offs_c + D1).to(tl.int64) * stride_xd)[None, :]
    m1 = valid[:, None] & mask_c1[None, :]
    m2 = valid[:, None] & mask_c2[None, :]
    acc1 = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for m in range(heads_in):
        w = tl.load(mix_ptr + m * stride_mi + h * stride_mo + p * stride_mp, mask=valid, other=0.0).to(tl.float32)
        head = x_ptr + m * stride_xh + rows
        acc1 += w[:, None] * tl.load(head + cols1, mask=m1, other=0.0).to(tl.float32)
        acc2 += w[:, None] * tl.load(head + cols2, mask=m2, other=0.0).to(tl.float32)
    return acc1, acc2


@triton.jit
def _rotate(x1, x2, cos_ptr, sin_ptr, stride_cn, stride_cd, stride_sn, stride_sd, pos, valid, offs_c, mask_c1,
            INVERSE: tl.constexpr):
    """Rotary on row halves at virtual positions `pos` (INVERSE: by -theta, the vector-Jacobian product)."""
    m = valid[:, None] & mask_c1[None, :]
    c = tl.load(cos_ptr + pos.to(tl.int64)[:, None] * stride_cn + offs_c[None, :] * stride_cd, mask=m,
                other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + pos.to(tl.int64)[:, None] * stride_sn + offs_c[None, :] * stride_sd, mask=m,
                other=0.0).to(tl.float32)
    if INVERSE:
        s = -s
    return x1 * c - x2 * s, x2 * c + x1 * s


@triton.jit
def _allowed(i_q, tok_q, valid_q, i_k, tok_k, valid_k, window, window_tok,
             TOKEN_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """[rows_q, rows_k] bool: which (query, key) pairs attend (reference.iha_allowed, plus padding)."""
    if TOKEN_CAUSAL:
        ok = tok_k[None, :] <= tok_q[:, None]
        if HAS_WINDOW:
            ok = ok & (tok_k[None, :] > tok_q[:, None] - window_tok)
    else:
        ok = i_k[None, :] <= i_q[:, None]
        if HAS_WINDOW:
            ok = ok & (i_k[None, :] > i_q[:, None] - window)
    return ok & valid_q[:, None] & valid_k[None, :]


@triton.jit
def _key_token_range(tok0, seq_len, P, window, window_tok, BLOCK_T: tl.constexpr,
                     TOKEN_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Key tokens [lo, hi) a query tile starting at token tok0 can see (lo aligned to BLOCK_T)."""
    hi = tl.minimum(tok0 + BLOCK_T, seq_len)
    lo = tok0 * 0
    if HAS_WINDOW:
        if TOKEN_CAUSAL:
            lo = tl.maximum(tok0 - window_tok + 1, 0)
        else:
            lo = tl.maximum(tok0 * P - window + 1, 0) // P
        lo = (lo // BLOCK_T) * BLOCK_T
    return lo, hi


@triton.jit
def _query_token_range(kt0, seq_len, P, window, window_tok, BLOCK_T: tl.constexpr,
                       TOKEN_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Query tokens [lo, hi) that can see some key of the tile starting at token kt0."""
    lo = kt0
    hi = seq_len + kt0 * 0
    if HAS_WINDOW:
        last = tl.minimum(kt0 + BLOCK_T, seq_len) - 1
        if TOKEN_CAUSAL:
            hi = tl.minimum(last + window_tok, seq_len)
        else:
            hi = tl.minimum((last * P + P - 1 + window - 1) // P + 1, seq_len)
    return lo, hi


@triton.jit
def _attend(q1, q2, i_q, tok_q, valid_q, k_ptr, v_ptr,
            stride_kh, stride_kn, stride_kd, stride_vh, stride_vn, stride_vd,
            mixk_ptr, mixv_ptr, stride_mi, stride_mo, stride_mp,
            cos_ptr, sin_ptr, stride_cn, stride_cd, stride_sn, stride_sd,
            h, lo, hi, seq_len, P, D1, heads_in, qk_scale, window, window_tok, offs_c, mask_c1, mask_c2,
            BLOCK_T: tl.constexpr, P_PAD: tl.constexpr, BLOCK_C: tl.constexpr, ROPE: tl.constexpr,
            TOKEN_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, ELEM: tl.constexpr, FP32_DOT: tl.constexpr):
    """Online softmax of the query rows over key tokens [lo, hi): (acc1, acc2, row max, row sum), base 2."""
    BLOCK_R: tl.constexpr = BLOCK_T * P_PAD
    m_i = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_R,), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for kt0 in range(lo, hi, BLOCK_T):
        tok_k, p_k, i_k, valid_k = _tile_rows(kt0, seq_len, P, BLOCK_T, P_PAD)
        k1, k2 = _pseudo_rows(k_ptr, stride_kh, stride_kn, stride_kd, mixk_ptr, stride_mi, stride_mo, stride_mp,
                              h, tok_k, p_k, valid_k, offs_c, mask_c1, mask_c2, D1, heads_in, BLOCK_R, BLOCK_C)
        if ROPE:
            k1, k2 = _rotate(k1, k2, cos_ptr, sin_ptr, stride_cn, stride_cd, stride_sn, stride_sd, i_k, valid_k,
                             offs_c, mask_c1, False)
        v1, v2 = _pseudo_rows(v_ptr, stride_vh, stride_vn, stride_vd, mixv_ptr, stride_mi, stride_mo, stride_mp,
                              h, tok_k, p_k, valid_k, offs_c, mask_c1, mask_c2, D1, heads_in, BLOCK_R, BLOCK_C)
        # Only dot operands from here on: hold them in the input dtype (what _dot rounds to anyway).
        k1, k2, v1, v2 = k1.to(ELEM), k2.to(ELEM), v1.to(ELEM), v2.to(ELEM)
        s = (_dot(q1, tl.trans(k1), ELEM, FP32_DOT) + _dot(q2, tl.trans(k2), ELEM, FP32_DOT)) * qk_scale
        ok = _allowed(i_q, tok_q, valid_q, i_k, tok_k, valid_k, window, window_tok, TOKEN_CAUSAL, HAS_WINDOW)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no visible key yet keeps max -inf; shifting by 0 then gives exp2(-inf) = 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        prob = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(prob, 1)
        acc1 = acc1 * alpha[:, None] + _dot(prob, v1, ELEM, FP32_DOT)
        acc2 = acc2 * alpha[:, None] + _dot(prob, v2, ELEM, FP32_DOT)
        m_i = m_new
    return acc1, acc2, m_i, l_i


@triton.jit
def _scatter_heads(g1, g2, x_ptr, stride_xh, stride_xn, stride_xd, mix_ptr, stride_mi, stride_mo, stride_mp,
                   dx_ptr, stride_dh, stride_dn, part_ptr, stride_pi, stride_po,
                   h, tok0, tok, p, valid, seq_len, P, D1, heads_in, offs_c, mask_c1, mask_c2,
                   BLOCK_T: tl.constexpr, P_PAD: tl.constexpr, BLOCK_C: tl.constexpr):
    """Push the pseudo-row gradient (g1, g2) of head h back through the mixing.

    dx[m, n] += sum_p mix[m, h, p] * g[n*P + p]   (fp32 atomics into dx_ptr = dx32[b], unit d stride)
    part[m, h, p] = sum_n <x[m, n], g[n*P + p]>   (this program's partial of dmix, plain stores)
    """
    offs_t = tok0 + tl.arange(0, BLOCK_T)
    mask_t = offs_t < seq_len
    dx_rows = offs_t.to(tl.int64)[:, None] * stride_dn
    x_rows = tok.to(tl.int64)[:, None] * stride_xn
    x_cols1 = (offs_c.to(tl.int64) * stride_xd)[None, :]
    x_cols2 = ((offs_c + D1).to(tl.int64) * stride_xd)[None, :]
    offs_p = tl.arange(0, P_PAD)
    m1 = valid[:, None] & mask_c1[None, :]
    m2 = valid[:, None] & mask_c2[None, :]
    for m in range(heads_in):
        w = tl.load(mix_ptr + m * stride_mi + h * stride_mo + p * stride_mp, mask=valid, other=0.0).to(tl.float32)
        c1 = tl.sum(tl.reshape(w[:, None] * g1, (BLOCK_T, P_PAD, BLOCK_C)), 1)
        c2 = tl.sum(tl.reshape(w[:, None] * g2, (BLOCK_T, P_PAD, BLOCK_C)), 1)
        dst = dx_ptr + m * stride_dh + dx_rows
        tl.atomic_add(dst + offs_c[None, :], c1, mask=mask_t[:, None] & mask_c1[None, :])
        tl.atomic_add(dst + D1 + offs_c[None, :], c2, mask=mask_t[:, None] & mask_c2[None, :])
        head = x_ptr + m * stride_xh + x_rows
        x1 = tl.load(head + x_cols1, mask=m1, other=0.0).to(tl.float32)
        x2 = tl.load(head + x_cols2, mask=m2, other=0.0).to(tl.float32)
        per_row = tl.sum(x1 * g1, 1) + tl.sum(x2 * g2, 1)
        per_p = tl.sum(tl.reshape(per_row, (BLOCK_T, P_PAD)), 0)
        tl.store(part_ptr + m * stride_pi + h * stride_po + offs_p, per_p, mask=offs_p < P)


# ---- kernels -------------------------------------------------------------------------------------


@triton.jit
def _iha_fwd_kernel(q_ptr, k_ptr, v_ptr, mixq_ptr, mixk_ptr, mixv_ptr, collapse_ptr, cos_ptr, sin_ptr,
                    out_ptr, lse_ptr,
                    stride_qb, stride_qh, stride_qn, stride_qd,
                    stride_kb, stride_kh, stride_kn, stride_kd,
                    stride_vb, stride_vh, stride_vn, stride_vd,
                    stride_mi, stride_mo, stride_mp,
                    stride_colh, stride_colp,
                    stride_cn, stride_cd, stride_sn, stride_sd,
                    stride_ob, stride_oh, stride_on, stride_od,
                    seq_len, heads_in, heads_out, P, D1, head_dim, qk_scale, window, window_tok,
                    BLOCK_T: tl.constexpr, P_PAD: tl.constexpr, BLOCK_C: tl.constexpr,
                    ROPE: tl.constexpr, TOKEN_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                    COLLAPSE: tl.constexpr, FP32_DOT: tl.constexpr):
    """Program (query tile, b * H_out + h). COLLAPSE: out = o [B, H_out, N, d] (per-head collapse
    in the epilogue); otherwise out = o~ [B, H_out, N*P, d]. lse [B, H_out, N*P]: base-2 logsumexp."""
    BLOCK_R: tl.constexpr = BLOCK_T * P_PAD
    ELEM: tl.constexpr = q_ptr.dtype.element_ty
    # Under causality the last query tiles have the most keys: start them first.
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // heads_out).to(tl.int64)
    h = bh % heads_out
    tok0 = tile * BLOCK_T
    offs_c = tl.arange(0, BLOCK_C)
    mask_c1 = offs_c < D1
    mask_c2 = offs_c < head_dim - D1

    tok, p, i, valid = _tile_rows(tok0, seq_len, P, BLOCK_T, P_PAD)
    q1, q2 = _pseudo_rows(q_ptr + b * stride_qb, stride_qh, stride_qn, stride_qd, mixq_ptr, stride_mi, stride_mo,
                          stride_mp, h, tok, p, valid, offs_c, mask_c1, mask_c2, D1, heads_in, BLOCK_R, BLOCK_C)
    if ROPE:
        q1, q2 = _rotate(q1, q2, cos_ptr, sin_ptr, stride_cn, stride_cd, stride_sn, stride_sd, i, valid, offs_c,
                         mask_c1, False)
    q1, q2 = q1.to(ELEM), q2.to(ELEM)  # dot operands only
    lo, hi = _key_token_range(tok0, seq_len, P, window, window_tok, BLOCK_T, TOKEN_CAUSAL, HAS_WINDOW)
    acc1, acc2, m_i, l_i = _attend(q1, q2, i, tok, valid, k_ptr + b * stride_kb, v_ptr + b * stride_vb,
                                   stride_kh, stride_kn, stride_kd, stride_vh, stride_vn, stride_vd,
                                   mixk_ptr, mixv_ptr, stride_mi, stride_mo, stride_mp,
                                   cos_ptr, sin_ptr, stride_cn, stride_cd, stride_sn, stride_sd,
                                   h, lo, hi, seq_len, P, D1, heads_in, qk_scale, window, window_tok,
                                   offs_c, mask_c1, mask_c2, BLOCK_T, P_PAD, BLOCK_C, ROPE, TOKEN_CAUSAL,
                                   HAS_WINDOW, ELEM, FP32_DOT)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o1 = acc1 / l_safe[:, None]
    o2 = acc2 / l_safe[:, None]
    row = bh.to(tl.int64) * seq_len * P
    tl.store(lse_ptr + row + i, m_i + tl.log2(l_safe), mask=valid)

    out_b = out_ptr + b * stride_ob + h * stride_oh
    if COLLAPSE:
        w = tl.load(collapse_ptr + h * stride_colh + p * stride_colp, mask=valid, other=0.0).to(tl.float32)
        y1 = tl.sum(tl.reshape(w[:, None] * o1, (BLOCK_T, P_PAD, BLOCK_C)), 1)
        y2 = tl.sum(tl.reshape(w[:, None] * o2, (BLOCK_T, P_PAD, BLOCK_C)), 1)
        offs_t = tok0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < seq_len
        dst = out_b + offs_t.to(tl.int64)[:, None] * stride_on
        tl.store(dst + (offs_c * stride_od)[None, :], y1.to(out_ptr.dtype.element_ty),
                 mask=mask_t[:, None] & mask_c1[None, :])
        tl.store(dst + ((offs_c + D1) * stride_od)[None, :], y2.to(out_ptr.dtype.element_ty),
                 mask=mask_t[:, None] & mask_c2[None, :])
    else:
        dst = out_b + i.to(tl.int64)[:, None] * stride_on
        tl.store(dst + (offs_c * stride_od)[None, :], o1.to(out_ptr.dtype.element_ty),
                 mask=valid[:, None] & mask_c1[None, :])
        tl.store(dst + ((offs_c + D1) * stride_od)[None, :], o2.to(out_ptr.dtype.element_ty),
                 mask=valid[:, None] & mask_c2[None, :])


@triton.jit
def _load_do_rows(do_ptr, stride_dob, stride_doh, stride_don, stride_dod, collapse_ptr, stride_colh, stride_colp,
                  b, h, tok, p, i, valid, offs_c, mask_c1, mask_c2, D1, COLLAPSE: tl.constexpr):
    """(do rows, weight) with do~[r] = weight[r] * do_rows[r]: per-head collapse reads do[b, h, n] and
    weight collapse[h, p]; otherwise do_ptr holds do~ [B, H_out, N*P, d] itself (weight 1)."""
    if COLLAPSE:
        w = tl.load(collapse_ptr + h * stride_colh + p * stride_colp, mask=valid, other=0.0).to(tl.float32)
        idx = tok
    else:
        w = tl.where(valid, 1.0, 0.0)
        idx = i
    rows = do_ptr + b * stride_dob + h * stride_doh + idx.to(tl.int64)[:, None] * stride_don
    do1 = tl.load(rows + (offs_c * stride_dod)[None, :], mask=valid[:, None] & mask_c1[None, :],
                  other=0.0).to(tl.float32)
    do2 = tl.load(rows + ((offs_c + D1) * stride_dod)[None, :], mask=valid[:, None] & mask_c2[None, :],
                  other=0.0).to(tl.float32)
    return do1, do2, w


@triton.jit
def _iha_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, mixq_ptr, mixk_ptr, mixv_ptr, collapse_ptr, cos_ptr, sin_ptr,
                       do_ptr, lse_ptr, dp_ptr, dq_ptr, dmixq_part_ptr,
                       stride_qb, stride_qh, stride_qn, stride_qd,
                       stride_kb, stride_kh, stride_kn, stride_kd,
                       stride_vb, stride_vh, stride_vn, stride_vd,
                       stride_mi, stride_mo, stride_mp,
                       stride_colh, stride_colp,
                       stride_cn, stride_cd, stride_sn, stride_sd,
                       stride_dob, stride_doh, stride_don, stride_dod,
                       stride_dqb, stride_dqh, stride_dqn,
                       stride_part, stride_part_i, stride_part_o,
                       seq_len, heads_in, heads_out, P, D1, head_dim, qk_scale, sm_scale, window, window_tok,
                       BLOCK_T: tl.constexpr, P_PAD: tl.constexpr, BLOCK_C: tl.constexpr,
                       ROPE: tl.constexpr, TOKEN_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                       COLLAPSE: tl.constexpr, FP32_DOT: tl.constexpr):
    """Program (query tile, b * H_out + h): Dp = <do, o~> per row (o~ recomputed), then dq, dmix_q."""
    BLOCK_R: tl.constexpr = BLOCK_T * P_PAD
    ELEM: tl.constexpr = q_ptr.dtype.element_ty
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // heads_out).to(tl.int64)
    h = bh % heads_out
    tok0 = tile * BLOCK_T
    offs_c = tl.arange(0, BLOCK_C)
    mask_c1 = offs_c < D1
    mask_c2 = offs_c < head_dim - D1

    tok, p, i, valid = _tile_rows(tok0, seq_len, P, BLOCK_T, P_PAD)
    q1, q2 = _pseudo_rows(q_ptr + b * stride_qb, stride_qh, stride_qn, stride_qd, mixq_ptr, stride_mi, stride_mo,
                          stride_mp, h, tok, p, valid, offs_c, mask_c1, mask_c2, D1, heads_in, BLOCK_R, BLOCK_C)
    if ROPE:
        q1, q2 = _rotate(q1, q2, cos_ptr, sin_ptr, stride_cn, stride_cd, stride_sn, stride_sd, i, valid, offs_c,
                         mask_c1, False)
    q1, q2 = q1.to(ELEM), q2.to(ELEM)  # dot operands only
    do1, do2, w = _load_do_rows(do_ptr, stride_dob, stride_doh, stride_don, stride_dod, collapse_ptr, stride_colh,
                                stride_colp, b, h, tok, p, i, valid, offs_c, mask_c1, mask_c2, D1, COLLAPSE)
    lo, hi = _key_token_range(tok0, seq_len, P, window, window_tok, BLOCK_T, TOKEN_CAUSAL, HAS_WINDOW)
    k_b = k_ptr + b * stride_kb
    v_b = v_ptr + b * stride_vb
    acc1, acc2, m_i, l_i = _attend(q1, q2, i, tok, valid, k_b, v_b,
                                   stride_kh, stride_kn, stride_kd, stride_vh, stride_vn, stride_vd,
                                   mixk_ptr, mixv_ptr, stride_mi, stride_mo, stride_mp,
                                   cos_ptr, sin_ptr, stride_cn, stride_cd, stride_sn, stride_sd,
                                   h, lo, hi, seq_len, P, D1, heads_in, qk_scale, window, window_tok,
                                   offs_c, mask_c1, mask_c2, BLOCK_T, P_PAD, BLOCK_C, ROPE, TOKEN_CAUSAL,
                                   HAS_WINDOW, ELEM, FP32_DOT)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    dp_row = (tl.sum(do1 * acc1, 1) + tl.sum(do2 * acc2, 1)) / l_safe
    row = bh.to(tl.int64) * seq_len * P
    tl.store(dp_ptr + row + i, dp_row, mask=valid)
    lse = tl.load(lse_ptr + row + i, mask=valid, other=0.0)
    d_row = w * dp_row
    do1 = (w[:, None] * do1).to(ELEM)
    do2 = (w[:, None] * do2).to(ELEM)

    dq1 = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    dq2 = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for kt0 in range(lo, hi, BLOCK_T):
        tok_k, p_k, i_k, valid_k = _tile_rows(kt0, seq_len, P, BLOCK_T, P_PAD)
        k1, k2 = _pseudo_rows(k_b, stride_kh, stride_kn, stride_kd, mixk_ptr, stride_mi, stride_mo, stride_mp,
                              h, tok_k, p_k, valid_k, offs_c, mask_c1, mask_c2, D1, heads_in, BLOCK_R, BLOCK_C)
        if ROPE:
            k1, k2 = _rotate(k1, k2, cos_ptr, sin_ptr, stride_cn, stride_cd, stride_sn, stride_sd, i_k, valid_k,
                             offs_c, mask_c1, False)
        v1, v2 = _pseudo_rows(v_b, stride_vh, stride_vn, stride_vd, mixv_ptr, stride_mi, stride_mo, stride_mp,
                              h, tok_k, p_k, valid_k, offs_c, mask_c1, mask_c2, D1, heads_in, BLOCK_R, BLOCK_C)
        k1, k2, v1, v2 = k1.to(ELEM), k2.to(ELEM), v1.to(ELEM), v2.to(ELEM)
        s = (_dot(q1, tl.trans(k1), ELEM, FP32_DOT) + _dot(q2, tl.trans(k2), ELEM, FP32_DOT)) * qk_scale
        ok = _allowed(i, tok, valid, i_k, tok_k, valid_k, window, window_tok, TOKEN_CAUSAL, HAS_WINDOW)
        prob = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
        dprob = _dot(do1, tl.trans(v1), ELEM, FP32_DOT) + _dot(do2, tl.trans(v2), ELEM, FP32_DOT)
        ds = prob * (dprob - d_row[:, None])
        dq1 += _dot(ds, k1, ELEM, FP32_DOT)
        dq2 += _dot(ds, k2, ELEM, FP32_DOT)
    dq1 = dq1 * sm_scale
    dq2 = dq2 * sm_scale
    if ROPE:
        dq1, dq2 = _rotate(dq1, dq2, cos_ptr, sin_ptr, stride_cn, stride_cd, stride_sn, stride_sd, i, valid, offs_c,
                           mask_c1, True)
    part = dmixq_part_ptr + (b * tl.num_programs(0) + tile) * stride_part
    _scatter_heads(dq1, dq2, q_ptr + b * stride_qb, stride_qh, stride_qn, stride_qd, mixq_ptr, stride_mi, stride_mo,
                   stride_mp, dq_ptr + b * stride_dqb, stride_dqh, stride_dqn, part, stride_part_i, stride_part_o,
                   h, tok0, tok, p, valid, seq_len, P, D1, heads_in, offs_c, mask_c1, mask_c2,
                   BLOCK_T, P_PAD, BLOCK_C)


@triton.jit
def _iha_bwd_dkv_kernel(q_ptr, k_ptr, v_ptr, mixq_ptr, mixk_ptr, mixv_ptr, collapse_ptr, cos_ptr, sin_ptr,
                        do_ptr, lse_ptr, dp_ptr, dk_ptr, dv_ptr, dmixk_part_ptr, dmixv_part_ptr,
                        stride_qb, stride_qh, stride_qn, stride_qd,
                        stride_kb, stride_kh, stride_kn, stride_kd,
                        stride_vb, stride_vh, stride_vn, stride_vd,
                        stride_mi, stride_mo, stride_mp,
                        stride_colh, stride_colp,
                        stride_cn, stride_cd, stride_sn, stride_sd,
                        stride_dob, stride_doh, stride_don, stride_dod,
                        stride_dkb, stride_dkh, stride_dkn,
                        stride_part, stride_part_i, stride_part_o,
                        seq_len, heads_in, heads_out, P, D1, head_dim, qk_scale, sm_scale, window, window_tok,
                        BLOCK_T: tl.constexpr, P_PAD: tl.constexpr, BLOCK_C: tl.constexpr,
                        ROPE: tl.constexpr, TOKEN_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                        COLLAPSE: tl.constexpr, FP32_DOT: tl.constexpr):
    """Program (key tile, b * H_out + h): dk~, dv~ over the queries that see the tile, then dk, dv,
    dmix_k, dmix_v through the mixing."""
    BLOCK_R: tl.constexpr = BLOCK_T * P_PAD
    ELEM: tl.constexpr = q_ptr.dtype.element_ty
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // heads_out).to(tl.int64)
    h = bh % heads_out
    kt0 = tile * BLOCK_T
    offs_c = tl.arange(0, BLOCK_C)
    mask_c1 = offs_c < D1
    mask_c2 = offs_c < head_dim - D1

    tok_k, p_k, i_k, valid_k = _tile_rows(kt0, seq_len, P, BLOCK_T, P_PAD)
    k_b = k_ptr + b * stride_kb
    v_b = v_ptr + b * stride_vb
    q_b = q_ptr + b * stride_qb
    k1, k2 = _pseudo_rows(k_b, stride_kh, stride_kn, stride_kd, mixk_ptr, stride_mi, stride_mo, stride_mp,
                          h, tok_k, p_k, valid_k, offs_c, mask_c1, mask_c2, D1, heads_in, BLOCK_R, BLOCK_C)
    if ROPE:
        k1, k2 = _rotate(k1, k2, cos_ptr, sin_ptr, stride_cn, stride_cd, stride_sn, stride_sd, i_k, valid_k,
                         offs_c, mask_c1, False)
    v1, v2 = _pseudo_rows(v_b, stride_vh, stride_vn, stride_vd, mixv_ptr, stride_mi, stride_mo, stride_mp,
                          h, tok_k, p_k, valid_k, offs_c, mask_c1, mask_c2, D1, heads_in, BLOCK_R, BLOCK_C)
    k1, k2, v1, v2 = k1.to(ELEM), k2.to(ELEM), v1.to(ELEM), v2.to(ELEM)  # dot operands only
    dk1 = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    dk2 = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    dv1 = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    dv2 = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    row = bh.to(tl.int64) * seq_len * P
    lo, hi = _query_token_range(kt0, seq_len, P, window, window_tok, BLOCK_T, TOKEN_CAUSAL, HAS_WINDOW)
    for qt0 in range(lo, hi, BLOCK_T):
        tok, p, i, valid = _tile_rows(qt0, seq_len, P, BLOCK_T, P_PAD)
        q1, q2 = _pseudo_rows(q_b, stride_qh, stride_qn, stride_qd, mixq_ptr, stride_mi, stride_mo, stride_mp,
                              h, tok, p, valid, offs_c, mask_c1, mask_c2, D1, heads_in, BLOCK_R, BLOCK_C)
        if ROPE:
            q1, q2 = _rotate(q1, q2, cos_ptr, sin_ptr, stride_cn, stride_cd, stride_sn, stride_sd, i, valid,
                             offs_c, mask_c1, False)
        q1, q2 = q1.to(ELEM), q2.to(ELEM)
        do1, do2, w = _load_do_rows(do_ptr, stride_dob, stride_doh, stride_don, stride_dod, collapse_ptr,
                                    stride_colh, stride_colp, b, h, tok, p, i, valid, offs_c, mask_c1, mask_c2, D1,
                                    COLLAPSE)
        do1 = (w[:, None] * do1).to(ELEM)
        do2 = (w[:, None] * do2).to(ELEM)
        lse = tl.load(lse_ptr + row + i, mask=valid, other=0.0)
        d_row = w * tl.load(dp_ptr + row + i, mask=valid, other=0.0)
        s = (_dot(q1, tl.trans(k1), ELEM, FP32_DOT) + _dot(q2, tl.trans(k2), ELEM, FP32_DOT)) * qk_scale
        ok = _allowed(i, tok, valid, i_k, tok_k, valid_k, window, window_tok, TOKEN_CAUSAL, HAS_WINDOW)
        prob = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
        prob_t = tl.trans(prob)
        dv1 += _dot(prob_t, do1, ELEM, FP32_DOT)
        dv2 += _dot(prob_t, do2, ELEM, FP32_DOT)
        dprob = _dot(do1, tl.trans(v1), ELEM, FP32_DOT) + _dot(do2, tl.trans(v2), ELEM, FP32_DOT)
        ds_t = tl.trans(prob * (dprob - d_row[:, None]))
        dk1 += _dot(ds_t, q1, ELEM, FP32_DOT)
        dk2 += _dot(ds_t, q2, ELEM, FP32_DOT)
    dk1 = dk1 * sm_scale
    dk2 = dk2 * sm_scale
    if ROPE:
        dk1, dk2 = _rotate(dk1, dk2, cos_ptr, sin_ptr, stride_cn, stride_cd, stride_sn, stride_sd, i_k, valid_k,
                           offs_c, mask_c1, True)
    part_row = (b * tl.num_programs(0) + tile) * stride_part
    _scatter_heads(dk1, dk2, k_b, stride_kh, stride_kn, stride_kd, mixk_ptr, stride_mi, stride_mo, stride_mp,
                   dk_ptr + b * stride_dkb, stride_dkh, stride_dkn, dmixk_part_ptr + part_row, stride_part_i,
                   stride_part_o, h, kt0, tok_k, p_k, valid_k, seq_len, P, D1, heads_in, offs_c, mask_c1, mask_c2,
                   BLOCK_T, P_PAD, BLOCK_C)
    _scatter_heads(dv1, dv2, v_b, stride_vh, stride_vn, stride_vd, mixv_ptr, stride_mi, stride_mo, stride_mp,
                   dv_ptr + b * stride_dkb, stride_dkh, stride_dkn, dmixv_part_ptr + part_row, stride_part_i,
                   stride_part_o, h, kt0, tok_k, p_k, valid_k, seq_len, P, D1, heads_in, offs_c, mask_c1, mask_c2,
                   BLOCK_T, P_PAD, BLOCK_C)


# ---- host side -----------------------------------------------------------------------------------


def launch_config(head_dim: int, pseudo: int, dtype: torch.dtype, *, backward: bool,
                  interpret: Optional[bool] = None) -> LaunchConfig:
    """Tiles, warps and stages of the forward (backward=False) or of both backward kernels.

    A tile holds BLOCK_T tokens = BLOCK_T * P_PAD virtual rows (P_PAD = next power of two >= P);
    BLOCK_C is the padded half head dim. Rows per tile on a GPU: 128 forward for d <= 64, else 64;
    64 backward for d <= 128, else 32 (flash-attention's usual sizes, not tuned here). Under the
    interpreter (`interpret`, default: TRITON_INTERPRET=1) 8 tokens per tile, so N = 13 spans two
    tiles. These are fixed rather than autotuned: the backward's per-tile dmix partial buffers are
    sized by the tile before the launch. The per-call flags (ROPE, TOKEN_CAUSAL, HAS_WINDOW,
    COLLAPSE) are added by the launcher.
    """
    interpret = interpreting() if interpret is None else interpret
    d1 = (head_dim + 1) // 2  # rotary needs an even d; without rotary any d splits this way
    block_c = max(16, next_power_of_2(d1))  # tl.dot needs every dim >= 16 on a GPU
    p_pad = next_power_of_2(pseudo)
    if interpret:
        rows = 8 * p_pad
    else:
        rows = (64 if head_dim <= 128 else 32) if backward else (128 if head_dim <= 64 else 64)
        rows = max(rows, p_pad, 16)
    return LaunchConfig.of(num_warps=4 if rows * block_c <= 4096 else 8, num_stages=1 if backward else 2,
                           BLOCK_T=rows // p_pad, P_PAD=p_pad, BLOCK_C=block_c,
                           FP32_DOT=interpret or dtype == torch.float32)


def cuda_launches(head_dim: int, pseudo: int, dtype: torch.dtype, *, rope: bool = True, token_causal: bool = False,
                  window: bool = True, collapse_heads: bool = True) -> list[KernelLaunch]:
    """The forward and both backward launches on CUDA for heads of size head_dim, P = pseudo, q/k/v
    of `dtype` (mixes, collapse and rotary tables fp32, as the model keeps them)."""
    flags = dict(ROPE=rope, TOKEN_CAUSAL=token_causal, HAS_WINDOW=window, COLLAPSE=collapse_heads)
    f32 = torch.float32
    common = {"q_ptr": dtype, "k_ptr": dtype, "v_ptr": dtype, "mixq_ptr": f32, "mixk_ptr": f32, "mixv_ptr": f32,
              "collapse_ptr": f32, "cos_ptr": f32, "sin_ptr": f32}
    fwd = signature(_iha_fwd_kernel, {**common, "out_ptr": dtype, "lse_ptr": f32}, floats=("qk_scale",))
    bwd = {**common, "do_ptr": dtype, "lse_ptr": f32, "dp_ptr": f32}
    dq = signature(_iha_bwd_dq_kernel, {**bwd, "dq_ptr": f32, "dmixq_part_ptr": f32}, floats=("qk_scale", "sm_scale"))
    dkv = signature(_iha_bwd_dkv_kernel, {**bwd, "dk_ptr": f32, "dv_ptr": f32, "dmixk_part_ptr": f32,
                                          "dmixv_part_ptr": f32}, floats=("qk_scale", "sm_scale"))
    note = f"d={head_dim} P={pseudo}"
    forward = launch_config(head_dim, pseudo, dtype, backward=False, interpret=False).replace(**flags)
    backward = launch_config(head_dim, pseudo, dtype, backward=True, interpret=False).replace(**flags)
    return [KernelLaunch(_iha_fwd_kernel, fwd, forward, False, note),
            KernelLaunch(_iha_bwd_dq_kernel, dq, backward, False, note),
            KernelLaunch(_iha_bwd_dkv_kernel, dkv, backward, False, note)]


class _Layout:
    """Sizes, block sizes and launch constants shared by the three launches of one call."""

    def __init__(self, q: Tensor, heads_out: int, pseudo: int, mask: str, window: Optional[int], rope: bool,
                 collapse_heads: bool, backward: bool):
        batch, heads_in, seq_len, head_dim = q.shape
        self.batch, self.heads_in, self.seq_len, self.head_dim = batch, heads_in, seq_len, head_dim
        self.heads_out, self.pseudo = heads_out, pseudo
        self.d1 = (head_dim + 1) // 2
        config = launch_config(head_dim, pseudo, q.dtype, backward=backward)
        self.block_t = config.constexpr_dict()["BLOCK_T"]
        self.num_tiles = triton.cdiv(seq_len, self.block_t)
        self.sm_scale = head_dim ** -0.5
        self.launch = config.replace(ROPE=rope, TOKEN_CAUSAL=mask == "token_causal", HAS_WINDOW=window is not None,
                                     COLLAPSE=collapse_heads).kwargs()
        self.window = window if window is not None else 0
        self.window_tok = self.window // pseudo

    def scalars(self) -> tuple:
        return (self.seq_len, self.heads_in, self.heads_out, self.pseudo, self.d1, self.head_dim)

    def grid(self):
        return (self.num_tiles, self.batch * self.heads_out)


def _table_strides(cos: Optional[Tensor], sin: Optional[Tensor], q: Tensor):
    if cos is None:
        return q, q, (0, 0, 0, 0)
    return cos, sin, (*cos.stride(), *sin.stride())


def _forward(q, k, v, mix_q, mix_k, mix_v, collapse, cos, sin, mask, window, collapse_heads: bool):
    """Launch the forward kernel: (out, lse). out is o [B, H_out, N, d] or, for a global collapse, o~."""
    heads_out, pseudo = mix_q.shape[1], mix_q.shape[2]
    lay = _Layout(q, heads_out, pseudo, mask, window, cos is not None, collapse_heads, backward=False)
    rows = lay.seq_len if collapse_heads else lay.seq_len * pseudo
    out = new_output((lay.batch, heads_out, rows, lay.head_dim), dtype=q.dtype, device=q.device)
    lse = new_output((lay.batch, heads_out, lay.seq_len * pseudo), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    cos_t, sin_t, table_strides = _table_strides(cos, sin, q)
    _iha_fwd_kernel[lay.grid()](
        q, k, v, mix_q, mix_k, mix_v, collapse, cos_t, sin_t, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *mix_q.stride(), *collapse.stride(), *table_strides, *out.stride(),
        *lay.scalars(), lay.sm_scale * LOG2E, lay.window, lay.window_tok,
        **lay.launch)
    return out, lse


def _backward(grad_rows, q, k, v, mix_q, mix_k, mix_v, collapse, cos, sin, lse, mask, window, collapse_heads):
    """Launch both backward kernels. grad_rows: do [B, H_out, N, d] (per-head collapse) or do~
    [B, H_out, N*P, d] (global). Returns (dq, dk, dv) fp32, (dmix_q, dmix_k, dmix_v) fp32, Dp."""
    heads_out, pseudo = mix_q.shape[1], mix_q.shape[2]
    lay = _Layout(q, heads_out, pseudo, mask, window, cos is not None, collapse_heads, backward=True)
    shape_in = (lay.batch, lay.heads_in, lay.seq_len, lay.head_dim)
    dq, dk, dv = (torch.zeros(shape_in, dtype=torch.float32, device=q.device) for _ in range(3))
    dp = new_output((lay.batch, heads_out, lay.seq_len * pseudo), dtype=torch.float32, device=q.device)
    parts = [new_output((lay.batch * lay.num_tiles, lay.heads_in, heads_out, pseudo), dtype=torch.float32,
                        device=q.device) for _ in range(3)]
    if lay.batch * lay.seq_len == 0 or lay.head_dim == 0:
        return (dq, dk, dv), tuple(part.zero_().sum(0) for part in parts), dp.zero_()
    cos_t, sin_t, table_strides = _table_strides(cos, sin, q)
    common = (*q.stride(), *k.stride(), *v.stride(), *mix_q.stride(), *collapse.stride(), *table_strides,
              *grad_rows.stride())
    scalars = (*lay.scalars(), lay.sm_scale * LOG2E, lay.sm_scale, lay.window, lay.window_tok)
    part_strides = parts[0].stride()[:3]
    _iha_bwd_dq_kernel[lay.grid()](
        q, k, v, mix_q, mix_k, mix_v, collapse, cos_t, sin_t, grad_rows, lse, dp, dq, parts[0],
        *common, *dq.stride()[:3], *part_strides, *scalars,
        **lay.launch)
    _iha_bwd_dkv_kernel[lay.grid()](
        q, k, v, mix_q, mix_k, mix_v, collapse, cos_t, sin_t, grad_rows, lse, dp, dk, dv, parts[1], parts[2],
        *common, *dk.stride()[:3], *part_strides, *scalars,
        **lay.launch)
    return (dq, dk, dv), tuple(part.sum(0) for part in parts), dp


class IhaAttentionFunction(torch.autograd.Function):
    """Autograd for `iha_attention`. Saves the inputs and the [B, H_out, N*P] logsumexp only (plus
    o~ in the global-collapse mode); backward recomputes the pseudo-heads. cos/sin get no gradient."""

    @staticmethod
    def forward(ctx, q, k, v, mix_q, mix_k, mix_v, collapse, cos, sin, mask, window):
        batch, _, seq_len, head_dim = q.shape
        heads_out, pseudo = mix_q.shape[1], mix_q.shape[2]
        collapse_heads = tuple(collapse.shape) == (heads_out, pseudo)
        # The kernels take one set of strides for the three (tiny) mixes.
        mix_q, mix_k, mix_v = mix_q.contiguous(), mix_k.contiguous(), mix_v.contiguous()
        out, lse = _forward(q, k, v, mix_q, mix_k, mix_v, collapse, cos, sin, mask, window, collapse_heads)
        o_tilde = None
        if not collapse_heads:
            o_tilde = out
            mixing = collapse.float().reshape(heads_out, heads_out, pseudo)
            out = torch.einsum("bmnpd,hmp->bhnd", o_tilde.float().reshape(batch, heads_out, seq_len, pseudo,
                                                                           head_dim), mixing).to(q.dtype)
        ctx.save_for_backward(q, k, v, mix_q, mix_k, mix_v, collapse, cos, sin, lse, o_tilde)
        ctx.mask, ctx.window, ctx.collapse_heads = mask, window, collapse_heads
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, mix_q, mix_k, mix_v, collapse, cos, sin, lse, o_tilde = ctx.saved_tensors
        batch, _, seq_len, head_dim = q.shape
        heads_out, pseudo = mix_q.shape[1], mix_q.shape[2]
        if ctx.collapse_heads:
            grad_rows = grad_out
        else:
            mixing = collapse.float().reshape(heads_out, heads_out, pseudo)
            grad_rows = torch.einsum("bhnd,hmp->bmnpd", grad_out.float(), mixing).reshape(
                batch, heads_out, seq_len * pseudo, head_dim)
        (dq, dk, dv), (dmix_q, dmix_k, dmix_v), dp = _backward(
            grad_rows, q, k, v, mix_q, mix_k, mix_v, collapse, cos, sin, lse, ctx.mask, ctx.window,
            ctx.collapse_heads)
        if ctx.collapse_heads:
            dcollapse = dp.reshape(batch, heads_out, seq_len, pseudo).sum((0, 2))
        else:
            o5 = o_tilde.float().reshape(batch, heads_out, seq_len, pseudo, head_dim)
            dcollapse = torch.einsum("bhnd,bmnpd->hmp", grad_out.float(), o5).reshape(heads_out, heads_out * pseudo)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dmix_q.to(mix_q.dtype), dmix_k.to(mix_k.dtype),
                dmix_v.to(mix_v.dtype), dcollapse.to(collapse.dtype), None, None, None, None)


def iha_attention(q: Tensor, k: Tensor, v: Tensor, mix_q: Tensor, mix_k: Tensor, mix_v: Tensor, collapse: Tensor,
                  cos: Optional[Tensor] = None, sin: Optional[Tensor] = None, mask: str = "causal",
                  window: Optional[int] = None) -> Tensor:
    """Interleaved head attention with fused Triton kernels (forward and backward).

    Same math, arguments and result as `reference.iha_attention` (see the module docstring):
    q, k, v [B, H_in, N, d] (any strides); mix_q, mix_k, mix_v [H_in, H_out, P]; collapse [H_out, P]
    (per head, fully fused) or [H_out, H_out*P] (global: o~ is written and collapsed by a matmul);
    cos, sin [N*P, d/2] or None; mask "causal" or "token_causal"; window None or a positive multiple
    of P (virtual tokens). Returns o [B, H_out, N, d] in q.dtype with gradients for q, k, v, the
    three mixes and collapse (cos and sin get none).

    Raises ValueError naming 'iha_attention' and the argument for any malformed input.
    """
    reference.iha_check_inputs(q, k, v, mix_q, mix_k, mix_v, collapse, cos, sin, mask, window)
    check_device(OP, q)
    return IhaAttentionFunction.apply(q, k, v, mix_q, mix_k, mix_v, collapse, cos, sin, mask, window)
