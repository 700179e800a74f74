"""The autocast rule of every megatrain kernel: one table, applied by the dispatcher for both backends.

Under `torch.autocast`, torch decides per op what precision it runs in; an op it does not know (a
Triton kernel, or a reference that upcasts to fp32 on purpose) needs that decision made for it, or
it gets whatever dtypes the surrounding ops produced (a bf16 branch output beside an fp32 residual)
and the reference's internal matmuls get re-cast behind its back. `kernels/__init__.py` wraps each
public op with `with_autocast_rule`, so the Triton kernels and the reference see the same inputs.
The rule follows torch's own autocast policy:

- `LOWER` (torch's "lower_precision_fp": matmul, linear, SDPA): the matmul-shaped ops
  (fused_linear_cross_entropy, lowrank_linear, sparse_lowrank_linear, iha_attention) get their
  floating tensor arguments cast to the autocast dtype (fp64 and tensors on another device type left
  alone, as torch does). Arguments named in `keep` are never cast: the rotary tables cos/sin are
  position constants that every implementation reads in fp32 (bf16 tables would misplace far
  positions). Results are in the autocast dtype; the loss of fused_linear_cross_entropy stays fp32.
- `PROMOTE` (torch's "promote", and what its elementwise ops do by type promotion): rms_norm, rope,
  swiglu (and the optimizer's projected_adam_update) run on their inputs as given. Their math is
  fp32 and each returns the widest dtype of its activation inputs (rms_norm's h = x + residual with
  x bf16 and an fp32 residual is fp32, as in a Hugging Face Llama under autocast); parameters read in
  fp32 whatever their dtype (the norm weight, the rotary tables) do not widen the result. The
  kernels load each input in its own dtype, so no cast pass runs.

Either way the op then runs with autocast disabled for the tensors' device type, so a reference's
fp32 matmuls stay fp32 and the result does not depend on the backend.

The device type and the autocast dtype come from the op's first tensor argument
(`torch.is_autocast_enabled(device_type)`, `torch.get_autocast_dtype(device_type)`), so the same
rule is right for CUDA and CPU autocast, bf16 and fp16. The kernels' torch custom ops
(kernels/library.py) apply the same rule: `cast_arguments` is the body of their Autocast{CPU,CUDA}
kernels (torch.library.register_autocast alone cannot keep cos/sin in fp32 nor express PROMOTE), so a
direct `torch.ops.megatrain.*` call under autocast is cast as the public function would cast it.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

__all__ = ["LOWER", "PROMOTE", "AutocastRule", "RULES", "autocast_device", "cast_arguments", "with_autocast_rule"]

LOWER = "lower"
PROMOTE = "promote"


@dataclass(frozen=True)
class AutocastRule:
    """policy: LOWER or PROMOTE; keep: names of floating arguments LOWER leaves uncast."""

    policy: str
    keep: tuple[str, ...] = ()


RULES: dict[str, AutocastRule] = {
    "rms_norm": AutocastRule(PROMOTE),
    "rope": AutocastRule(PROMOTE),
    "swiglu": AutocastRule(PROMOTE),
    "fused_linear_cross_entropy": AutocastRule(LOWER),
    "lowrank_linear": AutocastRule(LOWER),
    "sparse_lowrank_linear": AutocastRule(LOWER),
    "iha_attention": AutocastRule(LOWER, keep=("cos", "sin")),
    "projected_adam_update": AutocastRule(PROMOTE),  # an optimizer step: fp32 math on what it is given
}


def autocast_device(t: Any) -> Optional[str]:
    """The device type of tensor `t` when autocast is enabled for it, else None."""
    if not isinstance(t, Tensor):
        return None
    device_type = t.device.type
    return device_type if torch.is_autocast_enabled(device_type) else None


def cast_arguments(op: str, device_type: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """`arguments` (name -> value) of `op` as its rule passes them on under `device_type` autocast."""
    rule = RULES[op]
    if rule.policy == PROMOTE:
        return arguments
    dtype = torch.get_autocast_dtype(device_type)
    return {
        name: (value.to(dtype) if name not in rule.keep and _castable(value, device_type, dtype) else value)
        for name, value in arguments.items()
    }


def _castable(value: Any, device_type: str, dtype: torch.dtype) -> bool:
    return (
        isinstance(value, Tensor)
        and value.is_floating_point()
        and value.dtype not in (torch.float64, dtype)
        and value.device.type == device_type
    )


def with_autocast_rule(fn: Callable) -> Callable:
    """Wrap the dispatcher function `fn` (named like its RULES entry): outside autocast it is called
    as it is; inside, with its arguments as `cast_arguments` passes them and autocast disabled."""
    op = fn.__name__
    if op not in RULES:
        raise KeyError(f"with_autocast_rule: no autocast rule for {op!r}")
    names = list(inspect.signature(fn).parameters)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device_type = autocast_device(args[0] if args else kwargs.get(names[0]))
        if device_type is None:
            return fn(*args, **kwargs)
        arguments = dict(zip(names, args), **kwargs)
        arguments = cast_arguments(op, device_type, arguments)
        with torch.autocast(device_type, enabled=False):
            return fn(**arguments)

    return wrapper
