"""The dispatcher behind megatrain.kernels (which re-exports every public name): the backend choice of
MEGATRAIN_KERNELS and one entry point per op, each calling the Triton kernel or the reference.

MEGATRAIN_KERNELS=auto (the default) runs a Triton kernel only where kernels/measured.py's table has
it measured not slower than the reference on the tensor's GPU architecture, at the op's shape class
and mode; anything unmeasured (and every CPU tensor) takes the reference. `triton` always runs the
kernels (CPU tensors need TRITON_INTERPRET=1), `torch` always the reference. `kernel_paths()` says
which path each op took.

Under torch.autocast each entry point first applies its op's rule (`with_autocast_rule`, the table in
kernels/autocast.py: matmul-shaped ops get the autocast dtype, norms and elementwise ops keep their
inputs and promote) and runs the op with autocast disabled, the same for both backends."""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch import Tensor

from megatrain import env
from megatrain.constants import IGNORE_INDEX

from . import measured, reference
from ._utils import check_device, interpreting
from .autocast import with_autocast_rule

__all__ = [
    "backend",
    "triton_needs_cuda",
    "kernel_paths",
    "reset_kernel_paths",
    "rms_norm",
    "rope",
    "swiglu",
    "fused_linear_cross_entropy",
    "lowrank_linear",
    "sparse_lowrank_linear",
    "iha_attention",
    "projected_adam_update",
    "reference",
    "apex_rms_norm",
]

ENV_VAR = "MEGATRAIN_KERNELS"
BACKENDS = ("auto", "torch", "triton")  # megatrain.env.KERNEL_BACKENDS, which parses the variable


def backend() -> str:
    """The kernel backend MEGATRAIN_KERNELS selects now: "auto", "torch" or "triton".

    Raises ValueError for any other value.
    """
    return env.kernel_backend()


def triton_needs_cuda() -> bool:
    """True when MEGATRAIN_KERNELS=triton and Triton's CPU interpreter is off: every op then needs CUDA
    tensors. Raises ValueError for an unknown MEGATRAIN_KERNELS."""
    return backend() == "triton" and not interpreting()


def _use_triton(op: str, t: Tensor, dims: Callable[[], tuple] = tuple) -> bool:
    """Whether `op` on tensor `t` runs the Triton kernel under the current MEGATRAIN_KERNELS.

    auto: only where kernels/measured.py's table has the kernel measured not slower than the torch
    path on t's device architecture, for the shape class of `dims()` (measured.CLASS_DIMS[op]'s
    values, read only for a device the table can know) and the current mode; the decision is cached
    per (op, architecture, dims, mode).
    """
    mode = backend()
    if mode == "torch":
        use = False
    elif mode == "auto":
        use = measured.use_triton(op, t.get_device(), dims)
    else:
        check_device(op, t)
        use = True
    measured.record(op, use)
    return use


def kernel_paths() -> dict[str, str]:
    """{op: "triton" | "torch" | "triton+torch"}: the path each op took since `reset_kernel_paths()`."""
    return measured.paths()


def reset_kernel_paths() -> None:
    measured.reset_paths()


@functools.lru_cache(maxsize=None)
def _apex_rms_norm_fn() -> Optional[Callable]:
    try:
        import fused_layer_norm_cuda  # noqa: F401  (apex's compiled extension; the Python half imports without it)
        from apex.normalization.fused_layer_norm import fused_rms_norm_affine
    except ImportError:
        return None
    return fused_rms_norm_affine


def apex_rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """NVIDIA apex's fused affine RMSNorm (an alternative backend for benchmarks). Raises
    ValueError when apex is not installed (build it from source; never `pip install apex`)."""
    fn = _apex_rms_norm_fn()
    if fn is None:
        raise ValueError("apex_rms_norm: NVIDIA apex with its CUDA extensions is not importable")
    return fn(x, weight.to(x.dtype), weight.shape, eps)


@with_autocast_rule
def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, residual: Optional[Tensor] = None):
    """y = x / sqrt(mean(x^2, dim=-1) + eps) * weight.

    x [..., D], weight [D]; returns y [..., D] in x.dtype. With residual [..., D]: h = x + residual
    and the call returns (rms_norm(h), h), the pre-norm residual-stream update, both in the promoted
    dtype of x and residual (a bf16 x and an fp32 residual give fp32). The weight's dtype (read in
    fp32) never changes the result's.
    """
    if _use_triton("rms_norm", x):
        from .norm import rms_norm as triton_rms_norm

        return triton_rms_norm(x, weight, eps, residual)
    return reference.rms_norm(x, weight, eps, residual)


