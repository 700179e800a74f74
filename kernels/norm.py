"""Fused RMSNorm (optionally fused with the residual add) in Triton.

Math, per row of length D (rows = every leading index of x flattened):

    h    = x                      (or x + residual, summed in fp32)
    rstd = 1 / sqrt(mean(h^2) + eps)
    y    = h * rstd * w

Backward, with g = dy * w and n = h * rstd (the normalised row):

    dh = rstd * (g - n * mean(g * n)) [+ dh_out, the gradient of the returned h]
    dw = sum over rows of dy * n
    dx = dresidual = dh

Shapes: x, residual, y, h [rows, D] inside the launchers ([..., D] at the API); weight [D];
rstd [rows] fp32. All arithmetic is fp32 in registers; every input is loaded in its own dtype; y
and h are stored in x.dtype, or with a residual in the promoted dtype of x and residual (x bf16 +
an fp32 residual stream under autocast gives fp32), the weight gradient in weight.dtype.

Layout (docs/architecture.md, "kernels/"): private kernels by phase, host launchers that validate and pick
block sizes, the custom ops megatrain::rms_norm and megatrain::rms_norm_backward (kernels/library.py) with
their autograd formula, and the public `rms_norm`.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import check_device, check_same, check_tensor, new_output, next_power_of_2
from .aot import KernelLaunch, LaunchConfig, signature
from .library import kernel_op, none_tensor

__all__ = ["rms_norm"]

OP = "rms_norm"

# One row lives in registers; past this the kernel would spill so badly that a two-pass kernel is
# needed, which no model here requires.
MAX_D = 65536


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_fwd_kernel(
    X,
    R,
    W,
    Y,
    H,
    RSTD,  # X, R, Y, H [rows, D]; W [D]; RSTD [rows] fp32
    stride_x,
    stride_r,
    stride_y,
    stride_h,
    n_rows,
    D,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    STORE_RSTD: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program normalises BLOCK_ROWS rows (one, except for rows narrower than a warp's share):
    y = h * rstd * w with h = x (+ r). rstd is stored only when backward will need it (STORE_RSTD).
    """
    # int64 before multiplying by the stride: rows * D can exceed 2^31 for long sequences.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    if BLOCK_ROWS == 1:  # the grid has one program per row: no row mask
        row_mask = rows == rows
        mask = (cols < D)[None, :]
    else:
        row_mask = rows < n_rows
        mask = row_mask[:, None] & (cols < D)[None, :]

    h = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h += tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # The stream keeps the rounded sum, but the norm below uses the fp32 sum (as the reference).
        tl.store(H + rows[:, None] * stride_h + cols[None, :], h.to(H.dtype.element_ty), mask=mask)

    # Masked columns (and rows) were loaded as 0, so they add nothing to the sum of squares.
    mean_square = tl.sum(h * h, axis=1) / D
    rstd = tl.rsqrt(mean_square + eps)
    if STORE_RSTD:
        tl.store(RSTD + rows, rstd, mask=row_mask)

    w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
    y = h * rstd[:, None] * w[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY,
    H,
    W,
    RSTD,
    DH_OUT,
    DX,
    DW_PARTIAL,  # DY, H, DH_OUT, DX [rows, D]; W [D]; RSTD [rows];
    stride_dy,
    stride_h,
    stride_dh_out,
    stride_dx,  # DW_PARTIAL [num_programs, D] fp32
    n_rows,
    D,
    rows_per_program,
    HAS_DH_OUT: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program handles rows [pid * rows_per_program, ...) and writes its partial dw row.

    dh = rstd * (g - n * mean(g * n)) with g = dy * w, n = h * rstd; dw_partial = sum_rows dy * n.
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_D], dtype=tl.float32)

    # int64 loop bounds make the loop index int64 (see the forward kernel: no int32 overflow).
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)

        n = h * rstd
        g = dy * w
        # Masked columns have g = n = 0, so the dot product only sees the D real columns.
        dh = rstd * (g - n * (tl.sum(g * n, axis=0) / D))
        if HAS_DH_OUT:
            dh += tl.load(DH_OUT + row * stride_dh_out + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, dh.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw_acc += dy * n

    if COMPUTE_DW:
        # Every program writes its row (zeros if it got no rows), so the host sum sees no garbage.
        tl.store(DW_PARTIAL + pid.to(tl.int64) * D + cols, dw_acc, mask=mask)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def launch_config(d: int) -> LaunchConfig:
    """BLOCK_D and num_warps for rows of length d in the backward pass, on every device.

    About 256 columns per warp: enough independent loads per thread to hide latency without leaving
    most threads of a small row idle.
    """
    block_d = next_power_of_2(d)
    return LaunchConfig.of(num_warps=min(16, max(1, block_d // 256)), BLOCK_D=block_d)


def forward_config(d: int) -> LaunchConfig:
    """BLOCK_ROWS, BLOCK_D and num_warps of the forward pass for rows of length d (HAS_RESIDUAL and
    STORE_RSTD are added by the launcher).

    Rows of 256 or more columns keep `launch_config`'s one row per program and ~256 columns per
    warp. Tiles of several rows were weighed by what the SM can keep in flight (Little's law: ~4.8
    TB/s x ~0.6 us over 132 SMs is ~20-30 KB per SM) from the registers ptxas gives them (sm_90,
    bf16, D = 4096, no residual): one row and 16 warps, 32 registers, 4 programs per SM: 32 KB in
    flight; one row and 8 warps, 53 registers: 32 KB; two rows and 16 warps, 48 registers: 32 KB;
    two rows and 8 warps, 93 registers: 32 KB. None moves more bytes at once, so the choice is left
    to a GPU measurement. Narrower rows (tiny models) are packed so a program spans 256 columns,
    instead of leaving most lanes of its warp idle.
    """
    base = launch_config(d)
    block_d = dict(base.constexprs)["BLOCK_D"]
    return base.replace(BLOCK_ROWS=max(1, 256 // block_d))


def cuda_launches(d: int, dtype: torch.dtype, weight_dtype: Optional[torch.dtype] = None) -> list[KernelLaunch]:
    """Every launch `rms_norm` makes on CUDA for rows of length d in `dtype` (weight in
    `weight_dtype`, default dtype): forward with and without residual, each storing rstd (training)
    or not (no grad), backward with and without the returned h's gradient."""
    weight_dtype = weight_dtype or dtype
    base = launch_config(d)
    fwd = signature(
        _rms_norm_fwd_kernel,
        {"X": dtype, "R": dtype, "W": weight_dtype, "Y": dtype, "H": dtype, "RSTD": torch.float32},
        floats=("eps",),
    )
    bwd = signature(
        _rms_norm_bwd_kernel,
        {
            "DY": dtype,
            "H": dtype,
            "W": weight_dtype,
            "RSTD": torch.float32,
            "DH_OUT": dtype,
            "DX": dtype,
            "DW_PARTIAL": torch.float32,
        },
    )
    out = [
        KernelLaunch(
            _rms_norm_fwd_kernel, fwd, forward_config(d).replace(HAS_RESIDUAL=res, STORE_RSTD=store), True, f"D={d}"
        )
        for res in (False, True)
        for store in (True, False)
    ]
    out += [
        KernelLaunch(_rms_norm_bwd_kernel, bwd, base.replace(HAS_DH_OUT=dh, COMPUTE_DW=True), True, f"D={d}")
        for dh in (False, True)
    ]
    return out


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _bwd_num_programs(n_rows: int, device: torch.device) -> int:
    """Programs for the backward pass: each loops over a slice of rows and keeps one dw row.

    On a GPU, two programs per SM fill the machine while keeping the [programs, D] partial buffer
    (and its host-side sum) small. The interpreter runs programs one after another, so a few
    programs suffice there, and a small number still exercises the uneven last slice.
    """
    if device.type == "cuda":
        target = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        target = 4
    return max(1, min(n_rows, target))


def _validate(x: Tensor, weight: Tensor, residual: Optional[Tensor], eps: float) -> None:
    check_tensor(OP, "x", x, min_ndim=1)
    d = x.shape[-1]
    check_tensor(OP, "weight", weight, shape=(d,))
    if residual is not None:
        # Any float dtype: the kernel loads it as it is (see `out_dtype`).
        check_tensor(OP, "residual", residual, shape=tuple(x.shape))
    tensors = [("x", x), ("weight", weight)] + ([("residual", residual)] if residual is not None else [])
    check_same(OP, tensors, device=True)
    check_device(OP, x)
    if d == 0:
        raise ValueError(f"{OP}: argument 'x' has an empty last dim (shape {tuple(x.shape)})")
    if d > MAX_D:
        raise ValueError(f"{OP}: argument 'x' has last dim {d}, more than the {MAX_D} one block can hold")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"{OP}: argument 'eps' must be a number >= 0, got {eps!r}")


def out_dtype(x: Tensor, residual: Optional[Tensor]) -> torch.dtype:
    """The dtype of y and h: x's, or with a residual the promoted dtype of both (as x + residual)."""
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


def _rows(t: Tensor) -> Tensor:
    """[..., D] -> [rows, D], contiguous. The kernels assume unit column stride and one row stride,
    so a transposed or sliced view is copied here (once) rather than handled in the kernel."""
    return t.contiguous().view(-1, t.shape[-1])


def rms_norm_fwd(x: Tensor, weight: Tensor, eps: float, residual: Optional[Tensor] = None, store_rstd: bool = True):
    """Forward launcher. x, residual [rows, D] contiguous (each of any float dtype); weight [D].

    Returns (y [rows, D], h [rows, D] or None, rstd [rows] fp32 or None), y and h in
    `out_dtype(x, residual)`; rstd only with store_rstd (backward needs it, a no-grad call does not).

    Bytes per call (e = 2 for bf16, T rows): read x (and residual) and w, write y (and h), plus 4 B
    per row of rstd when stored: 2*T*D*e + D*e (4*T*D*e + D*e with a residual). At the benchmark's
    T = 16384, D = 4096, bf16 that is 268 MB: 0.065 ms at the H200's measured 4.1 TB/s copy
    bandwidth (measured 2026-12-04: this kernel 0.117 ms, torch.compile 0.077 ms). The rstd store a
    no-grad call skips is 4 B per row (64 KB there).
    """
    n_rows, d = x.shape
    dtype = out_dtype(x, residual)
    y = new_output((n_rows, d), dtype=dtype, device=x.device)
    h = new_output((n_rows, d), dtype=dtype, device=x.device) if residual is not None else None
    rstd = new_output((n_rows,), dtype=torch.float32, device=x.device) if store_rstd else None
    if n_rows == 0:
        return y, h, rstd
    weight = weight.contiguous()
    config = forward_config(d)
    grid = (triton.cdiv(n_rows, dict(config.constexprs)["BLOCK_ROWS"]),)
    _rms_norm_fwd_kernel[grid](
        x,
        residual if residual is not None else x,
        weight,
        y,
        h if h is not None else y,
        rstd if rstd is not None else y,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        y.stride(0),
        h.stride(0) if h is not None else 0,
        n_rows,
        d,
        float(eps),
        HAS_RESIDUAL=residual is not None,
        STORE_RSTD=store_rstd,
        **config.kwargs(),
    )
    return y, h, rstd


def rms_norm_bwd(dy: Tensor, h: Tensor, weight: Tensor, rstd: Tensor, dh_out: Optional[Tensor], compute_dw: bool):
    """Backward launcher. dy, h, dh_out [rows, D] contiguous (h is x when there is no residual);
    weight [D]; rstd [rows] fp32.

    Returns (dh [rows, D] in h.dtype, dweight [D] in weight.dtype or None). The weight gradient is
    summed from per-program fp32 partials on the host: deterministic, unlike atomics.
    """
    n_rows, d = h.shape
    dx = new_output((n_rows, d), dtype=h.dtype, device=h.device)
    num_programs = _bwd_num_programs(n_rows, h.device)
    rows_per_program = triton.cdiv(n_rows, num_programs) if n_rows else 0
    if n_rows:
        num_programs = triton.cdiv(n_rows, rows_per_program)  # no program without rows
    dw_partial = new_output((num_programs, d), dtype=torch.float32, device=h.device) if compute_dw else None
    if n_rows == 0:
        dw = torch.zeros(d, dtype=weight.dtype, device=weight.device) if compute_dw else None
        return dx, dw
    _rms_norm_bwd_kernel[(num_programs,)](
        dy,
        h,
        weight.contiguous(),
        rstd,
        dh_out if dh_out is not None else dy,
        dx,
        dw_partial if dw_partial is not None else rstd,
        dy.stride(0),
        h.stride(0),
        dh_out.stride(0) if dh_out is not None else 0,
        dx.stride(0),
        n_rows,
        d,
        rows_per_program,
        HAS_DH_OUT=dh_out is not None,
        COMPUTE_DW=compute_dw,
        **launch_config(d).kwargs(),
    )
    dw = dw_partial.sum(0).to(weight.dtype) if compute_dw else None
    return dx, dw


# --------------------------------------------------------------------------------------------------
# Custom ops and autograd
# --------------------------------------------------------------------------------------------------


@kernel_op("rms_norm", autocast="rms_norm")
def _rms_norm_op(
    x: Tensor, weight: Tensor, residual: Optional[Tensor], eps: float, store_rstd: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, h, rstd): y and h [..., D] (h empty without a residual), rstd [rows] fp32 (empty unless
    store_rstd: under no_grad, or with no input needing a gradient, there is no backward)."""
    shape = x.shape
    y, h, rstd = rms_norm_fwd(
        _rows(x), weight, eps, _rows(residual) if residual is not None else None, store_rstd=store_rstd
    )
    return (
        y.view(shape),
        h.view(shape) if h is not None else none_tensor(y),
        rstd if rstd is not None else none_tensor(y),
    )


@_rms_norm_op.register_fake
def _(x, weight, residual, eps, store_rstd):
    dtype = out_dtype(x, residual)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (
        x.new_empty(x.shape, dtype=dtype),
        x.new_empty(x.shape if residual is not None else (0,), dtype=dtype),
        x.new_empty((rows,) if store_rstd else (0,), dtype=torch.float32),
    )


@kernel_op("rms_norm_backward")
def _rms_norm_backward_op(
    dy: Tensor, h: Tensor, weight: Tensor, rstd: Tensor, dh_out: Optional[Tensor], compute_dw: bool
) -> tuple[Tensor, Tensor]:
    """(dh [..., D] in h.dtype, dweight [D] or empty); dy, h, dh_out [..., D], any strides."""
    dy2d = _rows(dy.to(h.dtype))
    dh2d = _rows(dh_out.to(h.dtype)) if dh_out is not None else None
    dx, dw = rms_norm_bwd(dy2d, _rows(h), weight, rstd, dh2d, compute_dw=compute_dw)
    return dx.view(h.shape), dw if dw is not None else none_tensor(dx)


@_rms_norm_backward_op.register_fake
def _(dy, h, weight, rstd, dh_out, compute_dw):
    return h.new_empty(h.shape), weight.new_empty(weight.shape if compute_dw else (0,))


def _setup_context(ctx, inputs, output) -> None:
    """Saves rstd [rows] fp32 and the normalised input (x, or the returned h when a residual is
    added) so backward never recomputes the sum or the reduction."""
    x, weight, residual, _, _ = inputs
    _, h, rstd = output
    # Lets backward tell "only y was used" / "only h was used" from zeros without allocating them.
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(rstd, *(() if residual is not None else (h,)))
    ctx.has_residual = residual is not None
    ctx.input_dtypes = (x.dtype, residual.dtype if residual is not None else None)
    # h is saved in its own dtype (the tensor the caller gets anyway) instead of an fp32 copy, which
    # would cost two more bytes per element. For bf16 the backward then sees the rounded sum: dx is
    # unaffected at bf16 precision, and dw (summed in fp32) is bf16-accurate, not fp32-exact. (Under
    # autocast with an fp32 stream, h is fp32 and so is this.)
    ctx.save_for_backward(h if residual is not None else x, weight, rstd)


def _backward(ctx, dy: Optional[Tensor], dh_out: Optional[Tensor], _drstd):
    h, weight, rstd = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0] or (ctx.has_residual and ctx.needs_input_grad[2])
    need_dw = ctx.needs_input_grad[1]
    if not ctx.has_residual:
        dh_out = None  # the empty placeholder output
    if dy is None:
        # Only h was used downstream: y contributes nothing, so dh is just the incoming dh_out.
        dx = dh_out if need_dx else None
        dw = torch.zeros_like(weight) if need_dw else None
    else:
        dx, dw = _rms_norm_backward_op(dy, h, weight, rstd, dh_out, need_dw)
        dw = dw if need_dw else None
    if not ctx.has_residual:
        return (dx if ctx.needs_input_grad[0] else None), dw, None, None, None
    # x and residual get the same gradient; autograd never writes into a gradient it receives, so one
    # tensor serves both (or a cast copy for an input narrower than h).
    x_dtype, r_dtype = ctx.input_dtypes
    dx_out = _as(dx, x_dtype) if ctx.needs_input_grad[0] else None
    dr_out = _as(dx, r_dtype) if ctx.needs_input_grad[2] else None
    return dx_out, dw, dr_out, None, None


_rms_norm_op.register_autograd(_backward, setup_context=_setup_context)


def _as(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, residual: Optional[Tensor] = None):
    """Fused RMSNorm: y = h / sqrt(mean(h^2, dim=-1) + eps) * weight, with h = x or x + residual.

    Args:
        x: [..., D], float16/bfloat16/float32. Non-contiguous inputs are copied to a contiguous
            layout first (the kernels read rows with unit column stride).
        weight: [D], any float dtype (an fp32 weight with bf16 x is fine: it is read in fp32).
        eps: added to the mean square before the square root.
        residual: optional [..., D], same shape and device as x, any float dtype (each is loaded in
            its own). The sum h = x + residual is taken in fp32 and normalised before rounding.

    Returns:
        y [..., D] in x.dtype, or (y, h) with both [..., D] in the promoted dtype of x and residual
        when residual is given (bf16 x + fp32 residual: fp32, as under autocast).
        Gradients: x and residual get the same gradient (that of h, including any gradient flowing
        into the returned h), each in its own dtype; weight's gradient comes back in weight.dtype.
        With a residual, the backward works from the returned h, so for bf16 x and residual even an
        fp32 weight gets a bf16-accurate gradient (the reference keeps an fp32 h alive instead).

    Raises:
        ValueError naming 'rms_norm' and the argument, for a wrong dtype, shape or device.
    """
    _validate(x, weight, residual, eps)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (residual is not None and residual.requires_grad)
    )
    y, h, _ = _rms_norm_op(x, weight, residual, float(eps), needs_grad)
    return y if residual is None else (y, h)
