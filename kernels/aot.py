"""Ahead-of-time compilation of the Triton kernels for NVIDIA targets, without a GPU.

`triton.compile` runs the whole CUDA pipeline (Triton IR -> LLVM -> PTX -> ptxas -> cubin) on any
machine: ptxas and cuobjdump ship inside the Triton wheel. So the launch configurations the launchers
pick for CUDA tensors can be compiled here for sm_80 (A100) and sm_90 (H100), and the compiled
kernel tells how much shared memory one program needs (Triton's own allocation: pipelining buffers,
layout conversions, reductions), how many registers a thread uses and how large a local-memory stack
frame ptxas had to open. Triton kernels have no local arrays and no calls, so a non-empty stack
frame means register spills (counted as the local-memory stores in the disassembled SASS).

Each kernel module exposes its CUDA launch choice as a function of the problem shape and dtype (the
function its launcher calls) and a `cuda_launches(...)` listing the `KernelLaunch`es a problem of
that shape runs. `benchmarks/compile_report.py` turns the model presets into problems, compiles
every distinct launch with `compile_launch`, and writes docs/kernels-compiled.md.

Triton's ASTSource API changed between 3.0 and 3.3 (how constexprs and alignment hints are passed);
`ast_source` builds it for the installed version. Compilation needs TRITON_INTERPRET unset when
the kernel modules are imported (the interpreter replaces `@triton.jit` functions by interpreted
ones, which `triton.compile` does not take).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Optional

import torch
import triton

__all__ = [
    "LaunchConfig",
    "KernelLaunch",
    "CompileResult",
    "SHARED_MEMORY_LIMIT",
    "TARGETS",
    "triton_version",
    "type_name",
    "signature",
    "ast_source",
    "compile_launch",
]

# Largest dynamic shared memory one block may opt into, per compute capability (CUDA programming
# guide, "Compute capabilities": 163 KB on sm_80, 227 KB on sm_90).
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
TARGETS = (80, 90)

_TYPE_NAMES = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int64: "i64",
    torch.int32: "i32",
}


@dataclass(frozen=True)
class LaunchConfig:
    """What a launcher passes to a kernel besides tensors and runtime scalars: its constexprs,
    num_warps and num_stages (None: Triton's default). Hashable, so equal choices deduplicate."""

    constexprs: tuple[tuple[str, object], ...]
    num_warps: int
    num_stages: Optional[int] = None

    @staticmethod
    def of(num_warps: int, num_stages: Optional[int] = None, **constexprs) -> "LaunchConfig":
        return LaunchConfig(tuple(sorted(constexprs.items())), num_warps, num_stages)

    def replace(self, **constexprs) -> "LaunchConfig":
        merged = dict(self.constexprs)
        merged.update(constexprs)
        return LaunchConfig(tuple(sorted(merged.items())), self.num_warps, self.num_stages)

    def kwargs(self) -> dict:
        """The keyword arguments of `kernel[grid](..., **config.kwargs())`."""
        out = dict(self.constexprs)
        out["num_warps"] = self.num_warps
        if self.num_stages is not None:
            out["num_stages"] = self.num_stages
        return out

    def constexpr_dict(self) -> dict:
        return dict(self.constexprs)

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in self.constexprs]
        parts.append(f"warps={self.num_warps}")
        if self.num_stages is not None:
            parts.append(f"stages={self.num_stages}")
        return " ".join(parts)


@dataclass(frozen=True)
class KernelLaunch:
    """One compilable launch: a `@triton.jit` kernel, the Triton type of every runtime argument
    (`signature`), the launch config, and whether the kernel is memory-bound (then it must not spill).
    `note` says where the launch comes from (shown in the report)."""

    kernel: object
    arg_types: tuple[tuple[str, str], ...]
    config: LaunchConfig
    memory_bound: bool
    note: str = ""

    @property
    def name(self) -> str:
        return getattr(self.kernel, "__name__", None) or self.kernel.fn.__name__

    def key(self) -> tuple:
        """What determines the compiled code (the note does not)."""
        return (self.name, self.arg_types, self.config)


@dataclass(frozen=True)
class CompileResult:
    """Resources of one compiled kernel: shared memory per program (bytes), registers per thread,
    local-memory stack frame per thread (bytes), and spill stores: the local-memory stores (STL) in
    its SASS. Triton kernels have no local arrays, so every STL is a register spilled."""

    shared: int
    registers: int
    stack: int
    spill_stores: int


