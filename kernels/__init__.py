"""megatrain.kernels: the functional ops the models call, dispatched to an implementation.

The backend is chosen by the environment variable MEGATRAIN_KERNELS, read at every call (so tests
and scripts can switch it without re-importing):

- ``auto`` (default): the fused Triton kernels for CUDA tensors, plain PyTorch
  (``megatrain.kernels.reference``) for CPU tensors.
- ``torch``: always the reference.
- ``triton``: always the Triton kernels. CPU tensors need ``TRITON_INTERPRET=1`` (Triton's
  interpreter runs the same kernels on CPU; that is how the test suite checks them).

One file per fused op (norm.py, rotary.py, activation.py, cross_entropy.py): private
``@triton.jit`` kernels named by phase, host launchers that check inputs and pick block sizes, a
``torch.autograd.Function`` with both passes, and the functional entry point this module calls.
NVIDIA apex's fused RMSNorm is offered as ``apex_rms_norm`` (None when apex is not installed) for
benchmarks; it is never required.

Shapes: B = batch, H = heads, N = sequence length, d = head dim, D = hidden size, T = tokens,
V = vocabulary size.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Optional

from torch import Tensor

from . import reference

__all__ = ["backend", "rms_norm", "rope", "swiglu", "fused_linear_cross_entropy", "reference", "apex_rms_norm"]

ENV_VAR = "MEGATRAIN_KERNELS"
BACKENDS = ("auto", "torch", "triton")


def backend() -> str:
    """The kernel backend MEGATRAIN_KERNELS selects now: "auto", "torch" or "triton".

    Raises ValueError for any other value.
    """
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r} is not a kernel backend (allowed: {', '.join(BACKENDS)})")
    return mode


def _use_triton(op: str, t: Tensor) -> bool:
    """Whether `op` on tensor `t` runs the Triton kernel under the current MEGATRAIN_KERNELS."""
    mode = backend()
    if mode == "torch":
        return False
    if mode == "auto":
        return t.is_cuda
    from ._utils import check_device

    check_device(op, t)
    return True


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


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, residual: Optional[Tensor] = None):
    """y = x / sqrt(mean(x^2, dim=-1) + eps) * weight.

    x [..., D], weight [D]; returns y [..., D] in x.dtype. With residual [..., D]: h = x + residual
    and the call returns (rms_norm(h), h), the pre-norm residual-stream update.
    """
    if _use_triton("rms_norm", x):
        from .norm import rms_norm as triton_rms_norm

        return triton_rms_norm(x, weight, eps, residual)
    return reference.rms_norm(x, weight, eps, residual)


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotary embedding, half-split (Hugging Face Llama) layout.

    With x1 = x[..., :d/2], x2 = x[..., d/2:]: out = cat(x1*cos - x2*sin, x2*cos + x1*sin).
    q [B, Hq, N, d], k [B, Hk, N, d]; cos, sin [N, d/2] or [B, N, d/2]. Returns (q_rot, k_rot).
    """
    if _use_triton("rope", q):
        from .rotary import rope as triton_rope

        return triton_rope(q, k, cos, sin)
    return reference.rope(q, k, cos, sin)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up, elementwise; gate and up [..., F]."""
    if _use_triton("swiglu", gate):
        from .activation import swiglu as triton_swiglu

        return triton_swiglu(gate, up)
    return reference.swiglu(gate, up)


def fused_linear_cross_entropy(h: Tensor, weight: Tensor, target: Tensor, ignore_index: int = -100,
                               process_group=None) -> Tensor:
    """Mean over non-ignored t of logsumexp(h[t] @ weight.T) - (h[t] @ weight.T)[target[t]].

    h [T, D], weight [V, D], target [T]; the [T, V] logits are never held at once. Returns a 0-dim
    fp32 loss, 0 (not NaN) when every target equals ignore_index.

    With `process_group`, `weight` is this rank's vocab-parallel shard (rows
    [rank * V_local, (rank + 1) * V_local) of the full head), `target` holds global ids and `h` is
    the same on every rank: the max, the sum of exponentials and the target logit are all-reduced
    over the group, and the gradient for `h` is all-reduced too, so the op is complete on its own.
    """
    if _use_triton("fused_linear_cross_entropy", h):
        from .cross_entropy import fused_linear_cross_entropy as triton_flce

        return triton_flce(h, weight, target, ignore_index, process_group=process_group)
    return reference.fused_linear_cross_entropy(h, weight, target, ignore_index, process_group=process_group)
