"""Interleaved Head Attention (IHA): tensor-core mixing plus one FlashAttention-2 kernel in Triton.

Math (the oracle is `reference.iha_attention`): from q, k, v [B, H_in, N, d] and mixing tensors
mix_q, mix_k, mix_v [H_in, H_out, P], output head h has P pseudo-tokens per token at the virtual
positions i = n*P + p of an interleaved sequence of L = N*P tokens,

    q~[b, h, n*P + p] = sum_m mix_q[m, h, p] * q[b, m, n]          (k~ with mix_k, v~ with mix_v)
    q~, k~ rotated by cos/sin [N*P, d/2] at row n*P + p             (when given)
    o~ = softmax(q~ k~^T / sqrt(d), masked) v~                      over the L virtual tokens
    o[b, h, n] = sum_p collapse[h, p] * o~[b, h, n*P + p]           per head, collapse [H_out, P]
               = sum_{m,p} collapse[h, m*P + p] * o~[b, m, n*P + p] global, collapse [H_out, H_out*P]

How it runs (one call, forward):

1. Mixing, one GEMM per tensor on tensor cores (cuBLAS through torch.matmul):
   [H_out*P, H_in] @ [B, H_in, N*d] -> [B, H_out*P, N*d], i.e. the pseudo-heads in the layout
   [B, H_out, P, N, d]. Row i = n*P + p of head h lies at p*N*d + n*d: the kernels address rows by
   (i // P) * stride_n + (i % P) * stride_p, so the interleaved sequence is a free view of it (no
   interleaving copy; any layout with a unit d stride works, e.g. [B, H_out, N, P, d] as well).
2. RoPE at the virtual positions (or the original ones: the caller's table then repeats row n P
   times) by the Triton rotary kernel (`rotary.rope`) on q~ and k~, one read and one write each.
3. `_iha_attn_fwd_kernel`: FlashAttention-2 over the L virtual tokens (below), writing o~ in the
   layout of 1 and the base-2 logsumexp [B, H_out, L] fp32.
4. Collapse, one GEMM: per head [H_out, 1, P] @ [B, H_out, P, N*d] (batched over heads), global
   [H_out, H_out*P] @ [B, H_out*P, N*d]. Result o [B, H_out, N, d].

Backward: autograd runs the transposes of the GEMMs (dmix = dq~ x^T and dx = mix^T dq~, one GEMM
each; dcollapse and do~ likewise) and the rotary kernel with -theta; the attention backward is
FlashAttention-2's: `_iha_attn_bwd_preprocess_kernel` (delta = rowsum(do~ * o~)),
`_iha_attn_bwd_dkdv_kernel` (one program per key tile, looping over the query tiles that see it)
and `_iha_attn_bwd_dq_kernel` (one program per query tile, looping over its key tiles). Each
gradient tile is accumulated in registers by one program and stored once: no atomics, bitwise
deterministic.

The attention kernel. One program per (tile of BLOCK_M virtual queries, b, h). Every query i sees a
contiguous key range [lower(i), upper(i)] (`reference.iha_allowed`):

    causal:        upper = i,                lower = i - W + 1           (W: window, virtual tokens)
    token_causal:  upper = (i // P)*P + P-1, lower = (i // P - W/P + 1)*P
    (no window: lower = 0; lower is clamped at 0, upper at L - 1)

Both bounds are non-decreasing in i, so for a query tile [m0, m1] the keys [lower(m0), upper(m1)]
are all it can see (the loop bounds: fully masked key tiles are never loaded), and the keys
[lower(m1), upper(m0)] are seen by every row (those tiles run without any elementwise mask). The
key loop therefore has three phases: masked tiles below, unmasked tiles, masked tiles above; the
masked phases compare each (row, key) with the row's bounds. The backward kernels use the same
bounds the other way round (the queries that see a key j are [first(j), last(j)]). Online softmax
in base 2 (scale folded into log2(e)/sqrt(d)), fp32 statistics and accumulators; QK^T and PV are
`tl.dot` on the input dtype (bf16/fp16 tensor cores; fp32 inputs use exact fp32 dots). Under
TRITON_INTERPRET=1 dot operands are rounded to the input dtype and upcast (FP32_DOT), since the
interpreter's bf16 dot is wrong (kernels/_utils.py).

What is stored for backward: q~ and k~ (rotated), v~ and o~ [B, H_out, P, N, d] in the input dtype
(P times MHA's q, k, v, o), the logsumexp [B, H_out, N*P] fp32, and the GEMMs' inputs (q, k, v,
tiny mixes). Nothing of size L^2.

Cost per call, B batch, H = H_out heads, L = N*P, d head dim, e bytes per element (2 for bf16),
causal without window (a window W replaces L^2/2 by about L*W):

    attention FLOPs, forward      4 * B*H * (L^2/2) * d             (QK^T and PV; FA2 counts)
    attention FLOPs, backward     2.5 x forward                      (recomputes QK^T: 5 matmuls)
    mixing + collapse FLOPs       2 * B*N*d * (3*H_in + 1) * H*P     (negligible: H_in*P per element)
    HBM bytes, forward            e*B*N*d * (3*H_in + 3*H*P [mix out] + 4*H*P [rope in/out]
                                  + 4*H*P [attn q~,k~,v~ in, o~ out] + H*P + H [collapse]) + 4*B*H*L

At the benchmark shape (B1 N4096 H32 d128 P2, bf16, causal): L = 8192, 550 GFLOP forward and 1.92
TFLOP forward+backward of attention, against about 0.7 GB forward of traffic outside attention.
The attention is compute-bound (arithmetic intensity ~L/2 FLOP per byte of q~/k~/v~ tile loaded),
and the rest is a memory-bound ~0.2 ms at H200 bandwidth (4.8 TB/s); the roofline at the H200's
989 TFLOP/s dense bf16 is 0.56 ms forward and 1.9 ms forward+backward, and with the ~50% of peak
that FlashAttention-2-style Triton kernels reach, about 1.3 ms and 4.5-5 ms (SDPA on MHA is 0.27 /
1.02 ms at this shape; IHA at P = 2 does 4x its FLOPs by construction).
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
from .library import kernel_op

__all__ = ["iha_attention", "launch_config", "cuda_launches"]

OP = "iha_attention"
LOG2E = 1.4426950408889634


# ---- device helpers ------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, FP32_DOT: tl.constexpr):
    """a @ b with fp32 accumulation. FP32_DOT: fp32 inputs (exact fp32, not tf32), or the interpreter
    (operands already rounded to the input dtype, then upcast: its bf16 dot is wrong)."""
    if FP32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _row_offsets(i, P, stride_n, stride_p, ALIGNED: tl.constexpr):
    """Element offset of virtual row i = n*P + p in a head: n * stride_n + p * stride_p (int64; the
    division stays in 32 bits, a 64-bit one is a slow multi-instruction routine on NVIDIA GPUs).
    ALIGNED: the launcher checked that every stride is a multiple of 16 elements; saying so lets the
    compiler vectorise the row loads and stage them with cp.async / TMA-free async copies."""
    n = i // P
    offsets = n.to(tl.int64) * stride_n + (i - n * P).to(tl.int64) * stride_p
    if ALIGNED:
        offsets = tl.multiple_of(offsets, 16)
    return offsets


@triton.jit
def _head_base(ptr, b, h, stride_b, stride_h, ALIGNED: tl.constexpr):
    """Pointer to head (b, h) (b, h int64) of the tensor at ptr."""
    offset = b * stride_b + h * stride_h
    if ALIGNED:
        offset = tl.multiple_of(offset, 16)
    return ptr + offset


@triton.jit
def _program_tile(heads, L, head_dim, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's tile of BLOCK virtual rows (grid: row tiles x B*H): its first row start,
    bh = b*heads + h, b and h (int64), the rows offs, the columns offs_d, the columns below head_dim
    (mask_d) and the rows below L (valid)."""
    start = tl.program_id(0) * BLOCK
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)
    offs = start + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < head_dim
    valid = offs < L
    return start, bh, b, h, offs, offs_d, mask_d, valid