def triton_version() -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", triton.__version__).groups()
    return int(major), int(minor)


def type_name(dtype: torch.dtype) -> str:
    return _TYPE_NAMES[dtype]


def signature(kernel, pointers: dict, floats: tuple = (), ints64: tuple = ()) -> tuple[tuple[str, str], ...]:
    """The runtime argument types of `kernel`, in order: pointers {name: torch dtype} as "*bf16" etc.,
    `floats` as fp32, `ints64` as i64, every other non-constexpr argument i32 (shapes and strides)."""
    types = []
    for param in _params(kernel):
        if param.is_constexpr:
            continue
        name = param.name
        if name in pointers:
            types.append((name, "*" + type_name(pointers[name])))
        elif name in floats:
            types.append((name, "fp32"))
        elif name in ints64:
            types.append((name, "i64"))
        else:
            types.append((name, "i32"))
    unknown = set(pointers) | set(floats) | set(ints64)
    unknown -= {p.name for p in _params(kernel)}
    if unknown:
        raise ValueError(f"signature: {sorted(unknown)} are not arguments of {kernel.__name__}")
    return tuple(types)


def _params(kernel):
    if not hasattr(kernel, "params"):
        raise TypeError(
            f"{kernel!r} is not a @triton.jit function; import the kernels with TRITON_INTERPRET unset to compile them"
        )
    return kernel.params


def ast_source(launch: KernelLaunch):
    """triton.compiler.ASTSource for `launch`, in the form the installed Triton expects.

    - 3.0, 3.1: the signature lists runtime arguments only, constexprs go by name in `constants`,
      alignment hints are a dataclass AttrsDescriptor of argument indices.
    - 3.2: as 3.1, but the hints are built by triton.backends.compiler.AttrsDescriptor.from_hints.
    - 3.3 and later: the signature also lists the constexprs (type "constexpr"); hints are a dict
      {(index,): [["tt.divisibility", 16]]}.

    Every pointer is declared 16-byte aligned, as torch's allocations are; integers get no hints.
    """
    from triton.compiler import ASTSource

    kernel = launch.kernel
    params = _params(kernel)
    index = {p.name: p.num for p in params}
    types = dict(launch.arg_types)
    constexprs = launch.config.constexpr_dict()
    missing = [p.name for p in params if p.is_constexpr and p.name not in constexprs]
    if missing:
        raise ValueError(f"{launch.name}: no value for constexpr(s) {missing}")
    aligned = [index[name] for name, t in launch.arg_types if t.startswith("*")]
    version = triton_version()
    if version < (3, 2):
        from triton.compiler.compiler import AttrsDescriptor

        return ASTSource(kernel, types, constexprs, AttrsDescriptor(divisible_by_16=set(aligned), equal_to_1=set()))
    if version < (3, 3):
        from triton.backends.compiler import AttrsDescriptor

        return ASTSource(kernel, types, constexprs, AttrsDescriptor.from_hints({i: 16 for i in aligned}))
    full = {p.name: ("constexpr" if p.is_constexpr else types[p.name]) for p in params}
    return ASTSource(kernel, full, constexprs, {(i,): [["tt.divisibility", 16]] for i in aligned})


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_launch(launch: KernelLaunch, capability: int) -> CompileResult:
    """Compile `launch` for NVIDIA compute capability `capability` (80, 90) and read its resources.

    Raises whatever Triton raises when the kernel does not compile (an MLIR or ptxas error).
    """
    from triton.backends.compiler import GPUTarget

    options = {"num_warps": launch.config.num_warps}
    if launch.config.num_stages is not None:
        options["num_stages"] = launch.config.num_stages
    compiled = triton.compile(ast_source(launch), target=GPUTarget("cuda", capability, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_cuobjdump(), "-res-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", path], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+)\s+STACK:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"{launch.name}: cuobjdump -res-usage printed no REG/STACK line:\n{usage}")
    return CompileResult(
        shared=int(compiled.metadata.shared),
        registers=int(found.group(1)),
        stack=int(found.group(2)),
        spill_stores=len(re.findall(r"\bSTL(?:\.\w+)*\b", sass)),
    )
