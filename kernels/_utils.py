"""Helpers shared by the Triton kernel launchers: input checks, block sizes, interpreter handling.

Every launcher validates its inputs with `check_tensor` / `check_same` so a wrong shape, dtype or
device becomes a ValueError naming the op, the argument and what it got, never a CUDA fault.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

from megatrain import env

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1).

    The interpreter stores bf16 as raw 16-bit patterns, so `tl.dot` on bf16 operands is wrong there
    (triton-lang/triton#11584); launchers pass `UPCAST_DOT=interpreting()` as a constexpr and kernels
    cast dot operands to fp32 when it is set. Elementwise bf16 math is always done in fp32.
    """
    return env.triton_interpret()


def check_tensor(
    op: str,
    name: str,
    t,
    *,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    ndim: Optional[int] = None,
    min_ndim: Optional[int] = None,
    shape: Optional[Sequence[Optional[int]]] = None,
) -> None:
    """Raise ValueError("op: argument 'name' ...") unless `t` is a tensor of an allowed dtype/rank/shape.

    In `shape`, None matches any size.
    """
    if not isinstance(t, Tensor):
        raise ValueError(f"{op}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{op}: argument '{name}' has dtype {str(t.dtype).replace('torch.', '')} (allowed: {allowed})")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: argument '{name}' must have {ndim} dims, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{op}: argument '{name}' must have at least {min_ndim} dims, got shape {tuple(t.shape)}")
    if shape is not None:
        if len(shape) != t.dim() or any(s is not None and s != got for s, got in zip(shape, t.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{op}: argument '{name}' must have shape {want}, got {tuple(t.shape)}")


def check_same(op: str, tensors: Iterable[tuple[str, Tensor]], *, device: bool = True, dtype: bool = False) -> None:
    """All named tensors on one device (and of one dtype, when asked)."""
    items = list(tensors)
    first_name, first = items[0]
    for name, t in items[1:]:
        if device and t.device != first.device:
            raise ValueError(f"{op}: argument '{name}' is on {t.device} but '{first_name}' is on {first.device}")
        if dtype and t.dtype != first.dtype:
            raise ValueError(f"{op}: argument '{name}' has dtype {t.dtype} but '{first_name}' has {first.dtype}")


def check_device(op: str, t: Tensor) -> None:
    """Triton kernels need a CUDA tensor, or the interpreter for CPU tensors."""
    if not t.is_cuda and not interpreting():
        raise ValueError(
            f"{op}: the Triton kernel got a {t.device.type} tensor; use a CUDA tensor, or set "
            f"TRITON_INTERPRET=1 to run the kernels on CPU through Triton's interpreter"
        )


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def new_output(shape, *, dtype: torch.dtype, device) -> Tensor:
    """Allocate a kernel output. With MEGATRAIN_KERNELS_POISON=1 (the tests set it) it is filled with
    NaN instead of left uninitialised, so an element a kernel forgets to write fails the comparison."""
    if env.kernels_poison():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