@triton.jit
def _key_lower(i, P, window, TOKEN_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """First virtual key that virtual query i sees."""
    if HAS_WINDOW:
        if TOKEN_CAUSAL:
            lower = tl.maximum(i // P - window // P + 1, 0) * P
        else:
            lower = tl.maximum(i - window + 1, 0)
    else:
        lower = i * 0
    return lower


@triton.jit
def _key_upper(i, P, TOKEN_CAUSAL: tl.constexpr):
    """Last virtual key that virtual query i sees (inclusive)."""
    if TOKEN_CAUSAL:
        upper = (i // P) * P + P - 1
    else:
        upper = i
    return upper


@triton.jit
def _query_first(j, P, TOKEN_CAUSAL: tl.constexpr):
    """First virtual query that sees virtual key j."""
    if TOKEN_CAUSAL:
        first = (j // P) * P
    else:
        first = j
    return first


@triton.jit
def _query_last(j, L, P, window, TOKEN_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Last virtual query that sees virtual key j (inclusive)."""
    if HAS_WINDOW:
        if TOKEN_CAUSAL:
            last = (j // P + window // P) * P - 1
        else:
            last = j + window - 1
        last = tl.minimum(last, L - 1)
    else:
        last = j * 0 + L - 1
    return last


@triton.jit
def _phases(lo, hi, full_lo, full_hi, BLOCK: tl.constexpr):
    """Split [lo, hi) (lo aligned to BLOCK) into tiles: masked [lo, mid_lo), unmasked [mid_lo, mid_hi),
    masked [mid_hi, hi). A tile is unmasked only when it lies inside [full_lo, full_hi)."""
    lo = (lo // BLOCK) * BLOCK
    mid_lo = tl.minimum(tl.maximum((full_lo + BLOCK - 1) // BLOCK * BLOCK, lo), hi)
    mid_hi = tl.maximum(tl.minimum((full_hi // BLOCK) * BLOCK, hi), mid_lo)
    return lo, mid_lo, mid_hi


@triton.jit
def _key_range(
    start_m,
    offs_m,
    L,
    P,
    window,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TOKEN_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):
    """The keys of the query tile offs_m = start_m + [0, BLOCK_M): each row's bounds key_lo, key_hi
    (inclusive) and the key tiles of the loop, masked [lo, mid_lo), unmasked [mid_lo, mid_hi), masked
    [mid_hi, hi) (`_phases`)."""
    key_lo = _key_lower(offs_m, P, window, TOKEN_CAUSAL, HAS_WINDOW)
    key_hi = _key_upper(offs_m, P, TOKEN_CAUSAL)
    last_m = tl.minimum(start_m + BLOCK_M, L) - 1
    lo = _key_lower(start_m, P, window, TOKEN_CAUSAL, HAS_WINDOW)
    hi = tl.minimum(_key_upper(last_m, P, TOKEN_CAUSAL) + 1, L)
    full_lo = _key_lower(last_m, P, window, TOKEN_CAUSAL, HAS_WINDOW)
    full_hi = _key_upper(start_m, P, TOKEN_CAUSAL) + 1
    lo, mid_lo, mid_hi = _phases(lo, hi, full_lo, full_hi, BLOCK_N)
    return key_lo, key_hi, lo, mid_lo, mid_hi, hi


@triton.jit
def _key_tile(start_n, L, P, stride_kn, stride_kp, stride_vn, stride_vp, BLOCK_N: tl.constexpr, ALIGNED: tl.constexpr):
    """The key tile start_n + [0, BLOCK_N) of a loop step: its keys offs_n, those below L (valid_n)
    and their row offsets in k and v."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    valid_n = offs_n < L
    k_rows = _row_offsets(offs_n, P, stride_kn, stride_kp, ALIGNED)
    v_rows = _row_offsets(offs_n, P, stride_vn, stride_vp, ALIGNED)
    return offs_n, valid_n, k_rows, v_rows


@triton.jit
def _load_rows(
    base, rows, rows_valid, offs_d, mask_d, CHECK_ROWS: tl.constexpr, EVEN_D: tl.constexpr, TRANSPOSED: tl.constexpr
):
    """Load the rows at offsets rows (`_row_offsets`) of the head at base, a [rows, BLOCK_D] tile
    ([BLOCK_D, rows] when TRANSPOSED), zero outside. Row checks only where a tile can pass the end
    (CHECK_ROWS), column checks only when d < BLOCK_D (EVEN_D false): a mask that varies along d would
    stop the loads from being vectorised."""
    if TRANSPOSED:
        ptrs = base + rows[None, :] + offs_d[:, None]
    else:
        ptrs = base + rows[:, None] + offs_d[None, :]
    if CHECK_ROWS:
        if EVEN_D:
            mask = rows_valid[None, :] if TRANSPOSED else rows_valid[:, None]
        else:
            mask = (mask_d[:, None] & rows_valid[None, :]) if TRANSPOSED else (rows_valid[:, None] & mask_d[None, :])
        x = tl.load(ptrs, mask=mask, other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=mask_d[:, None] if TRANSPOSED else mask_d[None, :], other=0.0)
    return x


@triton.jit
def _store_rows(base, rows, value, rows_valid, offs_d, mask_d, EVEN_D: tl.constexpr):
    """Store a [rows, BLOCK_D] tile in base's dtype at the rows at offsets rows of the head at base,
    rows that exist only."""
    ptrs = base + rows[:, None] + offs_d[None, :]
    value = value.to(base.dtype.element_ty)
    if EVEN_D:
        tl.store(ptrs, value, mask=rows_valid[:, None])
    else:
        tl.store(ptrs, value, mask=rows_valid[:, None] & mask_d[None, :])


# ---- forward -------------------------------------------------------------------------------------


@triton.jit
def _fwd_inner(
    acc,
    m_i,
    l_i,
    q,
    k_base,
    v_base,
    stride_kn,
    stride_kp,
    stride_vn,
    stride_vp,
    start,
    end,
    key_lo,
    key_hi,
    L,
    P,
    qk_scale,
    offs_d,
    mask_d,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    EVEN_D: tl.constexpr,
    ALIGNED: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    """Online softmax of the query tile over key tiles [start, end); elementwise mask when MASKED."""
    ELEM = q.dtype
    for start_n in range(start, end, BLOCK_N):
        offs_n, valid_n, k_rows, v_rows = _key_tile(
            start_n, L, P, stride_kn, stride_kp, stride_vn, stride_vp, BLOCK_N, ALIGNED
        )
        k = _load_rows(k_base, k_rows, valid_n, offs_d, mask_d, MASKED, EVEN_D, False)
        s = _dot(q, tl.trans(k), FP32_DOT) * qk_scale
        if MASKED:
            ok = (offs_n[None, :] >= key_lo[:, None]) & (offs_n[None, :] <= key_hi[:, None]) & valid_n[None, :]
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen no key yet keeps max -inf: shift by 0, so exp2(-inf) = 0, not NaN.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_shift = m_new
        alpha = tl.exp2(m_i - m_shift)
        p = tl.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_base, v_rows, valid_n, offs_d, mask_d, MASKED, EVEN_D, False)
        acc = acc * alpha[:, None] + _dot(p.to(ELEM), v, FP32_DOT)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _iha_attn_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    lse_ptr,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qp,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kp,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vp,
    stride_ob,
    stride_oh,
    stride_on,
    stride_op,
    heads,
    L,
    P,
    head_dim,
    window,
    qk_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TOKEN_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    EVEN_D: tl.constexpr,
    ALIGNED: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    """o~ and the base-2 logsumexp of one tile of BLOCK_M virtual queries of head (b, h)."""
    start_m, bh, b, h, offs_m, offs_d, mask_d, valid_m = _program_tile(heads, L, head_dim, BLOCK_M, BLOCK_D)
    q_rows = _row_offsets(offs_m, P, stride_qn, stride_qp, ALIGNED)
    q = _load_rows(
        _head_base(q_ptr, b, h, stride_qb, stride_qh, ALIGNED), q_rows, valid_m, offs_d, mask_d, True, EVEN_D, False
    )
    k_base = _head_base(k_ptr, b, h, stride_kb, stride_kh, ALIGNED)
    v_base = _head_base(v_ptr, b, h, stride_vb, stride_vh, ALIGNED)
    key_lo, key_hi, lo, mid_lo, mid_hi, hi = _key_range(
        start_m, offs_m, L, P, window, BLOCK_M, BLOCK_N, TOKEN_CAUSAL, HAS_WINDOW
    )

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc, m_i, l_i = _fwd_inner(
        acc,
        m_i,
        l_i,
        q,
        k_base,
        v_base,
        stride_kn,
        stride_kp,
        stride_vn,
        stride_vp,
        lo,
        mid_lo,
        key_lo,
        key_hi,
        L,
        P,
        qk_scale,
        offs_d,
        mask_d,
        BLOCK_N,
        True,
        EVEN_D,
        ALIGNED,
        FP32_DOT,
    )
    acc, m_i, l_i = _fwd_inner(
        acc,
        m_i,
        l_i,
        q,
        k_base,
        v_base,
        stride_kn,
        stride_kp,
        stride_vn,
        stride_vp,
        mid_lo,
        mid_hi,
        key_lo,
        key_hi,
        L,
        P,
        qk_scale,
        offs_d,
        mask_d,
        BLOCK_N,
        False,
        EVEN_D,
        ALIGNED,
        FP32_DOT,
    )
    acc, m_i, l_i = _fwd_inner(
        acc,
        m_i,
        l_i,
        q,
        k_base,
        v_base,
        stride_kn,
        stride_kp,
        stride_vn,
        stride_vp,
        mid_hi,
        hi,
        key_lo,
        key_hi,
        L,
        P,
        qk_scale,
        offs_d,
        mask_d,
        BLOCK_N,
        True,
        EVEN_D,
        ALIGNED,
        FP32_DOT,
    )
    # Every valid row sees at least itself, so l_i > 0 there; padding rows are not stored.
    l_safe = tl.where(valid_m, l_i, 1.0)
    acc = acc / l_safe[:, None]
    o_rows = _row_offsets(offs_m, P, stride_on, stride_op, ALIGNED)
    _store_rows(_head_base(o_ptr, b, h, stride_ob, stride_oh, ALIGNED), o_rows, acc, valid_m, offs_d, mask_d, EVEN_D)
    tl.store(lse_ptr + bh.to(tl.int64) * L + offs_m, m_i + tl.log2(l_safe), mask=valid_m)


# ---- backward ------------------------------------------------------------------------------------


@triton.jit
def _iha_attn_bwd_preprocess_kernel(
    o_ptr,
    do_ptr,
    delta_ptr,
    stride_ob,
    stride_oh,
    stride_on,
    stride_op,
    stride_dob,
    stride_doh,
    stride_don,
    stride_dop,
    heads,
    L,
    P,
    head_dim,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """delta[b, h, i] = sum_d do~[b, h, i, d] * o~[b, h, i, d] (fp32), the softmax-backward row term."""
    start_m, bh, b, h, offs_m, offs_d, mask_d, valid_m = _program_tile(heads, L, head_dim, BLOCK_M, BLOCK_D)
    mask = valid_m[:, None] & mask_d[None, :]
    o_rows = _row_offsets(offs_m, P, stride_on, stride_op, ALIGNED)
    do_rows = _row_offsets(offs_m, P, stride_don, stride_dop, ALIGNED)
    o_base = _head_base(o_ptr, b, h, stride_ob, stride_oh, ALIGNED)
    do_base = _head_base(do_ptr, b, h, stride_dob, stride_doh, ALIGNED)
    o = tl.load(o_base + o_rows[:, None] + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_base + do_rows[:, None] + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + bh.to(tl.int64) * L + offs_m, tl.sum(o * do, 1), mask=valid_m)


@triton.jit
def _dkdv_inner(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_base,
    delta_base,
    stride_qn,
    stride_qp,
    stride_don,
    stride_dop,
    start,
    end,
    offs_n,
    L,
    P,
    window,
    qk_scale,
    offs_d,
    mask_d,
    BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr,
    TOKEN_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    EVEN_D: tl.constexpr,
    ALIGNED: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    """Accumulate dk~, dv~ of the key tile over query tiles [start, end); elementwise mask when MASKED."""
    ELEM = k.dtype
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        valid_m = offs_m < L
        q_rows = _row_offsets(offs_m, P, stride_qn, stride_qp, ALIGNED)
        qT = _load_rows(q_base, q_rows, valid_m, offs_d, mask_d, MASKED, EVEN_D, True)
        lse = tl.load(lse_base + offs_m, mask=valid_m, other=0.0)
        pT = tl.exp2(_dot(k, qT, FP32_DOT) * qk_scale - lse[None, :])  # [BLOCK_N, BLOCK_M]
        if MASKED:
            key_lo = _key_lower(offs_m, P, window, TOKEN_CAUSAL, HAS_WINDOW)
            key_hi = _key_upper(offs_m, P, TOKEN_CAUSAL)
            ok = (offs_n[:, None] >= key_lo[None, :]) & (offs_n[:, None] <= key_hi[None, :]) & valid_m[None, :]
            pT = tl.where(ok, pT, 0.0)
        do_rows = _row_offsets(offs_m, P, stride_don, stride_dop, ALIGNED)
        do = _load_rows(do_base, do_rows, valid_m, offs_d, mask_d, MASKED, EVEN_D, False)
        dv += _dot(pT.to(ELEM), do, FP32_DOT)
        delta = tl.load(delta_base + offs_m, mask=valid_m, other=0.0)
        dpT = _dot(v, tl.trans(do), FP32_DOT)
        dsT = pT * (dpT - delta[None, :])
        dk += _dot(dsT.to(ELEM), tl.trans(qT), FP32_DOT)
    return dk, dv


@triton.jit
def _iha_attn_bwd_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qp,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kp,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vp,
    stride_dob,
    stride_doh,
    stride_don,
    stride_dop,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dkp,
    heads,
    L,
    P,
    head_dim,
    window,
    qk_scale,
    sm_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TOKEN_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    EVEN_D: tl.constexpr,
    ALIGNED: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    """dk~, dv~ of one tile of BLOCK_N virtual keys of head (b, h). dk and dv share strides."""
    start_n, bh, b, h, offs_n, offs_d, mask_d, valid_n = _program_tile(heads, L, head_dim, BLOCK_N, BLOCK_D)
    k_rows = _row_offsets(offs_n, P, stride_kn, stride_kp, ALIGNED)
    v_rows = _row_offsets(offs_n, P, stride_vn, stride_vp, ALIGNED)
    k_base = _head_base(k_ptr, b, h, stride_kb, stride_kh, ALIGNED)
    v_base = _head_base(v_ptr, b, h, stride_vb, stride_vh, ALIGNED)
    k = _load_rows(k_base, k_rows, valid_n, offs_d, mask_d, True, EVEN_D, False)
    v = _load_rows(v_base, v_rows, valid_n, offs_d, mask_d, True, EVEN_D, False)
    q_base = _head_base(q_ptr, b, h, stride_qb, stride_qh, ALIGNED)
    do_base = _head_base(do_ptr, b, h, stride_dob, stride_doh, ALIGNED)
    lse_base = lse_ptr + bh.to(tl.int64) * L
    delta_base = delta_ptr + bh.to(tl.int64) * L
    last_n = tl.minimum(start_n + BLOCK_N, L) - 1
    lo = _query_first(start_n, P, TOKEN_CAUSAL)
    hi = _query_last(last_n, L, P, window, TOKEN_CAUSAL, HAS_WINDOW) + 1
    full_lo = _query_first(last_n, P, TOKEN_CAUSAL)
    full_hi = _query_last(start_n, L, P, window, TOKEN_CAUSAL, HAS_WINDOW) + 1
    lo, mid_lo, mid_hi = _phases(lo, hi, full_lo, full_hi, BLOCK_M)

    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dk, dv = _dkdv_inner(
        dk,
        dv,
        k,
        v,
        q_base,
        do_base,
        lse_base,
        delta_base,
        stride_qn,
        stride_qp,
        stride_don,
        stride_dop,
        lo,
        mid_lo,
        offs_n,
        L,
        P,
        window,
        qk_scale,
        offs_d,
        mask_d,
        BLOCK_M,
        True,
        TOKEN_CAUSAL,
        HAS_WINDOW,
        EVEN_D,
        ALIGNED,
        FP32_DOT,
    )
    dk, dv = _dkdv_inner(
        dk,
        dv,
        k,
        v,
        q_base,
        do_base,
        lse_base,
        delta_base,
        stride_qn,
        stride_qp,
        stride_don,
        stride_dop,
        mid_lo,
        mid_hi,
        offs_n,
        L,
        P,
        window,
        qk_scale,
        offs_d,
        mask_d,
        BLOCK_M,
        False,
        TOKEN_CAUSAL,
        HAS_WINDOW,
        EVEN_D,
        ALIGNED,
        FP32_DOT,
    )
    dk, dv = _dkdv_inner(
        dk,
        dv,
        k,
        v,
        q_base,
        do_base,
        lse_base,
        delta_base,
        stride_qn,
        stride_qp,
        stride_don,
        stride_dop,
        mid_hi,
        hi,
        offs_n,
        L,
        P,
        window,
        qk_scale,
        offs_d,
        mask_d,
        BLOCK_M,
        True,
        TOKEN_CAUSAL,
        HAS_WINDOW,
        EVEN_D,
        ALIGNED,
        FP32_DOT,
    )
    out_rows = _row_offsets(offs_n, P, stride_dkn, stride_dkp, ALIGNED)
    _store_rows(
        _head_base(dk_ptr, b, h, stride_dkb, stride_dkh, ALIGNED),
        out_rows,
        dk * sm_scale,
        valid_n,
        offs_d,
        mask_d,
        EVEN_D,
    )
    _store_rows(
        _head_base(dv_ptr, b, h, stride_dkb, stride_dkh, ALIGNED), out_rows, dv, valid_n, offs_d, mask_d, EVEN_D
    )


@triton.jit
def _dq_inner(
    dq,
    q,
    do,
    lse,
    delta,
    k_base,
    v_base,
    stride_kn,
    stride_kp,
    stride_vn,
    stride_vp,
    start,
    end,
    key_lo,
    key_hi,
    L,
    P,
    qk_scale,
    offs_d,
    mask_d,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    EVEN_D: tl.constexpr,
    ALIGNED: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    """Accumulate dq~ of the query tile over key tiles [start, end); elementwise mask when MASKED."""
    ELEM = q.dtype
    for start_n in range(start, end, BLOCK_N):
        offs_n, valid_n, k_rows, v_rows = _key_tile(
            start_n, L, P, stride_kn, stride_kp, stride_vn, stride_vp, BLOCK_N, ALIGNED
        )
        kT = _load_rows(k_base, k_rows, valid_n, offs_d, mask_d, MASKED, EVEN_D, True)
        vT = _load_rows(v_base, v_rows, valid_n, offs_d, mask_d, MASKED, EVEN_D, True)
        p = tl.exp2(_dot(q, kT, FP32_DOT) * qk_scale - lse[:, None])
        if MASKED:
            ok = (offs_n[None, :] >= key_lo[:, None]) & (offs_n[None, :] <= key_hi[:, None]) & valid_n[None, :]
            p = tl.where(ok, p, 0.0)
        dp = _dot(do, vT, FP32_DOT)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(ELEM), tl.trans(kT), FP32_DOT)
    return dq


@triton.jit
def _iha_attn_bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qp,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kp,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vp,
    stride_dob,
    stride_doh,
    stride_don,
    stride_dop,
    stride_dqb,
    stride_dqh,
    stride_dqn,
    stride_dqp,
    heads,
    L,
    P,
    head_dim,
    window,
    qk_scale,
    sm_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TOKEN_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    EVEN_D: tl.constexpr,
    ALIGNED: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    """dq~ of one tile of BLOCK_M virtual queries of head (b, h)."""
    start_m, bh, b, h, offs_m, offs_d, mask_d, valid_m = _program_tile(heads, L, head_dim, BLOCK_M, BLOCK_D)
    q_rows = _row_offsets(offs_m, P, stride_qn, stride_qp, ALIGNED)
    do_rows = _row_offsets(offs_m, P, stride_don, stride_dop, ALIGNED)
    q = _load_rows(
        _head_base(q_ptr, b, h, stride_qb, stride_qh, ALIGNED), q_rows, valid_m, offs_d, mask_d, True, EVEN_D, False
    )
    do = _load_rows(
        _head_base(do_ptr, b, h, stride_dob, stride_doh, ALIGNED), do_rows, valid_m, offs_d, mask_d, True, EVEN_D, False
    )
    lse = tl.load(lse_ptr + bh.to(tl.int64) * L + offs_m, mask=valid_m, other=0.0)
    delta = tl.load(delta_ptr + bh.to(tl.int64) * L + offs_m, mask=valid_m, other=0.0)
    k_base = _head_base(k_ptr, b, h, stride_kb, stride_kh, ALIGNED)
    v_base = _head_base(v_ptr, b, h, stride_vb, stride_vh, ALIGNED)
    key_lo, key_hi, lo, mid_lo, mid_hi, hi = _key_range(
        start_m, offs_m, L, P, window, BLOCK_M, BLOCK_N, TOKEN_CAUSAL, HAS_WINDOW
    )

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dq = _dq_inner(
        dq,
        q,
        do,
        lse,
        delta,
        k_base,
        v_base,
        stride_kn,
        stride_kp,
        stride_vn,
        stride_vp,
        lo,
        mid_lo,
        key_lo,
        key_hi,
        L,
        P,
        qk_scale,
        offs_d,
        mask_d,
        BLOCK_N,
        True,
        EVEN_D,
        ALIGNED,
        FP32_DOT,
    )
    dq = _dq_inner(
        dq,
        q,
        do,
        lse,
        delta,
        k_base,
        v_base,
        stride_kn,
        stride_kp,
        stride_vn,
        stride_vp,
        mid_lo,
        mid_hi,
        key_lo,
        key_hi,
        L,
        P,
        qk_scale,
        offs_d,
        mask_d,
        BLOCK_N,
        False,
        EVEN_D,
        ALIGNED,
        FP32_DOT,
    )
    dq = _dq_inner(
        dq,
        q,
        do,
        lse,
        delta,
        k_base,
        v_base,
        stride_kn,
        stride_kp,
        stride_vn,
        stride_vp,
        mid_hi,
        hi,
        key_lo,
        key_hi,
        L,
        P,
        qk_scale,
        offs_d,
        mask_d,
        BLOCK_N,
        True,
        EVEN_D,
        ALIGNED,
        FP32_DOT,
    )
    dq_rows = _row_offsets(offs_m, P, stride_dqn, stride_dqp, ALIGNED)
    _store_rows(
        _head_base(dq_ptr, b, h, stride_dqb, stride_dqh, ALIGNED),
        dq_rows,
        dq * sm_scale,
        valid_m,
        offs_d,
        mask_d,
        EVEN_D,
    )


# ---- host side -----------------------------------------------------------------------------------

PHASES = ("fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq")


def launch_config(head_dim: int, dtype: torch.dtype, *, phase: str, interpret: Optional[bool] = None) -> LaunchConfig:
    """Tiles, warps and stages of one kernel (`phase` in PHASES) for heads of size head_dim.

    BLOCK_D is d rounded up to a power of two (>= 16, tl.dot's minimum). On a GPU the largest tiles
    that compile without register spills for both sm_80 and sm_90 (docs/kernels-compiled.md), for
    16-bit inputs (d <= 64 / d <= 128):

        forward   BLOCK_M x BLOCK_N = 128 x 64 / 128 x 32 queries x keys, 8 warps, 3 stages
        dk, dv    32 queries x 64 keys per step, 4 / 8 warps, 2 stages
        dq        64 queries x 32 / 64 keys (32 x 64 for d = 96: larger spills on sm_80), 4 / 8 warps, 2 stages
        delta     2048 / BLOCK_D rows, 4 warps (memory-bound)

    fp32 inputs (exact fp32 dots on CUDA cores, not tf32) take 16- and 32-wide tiles. Nothing
    depends on P or the mask (runtime values of the kernels). Under the interpreter (`interpret`,
    default TRITON_INTERPRET=1) tiles of 16 x 8 (8 x 16 for dk/dv), so short test sequences span
    several tiles and every phase of the loops runs. The launcher adds the mask flags and ALIGNED.
    """
    interpret = interpreting() if interpret is None else interpret
    if phase not in PHASES:
        raise ValueError(f"launch_config: phase must be one of {PHASES}, got {phase!r}")
    block_d = max(16, next_power_of_2(head_dim))
    fp32 = dtype == torch.float32
    wide = block_d > 64
    if phase == "bwd_preprocess":
        rows = 16 if interpret else max(16, 2048 // block_d)
        return LaunchConfig.of(num_warps=4, BLOCK_M=rows, BLOCK_D=block_d)
    if interpret:
        (block_m, block_n), warps, stages = {"fwd": (16, 8), "bwd_dkdv": (8, 16), "bwd_dq": (16, 8)}[phase], 4, None
    elif fp32:
        block_m, block_n, warps, stages = {
            "fwd": (16 if wide else 32, 16, 4, 2),
            "bwd_dkdv": (16, 32, 8 if wide else 4, 1),
            "bwd_dq": (32, 16, 8, 1),
        }[phase]
    else:
        masked_d = block_d != head_dim  # column masks cost registers: d = 96 needs a smaller dq tile
        block_m, block_n, warps, stages = {
            "fwd": (128, 32 if wide else 64, 8, 3),
            "bwd_dkdv": (32, 64, 8 if wide else 4, 2),
            "bwd_dq": (32 if masked_d else 64, 64 if wide else 32, 8 if wide else 4, 2),
        }[phase]
    return LaunchConfig.of(
        num_warps=warps,
        num_stages=stages,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        EVEN_D=block_d == head_dim,
        FP32_DOT=interpret or fp32,
    )


_KERNELS = {
    "fwd": _iha_attn_fwd_kernel,
    "bwd_preprocess": _iha_attn_bwd_preprocess_kernel,
    "bwd_dkdv": _iha_attn_bwd_dkdv_kernel,
    "bwd_dq": _iha_attn_bwd_dq_kernel,
}


def cuda_launches(
    head_dim: int, dtype: torch.dtype, *, token_causal: bool = False, window: bool = True
) -> list[KernelLaunch]:
    """The four launches of one forward + backward on CUDA for heads of size head_dim in `dtype`
    (the pseudo-heads' dtype; logsumexp and delta are fp32). P does not change the compiled code."""
    f32 = torch.float32
    flags = dict(TOKEN_CAUSAL=token_causal, HAS_WINDOW=window, ALIGNED=True)
    types = {
        "fwd": {"q_ptr": dtype, "k_ptr": dtype, "v_ptr": dtype, "o_ptr": dtype, "lse_ptr": f32},
        "bwd_preprocess": {"o_ptr": dtype, "do_ptr": dtype, "delta_ptr": f32},
        "bwd_dkdv": {
            "q_ptr": dtype,
            "k_ptr": dtype,
            "v_ptr": dtype,
            "do_ptr": dtype,
            "lse_ptr": f32,
            "delta_ptr": f32,
            "dk_ptr": dtype,
            "dv_ptr": dtype,
        },
        "bwd_dq": {
            "q_ptr": dtype,
            "k_ptr": dtype,
            "v_ptr": dtype,
            "do_ptr": dtype,
            "lse_ptr": f32,
            "delta_ptr": f32,
            "dq_ptr": dtype,
        },
    }
    floats = {
        "fwd": ("qk_scale",),
        "bwd_preprocess": (),
        "bwd_dkdv": ("qk_scale", "sm_scale"),
        "bwd_dq": ("qk_scale", "sm_scale"),
    }
    launches = []
    for phase in PHASES:
        config = launch_config(head_dim, dtype, phase=phase, interpret=False)
        config = config.replace(**(flags if phase != "bwd_preprocess" else dict(ALIGNED=True)))
        kernel = _KERNELS[phase]
        launches.append(
            KernelLaunch(
                kernel,
                signature(kernel, types[phase], floats=floats[phase]),
                config,
                phase == "bwd_preprocess",
                f"d={head_dim}",
            )
        )
    return launches


def _strides(x: Tensor) -> tuple[int, int, int, int]:
    """(b, h, n, p) strides of a [B, H, P, N, d] pseudo-head tensor (d has unit stride)."""
    return x.stride(0), x.stride(1), x.stride(3), x.stride(2)


def _unit_d(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _mask_flags(mask: str, window: Optional[int]) -> dict:
    return dict(TOKEN_CAUSAL=mask == "token_causal", HAS_WINDOW=window is not None)


def _aligned(*tensors: Tensor) -> bool:
    """Every (b, h, n, p) stride a multiple of 16 elements and every pointer 16-byte aligned: then the
    kernels may tell the compiler so (ALIGNED), which vectorises their row loads."""
    return all(x.data_ptr() % 16 == 0 and all(st % 16 == 0 for st in _strides(x)) for x in tensors)


def _attention_forward(q: Tensor, k: Tensor, v: Tensor, mask: str, window: Optional[int]) -> tuple[Tensor, Tensor]:
    """q~, k~, v~ [B, H, P, N, d] (any strides, unit d stride) -> o~ [B, H, P, N, d] contiguous and
    the base-2 logsumexp [B, H, N*P] fp32."""
    batch, heads, pseudo, seq_len, head_dim = q.shape
    L = seq_len * pseudo
    out = new_output(q.shape, dtype=q.dtype, device=q.device)
    lse = new_output((batch, heads, L), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    config = launch_config(head_dim, q.dtype, phase="fwd").replace(
        **_mask_flags(mask, window), ALIGNED=_aligned(q, k, v, out)
    )
    block_m = config.constexpr_dict()["BLOCK_M"]
    _iha_attn_fwd_kernel[(triton.cdiv(L, block_m), batch * heads)](
        q,
        k,
        v,
        out,
        lse,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(out),
        heads,
        L,
        pseudo,
        head_dim,
        window or 0,
        head_dim**-0.5 * LOG2E,
        **config.kwargs(),
    )
    return out, lse


def _attention_backward(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, mask: str, window: Optional[int]
) -> tuple[Tensor, Tensor, Tensor]:
    """dq~, dk~, dv~ [B, H, P, N, d] (contiguous, the inputs' dtype) from do~."""
    batch, heads, pseudo, seq_len, head_dim = q.shape
    L = seq_len * pseudo
    dq, dk, dv = (new_output(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    if dq.numel() == 0:
        return dq, dk, dv
    flags = dict(_mask_flags(mask, window), ALIGNED=_aligned(q, k, v, do, dq))
    delta = new_output((batch, heads, L), dtype=torch.float32, device=q.device)
    pre = launch_config(head_dim, q.dtype, phase="bwd_preprocess").replace(ALIGNED=_aligned(o, do))
    _iha_attn_bwd_preprocess_kernel[(triton.cdiv(L, pre.constexpr_dict()["BLOCK_M"]), batch * heads)](
        o, do, delta, *_strides(o), *_strides(do), heads, L, pseudo, head_dim, **pre.kwargs()
    )
    sm_scale = head_dim**-0.5
    scalars = (heads, L, pseudo, head_dim, window or 0, sm_scale * LOG2E, sm_scale)
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))
    dkdv = launch_config(head_dim, q.dtype, phase="bwd_dkdv").replace(**flags)
    _iha_attn_bwd_dkdv_kernel[(triton.cdiv(L, dkdv.constexpr_dict()["BLOCK_N"]), batch * heads)](
        q, k, v, do, lse, delta, dk, dv, *strides, *_strides(dk), *scalars, **dkdv.kwargs()
    )
    dq_config = launch_config(head_dim, q.dtype, phase="bwd_dq").replace(**flags)
    _iha_attn_bwd_dq_kernel[(triton.cdiv(L, dq_config.constexpr_dict()["BLOCK_M"]), batch * heads)](
        q, k, v, do, lse, delta, dq, *strides, *_strides(dq), *scalars, **dq_config.kwargs()
    )
    return dq, dk, dv


@kernel_op("iha_flash_attention", autocast="iha_attention")
def _attention_op(q: Tensor, k: Tensor, v: Tensor, mask: str, window: Optional[int]) -> tuple[Tensor, Tensor]:
    """Softmax attention over the interleaved virtual sequence of [B, H, P, N, d] pseudo-heads (row
    n*P + p is [:, :, p, n]; any strides): (o~ [B, H, P, N, d] contiguous, logsumexp [B, H, N*P] fp32)."""
    return _attention_forward(_unit_d(q), _unit_d(k), _unit_d(v), mask, window)


@_attention_op.register_fake
def _(q, k, v, mask, window):
    batch, heads, pseudo, seq_len, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, seq_len * pseudo), dtype=torch.float32)


@kernel_op("iha_flash_attention_backward")
def _attention_backward_op(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, mask: str, window: Optional[int]
) -> tuple[Tensor, Tensor, Tensor]:
    """FA2's backward: dq~, dk~, dv~ [B, H, P, N, d] (contiguous, q's dtype) from do~."""
    return _attention_backward(_unit_d(do.to(q.dtype)), _unit_d(q), _unit_d(k), _unit_d(v), o, lse, mask, window)


@_attention_backward_op.register_fake
def _(do, q, k, v, o, lse, mask, window):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup_context(ctx, inputs, output) -> None:
    """Saves q~, k~, v~, o~ and the logsumexp (nothing of size (N*P)^2)."""
    q, k, v, mask, window = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.mask, ctx.window = mask, window


def _backward(ctx, grad_out: Tensor, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(grad_out, q, k, v, out, lse, ctx.mask, ctx.window)
    return dq, dk, dv, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def pseudo_heads(x: Tensor, mix: Tensor) -> Tensor:
    """x [B, H_in, N, d], mix [H_in, H_out, P] -> x~ [B, H_out, P, N, d]: one GEMM,
    [H_out*P, H_in] @ [B, H_in, N*d], on tensor cores in x's dtype."""
    batch, heads_in, seq_len, head_dim = x.shape
    heads_out, pseudo = mix.shape[1], mix.shape[2]
    weights = mix.permute(1, 2, 0).reshape(heads_out * pseudo, heads_in).to(x.dtype)
    return torch.matmul(weights, x.reshape(batch, heads_in, seq_len * head_dim)).view(
        batch, heads_out, pseudo, seq_len, head_dim
    )


def rotate_pseudo_heads(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """RoPE on q~, k~ [B, H, P, N, d] with tables cos, sin [N*P, d/2] indexed by virtual row n*P + p,
    by the rotary kernel: the pseudo index becomes its batch dim ([P, B*H, N, d] views, per-p
    tables [P, N, d/2]). Returns [B, H, P, N, d] views (of [P, B, H, N, d] storage)."""
    batch, heads, pseudo, seq_len, head_dim = q.shape
    from .rotary import rope

    def per_p(table: Tensor) -> Tensor:
        return table.view(seq_len, pseudo, head_dim // 2).transpose(0, 1)

    def as_batch(x: Tensor) -> Tensor:
        return x.permute(2, 0, 1, 3, 4).reshape(pseudo, batch * heads, seq_len, head_dim)

    q_rot, k_rot = rope(as_batch(q), as_batch(k), per_p(cos), per_p(sin))
    return tuple(t.view(pseudo, batch, heads, seq_len, head_dim).permute(1, 2, 0, 3, 4) for t in (q_rot, k_rot))


def collapse_pseudo_heads(o: Tensor, collapse: Tensor) -> Tensor:
    """o~ [B, H, P, N, d] -> o [B, H, N, d], one GEMM: per head [H, 1, P] @ [B, H, P, N*d], global
    [H, H*P] @ [B, H*P, N*d] (collapse [H, H*P], column m*P + p)."""
    batch, heads, pseudo, seq_len, head_dim = o.shape
    weights = collapse.to(o.dtype)
    if tuple(collapse.shape) == (heads, pseudo):
        out = torch.matmul(weights[:, None, :], o.reshape(batch, heads, pseudo, seq_len * head_dim))
    else:
        out = torch.matmul(weights, o.reshape(batch, heads * pseudo, seq_len * head_dim))
    return out.view(batch, heads, seq_len, head_dim)


def iha_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mix_q: Tensor,
    mix_k: Tensor,
    mix_v: Tensor,
    collapse: Tensor,
    cos: Optional[Tensor] = None,
    sin: Optional[Tensor] = None,
    mask: str = "causal",
    window: Optional[int] = None,
) -> Tensor:
    """Interleaved head attention: GEMM mixing, rotary, the FlashAttention-2 Triton kernel, GEMM collapse.

    Same math, arguments and result as `reference.iha_attention` (see the module docstring):
    q, k, v [B, H_in, N, d] (any strides); mix_q, mix_k, mix_v [H_in, H_out, P]; collapse [H_out, P]
    (per head) or [H_out, H_out*P] (global); cos, sin [N*P, d/2] or None; mask "causal" or
    "token_causal"; window None or a positive multiple of P (virtual tokens). Returns o
    [B, H_out, N, d] in q.dtype with gradients for q, k, v, the three mixes and collapse (cos and sin
    get none). The mixes and collapse are applied in q's dtype (bf16 models: bf16 GEMMs, fp32
    accumulation).

    Raises ValueError naming 'iha_attention' and the argument for any malformed input.
    """
    reference.iha_check_inputs(q, k, v, mix_q, mix_k, mix_v, collapse, cos, sin, mask, window)
    check_device(OP, q)
    q_t, k_t, v_t = pseudo_heads(q, mix_q), pseudo_heads(k, mix_k), pseudo_heads(v, mix_v)
    if cos is not None:
        q_t, k_t = rotate_pseudo_heads(q_t, k_t, cos, sin)
    o_t = _attention_op(q_t, k_t, v_t, mask, window)[0]
    return collapse_pseudo_heads(o_t, collapse)
