"""Sparse plus low-rank projection y = x @ (scale * a @ b + S) (SLTrain): the weight W is built per
call by cuBLAS plus one Triton scatter, used by one cuBLAS GEMM, and dropped.

Math, with rows t of x flattened to [T, D_in], a [D_in, r], b [r, D_out], and S [D_in, D_out] zero
except at the nnz flat row-major positions index[k] = i_k * D_out + j_k, where it holds values[k]:

    W  = scale * a @ b + S                      [D_in, D_out]
    y  = x @ W                                  [T, D_out]

Backward, from dy [T, D_out], through dW = x^T @ dy [D_in, D_out]:

    dx = dy @ W^T,   da = scale * dW @ b^T,   db = scale * a^T @ dW,   dvalues[k] = dW.view(-1)[index[k]]

(the gradient of S at its support only: nnz numbers).

How it runs. Forward: W = scale * a @ b by one torch.addmm (cuBLAS, the scale applied in its
epilogue), `_scatter_add_kernel` adds the nnz values of S at their positions in one pass (the index
is unique, so no atomics and the result is deterministic), then y = x @ W (cuBLAS). W is a transient:
nothing of size D_in * D_out is saved for backward, which keeps x, a, b, values and index and
rebuilds W when dx is needed (dx = dy @ W^T, W freed before dW is allocated). dW = x^T @ dy (cuBLAS)
is the one other transient; da, db are two thin matmuls of it and dvalues a gather at the support.

Cost per call (e = bytes per element of x's dtype; nnz = density * D_in * D_out):

    forward    2*D_in*r*D_out (W) + 2*T*D_in*D_out (y) FLOPs;  W written once (D_in*D_out*e bytes),
               the scatter moves nnz*(8 + 3e) bytes
    backward   2*D_in*r*D_out (W again) + 4*T*D_in*D_out (dx, dW) + 4*D_in*r*D_out (da, db) FLOPs;
               dW written once, the gather reads nnz*(8 + e) bytes

so forward+backward is 6*T*D_in*D_out + 8*D_in*r*D_out FLOPs: the dense layer's work plus 4 / 3 * r / T
of it (T8192 2048x2048 r512 bf16: 206 + 17 GFLOP, ~0.32 ms at an H200's ~700 dense bf16 TFLOP/s; the
W, dW and scatter traffic is ~25 MB, ~5 us). Roofline: every FLOP is a large cuBLAS GEMM, so the op
runs at the dense layer's speed, which is also what the unfused materialised version (W built with
zeros + index_put + addmm, kept for backward) costs. The factored alternative (two thin matmuls
through [T, r] plus sparse gathers) does 6*T*r*(D_in + D_out) FLOPs, half at r = D/4, but its sparse
parts are gathers at ~1 useful FLOP per loaded element: far below either bound on a GPU.

Memory: parameters are a, b and values (nnz) as before; the transient W (and, in backward, W then
dW) is D_in * D_out elements of x's dtype, counted by `megatrain plan` (megatrain/engine/memory_plan.py).

The support is validated (int64, 1-D, sorted, unique, inside [0, D_in * D_out)) once per index
tensor: that reads it on the host (a sync), so the result is cached (`sparse_support`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import check_device, check_same, check_tensor, new_output
from .aot import KernelLaunch, LaunchConfig, signature
from .library import kernel_op, none_tensor

__all__ = ["sparse_lowrank_linear", "SparseSupport", "sparse_support"]

OP = "sparse_lowrank_linear"

# Support entries per program of the scatter: one index and one value load per thread and element,
# enough programs to cover every SM at SLTrain's smallest supports (~10^4 entries).
BLOCK = 1024
NUM_WARPS = 4


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _scatter_add_kernel(W, INDEX, VALUES, nnz, BLOCK: tl.constexpr):
    """W.view(-1)[INDEX[k]] += VALUES[k] for k < nnz (INDEX unique: each element written by one lane)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < nnz
    flat = tl.load(INDEX + offs, mask=mask, other=0)
    value = tl.load(VALUES + offs, mask=mask, other=0.0).to(tl.float32)
    old = tl.load(W + flat, mask=mask, other=0.0).to(tl.float32)
    tl.store(W + flat, (old + value).to(W.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# Support validation (once per index tensor)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SparseSupport:
    """A validated support of S [d_in, d_out] with nnz entries (the index tensor itself is not held,
    so the cache entry dies with it)."""

    d_in: int
    d_out: int
    nnz: int


# id(index) -> (weak reference to index, its version, d_in, d_out, support). An entry is dropped when
# its index tensor is freed; a changed (in-place written) index is validated again.
_SUPPORT_CACHE: dict[int, tuple] = {}


def sparse_support(index: Tensor, d_in: int, d_out: int) -> SparseSupport:
    """The validated `SparseSupport` of `index` (checked on first use: one host sync, then cached)."""
    key = id(index)
    hit = _SUPPORT_CACHE.get(key)
    if hit is not None:
        ref, version, cached_in, cached_out, support = hit
        if ref() is index and version == index._version and (cached_in, cached_out) == (d_in, d_out):
            return support
    from .reference import check_sparse_support

    check_sparse_support(OP, index, index, d_in, d_out, check_order=True)
    support = SparseSupport(d_in=d_in, d_out=d_out, nnz=index.numel())
    _SUPPORT_CACHE[key] = (
        weakref.ref(index, lambda _r, key=key: _SUPPORT_CACHE.pop(key, None)),
        index._version,
        d_in,
        d_out,
        support,
    )
    return support


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def launch_config() -> LaunchConfig:
    """The one launch shape of the scatter, for every size, dtype and device."""
    return LaunchConfig.of(num_warps=NUM_WARPS, BLOCK=BLOCK)


def cuda_launches(dtype: torch.dtype) -> list[KernelLaunch]:
    """The scatter on CUDA for W and values of `dtype` (the config does not depend on the shape)."""
    types = signature(_scatter_add_kernel, {"W": dtype, "INDEX": torch.int64, "VALUES": dtype}, ints64=("nnz",))
    return [KernelLaunch(_scatter_add_kernel, types, launch_config(), True)]


def build_weight(a: Tensor, b: Tensor, values: Tensor, index: Tensor, scale: float) -> Tensor:
    """W = scale * a @ b + S as a new [D_in, D_out] tensor in a's dtype: one cuBLAS GEMM (beta = 0:
    the uninitialised output is never read), then one scatter pass over the nnz entries of S."""
    weight = new_output((a.shape[0], b.shape[1]), dtype=a.dtype, device=a.device)
    torch.addmm(weight, a, b, beta=0, alpha=scale, out=weight)
    nnz = index.numel()
    if nnz:
        _scatter_add_kernel[(triton.cdiv(nnz, BLOCK),)](weight, index, values, nnz, **launch_config().kwargs())
    return weight


# --------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------


@kernel_op("sparse_lowrank_linear", autocast="sparse_lowrank_linear")
def _sparse_lowrank_op(x: Tensor, a: Tensor, b: Tensor, values: Tensor, index: Tensor, scale: float) -> Tensor:
    shape = x.shape
    x2d = x.reshape(-1, shape[-1]).contiguous()
    weight = build_weight(a.contiguous(), b.contiguous(), values.contiguous(), index.contiguous(), scale)
    return torch.mm(x2d, weight).view(*shape[:-1], b.shape[1])


@_sparse_lowrank_op.register_fake
def _(x, a, b, values, index, scale):
    return x.new_empty((*x.shape[:-1], b.shape[1]))


@kernel_op("sparse_lowrank_linear_backward")
def _sparse_lowrank_backward_op(
    dy: Tensor,
    x: Tensor,
    a: Tensor,
    b: Tensor,
    values: Tensor,
    index: Tensor,
    scale: float,
    need_dx: bool,
    need_da: bool,
    need_db: bool,
    need_dv: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, da, db, dvalues), each empty unless asked for. W is rebuilt for dx and freed before the
    weight gradient exists: one [D_in, D_out] transient at a time."""
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    a, b, values, index = a.contiguous(), b.contiguous(), values.contiguous(), index.contiguous()
    dy2d = dy.reshape(-1, dy.shape[-1]).to(x2d.dtype).contiguous()
    dx, da, db, dv = (none_tensor(dy2d) for _ in range(4))  # separate: outputs may not alias
    if need_dx:
        weight = build_weight(a, b, values, index, scale)
        dx = torch.mm(dy2d, weight.t()).view(x.shape)
        del weight
    if need_da or need_db or need_dv:
        dweight = torch.mm(x2d.t(), dy2d)
        if need_da:
            da = torch.mm(dweight, b.t()).mul_(scale)
        if need_db:
            db = torch.mm(a.t(), dweight).mul_(scale)
        if need_dv:
            dv = dweight.view(-1).index_select(0, index)
    return dx, da, db, dv


@_sparse_lowrank_backward_op.register_fake
def _(dy, x, a, b, values, index, scale, need_dx, need_da, need_db, need_dv):
    return tuple(
        t.new_empty(t.shape if flag else (0,))
        for t, flag in ((x, need_dx), (a, need_da), (b, need_db), (values, need_dv))
    )


def _setup_context(ctx, inputs, output) -> None:
    """Saves x, a, b, values and index; nothing of size D_in * D_out (W is rebuilt in backward)."""
    x, a, b, values, index, scale = inputs
    ctx.scale = scale
    ctx.save_for_backward(x, a, b, values, index)


def _backward(ctx, dy: Tensor):
    x, a, b, values, index = ctx.saved_tensors
    need = ctx.needs_input_grad[:4]
    grads = _sparse_lowrank_backward_op(dy, x, a, b, values, index, ctx.scale, *need)
    return (*(g if flag else None for g, flag in zip(grads, need)), None, None)


_sparse_lowrank_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def _validate(x: Tensor, a: Tensor, b: Tensor, values: Tensor, index: Tensor, scale) -> None:
    check_tensor(OP, "x", x, min_ndim=1)
    check_tensor(OP, "a", a, ndim=2, shape=(x.shape[-1], None))
    check_tensor(OP, "b", b, ndim=2, shape=(a.shape[1], None))
    check_tensor(OP, "values", values, ndim=1)
    check_tensor(OP, "index", index, dtypes=(torch.int64,), shape=(values.shape[0],))
    check_same(OP, [("x", x), ("a", a), ("b", b), ("values", values), ("index", index)])
    check_device(OP, x)
    if min(x.shape[-1], a.shape[1], b.shape[1]) == 0:
        raise ValueError(
            f"{OP}: D_in, r and D_out must be >= 1, got x {tuple(x.shape)}, a {tuple(a.shape)}, b {tuple(b.shape)}"
        )
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"{OP}: argument 'scale' must be a number, got {scale!r}")


def sparse_lowrank_linear(x: Tensor, a: Tensor, b: Tensor, values: Tensor, index: Tensor, scale: float) -> Tensor:
    """Sparse plus low-rank projection (SLTrain): y = x @ (scale * a @ b + S).

    W = scale * a @ b + S is built per call (cuBLAS + one Triton scatter) and used by one cuBLAS
    GEMM; it is never kept: backward rebuilds it (see the module docstring for costs).

    Args:
        x: [..., D_in], float16/bfloat16/float32. Copied to a contiguous [T, D_in] layout if needed.
        a: [D_in, r]; b: [r, D_out]; values: [nnz]. Another float dtype than x's is cast to x's
            dtype (gradients flow back through the cast).
        index: [nnz] int64, flat row-major positions i * D_out + j of S's entries, sorted ascending,
            unique. Validated on first use (one host sync) and cached for the life of the tensor;
            write into it in place and it is validated again. (Under torch.compile the check, which
            reads the data, is skipped: run one eager call first to have it.)
        scale: multiplies a @ b (alpha / r in SLTrain).

    Returns:
        [..., D_out] in x.dtype. Gradients for x, a, b and values ([nnz]: S's gradient at its
        support only).

    Raises:
        ValueError naming 'sparse_lowrank_linear' and the argument, for a wrong dtype, shape,
        device, or an index that is not sorted, unique and inside [0, D_in * D_out).
    """
    _validate(x, a, b, values, index, scale)
    if not torch.compiler.is_compiling():  # a data-dependent check: eager calls only
        sparse_support(index, a.shape[0], b.shape[1])
    a, b, values = (t if t.dtype == x.dtype else t.to(x.dtype) for t in (a, b, values))
    return _sparse_lowrank_op(x, a, b, values, index, float(scale))
