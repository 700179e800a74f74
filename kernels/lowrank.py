"""Fused low-rank projection act(x @ a) @ b + bias in Triton (CoLA; activation None = plain low-rank).

Math, with rows t of x flattened to [T, D_in], a [D_in, r], b [r, D_out]:

    z = x @ a                 [T, r]   (the r-wide intermediate)
    s = silu(z) = z * sigmoid(z)       (or s = z without an activation)
    y = s @ b + bias          [T, D_out]

Backward, from dy [T, D_out]:

    dz   = (dy @ b^T) * silu'(z),  silu'(z) = sigmoid(z) * (1 + z * (1 - sigmoid(z)))
    db   = s^T @ dy,   da = x^T @ dz,   dx = dz @ a^T,   dbias = sum_t dy

Kernels (private, by phase):

- `_lowrank_fwd_fused_kernel`: one program owns BLOCK_T rows. It accumulates z = x @ a over D_in
  tiles in registers, applies SiLU there and, without leaving the chip, multiplies s by b one
  D_out tile at a time (adding the bias). z is written to memory only when backward needs it
  (training without recompute); with recompute=True (CoLA-M) or in inference the r-wide
  intermediate never reaches device memory. Used while the whole rank fits one register tile
  (r <= MAX_FUSED_RANK = 256, CoLA's r = d/4 up to d = 1024, d/8 up to 2048).
- `_lowrank_mm_kernel`: a tiled matmul C = P @ Q with three fusions that replace the separate
  elementwise passes of the unfused op: SiLU applied to P tiles as they are loaded (prologue),
  a bias added and a SiLU derivative multiplied in the epilogue. It serves the forward for larger
  ranks (z = x @ a by cuBLAS, then y = silu(z) @ b + bias in one pass over z: s never exists),
  and the backward: dz = (dy @ b^T) * silu'(z) and db = silu(z)^T @ dy (s never exists).

The plain matmuls (x @ a for large ranks or recompute, da = x^T @ dz, dx = dz @ a^T) go to cuBLAS,
as in the fused cross-entropy: Triton only where a fusion removes a pass over memory.

Dtypes: x, a, b share one dtype (the public function casts a and b to x's dtype; autograd carries
the gradients back through the cast). Dots accumulate in fp32; SiLU is computed in fp32 and s is
rounded to x's dtype before it is multiplied by b (as a tensor-core matmul of s would). fp32 dots
use TF32 only when torch.backends.cuda.matmul.allow_tf32 is set, as torch.matmul does.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import check_device, check_same, check_tensor, interpreting, new_output, next_power_of_2
from .aot import KernelLaunch, LaunchConfig, signature
from .tuning import autotuned

__all__ = ["lowrank_linear", "MAX_FUSED_RANK"]

OP = "lowrank_linear"
ACTIVATIONS = ("silu", None)

# Largest rank the single-kernel forward keeps in registers ([BLOCK_T, r] fp32 accumulator). Beyond
# it the forward is cuBLAS x @ a followed by the fused silu(z) @ b + bias kernel.
MAX_FUSED_RANK = 256


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _lowrank_fwd_fused_kernel(
    X, A, B, BIAS, Y, Z,             # X [T, D_in]; A [D_in, R]; B [R, D_out]; BIAS [D_out]; Y [T, D_out]; Z [T, R]
    n_rows, D_IN, R, D_OUT,
    stride_x, stride_a, stride_b, stride_y, stride_z,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_Z: tl.constexpr,
    UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: rows [pid*BLOCK_T, +BLOCK_T). z = x @ a in registers, s = act(z), y = s @ b + bias."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < n_rows
    rr = tl.arange(0, BLOCK_R)
    r_mask = rr < R

    z = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, D_IN, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < D_IN
        xt = tl.load(X + rows[:, None] * stride_x + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        at = tl.load(A + ks[:, None].to(tl.int64) * stride_a + rr[None, :], mask=k_mask[:, None] & r_mask[None, :],
                     other=0.0)
        if UPCAST_DOT:
            xt = xt.to(tl.float32)
            at = at.to(tl.float32)
        z = tl.dot(xt, at, z, input_precision=PRECISION)

    if STORE_Z:
        tl.store(Z + rows[:, None] * stride_z + rr[None, :], z.to(Z.dtype.element_ty),
                 mask=row_mask[:, None] & r_mask[None, :])
    if ACT:
        z = z * tl.sigmoid(z)
    # Padded rank columns hold z = 0, silu(0) = 0, and their rows of b load as 0: they add nothing.
    s = z.to(X.dtype.element_ty)
    if UPCAST_DOT:
        s = s.to(tl.float32)

    for n0 in range(0, D_OUT, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        c_mask = cols < D_OUT
        bt = tl.load(B + rr[:, None].to(tl.int64) * stride_b + cols[None, :], mask=r_mask[:, None] & c_mask[None, :],
                     other=0.0)
        if UPCAST_DOT:
            bt = bt.to(tl.float32)
        acc = tl.dot(s, bt, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(BIAS + cols, mask=c_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rows[:, None] * stride_y + cols[None, :], acc.to(Y.dtype.element_ty),
                 mask=row_mask[:, None] & c_mask[None, :])


@triton.jit
def _lowrank_mm_kernel(
    P, Q, BIAS, ZE, C,               # P [M, K]; Q [K, N]; BIAS [N]; ZE, C [M, N] (any strides)
    M, N, K,
    stride_pm, stride_pk, stride_qk, stride_qn, stride_zm, stride_zn, stride_cm, stride_cn,
    ACT_P: tl.constexpr, HAS_BIAS: tl.constexpr, DACT_EPILOGUE: tl.constexpr,
    UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C = act?(P) @ Q (+ bias) (* silu'(ZE)), one [BLOCK_M, BLOCK_N] tile per program.

    Programs are ordered in groups of GROUP_M row tiles so that neighbours reuse Q tiles from L2.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_mask = rk < K
        p = tl.load(P + rm[:, None] * stride_pm + rk[None, :] * stride_pk, mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)
        if ACT_P:
            pf = p.to(tl.float32)
            p = (pf * tl.sigmoid(pf)).to(P.dtype.element_ty)
        q = tl.load(Q + rk[:, None] * stride_qk + rn[None, :] * stride_qn, mask=k_mask[:, None] & n_mask[None, :],
                    other=0.0)
        if UPCAST_DOT:
            p = p.to(tl.float32)
            q = q.to(tl.float32)
        acc = tl.dot(p, q, acc, input_precision=PRECISION)

    mask = m_mask[:, None] & n_mask[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if DACT_EPILOGUE:
        z = tl.load(ZE + rm[:, None] * stride_zm + rn[None, :] * stride_zn, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(z)
        acc = acc * (sig * (1.0 + z * (1.0 - sig)))
    tl.store(C + rm[:, None] * stride_cm + rn[None, :] * stride_cn, acc.to(C.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 operands use TF32 only when torch's matmuls would."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


# Accumulator elements one program of the fused forward may hold: [BLOCK_T, BLOCK_R] fp32 z, about
# 64 registers a thread at 8 warps, which leaves room for the second matmul without spilling.
FUSED_ACC_ELEMENTS = 16384


def fused_configs(rank: int, dtype: torch.dtype, device_type: str = "cuda") -> list[LaunchConfig]:
    """Launch configs of the fused forward for rank r <= MAX_FUSED_RANK and operands of `dtype`.

    CPU (the interpreter): one config of small tiles. CUDA: the autotuner's candidates, every one of
    which fits sm_80's and sm_90's shared memory (tests/kernels/test_compile_cuda.py compiles them
    all). 4-byte operands take half-depth K tiles and two stages: with the 16-bit tiles an fp32
    [64, 256] rank tile needs 272 KB of shared memory, more than sm_90's 227 KB.
    """
    block_r = max(16, next_power_of_2(rank))
    if device_type != "cuda":
        # The interpreter runs programs one by one: small tiles keep it fast and make tiny test
        # shapes span several row, reduction and output tiles.
        return [LaunchConfig.of(num_warps=4, BLOCK_T=16, BLOCK_K=16, BLOCK_R=block_r, BLOCK_N=16)]
    wide = dtype.itemsize >= 4
    block_k, stages = (32, 2) if wide else (64, 3)
    largest_t = max(16, min(128, FUSED_ACC_ELEMENTS // block_r))
    if wide:
        # fp32 operands (IEEE dots run on the FMA units and hold more per thread): half the rows.
        largest_t = max(16, largest_t // 2)
    # Output tiles of 64 columns: at 128 the second matmul's accumulator spills at every rank
    # (docs/kernels-compiled.md has the compiled numbers).
    tiles = [(largest_t, 64), (max(16, largest_t // 2), 64), (largest_t, 32)]
    configs = []
    for block_t, block_n in dict.fromkeys(tiles):
        warps = 8 if block_t * block_r >= 8192 else 4
        configs.append(LaunchConfig.of(num_warps=warps, num_stages=stages, BLOCK_T=block_t, BLOCK_K=block_k,
                                       BLOCK_R=block_r, BLOCK_N=block_n))
    return configs


def mm_configs(dtype: torch.dtype, device_type: str = "cuda") -> list[LaunchConfig]:
    """Launch configs of `_lowrank_mm_kernel` (C = act?(P) @ Q ...): one small config on CPU, the
    autotuner's candidates on CUDA (the usual square and flat matmul tiles, K tiles halved for fp32)."""
    if device_type != "cuda":
        return [LaunchConfig.of(num_warps=4, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2)]
    block_k = 32 if dtype.itemsize >= 4 else 64
    # 128-wide tiles need 8 warps: at 4 their fp32 accumulator plus the SiLU prologue spills.
    tiles = ((128, 128, 8, 3), (128, 64, 8, 3), (64, 128, 8, 3), (64, 64, 4, 4))
    return [LaunchConfig.of(num_warps=warps, num_stages=stages, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=block_k, GROUP_M=8)
            for bm, bn, warps, stages in tiles]


