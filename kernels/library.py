"""Every Triton kernel as a torch custom op: the `megatrain::` operator namespace.

Each kernel file defines its passes with `kernel_op` (a thin layer over `torch.library.custom_op`):
a forward op the public function calls, a backward op its autograd formula calls, a fake
implementation for each (shapes and dtypes only, no data), and `torch.library.register_autograd`
linking the two. To torch the kernel is then one operator: `torch.compile` puts
`torch.ops.megatrain.rms_norm` in its graph as one node instead of breaking the graph at the Triton
launch (or tracing Triton's CPU interpreter), FakeTensor and meta tensors get the fake
implementation, and `torch.autocast` meets the op's own rule (kernels/autocast.py) at the
Autocast{CPU,CUDA} dispatch keys, the same rule the public functions in kernels/dispatch.py apply
for both backends.

The ops are opaque to torch: Inductor calls them as they are (a Triton kernel compiled by Triton,
not re-generated), which is what a hand-tuned kernel wants. Operators are registered once, when
their kernel file is first imported (lazily, by the dispatcher's first Triton call).

Schema conventions: no argument has a default (the dispatcher drops arguments equal to their
default, and the autocast kernel below reads them by position); an output that a mode does not
produce is an empty tensor (`none_tensor`), since a custom op cannot return None.
"""

from __future__ import annotations

import inspect
from typing import Callable, Iterable

import torch
from torch import Tensor

from .autocast import RULES, cast_arguments

__all__ = ["NAMESPACE", "kernel_op", "none_tensor", "op_name"]

NAMESPACE = "megatrain"

# The Library that holds this package's autocast kernels (the ops themselves are defined by
# torch.library.custom_op, which keeps its own). Kept alive for the life of the process.
_LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")

_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def op_name(name: str) -> str:
    """The qualified operator name: "rms_norm" -> "megatrain::rms_norm"."""
    return f"{NAMESPACE}::{name}"


def none_tensor(like: Tensor) -> Tensor:
    """The stand-in for an output a call does not produce: an empty tensor on `like`'s device."""
    return like.new_empty((0,))


def kernel_op(name: str, *, autocast: str | None = None, mutates_args: Iterable[str] = ()) -> Callable:
    """Decorator: define the function as the custom op megatrain::`name` (its type hints are the
    schema; see torch.library.custom_op) and return the op (a CustomOpDef: call it like the function,
    `.register_fake`, `torch.library.register_autograd(op, ...)`).

    autocast: the kernels/autocast.py RULES entry that the op applies under CPU and CUDA autocast;
    None (the backward ops, whose inputs are whatever the forward saved) registers no rule, so
    autocast passes the op by untouched.
    """

    def define(fn: Callable):
        if any(p.default is not inspect.Parameter.empty for p in inspect.signature(fn).parameters.values()):
            raise TypeError(f"kernel_op {name}: arguments may not have defaults (see kernels/library.py)")
        op = torch.library.custom_op(op_name(name), fn, mutates_args=tuple(mutates_args))
        if autocast is not None:
            _register_autocast(op, name, autocast, list(inspect.signature(fn).parameters))
        return op

    return define


def _register_autocast(op, name: str, rule: str, arg_names: list[str]) -> None:
    """Autocast{CPU,CUDA} kernels for `op`: cast the arguments by RULES[rule], then run the op with
    that autocast key excluded (so the kernel's own matmuls are not re-cast)."""
    if rule not in RULES:
        raise KeyError(f"kernel_op {name}: no autocast rule {rule!r} in kernels/autocast.py")
    for device_type, key in _AUTOCAST_KEYS.items():
        excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_keyset, *args, _device_type=device_type, _excluded=excluded):
            arguments = cast_arguments(rule, _device_type, dict(zip(arg_names, args)))
            with torch._C._ExcludeDispatchKeyGuard(_excluded):
                return op(*arguments.values())

        _LIBRARY.impl(name, kernel, key, with_keyset=True)
