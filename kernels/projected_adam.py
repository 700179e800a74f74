"""Fused GaLore / Fira step in Triton: Adam in the projected space, back-projection and the weight
update in one pass over the weight.

Math (one 2-D weight W [M, N] with an orthonormal projection P; R is the projected gradient):

    side "right": P [r, N], R, m, v [M, r], back(X) = X @ P        (GaLore when M >= N)
    side "left":  P [M, r], R, m, v [r, N], back(X) = P @ X        (GaLore when M < N)

    m   <- b1 * m + (1 - b1) * R          (only with update_moments)
    v   <- b2 * v + (1 - b2) * R^2
    psi  = m / (sqrt(v) + eps)
    U    = scale * back(psi)  [+ s (.) (G - c * back(R))]      (Fira's residual, optional)
    W   <- (W - step_size * U) * (1 - decay)

`s` scales each index of the dimension the projection keeps (rows for "right", columns for
"left"); Fira computes it (norm-based scaling times its growth limiter) before this pass, because
the limiter needs the norm of the whole residual before any element of W may be written.

Kernel layout: the launcher views both sides in one orientation, "a" = the kept dimension and
"b" = the projected one (the left side is the right side of the transposed problem, passed as
strides, never copied). One program owns a [BLOCK_A, BLOCK_B] tile of W and loops over the rank
in BLOCK_K chunks: it reads R, m, v for its rows, updates the moments in registers, forms psi and
accumulates psi @ P (and R @ P for the residual) with tl.dot, then reads, updates and writes its
W tile once. The programs of the first column of tiles store the new moments into fresh buffers
(the others keep reading the old ones), so no program ever sees a half-updated moment.

All arithmetic is fp32 in registers (psi, P and R are cast to fp32 before the dots, so bf16
inputs need no interpreter work-around); W and G may be fp32 or bf16; moments are fp32.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import check_device, check_same, check_tensor, new_output, next_power_of_2
from .aot import KernelLaunch, LaunchConfig, signature
from .library import kernel_op, none_tensor
from .tuning import autotuned

__all__ = ["projected_adam_update"]

OP = "projected_adam_update"


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _projected_adam_update_kernel(
    W,
    P,
    R,
    M1,
    V1,
    M1_OUT,
    V1_OUT,
    G,
    SCALE_A,  # W, G [A, B]; P [K, B]; R, M1, V1, *_OUT [A, K]; SCALE_A [A]
    stride_wa,
    stride_wb,
    stride_pk,
    stride_pb,
    stride_ra,
    stride_rk,
    stride_ma,
    stride_mk,
    stride_oa,
    stride_ok,
    stride_ga,
    stride_gb,
    A,
    B,
    K,
    beta1,
    beta2,
    eps,
    step_size,
    scale,
    keep,
    residual_coef,
    UPDATE_MOMENTS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One W tile: moments in rank space, psi @ P (and R @ P), then W <- (W - step * U) * keep."""
    pid_a = tl.program_id(0)
    pid_b = tl.program_id(1)
    # int64 offsets: A * stride can pass 2^31 for large embeddings-sized matrices.
    offs_a = pid_a.to(tl.int64) * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_b = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_a = offs_a < A
    mask_b = offs_b < B

    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    acc_r = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        mask_ak = mask_a[:, None] & mask_k[None, :]
        r = tl.load(R + offs_a[:, None] * stride_ra + offs_k[None, :] * stride_rk, mask=mask_ak, other=0.0).to(
            tl.float32
        )
        m = tl.load(M1 + offs_a[:, None] * stride_ma + offs_k[None, :] * stride_mk, mask=mask_ak, other=0.0).to(
            tl.float32
        )
        v = tl.load(V1 + offs_a[:, None] * stride_ma + offs_k[None, :] * stride_mk, mask=mask_ak, other=0.0).to(
            tl.float32
        )
        if UPDATE_MOMENTS:
            m = beta1 * m + (1.0 - beta1) * r
            v = beta2 * v + (1.0 - beta2) * (r * r)
            # Only the first column of tiles writes the moments (every program needs them, one writes).
            if pid_b == 0:
                tl.store(M1_OUT + offs_a[:, None] * stride_oa + offs_k[None, :] * stride_ok, m, mask=mask_ak)
                tl.store(V1_OUT + offs_a[:, None] * stride_oa + offs_k[None, :] * stride_ok, v, mask=mask_ak)
        # Padding lanes would be 0 / eps (or 0 / 0 with eps = 0): force them to 0 before the dot.
        psi = tl.where(mask_ak, m / (tl.sqrt(v) + eps), 0.0)
        p = tl.load(
            P + offs_k[:, None] * stride_pk + offs_b[None, :] * stride_pb,
            mask=mask_k[:, None] & mask_b[None, :],
            other=0.0,
        ).to(tl.float32)
        acc = tl.dot(psi, p, acc, input_precision=PRECISION)
        if HAS_RESIDUAL:
            acc_r = tl.dot(r, p, acc_r, input_precision=PRECISION)

    mask_ab = mask_a[:, None] & mask_b[None, :]
    w_ptrs = W + offs_a[:, None] * stride_wa + offs_b[None, :] * stride_wb
    w = tl.load(w_ptrs, mask=mask_ab, other=0.0).to(tl.float32)
    update = scale * acc
    if HAS_RESIDUAL:
        g = tl.load(G + offs_a[:, None] * stride_ga + offs_b[None, :] * stride_gb, mask=mask_ab, other=0.0).to(
            tl.float32
        )
        s = tl.load(SCALE_A + offs_a, mask=mask_a, other=0.0).to(tl.float32)
        update += s[:, None] * (g - residual_coef * acc_r)
    w = (w - step_size * update) * keep
    tl.store(w_ptrs, w.to(W.dtype.element_ty), mask=mask_ab)


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------