def _per_call_constexprs(dtype: torch.dtype) -> dict:
    return dict(UPCAST_DOT=interpreting(), PRECISION=_precision(dtype))


def cuda_launches(rank: int, dtype: torch.dtype) -> list[KernelLaunch]:
    """Every config the CUDA launchers may run for rank r and `dtype`: the fused forward (r <= 256)
    and the matmul kernel (backward; forward for larger r), each with its optional work on (bias,
    SiLU, z stored; SiLU prologue and derivative epilogue), so the heaviest variant is what compiles."""
    # fp32 dots are IEEE unless torch.backends.cuda.matmul.allow_tf32 is set: both can run.
    precisions = ("ieee", "tf32") if dtype == torch.float32 else ("tf32",)
    out = []
    for precision in precisions:
        flags = dict(UPCAST_DOT=False, PRECISION=precision)
        if rank <= MAX_FUSED_RANK:
            types = signature(_lowrank_fwd_fused_kernel, {n: dtype for n in ("X", "A", "B", "BIAS", "Y", "Z")})
            for config in fused_configs(rank, dtype):
                config = config.replace(HAS_BIAS=True, ACT=True, STORE_Z=True, **flags)
                out.append(KernelLaunch(_lowrank_fwd_fused_kernel, types, config, False, f"r={rank}"))
        types = signature(_lowrank_mm_kernel, {n: dtype for n in ("P", "Q", "BIAS", "ZE", "C")})
        for config in mm_configs(dtype):
            config = config.replace(ACT_P=True, HAS_BIAS=True, DACT_EPILOGUE=True, **flags)
            out.append(KernelLaunch(_lowrank_mm_kernel, types, config, False))
    return out


