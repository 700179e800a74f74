"""Low-rank projection act(x @ a) @ b + bias (CoLA; activation None = plain low-rank): cuBLAS matmuls
around one fused elementwise Triton pass per direction.

Math, with rows t of x flattened to [T, D_in], a [D_in, r], b [r, D_out]:

    z = x @ a                 [T, r]   (the r-wide intermediate)
    s = silu(z) = z * sigmoid(z)       (or s = z without an activation)
    y = s @ b + bias          [T, D_out]

Backward, from dy [T, D_out]:

    ds   = dy @ b^T,   dz = ds * silu'(z),  silu'(z) = sigmoid(z) * (1 + z * (1 - sigmoid(z)))
    db   = s^T @ dy,   da = x^T @ dz,   dx = dz @ a^T,   dbias = sum_t dy

How it runs. Every matmul is one cuBLAS call through torch (torch.mm, or torch.addmm when there is a
bias, which adds it in the GEMM's epilogue); Triton does only the elementwise work between them, each
in one pass over the [T, r] intermediate:

- forward: z = x @ a; `_silu_fwd_kernel` writes s = silu(z) (in place over z when backward will not
  need z: inference, or recompute); y = s @ b (+ bias).
- backward: ds = dy @ b^T; `_silu_bwd_kernel` reads z and ds once and writes dz = ds * silu'(z) over
  ds (in place) and s = silu(z) (the operand of db): so only z is saved, not s; then db = s^T @ dy,
  da = x^T @ dz, dx = dz @ a^T, dbias = dy summed in fp32.
- recompute=True (CoLA-M): forward saves x, a, b only; backward first recomputes z = x @ a (one more
  cuBLAS matmul, 2*T*D_in*r FLOPs) and then runs exactly the backward above.
- activation None: no Triton at all, z is s.

Cost per call (e = bytes per element, FLOPs useful work; the dense d x d layer it replaces does
2*T*D_in*D_out forward and 6*T*D_in*D_out forward+backward):

    forward    2*T*r*(D_in + D_out) FLOPs;  the SiLU pass moves 2*T*r*e bytes (read z, write s)
    backward   4*T*r*(D_in + D_out) FLOPs (+ 2*T*D_in*r recomputing z);  the SiLU pass moves
               4*T*r*e bytes (read z, ds; write dz, s)

Roofline: the matmuls are the cost and run at cuBLAS speed; the elementwise passes move r/D of the
bytes of one [T, D] activation (T8192, r1024, bf16: 16.8 MB forward, 33.6 MB backward, ~10 us at an
H200's 4.8 TB/s, against ~0.2 ms / 0.4 ms of matmuls), so the op is as fast as two matmuls plus a
SiLU can be: the unfused eager version runs the same GEMMs plus a SiLU forward and a SiLU backward
pass of the same size, and stores s as well as z for backward (this op stores z only).

Dtypes: x, a, b share one dtype (the public function casts a and b to x's dtype; autograd carries
the gradients back through the cast). SiLU and its derivative are computed in fp32 and stored in x's
dtype (as an unfused bf16 version's are). fp32 matmuls use TF32 exactly when torch's do
(torch.backends.cuda.matmul.allow_tf32): they are torch's.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import check_device, check_same, check_tensor, new_output
from .aot import KernelLaunch, LaunchConfig, signature
from .library import kernel_op, none_tensor

__all__ = ["lowrank_linear"]

OP = "lowrank_linear"
ACTIVATIONS = ("silu", None)

# Elements per program of the elementwise passes: several vector loads per thread of 4 warps, and
# a grid that covers every SM at the smallest [T, r] a model makes.
BLOCK = 1024
NUM_WARPS = 4


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _silu_fwd_kernel(Z, S, n, BLOCK: tl.constexpr):
    """S = silu(Z) over n elements (S may be Z: in place)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    z = tl.load(Z + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(S + offs, (z * tl.sigmoid(z)).to(S.dtype.element_ty), mask=mask)


@triton.jit
def _silu_bwd_kernel(Z, DS, S, DZ, n, BLOCK: tl.constexpr):
    """DZ = DS * silu'(Z) and S = silu(Z) in one pass over n elements (DZ may be DS: in place)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    z = tl.load(Z + offs, mask=mask, other=0.0).to(tl.float32)
    ds = tl.load(DS + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(z)
    tl.store(S + offs, (z * sig).to(S.dtype.element_ty), mask=mask)
    tl.store(DZ + offs, (ds * (sig * (1.0 + z * (1.0 - sig)))).to(DZ.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def launch_config() -> LaunchConfig:
    """The one launch shape of both SiLU passes, for every size, dtype and device."""
    return LaunchConfig.of(num_warps=NUM_WARPS, BLOCK=BLOCK)


def cuda_launches(rank: int, dtype: torch.dtype) -> list[KernelLaunch]:
    """The launches a rank-r problem in `dtype` runs on CUDA: both SiLU passes (the config does not
    depend on r; the argument keeps the per-problem interface of benchmarks/compile_report.py)."""
    fwd = signature(_silu_fwd_kernel, {"Z": dtype, "S": dtype}, ints64=("n",))
    bwd = signature(_silu_bwd_kernel, {n: dtype for n in ("Z", "DS", "S", "DZ")}, ints64=("n",))
    note = f"r={rank}"
    return [
        KernelLaunch(_silu_fwd_kernel, fwd, launch_config(), True, note),
        KernelLaunch(_silu_bwd_kernel, bwd, launch_config(), True, note),
    ]


def _silu_(z: Tensor, out: Tensor) -> Tensor:
    """out = silu(z), elementwise over contiguous tensors of one shape (out may be z)."""
    n = z.numel()
    if n:
        config = launch_config()
        _silu_fwd_kernel[(triton.cdiv(n, BLOCK),)](z, out, n, **config.kwargs())
    return out


def _silu_backward_(z: Tensor, ds: Tensor) -> tuple[Tensor, Tensor]:
    """(dz, s): dz = ds * silu'(z) written over ds, s = silu(z) in a new tensor; one pass."""
    s = new_output(z.shape, dtype=z.dtype, device=z.device)
    n = z.numel()
    if n:
        _silu_bwd_kernel[(triton.cdiv(n, BLOCK),)](z, ds, s, ds, n, **launch_config().kwargs())
    return ds, s


def _project_out(s: Tensor, b: Tensor, bias: Optional[Tensor]) -> Tensor:
    """s @ b (+ bias, added in the GEMM's epilogue)."""
    if bias is None:
        return torch.mm(s, b)
    return torch.addmm(bias, s, b)


# --------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------


@kernel_op("lowrank_linear", autocast="lowrank_linear")
def _lowrank_op(
    x: Tensor, a: Tensor, b: Tensor, bias: Optional[Tensor], silu: bool, keep_z: bool
) -> tuple[Tensor, Tensor]:
    """(y [..., D_out], z = x @ a [T, r] when keep_z, else empty). x, a, b of one dtype."""
    shape = x.shape
    x2d = x.reshape(-1, shape[-1]).contiguous()
    z = torch.mm(x2d, a.contiguous())
    s = z
    if silu:
        # z itself is kept only when backward reads it; otherwise SiLU overwrites it.
        s = _silu_(z, new_output(z.shape, dtype=z.dtype, device=z.device) if keep_z else z)
    y = _project_out(s, b.contiguous(), bias.to(x2d.dtype) if bias is not None else None)
    return y.view(*shape[:-1], b.shape[1]), z if keep_z else none_tensor(y)


@_lowrank_op.register_fake
def _(x, a, b, bias, silu, keep_z):
    rows = x.numel() // x.shape[-1]
    return x.new_empty((*x.shape[:-1], b.shape[1])), x.new_empty((rows, a.shape[1]) if keep_z else (0,))


@kernel_op("lowrank_linear_backward")
def _lowrank_backward_op(
    dy: Tensor,
    x: Tensor,
    a: Tensor,
    b: Tensor,
    z: Optional[Tensor],
    silu: bool,
    need_dx: bool,
    need_da: bool,
    need_db: bool,
    need_dbias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, da, db, dbias fp32), each empty unless asked for; z None recomputes x @ a (CoLA-M)."""
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    a, b = a.contiguous(), b.contiguous()
    if z is None:
        z = torch.mm(x2d, a)
    dy2d = dy.reshape(-1, dy.shape[-1]).to(x2d.dtype).contiguous()
    dz, s = None, z
    if need_dx or need_da:
        dz = torch.mm(dy2d, b.t())
        if silu:
            dz, s = _silu_backward_(z, dz)
    elif need_db and silu:
        s = _silu_(z, new_output(z.shape, dtype=z.dtype, device=z.device))
    # Separate placeholders: a custom op's outputs may not alias each other.
    dx = torch.mm(dz, a.t()).view(x.shape) if need_dx else none_tensor(dy2d)
    da = torch.mm(x2d.t(), dz) if need_da else none_tensor(dy2d)
    db = torch.mm(s.t(), dy2d) if need_db else none_tensor(dy2d)
    dbias = dy2d.float().sum(0) if need_dbias else none_tensor(dy2d)
    return dx, da, db, dbias


@_lowrank_backward_op.register_fake
def _(dy, x, a, b, z, silu, need_dx, need_da, need_db, need_dbias):
    def out(flag, shape, dtype=x.dtype):
        return x.new_empty(shape if flag else (0,), dtype=dtype)

    return (
        out(need_dx, x.shape),
        out(need_da, a.shape),
        out(need_db, b.shape),
        out(need_dbias, (b.shape[1],), torch.float32),
    )


def _setup_context(ctx, inputs, output) -> None:
    """Saves x, a, b and z = x @ a [T, r] (or, with recompute, only x, a, b: z is recomputed by cuBLAS
    in backward)."""
    x, a, b, bias, silu, keep_z = inputs
    _, z = output
    ctx.mark_non_differentiable(z)
    ctx.silu, ctx.keep_z = silu, keep_z
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.save_for_backward(x, a, b, z if keep_z else None)


def _backward(ctx, dy: Tensor, _dz):
    x, a, b, z = ctx.saved_tensors
    need = ctx.needs_input_grad[:4]
    dx, da, db, dbias = _lowrank_backward_op(dy, x, a, b, z, ctx.silu, *need)
    return (
        dx if need[0] else None,
        da if need[1] else None,
        db if need[2] else None,
        dbias.to(ctx.bias_dtype) if need[3] else None,
        None,
        None,
    )


_lowrank_op.register_autograd(_backward, setup_context=_setup_context)


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
        raise ValueError(
            f"{OP}: D_in, r and D_out must be >= 1, got x {tuple(x.shape)}, a {tuple(a.shape)}, b {tuple(b.shape)}"
        )
    if activation not in ACTIVATIONS:
        raise ValueError(f"{OP}: argument 'activation' must be one of {ACTIVATIONS}, got {activation!r}")
    if not isinstance(recompute, bool):
        raise ValueError(f"{OP}: argument 'recompute' must be a bool, got {recompute!r}")


def lowrank_linear(
    x: Tensor,
    a: Tensor,
    b: Tensor,
    bias: Optional[Tensor] = None,
    activation: Optional[str] = "silu",
    recompute: bool = False,
) -> Tensor:
    """Low-rank projection act(x @ a) @ b + bias (CoLA; activation None = plain low-rank): cuBLAS
    matmuls with the SiLU (and its derivative) in one Triton pass each (see the module docstring).

    Args:
        x: [..., D_in], float16/bfloat16/float32. Copied to a contiguous [T, D_in] layout if needed.
        a: [D_in, r]; b: [r, D_out]. Another float dtype than x's is cast to x's dtype (the
            gradient flows back through the cast).
        bias: [D_out] or None, any float dtype (cast to x's dtype and added in the second matmul's
            epilogue; its gradient, summed in fp32, comes back in its dtype).
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
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, a, b, bias))
    return _lowrank_op(x, a, b, bias, activation == "silu", needs_grad and not recompute)[0]
