"""Sparse plus low-rank projection y = x @ (scale * a @ b + S) in Triton (SLTrain), without a dense W.

Math, with rows t of x flattened to [T, D_in], a [D_in, r], b [r, D_out], and S [D_in, D_out] zero
except at nnz fixed positions (i_k, j_k), k = 0..nnz-1, where it holds values[k]:

    u  = x @ a                                  [T, r]
    y  = scale * (u @ b) + x @ S,   (x @ S)[t, j] = sum_{k : j_k = j} x[t, i_k] * values[k]

Backward, from dy [T, D_out]:

    du = scale * dy @ b^T,   db = scale * u^T @ dy,   da = x^T @ du
    dx = du @ a^T + dy @ S^T,   (dy @ S^T)[t, i] = sum_{k : i_k = i} dy[t, j_k] * values[k]
    dvalues[k] = sum_t x[t, i_k] * dy[t, j_k]   (the gradient of S at its support only: nnz numbers)

No [D_in, D_out] tensor is ever allocated: the low-rank part runs as two cuBLAS matmuls through
the r-wide u (saved for backward: T*r elements), and S only ever exists as its nnz entries.

Sparse layout. The support is fixed for the whole run, so everything about it is computed once per
`index` tensor and cached (`_support`): row and column of every entry, and two orderings of it,

- CSR (entries grouped by input row i): the caller's order, since `index` is sorted row-major;
  row pointers [D_in + 1];
- CSC (entries grouped by output column j, rows ascending inside a column): a permutation of the
  entries and column pointers [D_out + 1]. values are gathered into this order once per call
  (nnz elements, negligible next to the matmuls).

`_sparse_spmm_kernel` computes out[t, g] (+)= sum over the entries of group g of in[t, c_k] * v_k
for a block of BLOCK_G consecutive groups (output columns for x @ S with the CSC order, input rows
for dy @ S^T with the CSR order). Its entries are one contiguous range of the ordering, walked
BLOCK_NZ at a time: the gathered, value-weighted inputs [BLOCK_T, BLOCK_NZ] are reduced into the
[BLOCK_T, BLOCK_G] output tile by a matmul with the entries' one-hot group matrix
[BLOCK_NZ, BLOCK_G], so the segmented reduction runs on tensor cores with no atomics (results are
deterministic), and each output tile is read (to add the low-rank part) and written once.
`_sparse_sddmm_kernel` computes dvalues: one program per (BLOCK_NZ entries, slice of T) in CSR
order, so consecutive entries mostly share the row i and the x loads are broadcasts; per-slice fp32
partials are summed on the host (deterministic).

The support is validated (int64, 1-D, sorted, unique, inside [0, D_in * D_out)) when its layout is
built; that reads it on the host once per index tensor, not per call.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import check_device, check_same, check_tensor, interpreting, new_output
from .aot import KernelLaunch, LaunchConfig, signature

__all__ = ["sparse_lowrank_linear", "SparseSupport", "sparse_support"]

OP = "sparse_lowrank_linear"


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _sparse_spmm_kernel(
    INP, V, GATHER, GROUP, PTR, OUT,   # INP [T, C_in]; V, GATHER, GROUP [nnz]; PTR [G + 1]; OUT [T, G]
    n_rows, n_groups, old_scale,
    stride_in, stride_out,
    ACCUMULATE: tl.constexpr, UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_NZ: tl.constexpr,
):
    """OUT[t, g] = old_scale * OUT[t, g] (if ACCUMULATE) + sum_{k in group g} INP[t, GATHER[k]] * V[k]."""
    pid_t = tl.program_id(0)
    pid_g = tl.program_id(1)
    rows = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < n_rows
    g0 = pid_g * BLOCK_G
    groups = g0 + tl.arange(0, BLOCK_G)
    g_mask = groups < n_groups
    start = tl.load(PTR + g0)
    end = tl.load(PTR + tl.minimum(g0 + BLOCK_G, n_groups))

    acc = tl.zeros((BLOCK_T, BLOCK_G), dtype=tl.float32)
    for k0 in range(start, end, BLOCK_NZ):
        ks = k0 + tl.arange(0, BLOCK_NZ)
        k_mask = ks < end
        src = tl.load(GATHER + ks, mask=k_mask, other=0).to(tl.int64)
        grp = tl.load(GROUP + ks, mask=k_mask, other=-1)
        v = tl.load(V + ks, mask=k_mask, other=0.0).to(tl.float32)
        xg = tl.load(INP + rows[:, None] * stride_in + src[None, :], mask=row_mask[:, None] & k_mask[None, :],
                     other=0.0).to(tl.float32)
        contrib = (xg * v[None, :]).to(INP.dtype.element_ty)
        # Entry k lands in column grp[k] - g0 of the tile; masked entries have grp = -1 (no column).
        # (Built as fp32 then cast: the interpreter mis-converts bool straight to bf16.)
        onehot = tl.where(grp[:, None] == groups[None, :], 1.0, 0.0).to(INP.dtype.element_ty)
        if UPCAST_DOT:
            contrib = contrib.to(tl.float32)
            onehot = onehot.to(tl.float32)
        acc = tl.dot(contrib, onehot, acc, input_precision=PRECISION)

    mask = row_mask[:, None] & g_mask[None, :]
    out_ptrs = OUT + rows[:, None] * stride_out + groups[None, :]
    if ACCUMULATE:
        acc += old_scale * tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _sparse_sddmm_kernel(
    X, DY, ROWS, COLS, PARTIAL,       # X [T, D_in]; DY [T, D_out]; ROWS, COLS [nnz]; PARTIAL [splits, nnz] fp32
    n_rows, nnz, rows_per_split,
    stride_x, stride_dy,
    BLOCK_T: tl.constexpr, BLOCK_NZ: tl.constexpr,
):
    """PARTIAL[s, k] = sum over t in slice s of X[t, ROWS[k]] * DY[t, COLS[k]]."""
    pid_k = tl.program_id(0)
    split = tl.program_id(1)
    ks = pid_k.to(tl.int64) * BLOCK_NZ + tl.arange(0, BLOCK_NZ)
    k_mask = ks < nnz
    ri = tl.load(ROWS + ks, mask=k_mask, other=0).to(tl.int64)
    ci = tl.load(COLS + ks, mask=k_mask, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_NZ,), dtype=tl.float32)
    t_start = split.to(tl.int64) * rows_per_split
    t_end = tl.minimum(t_start + rows_per_split, n_rows)
    for t0 in range(t_start, t_end, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        mask = (ts < t_end)[:, None] & k_mask[None, :]
        xv = tl.load(X + ts[:, None] * stride_x + ri[None, :], mask=mask, other=0.0).to(tl.float32)
        dv = tl.load(DY + ts[:, None] * stride_dy + ci[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(xv * dv, axis=0)
    tl.store(PARTIAL + split.to(tl.int64) * nnz + ks, acc, mask=k_mask)


# --------------------------------------------------------------------------------------------------
# Support layout (computed once per index tensor)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SparseSupport:
    """The fixed support of S [d_in, d_out] in the two orderings the kernels walk.

    rows, cols [nnz] int32: coordinates of each entry in the caller's (row-major, CSR) order;
    row_ptr [d_in + 1] int64; csc_perm [nnz] int64: the entry (caller order) at each CSC position;
    csc_rows, csc_cols [nnz] int32: coordinates in CSC order; col_ptr [d_out + 1] int64.
    """

    d_in: int
    d_out: int
    nnz: int
    rows: Tensor
    cols: Tensor
    row_ptr: Tensor
    csc_perm: Tensor
    csc_rows: Tensor
    csc_cols: Tensor
    col_ptr: Tensor


def _build_support(index: Tensor, d_in: int, d_out: int) -> SparseSupport:
    from .reference import check_sparse_support

    if max(d_in, d_out) >= 2**31:
        raise ValueError(f"{OP}: D_in and D_out must be < 2^31, got {d_in} and {d_out}")
    check_sparse_support(OP, index, index, d_in, d_out, check_order=True)
    rows64 = torch.div(index, d_out, rounding_mode="floor")
    cols64 = index - rows64 * d_out
    row_ptr = torch.zeros(d_in + 1, dtype=torch.int64, device=index.device)
    row_ptr[1:] = torch.cumsum(torch.bincount(rows64, minlength=d_in), 0)
    col_ptr = torch.zeros(d_out + 1, dtype=torch.int64, device=index.device)
    col_ptr[1:] = torch.cumsum(torch.bincount(cols64, minlength=d_out), 0)
    # Stable sort by column keeps rows ascending inside each column.
    csc_perm = torch.sort(cols64, stable=True).indices
    return SparseSupport(
        d_in=d_in, d_out=d_out, nnz=index.numel(),
        rows=rows64.to(torch.int32), cols=cols64.to(torch.int32), row_ptr=row_ptr,
        csc_perm=csc_perm, csc_rows=rows64[csc_perm].to(torch.int32), csc_cols=cols64[csc_perm].to(torch.int32),
        col_ptr=col_ptr,
    )


# id(index) -> (weak reference to index, its version, d_in, d_out, layout). An entry is dropped when
# its index tensor is freed; a changed (in-place written) index is rebuilt.
_SUPPORT_CACHE: dict[int, tuple] = {}


def sparse_support(index: Tensor, d_in: int, d_out: int) -> SparseSupport:
    """The cached `SparseSupport` of `index` (built and validated on first use: one host sync)."""
    key = id(index)
    hit = _SUPPORT_CACHE.get(key)
    if hit is not None:
        ref, version, cached_in, cached_out, layout = hit
        if ref() is index and version == index._version and (cached_in, cached_out) == (d_in, d_out):
            return layout
    layout = _build_support(index, d_in, d_out)
    _SUPPORT_CACHE[key] = (weakref.ref(index, lambda _r, key=key: _SUPPORT_CACHE.pop(key, None)),
                           index._version, d_in, d_out, layout)
    return layout


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def spmm_config(device_type: str = "cuda") -> LaunchConfig:
    """Tiles of the gather-matmul kernel (x @ S, dy @ S^T): fixed; the work per tile follows the
    support, not a shape an autotuner could key on. Small tiles for the interpreter."""
    if device_type != "cuda":
        return LaunchConfig.of(num_warps=4, BLOCK_T=16, BLOCK_G=16, BLOCK_NZ=16)
    return LaunchConfig.of(num_warps=4, num_stages=2, BLOCK_T=64, BLOCK_G=32, BLOCK_NZ=64)


def sddmm_config(device_type: str = "cuda") -> LaunchConfig:
    """Tiles of the dvalues kernel (entries x token slices)."""
    if device_type != "cuda":
        return LaunchConfig.of(num_warps=4, BLOCK_T=16, BLOCK_NZ=16)
    return LaunchConfig.of(num_warps=4, BLOCK_T=32, BLOCK_NZ=128)


def cuda_launches(dtype: torch.dtype) -> list[KernelLaunch]:
    """The two kernels on CUDA for x of `dtype` (configs do not depend on the shape): the gather
    matmul with accumulation on, and dvalues."""
    spmm_types = signature(_sparse_spmm_kernel, {"INP": dtype, "V": dtype, "GATHER": torch.int32, "GROUP": torch.int32,
                                                 "PTR": torch.int64, "OUT": dtype}, floats=("old_scale",))
    sddmm_types = signature(_sparse_sddmm_kernel, {"X": dtype, "DY": dtype, "ROWS": torch.int32, "COLS": torch.int32,
                                                   "PARTIAL": torch.float32})
    precision = _precision(dtype)
    return [KernelLaunch(_sparse_spmm_kernel, spmm_types,
                         spmm_config().replace(ACCUMULATE=True, UPCAST_DOT=False, PRECISION=precision), False),
            KernelLaunch(_sparse_sddmm_kernel, sddmm_types, sddmm_config(), True)]


def spmm(inp: Tensor, values: Tensor, gather: Tensor, group: Tensor, ptr: Tensor, out: Tensor,
         accumulate: bool, old_scale: float = 1.0) -> Tensor:
    """out[t, g] = (old_scale * out[t, g] if accumulate) + sum_{k in group g} inp[t, gather[k]] * values[k].

    inp [T, C_in], out [T, G] with unit column stride; values/gather/group [nnz] in group order;
    ptr [G + 1]. Writes every element of out.
    """
    n_rows, n_groups = out.shape
    if n_rows == 0 or n_groups == 0:
        return out
    config = spmm_config(inp.device.type)
    blocks = config.kwargs()
    grid = (triton.cdiv(n_rows, blocks["BLOCK_T"]), triton.cdiv(n_groups, blocks["BLOCK_G"]))
    _sparse_spmm_kernel[grid](
        inp, values, gather, group, ptr, out,
        n_rows, n_groups, float(old_scale), inp.stride(0), out.stride(0),
        ACCUMULATE=accumulate, UPCAST_DOT=interpreting(), PRECISION=_precision(inp.dtype), **blocks,
    )
    return out


def sddmm(x: Tensor, dy: Tensor, support: SparseSupport, dtype: torch.dtype) -> Tensor:
    """dvalues[k] = sum_t x[t, rows[k]] * dy[t, cols[k]] in the caller's entry order, as `dtype`."""
    n_rows, nnz = x.shape[0], support.nnz
    if nnz == 0 or n_rows == 0:
        return torch.zeros(nnz, dtype=dtype, device=x.device)
    config = sddmm_config(x.device.type)
    block_t, block_nz = config.constexpr_dict()["BLOCK_T"], config.constexpr_dict()["BLOCK_NZ"]
    if x.device.type == "cuda":
        target = 4 * _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())
    else:
        target = 2
    k_programs = triton.cdiv(nnz, block_nz)
    splits = max(1, min(triton.cdiv(n_rows, block_t), triton.cdiv(target, k_programs)))
    rows_per_split = triton.cdiv(triton.cdiv(n_rows, splits), block_t) * block_t
    splits = triton.cdiv(n_rows, rows_per_split)
    partial = new_output((splits, nnz), dtype=torch.float32, device=x.device)
    _sparse_sddmm_kernel[(k_programs, splits)](
        x, dy, support.rows, support.cols, partial,
        n_rows, nnz, rows_per_split, x.stride(0), dy.stride(0),
        **config.kwargs(),
    )
    return partial.sum(0).to(dtype)


