"""Where a Triton kernel was measured not slower than the torch path: the table behind
`MEGATRAIN_KERNELS=auto`.

auto runs an op's Triton kernel on a device only where a committed benchmark measured it not slower
than the torch path there (`kernels/reference.py`, eager: what MEGATRAIN_KERNELS=torch runs, through
the same dispatcher). Everything else takes the torch path: an op, GPU architecture or shape class
with no row, a CPU tensor, a device whose architecture is unknown.

A row is (op, arch, shape class, mode) -> "triton" | "torch", with the medians it came from and the
result file:

- op: the dispatcher's name (`rms_norm`, `fused_linear_cross_entropy`, ...).
- arch: the CUDA compute capability, "sm_90" for H100 and H200, "sm_80" for A100.
- shape class: `shape_class(op, dims)`. Ops whose kernels make one pass over memory (rms_norm, rope,
  swiglu) have one class, "any": one measurement at a training size stands for all (a single fused
  pass against torch's chain of elementwise kernels). The matmul-shaped ops are classed by the size
  that changes their kernels' work split, in power-of-two buckets: the vocabulary for the fused
  cross-entropy ("V65537-131072"), the rank for CoLA and the projected Adam step ("r513-1024"), the
  input size for SLTrain ("Din1025-2048"), the head dim and pseudo-token count for IHA
  ("d65-128 P2"). A row of class "any" stands for every class of its op the table has no row for.
- mode: "fwd+bwd" decides while autograd records (training), "fwd" under no_grad / inference_mode
  (evaluation, generation); `projected_adam_update`, an optimizer step, has the one mode "step".

Several rows for one key (an H100 and an H200 file, both sm_90) pick Triton only if all say triton.

The architecture is read once per device index and the decision made once per (op, architecture,
shape dims, mode), then cached: the hot path is two dict lookups, no file I/O, no capability query.
`paths()` reports which path each op took since `reset_paths()`, for `megatrain bench` and the
trainer's first log line.

Updating the table from a GPU run: `python benchmarks/kernels.py --auto-table RESULTS.json` prints
the rows of that run (each op's fwd / fwd+bwd megatrain-triton median against the torch path's:
the "megatrain-torch" row, or "torch-eager" for the ops whose eager implementation is the reference
itself) in the form of `TABLE` below; paste them over the rows of the same op and architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

__all__ = [
    "Row",
    "TABLE",
    "TRITON",
    "TORCH",
    "CLASS_DIMS",
    "MODES",
    "ANY",
    "shape_class",
    "lookup",
    "device_arch",
    "use_triton",
    "record",
    "clear_cache",
    "paths",
    "reset_paths",
    "grad_mode",
]

TRITON = "triton"
TORCH = "torch"
ANY = "any"
MODES = ("fwd", "fwd+bwd", "step")


@dataclass(frozen=True)
class Row:
    """One measurement: `choice` is "triton" when megatrain-triton's median <= the torch path's."""

    op: str
    arch: str
    shape_class: str
    mode: str
    choice: str
    triton_ms: float
    torch_ms: float
    shape: str  # the benchmark shape measured
    source: str  # the result file (repository path) the medians come from
    torch_impl: str = "torch-eager"  # the benchmark row timed as the torch path


# The dims each op is classed by (the names benchmarks/kernels.py gives them in its shape dicts) and
# the letter of each in a class label. No dims: one class, "any".
CLASS_DIMS: dict[str, tuple[tuple[str, str], ...]] = {
    "rms_norm": (),
    "rope": (),
    "swiglu": (),
    "fused_linear_cross_entropy": (("vocab", "V"),),
    "lowrank_linear": (("rank", "r"),),
    "sparse_lowrank_linear": (("d_in", "Din"),),
    "iha_attention": (("head_dim", "d"), ("pseudo", "P")),
    "projected_adam_update": (("rank", "r"),),
}

# Dims whose class is the exact value rather than a power-of-two bucket.
_EXACT = {"pseudo"}

_H100 = "benchmarks/results/kernels-nvidia-h100-80gb-hbm3-quick.md"
_H200_LOG = "benchmarks/results/h200-2026-12-04/kernels-first-ops.log"
_H200 = "benchmarks/results/h200-2026-12-04/kernels-nvidia-h200-quick.md"
# The flce, lowrank, sparse_lowrank and iha rows time the kernels before their rewrite against the
# benchmark's bf16 unfused baseline (torch_impl), which is what the torch path runs for bf16 inputs (the
# dispatcher calls the reference in the inputs' dtype): the old kernels lost, so these choose torch,
# which is also what the unmeasured rewritten kernels get until a GPU run measures them.
_UNFUSED_FLCE = "torch-eager (bf16 F.cross_entropy(h @ W.T))"
_UNFUSED_COLA = "torch-eager (bf16 F.silu(x @ a) @ b)"
_UNFUSED_SLTRAIN = "torch-eager (bf16 dense W = scale*a@b + S, x @ W)"
_UNFUSED_IHA = "torch-eager (reference.iha_attention, bf16 compute)"

TABLE: tuple[Row, ...] = (
    # NVIDIA H100 80GB HBM3, 2026-11-25, commit 77de0b8, triton 3.6.0
    Row("rms_norm", "sm_90", ANY, "fwd", TRITON, 0.095, 1.079, "B2 N8192 D4096", _H100),
    Row("rms_norm", "sm_90", ANY, "fwd+bwd", TRITON, 0.720, 3.676, "B2 N8192 D4096", _H100),
    Row("rope", "sm_90", ANY, "fwd", TRITON, 0.141, 0.825, "B1 N8192 H32/8 d128", _H100),
    Row("rope", "sm_90", ANY, "fwd+bwd", TRITON, 0.606, 1.713, "B1 N8192 H32/8 d128", _H100),
    Row("swiglu", "sm_90", ANY, "fwd", TRITON, 0.466, 3.443, "B2 N8192 F14336", _H100),
    Row("swiglu", "sm_90", ANY, "fwd+bwd", TRITON, 1.242, 7.856, "B2 N8192 F14336", _H100),
    Row(
        "fused_linear_cross_entropy",
        "sm_90",
        "V65537-131072",
        "fwd",
        TORCH,
        16.807,
        15.002,
        "T8192 D4096 V128256",
        _H100,
        _UNFUSED_FLCE,
    ),
    Row(
        "fused_linear_cross_entropy",
        "sm_90",
        "V65537-131072",
        "fwd+bwd",
        TORCH,
        116.223,
        44.760,
        "T8192 D4096 V128256",
        _H100,
        _UNFUSED_FLCE,
    ),
    Row(
        "lowrank_linear",
        "sm_90",
        "r513-1024",
        "fwd",
        TORCH,
        0.375,
        0.216,
        "T8192 D4096x4096 r1024",
        _H100,
        _UNFUSED_COLA,
    ),
    Row(
        "lowrank_linear",
        "sm_90",
        "r513-1024",
        "fwd+bwd",
        TORCH,
        1.374,
        0.651,
        "T8192 D4096x4096 r1024",
        _H100,
        _UNFUSED_COLA,
    ),
    Row(
        "sparse_lowrank_linear",
        "sm_90",
        "Din1025-2048",
        "fwd",
        TORCH,
        7.234,
        0.131,
        "T8192 D2048x2048 r512 delta0.03",
        _H100,
        _UNFUSED_SLTRAIN,
    ),
    Row(
        "sparse_lowrank_linear",
        "sm_90",
        "Din1025-2048",
        "fwd+bwd",
        TORCH,
        23.792,
        0.656,
        "T8192 D2048x2048 r512 delta0.03",
        _H100,
        _UNFUSED_SLTRAIN,
    ),
    Row(
        "iha_attention", "sm_90", "d65-128 P2", "fwd", TORCH, 54.291, 4.646, "B1 N4096 H32 d128 P2", _H100, _UNFUSED_IHA
    ),
    Row(
        "iha_attention",
        "sm_90",
        "d65-128 P2",
        "fwd+bwd",
        TORCH,
        202.011,
        11.420,
        "B1 N4096 H32 d128 P2",
        _H100,
        _UNFUSED_IHA,
    ),
    # NVIDIA H200, 2026-12-04, triton 3.6.0 (the log of the run that stopped at the adam op, and the
    # quick run of lowrank, sparse_lowrank and iha)
    Row("rms_norm", "sm_90", ANY, "fwd", TRITON, 0.117, 0.892, "B2 N8192 D4096", _H200_LOG),
    Row("rms_norm", "sm_90", ANY, "fwd+bwd", TRITON, 0.540, 2.904, "B2 N8192 D4096", _H200_LOG),
    Row("rope", "sm_90", ANY, "fwd", TRITON, 0.200, 0.682, "B1 N8192 H32/8 d128", _H200_LOG),
    Row("rope", "sm_90", ANY, "fwd+bwd", TRITON, 0.856, 1.420, "B1 N8192 H32/8 d128", _H200_LOG),
    Row("swiglu", "sm_90", ANY, "fwd", TRITON, 0.326, 2.745, "B2 N8192 F14336", _H200_LOG),
    Row("swiglu", "sm_90", ANY, "fwd+bwd", TRITON, 0.869, 5.988, "B2 N8192 F14336", _H200_LOG),
    Row(
        "fused_linear_cross_entropy",
        "sm_90",
        "V65537-131072",
        "fwd",
        TORCH,
        15.862,
        14.119,
        "T8192 D4096 V128256",
        _H200_LOG,
        _UNFUSED_FLCE,
    ),
    Row(
        "fused_linear_cross_entropy",
        "sm_90",
        "V65537-131072",
        "fwd+bwd",
        TORCH,
        104.839,
        42.184,
        "T8192 D4096 V128256",
        _H200_LOG,
        _UNFUSED_FLCE,
    ),
    Row(
        "lowrank_linear",
        "sm_90",
        "r513-1024",
        "fwd",
        TORCH,
        0.371,
        0.213,
        "T8192 D4096x4096 r1024",
        _H200,
        _UNFUSED_COLA,
    ),
    Row(
        "lowrank_linear",
        "sm_90",
        "r513-1024",
        "fwd+bwd",
        TORCH,
        1.445,
        0.612,
        "T8192 D4096x4096 r1024",
        _H200,
        _UNFUSED_COLA,
    ),
    Row(
        "sparse_lowrank_linear",
        "sm_90",
        "Din1025-2048",
        "fwd",
        TORCH,
        6.733,
        0.130,
        "T8192 D2048x2048 r512 delta0.03",
        _H200,
        _UNFUSED_SLTRAIN,
    ),
    Row(
        "sparse_lowrank_linear",
        "sm_90",
        "Din1025-2048",
        "fwd+bwd",
        TORCH,
        23.091,
        0.726,
        "T8192 D2048x2048 r512 delta0.03",
        _H200,
        _UNFUSED_SLTRAIN,
    ),
    Row(
        "iha_attention", "sm_90", "d65-128 P2", "fwd", TORCH, 52.969, 3.638, "B1 N4096 H32 d128 P2", _H200, _UNFUSED_IHA
    ),
    Row(
        "iha_attention",
        "sm_90",
        "d65-128 P2",
        "fwd+bwd",
        TORCH,
        198.945,
        9.881,
        "B1 N4096 H32 d128 P2",
        _H200,
        _UNFUSED_IHA,
    ),
)


def _bucket(value: int) -> tuple[int, int]:
    """The power-of-two bucket (lo, hi] holding value: 4096 -> (2049, 4096), 768 -> (513, 1024)."""
    value = max(1, int(value))
    hi = 1 << (value - 1).bit_length()
    return (hi // 2 + 1, hi) if hi > 1 else (1, 1)


def shape_class(op: str, dims: Sequence[int]) -> str:
    """The class label of `op` at `dims` (the values of CLASS_DIMS[op], in order): "any" for an op
    without dims, else e.g. "V65537-131072" or "d65-128 P2"."""
    spec = CLASS_DIMS[op]
    if not spec:
        return ANY
    if len(dims) != len(spec):
        raise ValueError(f"shape_class: {op} is classed by {[name for name, _ in spec]}, got {tuple(dims)}")
    parts = []
    for (name, letter), value in zip(spec, dims):
        if name in _EXACT:
            parts.append(f"{letter}{int(value)}")
        else:
            lo, hi = _bucket(value)
            parts.append(f"{letter}{lo}-{hi}" if lo != hi else f"{letter}{hi}")
    return " ".join(parts)


def lookup(op: str, arch: Optional[str], cls: str, mode: str, table: Sequence[Row] = None) -> Optional[str]:
    """ "triton" or "torch" from the rows of (op, arch, cls, mode), else from (op, arch, "any", mode);
    None when neither has a row (unmeasured). Several rows: triton only if every one says triton."""
    rows = TABLE if table is None else table
    for wanted in (cls, ANY) if cls != ANY else (ANY,):
        found = [r.choice for r in rows if r.op == op and r.arch == arch and r.shape_class == wanted and r.mode == mode]
        if found:
            return TRITON if all(choice == TRITON for choice in found) else TORCH
    return None


def device_arch(index: int) -> Optional[str]:
    """ "sm_XY" of CUDA device `index` (torch's Tensor.get_device: -1 is the CPU), None for the CPU.
    Read once per index (`_ARCHS`); tests replace this function to fake a GPU."""
    if index < 0 or not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


_ARCHS: dict[int, Optional[str]] = {}


def grad_mode(op: str) -> str:
    """The mode whose rows decide now: "step" for the optimizer op, "fwd+bwd" while autograd
    records, "fwd" under no_grad / inference_mode."""
    if op == "projected_adam_update":
        return "step"
    return "fwd+bwd" if torch.is_grad_enabled() else "fwd"


_DECISIONS: dict[tuple, bool] = {}
_TAKEN: dict[str, set] = {}


def use_triton(op: str, index: int, dims: Callable[[], tuple]) -> bool:
    """auto's choice for `op` on device `index` (torch's get_device: -1 is the CPU) at the shape
    `dims()` returns (CLASS_DIMS[op]'s values; not called for a device without an architecture, and
    a call that raises on malformed inputs leaves them to the torch path, which reports them)."""
    try:
        arch = _ARCHS[index]
    except KeyError:
        arch = _ARCHS[index] = device_arch(index)
    if arch is None:
        return False
    try:
        shape = tuple(int(v) for v in dims())
    except (IndexError, AttributeError, TypeError, ValueError):
        return False
    key = (op, arch, shape, grad_mode(op))
    decision = _DECISIONS.get(key)
    if decision is None:
        decision = lookup(op, arch, shape_class(op, shape), key[3]) == TRITON
        _DECISIONS[key] = decision
    return decision


def record(op: str, triton: bool) -> None:
    """Note the path `op` took (every backend; `paths` reads it)."""
    taken = _TAKEN.get(op)
    path = TRITON if triton else TORCH
    if taken is None:
        _TAKEN[op] = {path}
    elif path not in taken:
        taken.add(path)


def paths() -> dict[str, str]:
    """{op: "triton" | "torch" | "triton+torch"} for every op called since `reset_paths()` (both
    when calls of one op at different shapes or modes took different paths)."""
    return {op: "+".join(sorted(taken, reverse=True)) for op, taken in sorted(_TAKEN.items())}


def reset_paths() -> None:
    _TAKEN.clear()


def clear_cache() -> None:
    """Forget the cached decisions and architectures (tests that change TABLE or fake a device)."""
    _DECISIONS.clear()
    _ARCHS.clear()
