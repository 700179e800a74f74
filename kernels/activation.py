"""Fused SwiGLU gating in Triton.

Math, elementwise over gate g and up u (any shape [..., F], flattened to [n] in the launchers):

    s = sigmoid(g) = 1 / (1 + exp(-g))
    y = silu(g) * u = g * s * u

Backward, with incoming dy:

    dg = dy * u * s * (1 + g * (1 - s))     (d silu / dg = s + g * s * (1 - s))
    du = dy * g * s

Only gate and up are saved; s is recomputed in backward (one exp per element is cheaper than
storing and re-reading an extra [n] tensor). Arithmetic is fp32 and every input is loaded in its
own dtype; y is stored in the promoted dtype of gate and up (they may differ), each gradient in its
input's dtype.

Layout (docs/architecture.md, "kernels/"): private kernels by phase, host launchers that validate and pick
block sizes, the custom ops megatrain::swiglu and megatrain::swiglu_backward (kernels/library.py) with
their autograd formula, and the public `swiglu`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import check_device, check_same, check_tensor, new_output
from .aot import KernelLaunch, LaunchConfig, signature
from .library import kernel_op

__all__ = ["swiglu"]

OP = "swiglu"

# Elements per program: large enough that each of the 4 warps issues several vector loads, small
# enough that the grid covers every SM even for modest activations.
BLOCK = 1024
NUM_WARPS = 4


def launch_config() -> LaunchConfig:
    """The one launch shape of both SwiGLU kernels, for every size, dtype and device."""
    return LaunchConfig.of(num_warps=NUM_WARPS, BLOCK=BLOCK)


def cuda_launches(dtype: torch.dtype) -> list[KernelLaunch]:
    """Forward and backward launches on CUDA tensors of `dtype` (any size: the config is fixed)."""
    fwd = signature(_swiglu_fwd_kernel, {"G": dtype, "U": dtype, "Y": dtype}, ints64=("n",))
    bwd = signature(_swiglu_bwd_kernel, {n: dtype for n in ("DY", "G", "U", "DG", "DU")}, ints64=("n",))
    return [
        KernelLaunch(_swiglu_fwd_kernel, fwd, launch_config(), True),
        KernelLaunch(_swiglu_bwd_kernel, bwd, launch_config(), True),
    ]


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, n, BLOCK: tl.constexpr):
    """Y[i] = G[i] * sigmoid(G[i]) * U[i] for i in this program's block of the flat [n] tensors."""
    # int64 block start: activations of a long-context batch can hold more than 2^31 elements.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    # exp(-g) overflows to inf for very negative g, giving s = 0 and y = -0: the right limit.
    s = 1.0 / (1.0 + tl.exp(-g))
    tl.store(Y + offs, (g * s * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DY, G, U, DG, DU, n, BLOCK: tl.constexpr):
    """DG = DY * U * s * (1 + G * (1 - s)), DU = DY * G * s, with s = sigmoid(G) recomputed."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    dg = dy * u * s * (1.0 + g * (1.0 - s))
    du = dy * g * s
    tl.store(DG + offs, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, du.to(DU.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def _validate(gate: Tensor, up: Tensor) -> None:
    check_tensor(OP, "gate", gate)
    check_tensor(OP, "up", up, shape=tuple(gate.shape))
    check_same(OP, [("gate", gate), ("up", up)], device=True)
    check_device(OP, gate)


def _flat(t: Tensor) -> Tensor:
    """Any shape -> [n], contiguous. The kernels index the flat storage, so a transposed or sliced
    view is copied here (once) rather than handled with strides in the kernel."""
    return t.contiguous().view(-1)


def swiglu_fwd(gate: Tensor, up: Tensor) -> Tensor:
    """Forward launcher. gate, up [n] contiguous. Returns y [n] in their promoted dtype."""
    n = gate.numel()
    y = new_output((n,), dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    if n:
        _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK),)](gate, up, y, n, **launch_config().kwargs())
    return y


def swiglu_bwd(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """Backward launcher. dy, gate, up [n] contiguous. Returns (dgate, dup), [n] each, in gate's and up's dtype."""
    n = gate.numel()
    dgate = new_output((n,), dtype=gate.dtype, device=gate.device)
    dup = new_output((n,), dtype=up.dtype, device=up.device)
    if n:
        _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK),)](dy, gate, up, dgate, dup, n, **launch_config().kwargs())
    return dgate, dup


# --------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------


@kernel_op("swiglu", autocast="swiglu")
def _swiglu_op(gate: Tensor, up: Tensor) -> Tensor:
    return swiglu_fwd(_flat(gate), _flat(up)).view(gate.shape)


@_swiglu_op.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype))


@kernel_op("swiglu_backward")
def _swiglu_backward_op(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    # The upstream gradient may be an expanded or strided view (e.g. from .sum().backward()).
    dgate, dup = swiglu_bwd(_flat(dy), _flat(gate), _flat(up))
    return dgate.view(gate.shape), dup.view(up.shape)


@_swiglu_backward_op.register_fake
def _(dy, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _setup_context(ctx, inputs, output) -> None:
    """Saves gate and up (not the output) for backward."""
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy: Tensor):
    gate, up = ctx.saved_tensors
    dgate, dup = _swiglu_backward_op(dy, gate, up)
    return (dgate if ctx.needs_input_grad[0] else None), (dup if ctx.needs_input_grad[1] else None)


_swiglu_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """Fused SwiGLU: silu(gate) * up = gate * sigmoid(gate) * up, elementwise.

    Args:
        gate: [..., F], float16/bfloat16/float32. Non-contiguous inputs are copied to a contiguous
            layout first (the kernels index flat storage).
        up: the same shape and device as gate, any float dtype (each is loaded in its own).

    Returns:
        [..., F] (contiguous) in the promoted dtype of gate and up. Gradients for gate and up come
        back in their dtype.

    Raises:
        ValueError naming 'swiglu' and the argument, for a wrong dtype, shape or device.
    """
    _validate(gate, up)
    return _swiglu_op(gate, up)