# --------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------


class SparseLowRankLinearFunction(torch.autograd.Function):
    """Autograd node for `sparse_lowrank_linear`. Saves x [T, D_in], u = x @ a [T, r], a, b and
    values; the support layout is the cached one (no [D_in, D_out] tensor in either pass)."""

    @staticmethod
    def forward(ctx, x: Tensor, a: Tensor, b: Tensor, values: Tensor, support: SparseSupport, scale: float):
        shape = x.shape
        x2d = x.reshape(-1, shape[-1]).contiguous()
        a_c, b_c, v_c = a.contiguous(), b.contiguous(), values.contiguous()
        u = x2d @ a_c
        # scale is applied in the sparse kernel while it adds x @ S, saving a pass over y.
        y = u @ b_c
        spmm(x2d, v_c[support.csc_perm], support.csc_rows, support.csc_cols, support.col_ptr, y,
             accumulate=True, old_scale=scale)
        ctx.support, ctx.scale, ctx.x_shape = support, scale, shape
        ctx.save_for_backward(x2d, u, a_c, b_c, v_c)
        return y.view(*shape[:-1], b.shape[1])

    @staticmethod
    def backward(ctx, dy: Tensor):
        x2d, u, a, b, values = ctx.saved_tensors
        support, scale = ctx.support, ctx.scale
        dy2d = dy.reshape(-1, dy.shape[-1]).to(x2d.dtype).contiguous()
        need_dx, need_da, need_db, need_dv = ctx.needs_input_grad[:4]
        dx = da = db = dv = None
        if need_dx or need_da:
            du = torch.mm(dy2d, b.t()).mul_(scale)
            if need_da:
                da = x2d.t() @ du
            if need_dx:
                dx = du @ a.t()
                spmm(dy2d, values, support.cols, support.rows, support.row_ptr, dx, accumulate=True)
                dx = dx.view(ctx.x_shape)
        if need_db:
            db = torch.mm(u.t(), dy2d).mul_(scale)
        if need_dv:
            dv = sddmm(x2d, dy2d, support, values.dtype)
        return dx, da, db, dv, None, None


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
        raise ValueError(f"{OP}: D_in, r and D_out must be >= 1, got x {tuple(x.shape)}, a {tuple(a.shape)}, "
                         f"b {tuple(b.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"{OP}: argument 'scale' must be a number, got {scale!r}")


def sparse_lowrank_linear(x: Tensor, a: Tensor, b: Tensor, values: Tensor, index: Tensor, scale: float) -> Tensor:
    """Sparse plus low-rank projection (SLTrain): y = x @ (scale * a @ b + S), never forming W or S.

    Args:
        x: [..., D_in], float16/bfloat16/float32. Copied to a contiguous [T, D_in] layout if needed.
        a: [D_in, r]; b: [r, D_out]; values: [nnz]. Another float dtype than x's is cast to x's
            dtype (gradients flow back through the cast).
        index: [nnz] int64, flat row-major positions i * D_out + j of S's entries, sorted ascending,
            unique. Its CSR/CSC layout is built (and validated: one host sync) on first use and
            cached for the life of the tensor; write into it in place and it is rebuilt.
        scale: multiplies a @ b (alpha / r in SLTrain).

    Returns:
        [..., D_out] in x.dtype. Gradients for x, a, b and values ([nnz]: S's gradient at its
        support only).

    Raises:
        ValueError naming 'sparse_lowrank_linear' and the argument, for a wrong dtype, shape,
        device, or an index that is not sorted, unique and inside [0, D_in * D_out).
    """
    _validate(x, a, b, values, index, scale)
    support = sparse_support(index, a.shape[0], b.shape[1])
    a, b, values = (t if t.dtype == x.dtype else t.to(x.dtype) for t in (a, b, values))
    return SparseLowRankLinearFunction.apply(x, a, b, values, support, float(scale))