def lowrank_fwd(x: Tensor, a: Tensor, b: Tensor, bias: Optional[Tensor], act: bool, store_z: bool):
    """Forward launcher. x [T, D_in], a [D_in, R], b [R, D_out] contiguous, one dtype; bias [D_out].

    Returns (y [T, D_out] in x.dtype, z [T, R] in x.dtype or None). z is returned only when
    `store_z` (it is needed by backward); the fused kernel writes it only then.
    """
    n_rows, d_in = x.shape
    rank, d_out = b.shape
    y = new_output((n_rows, d_out), dtype=x.dtype, device=x.device)
    if n_rows == 0:
        return y, (new_output((0, rank), dtype=x.dtype, device=x.device) if store_z else None)
    if rank <= MAX_FUSED_RANK:
        z = new_output((n_rows, rank), dtype=x.dtype, device=x.device) if store_z else None
        kernel, fixed = autotuned(_lowrank_fwd_fused_kernel, fused_configs(rank, x.dtype, x.device.type),
                                  key=("D_IN", "R", "D_OUT"))
        kernel[lambda meta: (triton.cdiv(n_rows, meta["BLOCK_T"]),)](
            x, a, b, bias if bias is not None else y, y, z if z is not None else y,
            n_rows, d_in, rank, d_out,
            x.stride(0), a.stride(0), b.stride(0), y.stride(0), z.stride(0) if z is not None else 0,
            HAS_BIAS=bias is not None, ACT=act, STORE_Z=store_z, **_per_call_constexprs(x.dtype),
            **fixed,
        )
        return y, z
    # Large rank: z by cuBLAS, then one fused pass for act(z) @ b + bias.
    z = x @ a
    _mm(z, b, y, act_p=act, bias=bias)
    return y, (z if store_z else None)