@with_autocast_rule
def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotary embedding, half-split (Hugging Face Llama) layout.

    With x1 = x[..., :d/2], x2 = x[..., d/2:]: out = cat(x1*cos - x2*sin, x2*cos + x1*sin).
    q [B, Hq, N, d], k [B, Hk, N, d]; cos, sin [N, d/2] or [B, N, d/2]. Returns (q_rot, k_rot).
    """
    if _use_triton("rope", q):
        from .rotary import rope as triton_rope

        return triton_rope(q, k, cos, sin)
    return reference.rope(q, k, cos, sin)


@with_autocast_rule
def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up, elementwise; gate and up [..., F]; the result in their promoted dtype."""
    if _use_triton("swiglu", gate):
        from .activation import swiglu as triton_swiglu

        return triton_swiglu(gate, up)
    return reference.swiglu(gate, up)


def _torch_path_dtype(*tensors: Tensor):
    """The dtype the torch path of a matmul-shaped op computes in: its inputs' (promoted), as the unfused
    PyTorch ops it replaces do (bf16 operands, fp32 accumulation in cuBLAS). The reference's own default,
    fp32 math, is for the tests' oracle; on a GPU it would make the torch path several times slower than
    the unfused ops the kernel benchmarks time as "torch-eager", against which the auto table decides."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


@with_autocast_rule
def fused_linear_cross_entropy(
    h: Tensor, weight: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX, process_group=None
) -> Tensor:
    """Mean over non-ignored t of logsumexp(h[t] @ weight.T) - (h[t] @ weight.T)[target[t]].

    h [T, D], weight [V, D], target [T]; the [T, V] logits are never held at once. Returns a 0-dim
    fp32 loss, 0 (not NaN) when every target equals ignore_index.

    With `process_group`, `weight` is this rank's vocab-parallel shard (rows
    [rank * V_local, (rank + 1) * V_local) of the full head), `target` holds global ids and `h` is
    the same on every rank: the max, the sum of exponentials and the target logit are all-reduced
    over the group, and the gradient for `h` is all-reduced too, so the op is complete on its own.

    A target that is neither ignore_index nor a vocabulary id raises ValueError for a CPU tensor. On a GPU
    both paths leave the targets unread (a host read would stall every step) and return a NaN loss instead.
    """
    if _use_triton("fused_linear_cross_entropy", h, lambda: (weight.shape[0],)):
        from .cross_entropy import fused_linear_cross_entropy as triton_flce

        return triton_flce(h, weight, target, ignore_index, process_group=process_group)
    return reference.fused_linear_cross_entropy(
        h, weight, target, ignore_index, process_group=process_group, compute_dtype=_torch_path_dtype(h, weight)
    )


@with_autocast_rule
def lowrank_linear(
    x: Tensor,
    a: Tensor,
    b: Tensor,
    bias: Optional[Tensor] = None,
    activation: Optional[str] = "silu",
    recompute: bool = False,
) -> Tensor:
    """act(x @ a) @ b + bias: CoLA's low-rank projection (activation None: plain low-rank).

    x [..., D_in], a [D_in, r], b [r, D_out], bias [D_out] or None; activation "silu" or None.
    recompute=True (CoLA-M) saves only the inputs for backward and recomputes x @ a there instead
    of keeping the [..., r] intermediate. Returns [..., D_out] in x.dtype; gradients for x, a, b, bias.
    """
    if _use_triton("lowrank_linear", x, lambda: (a.shape[-1],)):
        from .lowrank import lowrank_linear as triton_lowrank_linear

        return triton_lowrank_linear(x, a, b, bias, activation, recompute)
    return reference.lowrank_linear(x, a, b, bias, activation, recompute, compute_dtype=_torch_path_dtype(x, a, b))


@with_autocast_rule
def sparse_lowrank_linear(x: Tensor, a: Tensor, b: Tensor, values: Tensor, index: Tensor, scale: float) -> Tensor:
    """x @ (scale * a @ b + S): SLTrain's sparse plus low-rank projection.

    x [..., D_in], a [D_in, r], b [r, D_out]; S [D_in, D_out] is zero except at the flat row-major
    positions `index` [nnz] (int64, sorted, unique), where it holds `values` [nnz]. The Triton path
    builds the dense W per call for one cuBLAS GEMM and never keeps it (backward rebuilds it); the
    gradient of `values` is computed only at the support. Returns [..., D_out] in x.dtype; gradients
    for x, a, b, values.
    """
    if _use_triton("sparse_lowrank_linear", x, lambda: (a.shape[0],)):
        from .sparse_lowrank import sparse_lowrank_linear as triton_sparse_lowrank_linear

        return triton_sparse_lowrank_linear(x, a, b, values, index, scale)
    return reference.sparse_lowrank_linear(
        x, a, b, values, index, scale, compute_dtype=_torch_path_dtype(x, a, b, values)
    )


@with_autocast_rule
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
    """Interleaved head attention: P pseudo-tokens per token, mixed across heads, attended, collapsed.

    q, k, v [B, H_in, N, d]; mix_q, mix_k, mix_v [H_in, H_out, P]: pseudo-token (n, p) of output
    head h is q~[b, h, n*P + p] = sum_m mix_q[m, h, p] * q[b, m, n] (k~, v~ alike), at virtual
    position n*P + p. Softmax attention (scale 1/sqrt(d)) runs over the N*P virtual tokens with
    mask "causal" (flattened order) or "token_causal" (pseudo-tokens of one position see each
    other), optionally limited to a sliding `window` of virtual tokens (a positive multiple of P;
    see `reference.iha_allowed` for the exact rule). cos, sin [N*P, d/2] rotate q~ and k~ at their
    virtual positions (half-split layout, as `rope`). The P outputs are collapsed with collapse
    [H_out, P] (o[b,h,n] = sum_p collapse[h,p] o~[b,h,n*P+p]) or [H_out, H_out*P] (global:
    o[b,h,n] = sum_{m,p} collapse[h, m*P+p] o~[b,m,n*P+p]). Returns o [B, H_out, N, d] in q.dtype,
    differentiable in q, k, v, the mixes and collapse. The Triton path mixes and collapses with GEMMs
    and runs one FlashAttention-2 kernel over the N*P virtual tokens; it stores the P pseudo-heads
    for backward, nothing of size (N*P)^2 (see docs/kernels.md).
    """
    if _use_triton("iha_attention", q, lambda: (q.shape[-1], mix_q.shape[-1])):
        from .iha import iha_attention as triton_iha_attention

        return triton_iha_attention(q, k, v, mix_q, mix_k, mix_v, collapse, cos, sin, mask, window)
    return reference.iha_attention(
        q, k, v, mix_q, mix_k, mix_v, collapse, cos, sin, mask, window, compute_dtype=_torch_path_dtype(q, k, v)
    )


@with_autocast_rule
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
    """GaLore / Fira inner step: Adam in the projected space, back-projection, decoupled decay.

    side "right": weight [M, N], proj [r, N], low_rank_grad / moments [M, r]; "left": proj [M, r],
    low_rank_grad / moments [r, N]. With update_moments: m, v <- Adam moments of low_rank_grad;
    psi = m / (sqrt(v) + eps); W <- (W - step_size * (scale * back(psi) + S)) * (1 - decay), where
    S = residual_scale (.) (grad - residual_coef * back(low_rank_grad)) when grad is given (Fira).
    `weight` is updated in place; returns the moments after the step (keep the returned tensors:
    the Triton kernel writes new ones). Math and shapes: `reference.projected_adam_update`.
    """
    if _use_triton("projected_adam_update", weight, lambda: (low_rank_grad.shape[1 if side == "right" else 0],)):
        from .projected_adam import projected_adam_update as update
    else:
        update = reference.projected_adam_update
    return update(
        weight,
        proj,
        low_rank_grad,
        exp_avg,
        exp_avg_sq,
        side=side,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        step_size=step_size,
        scale=scale,
        decay=decay,
        update_moments=update_moments,
        grad=grad,
        residual_scale=residual_scale,
        residual_coef=residual_coef,
    )
