"""megatrain.kernels: the functional ops the models call, dispatched to an implementation.

The backend is chosen by the environment variable MEGATRAIN_KERNELS, read at every call (so tests
and scripts can switch it without re-importing):

- ``auto`` (default): plain PyTorch (``megatrain.kernels.reference``) for CPU tensors. On CUDA
  tensors ``rms_norm`` uses NVIDIA apex's fused RMSNorm when apex is installed (it is optional,
  never a dependency); the other ops use the reference.
- ``torch``: always the reference.
- ``triton``: the fused Triton kernels. They are not part of this release yet, so this mode
  raises a ValueError naming the op.

Shapes: B = batch, H = heads, N = sequence length, d = head dim, D = hidden size, T = tokens,
V = vocabulary size.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Optional

from torch import Tensor

from . import reference

__all__ = ["backend", "rms_norm", "rope", "swiglu", "fused_linear_cross_entropy", "reference"]

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


def _check_not_triton(op: str) -> str:
    mode = backend()
    if mode == "triton":
        raise ValueError(f"{ENV_VAR}=triton: no Triton kernel for {op} in this version; use auto or torch")
    return mode


@functools.lru_cache(maxsize=None)
def _apex_rms_norm() -> Optional[Callable]:
    """apex's fused affine RMSNorm, or None when apex (or its CUDA extension) is not installed."""
    try:
        import fused_layer_norm_cuda  # noqa: F401  (apex's compiled extension; the Python half imports without it)
        from apex.normalization.fused_layer_norm import fused_rms_norm_affine
    except ImportError:
        return None
    return fused_rms_norm_affine


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, residual: Optional[Tensor] = None):
    """y = x / sqrt(mean(x^2, dim=-1) + eps) * weight.

    x [..., D], weight [D]; returns y [..., D] in x.dtype. With residual [..., D]: h = x + residual
    and the call returns (rms_norm(h), h), the pre-norm residual-stream update.
    """
    mode = _check_not_triton("rms_norm")
    fused = _apex_rms_norm() if mode == "auto" and x.is_cuda else None
    if fused is None:
        return reference.rms_norm(x, weight, eps, residual)
    h = x if residual is None else x + residual
    # apex returns the weight's dtype when it differs from the input's; match the reference contract.
    y = fused(h, weight.to(h.dtype), weight.shape, eps)
    return y if residual is None else (y, h)


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotary embedding, half-split (Hugging Face Llama) layout.

    With x1 = x[..., :d/2], x2 = x[..., d/2:]: out = cat(x1*cos - x2*sin, x2*cos + x1*sin).
    q [B, Hq, N, d], k [B, Hk, N, d]; cos, sin [N, d/2] or [B, N, d/2]. Returns (q_rot, k_rot).
    """
    _check_not_triton("rope")
    return reference.rope(q, k, cos, sin)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up, elementwise; gate and up [..., F]."""
    _check_not_triton("swiglu")
    return reference.swiglu(gate, up)


def fused_linear_cross_entropy(h: Tensor, weight: Tensor, target: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean over non-ignored t of logsumexp(h[t] @ weight.T) - (h[t] @ weight.T)[target[t]].

    h [T, D], weight [V, D], target [T]; the [T, V] logits are never held at once. Returns a 0-dim
    fp32 loss, 0 (not NaN) when every target equals ignore_index.
    """
    _check_not_triton("fused_linear_cross_entropy")
    return reference.fused_linear_cross_entropy(h, weight, target, ignore_index)