def _mm(p: Tensor, q: Tensor, out: Tensor, *, act_p: bool = False, bias: Optional[Tensor] = None,
        dact: Optional[Tensor] = None) -> Tensor:
    """out[M, N] = act?(p[M, K]) @ q[K, N] (+ bias[N]) (* silu'(dact[M, N])); any strides."""
    m, k = p.shape
    n = q.shape[1]
    if m == 0 or n == 0:
        return out
    kernel, fixed = autotuned(_lowrank_mm_kernel, mm_configs(p.dtype, p.device.type), key=("N", "K"))
    kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)](
        p, q, bias if bias is not None else out, dact if dact is not None else out, out,
        m, n, k,
        p.stride(0), p.stride(1), q.stride(0), q.stride(1),
        dact.stride(0) if dact is not None else 0, dact.stride(1) if dact is not None else 0,
        out.stride(0), out.stride(1),
        ACT_P=act_p, HAS_BIAS=bias is not None, DACT_EPILOGUE=dact is not None,
        **_per_call_constexprs(p.dtype), **fixed,
    )
    return out


def lowrank_bwd(dy: Tensor, x: Tensor, a: Tensor, b: Tensor, z: Tensor, act: bool, need_dx: bool,
                need_da: bool, need_db: bool):
    """Backward launcher. dy [T, D_out], x [T, D_in], z = x @ a [T, R]; returns (dx, da, db) or Nones.

    With SiLU: dz = (dy @ b^T) * silu'(z) and db = silu(z)^T @ dy are each one fused matmul pass.
    """
    dz = None
    if need_dx or need_da:
        if act:
            dz = _mm(dy, b.t(), new_output(z.shape, dtype=z.dtype, device=z.device), dact=z)
        else:
            dz = dy @ b.t()
    db = None
    if need_db:
        if act:
            db = _mm(z.t(), dy, new_output(b.shape, dtype=b.dtype, device=b.device), act_p=True)
        else:
            db = z.t() @ dy
    dx = dz @ a.t() if need_dx else None
    da = x.t() @ dz if need_da else None
    return dx, da, db


# --------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------