def _precision(dtype: torch.dtype) -> str:
    """fp32 dots stay IEEE unless torch's own matmuls would use TF32 (the optimizer's update is
    compared against torch.matmul, which follows the same flag)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def launch_configs(rank: int, device_type: str = "cuda") -> list[LaunchConfig]:
    """Candidate (BLOCK_A, BLOCK_B, BLOCK_K, warps, stages) for rank r: one small config on CPU, the
    autotuner's list on CUDA (square and flat W tiles; K tiles of the rank up to 64)."""
    if device_type != "cuda":
        # The interpreter runs programs one by one: small tiles keep it fast and make small test
        # shapes span several tiles and rank chunks.
        return [LaunchConfig.of(num_warps=4, BLOCK_A=16, BLOCK_B=16, BLOCK_K=16)]
    block_k = min(64, max(16, next_power_of_2(rank)))
    return [
        LaunchConfig.of(num_warps=warps, num_stages=2, BLOCK_A=a, BLOCK_B=b, BLOCK_K=block_k)
        for a, b, warps in ((64, 64, 4), (128, 64, 8), (64, 128, 8))
    ]


def cuda_launches(rank: int) -> list[KernelLaunch]:
    """Every candidate on CUDA for rank r, Fira's residual on (the heavier variant), fp32 tensors
    (GaLore and Fira keep fp32 master weights and moments), IEEE and TF32 dots."""
    f32 = torch.float32
    types = signature(
        _projected_adam_update_kernel,
        {n: f32 for n in ("W", "P", "R", "M1", "V1", "M1_OUT", "V1_OUT", "G", "SCALE_A")},
        floats=("beta1", "beta2", "eps", "step_size", "scale", "keep", "residual_coef"),
    )
    return [
        KernelLaunch(
            _projected_adam_update_kernel,
            types,
            config.replace(UPDATE_MOMENTS=True, HAS_RESIDUAL=True, PRECISION=precision),
            False,
            f"r={rank}",
        )
        for precision in ("ieee", "tf32")
        for config in launch_configs(rank)
    ]


def _validate(weight, proj, low_rank_grad, exp_avg, exp_avg_sq, side, grad, residual_scale):
    if side not in ("right", "left"):
        raise ValueError(f"{OP}: side must be 'right' or 'left', got {side!r}")
    check_tensor(OP, "weight", weight, ndim=2)
    m, n = weight.shape
    check_tensor(OP, "proj", proj, ndim=2)
    rank = proj.shape[0] if side == "right" else proj.shape[1]
    low_shape = (m, rank) if side == "right" else (rank, n)
    check_tensor(OP, "proj", proj, shape=(rank, n) if side == "right" else (m, rank))
    check_tensor(OP, "low_rank_grad", low_rank_grad, shape=low_shape)
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        check_tensor(OP, name, t, dtypes=(torch.float32,), shape=low_shape)
    if exp_avg.stride() != exp_avg_sq.stride():
        raise ValueError(f"{OP}: exp_avg and exp_avg_sq must have the same strides")
    tensors = [
        ("weight", weight),
        ("proj", proj),
        ("low_rank_grad", low_rank_grad),
        ("exp_avg", exp_avg),
        ("exp_avg_sq", exp_avg_sq),
    ]
    if grad is not None:
        check_tensor(OP, "grad", grad, shape=(m, n))
        check_tensor(OP, "residual_scale", residual_scale, shape=(m if side == "right" else n,))
        tensors += [("grad", grad), ("residual_scale", residual_scale)]
    check_same(OP, tensors, device=True)
    check_device(OP, weight)
    return rank


