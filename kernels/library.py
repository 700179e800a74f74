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

Eager fast path. A call through torch's dispatcher costs a custom op tens of microseconds of Python
on the host (the known overhead of `torch.library.custom_op`, pytorch/pytorch#176592), and a training
step calls these ops a few hundred times: benchmarks/results/op-overhead-cpu.md measures 43-80 us per
call with autograd through the op against 21-36 us on the fast path, the kernel left out.
`kernel_op` therefore returns a `KernelOp`: called in plain eager mode (no torch.compile tracing, no
autocast, no Python dispatch or function mode, no functorch transform, plain tensors off the meta
device) it runs the same implementation under a `torch.autograd.Function` made from the same
backward and setup_context that `register_autograd` gives the op (or the implementation itself when
no gradient can be needed); in every other case it calls the op. The two paths run the same code, so their results
and gradients are the same bit for bit (tests/kernels/test_custom_ops.py).

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

__all__ = ["NAMESPACE", "KernelOp", "kernel_op", "none_tensor", "op_name"]

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


def _plain_eager(args: tuple) -> bool:
    """Whether a call with `args` may take the eager fast path (see the module docstring)."""
    if torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._len_torch_dispatch_stack() > 0 or torch._C._are_functorch_transforms_active():
        return False
    device_type = None
    for arg in args:
        if isinstance(arg, Tensor):
            if type(arg) not in (Tensor, torch.nn.Parameter) or arg.is_meta:
                return False
            device_type = arg.device.type
    return device_type is None or not torch.is_autocast_enabled(device_type)


class KernelOp:
    """The custom op megatrain::`name` (`.op`, torch's CustomOpDef) and its eager fast path.

    Call it like the function. `register_fake` and `register_autograd` register with the op (the
    latter also builds the fast path's autograd.Function). On the fast path a call that could need a
    gradient goes through that Function, any other calls the implementation directly (what the op
    would run); ops without an autograd formula (the backward passes) take the op where a gradient
    could be asked of them, and mutating ops always (the op bumps the mutated tensors' version
    counters).
    """

    def __init__(self, op, fn: Callable, mutates: bool):
        self.op, self._fn, self._mutates = op, fn, mutates
        self._function = None

    @property
    def name(self) -> str:
        return self.op._qualname

    def register_fake(self, fn: Callable) -> Callable:
        return self.op.register_fake(fn)

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        torch.library.register_autograd(self.op, backward, setup_context=setup_context)
        kernel_op = self

        def forward(ctx, *args):
            out = kernel_op._fn(*args)
            setup_context(ctx, args, out)
            return out

        def eager_backward(ctx, *grads):
            return backward(ctx, *grads)

        # Named after the op: autograd's node is then e.g. "rope_eagerBackward" in traces and grad_fn.
        name = f"{self.op._qualname.split('::')[-1]}_eager"
        self._function = type(
            name,
            (torch.autograd.Function,),
            {"forward": staticmethod(forward), "backward": staticmethod(eager_backward), "__module__": __name__},
        )

    def __call__(self, *args):
        if self._mutates or not _plain_eager(args):
            return self.op(*args)
        if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
            if self._function is None:
                return self.op(*args)  # no formula: the op says so
            return self._function.apply(*args)
        return self._fn(*args)  # nothing to differentiate: the implementation itself


def kernel_op(name: str, *, autocast: str | None = None, mutates_args: Iterable[str] = ()) -> Callable:
    """Decorator: define the function as the custom op megatrain::`name` (its type hints are the
    schema; see torch.library.custom_op) and return it as a `KernelOp` (call it like the function,
    `.register_fake`, `.register_autograd(backward, setup_context=...)`, `.op` for torch's CustomOpDef).

    autocast: the kernels/autocast.py RULES entry that the op applies under CPU and CUDA autocast;
    None (the backward ops, whose inputs are whatever the forward saved) registers no rule, so
    autocast passes the op by untouched.
    """

    def define(fn: Callable):
        if any(p.default is not inspect.Parameter.empty for p in inspect.signature(fn).parameters.values()):
            raise TypeError(f"kernel_op {name}: arguments may not have defaults (see kernels/library.py)")
        mutates = tuple(mutates_args)
        op = torch.library.custom_op(op_name(name), fn, mutates_args=mutates)
        if autocast is not None:
            _register_autocast(op, name, autocast, list(inspect.signature(fn).parameters))
        return KernelOp(op, fn, bool(mutates))

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