class LowRankLinearFunction(torch.autograd.Function):
    """Autograd node for `lowrank_linear`. Saves x, a, b and z = x @ a [T, r] (or, with recompute,
    only x, a, b: z is recomputed by cuBLAS in backward)."""

    @staticmethod
    def forward(ctx, x: Tensor, a: Tensor, b: Tensor, bias: Optional[Tensor], activation: Optional[str],
                recompute: bool):
        shape = x.shape
        x2d = x.reshape(-1, shape[-1]).contiguous()
        a_c, b_c = a.contiguous(), b.contiguous()
        act = activation == "silu"
        needs_grad = any(ctx.needs_input_grad[:4])
        y, z = lowrank_fwd(x2d, a_c, b_c, bias.contiguous() if bias is not None else None, act,
                           store_z=needs_grad and not recompute)
        ctx.act, ctx.recompute, ctx.x_shape = act, recompute, shape
        ctx.bias_dtype = bias.dtype if bias is not None else None
        if recompute:
            ctx.save_for_backward(x2d, a_c, b_c)
        else:
            ctx.save_for_backward(x2d, a_c, b_c, z)
        return y.view(*shape[:-1], b.shape[1])

    @staticmethod
    def backward(ctx, dy: Tensor):
        if ctx.recompute:
            x2d, a, b = ctx.saved_tensors
            z = x2d @ a
        else:
            x2d, a, b, z = ctx.saved_tensors
        dy2d = dy.reshape(-1, dy.shape[-1]).to(x2d.dtype).contiguous()
        need_dx, need_da, need_db, need_dbias = ctx.needs_input_grad[:4]
        dx, da, db = lowrank_bwd(dy2d, x2d, a, b, z, ctx.act, need_dx, need_da, need_db)
        dbias = dy2d.float().sum(0).to(ctx.bias_dtype) if need_dbias else None
        if dx is not None:
            dx = dx.view(ctx.x_shape)
        return dx, da, db, dbias, None, None


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def _validate(x: Tensor, a: Tensor, b: Tensor, bias: Optional[Tensor], activation, recompute) -> None:
    check_tensor(OP, "x", x, min_ndim=1)
    d_in = x.shape[-1]
    check_tensor(OP, "a", a, ndim=2, shape=(d_in, None))
    check_tensor(OP, "b", b, ndim=2, shape=(a.shape[1], None))
    if bias is not None:
        check_tensor(OP, "bias", bias, shape=(b.shape[1],))
    check_same(OP, [("x", x), ("a", a), ("b", b)] + ([("bias", bias)] if bias is not None else []))
    check_device(OP, x)
    if min(d_in, a.shape[1], b.shape[1]) == 0:
        raise ValueError(f"{OP}: D_in, r and D_out must be >= 1, got x {tuple(x.shape)}, a {tuple(a.shape)}, "
                         f"b {tuple(b.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{OP}: argument 'activation' must be one of {ACTIVATIONS}, got {activation!r}")
    if not isinstance(recompute, bool):
        raise ValueError(f"{OP}: argument 'recompute' must be a bool, got {recompute!r}")


def lowrank_linear(x: Tensor, a: Tensor, b: Tensor, bias: Optional[Tensor] = None,
                   activation: Optional[str] = "silu", recompute: bool = False) -> Tensor:
    """Fused low-rank projection: act(x @ a) @ b + bias (CoLA; activation None = plain low-rank).

    Args:
        x: [..., D_in], float16/bfloat16/float32. Copied to a contiguous [T, D_in] layout if needed.
        a: [D_in, r]; b: [r, D_out]. Another float dtype than x's is cast to x's dtype (the
            gradient flows back through the cast).
        bias: [D_out] or None, any float dtype (read in fp32; its gradient comes back in its dtype).
        activation: "silu" or None.
        recompute: True (CoLA-M) saves only x, a, b for backward and recomputes z = x @ a there;
            False saves z [T, r] (r/D_out of the output's size).

    Returns:
        [..., D_out] in x.dtype.

    Raises:
        ValueError naming 'lowrank_linear' and the argument, for a wrong dtype, shape, device or option.
    """
    _validate(x, a, b, bias, activation, recompute)
    if a.dtype != x.dtype:
        a = a.to(x.dtype)
    if b.dtype != x.dtype:
        b = b.to(x.dtype)
    return LowRankLinearFunction.apply(x, a, b, bias, activation, recompute)