def projected_adam_update(
    weight: Tensor,
    proj: Tensor,
    low_rank_grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    side: str,
    beta1: float,
    beta2: float,
    eps: float,
    step_size: float,
    scale: float,
    decay: float,
    update_moments: bool = True,
    grad: Optional[Tensor] = None,
    residual_scale: Optional[Tensor] = None,
    residual_coef: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Triton version of `megatrain.kernels.reference.projected_adam_update` (same contract), run as
    the custom op megatrain::projected_adam_update (which mutates `weight`).

    `weight` is updated in place. Returns the moments after the step: with update_moments they are
    new tensors (the kernel never overwrites a moment another program may still read), otherwise
    the inputs.
    """
    if (grad is None) != (residual_scale is None):
        raise ValueError(f"{OP}: grad and residual_scale go together (Fira's residual), got only one")
    _validate(weight, proj, low_rank_grad, exp_avg, exp_avg_sq, side, grad, residual_scale)
    m_out, v_out = _projected_adam_op(
        weight,
        proj,
        low_rank_grad,
        exp_avg,
        exp_avg_sq,
        side,
        float(beta1),
        float(beta2),
        float(eps),
        float(step_size),
        float(scale),
        float(decay),
        update_moments,
        grad,
        residual_scale,
        float(residual_coef),
    )
    return (m_out, v_out) if update_moments else (exp_avg, exp_avg_sq)


@kernel_op("projected_adam_update", autocast="projected_adam_update", mutates_args=("weight",))
def _projected_adam_op(
    weight: Tensor,
    proj: Tensor,
    low_rank_grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    side: str,
    beta1: float,
    beta2: float,
    eps: float,
    step_size: float,
    scale: float,
    decay: float,
    update_moments: bool,
    grad: Optional[Tensor],
    residual_scale: Optional[Tensor],
    residual_coef: float,
) -> tuple[Tensor, Tensor]:
    """Updates `weight` in place; returns the new moments, or two empty tensors without update_moments
    (a custom op may not return its inputs)."""
    rank = proj.shape[0] if side == "right" else proj.shape[1]
    m_out, v_out = none_tensor(exp_avg), none_tensor(exp_avg)
    if update_moments:
        m_out = new_output(tuple(exp_avg.shape), dtype=torch.float32, device=exp_avg.device)
        v_out = new_output(tuple(exp_avg.shape), dtype=torch.float32, device=exp_avg.device)
    if weight.numel() == 0 or rank == 0:
        if update_moments:
            m_out.copy_(exp_avg.mul(beta1).add_(low_rank_grad.float(), alpha=1 - beta1))
            v_out.copy_(exp_avg_sq.mul(beta2).addcmul_(low_rank_grad.float(), low_rank_grad.float(), value=1 - beta2))
        weight.mul_(1.0 - decay)
        return m_out, v_out
    m_new, v_new = (m_out, v_out) if update_moments else (exp_avg, exp_avg_sq)

    # One orientation for the kernel: a = the kept dimension, b = the projected one.
    def ab(t: Tensor) -> tuple[int, int]:  # [M, N]-shaped tensor -> (stride_a, stride_b)
        return (t.stride(0), t.stride(1)) if side == "right" else (t.stride(1), t.stride(0))

    def ak(t: Tensor) -> tuple[int, int]:  # rank-space tensor -> (stride_a, stride_k)
        return (t.stride(0), t.stride(1)) if side == "right" else (t.stride(1), t.stride(0))

    stride_pk, stride_pb = (proj.stride(0), proj.stride(1)) if side == "right" else (proj.stride(1), proj.stride(0))
    a_size, b_size = (weight.shape[0], weight.shape[1]) if side == "right" else (weight.shape[1], weight.shape[0])
    has_residual = grad is not None
    g = grad if has_residual else weight
    s = residual_scale.contiguous() if has_residual else weight
    # Tuning runs the kernel several times: W, updated in place, is restored after each run.
    kernel, fixed = autotuned(
        _projected_adam_update_kernel, launch_configs(rank, weight.device.type), key=("A", "B", "K"), restore=("W",)
    )
    kernel[lambda meta: (triton.cdiv(a_size, meta["BLOCK_A"]), triton.cdiv(b_size, meta["BLOCK_B"]))](
        weight,
        proj,
        low_rank_grad,
        exp_avg,
        exp_avg_sq,
        m_new,
        v_new,
        g,
        s,
        *ab(weight),
        stride_pk,
        stride_pb,
        *ak(low_rank_grad),
        *ak(exp_avg),
        *ak(m_new),
        *ab(g),
        a_size,
        b_size,
        rank,
        float(beta1),
        float(beta2),
        float(eps),
        float(step_size),
        float(scale),
        float(1.0 - decay),
        float(residual_coef),
        UPDATE_MOMENTS=update_moments,
        HAS_RESIDUAL=has_residual,
        PRECISION=_precision(torch.float32),
        **fixed,
    )
    return m_out, v_out


@_projected_adam_op.register_fake
def _(
    weight,
    proj,
    low_rank_grad,
    exp_avg,
    exp_avg_sq,
    side,
    beta1,
    beta2,
    eps,
    step_size,
    scale,
    decay,
    update_moments,
    grad,
    residual_scale,
    residual_coef,
):
    shape = exp_avg.shape if update_moments else (0,)
    return exp_avg.new_empty(shape), exp_avg.new_empty(shape)
