"""Fused-kernel benchmarks: megatrain's Triton ops against torch eager, torch.compile, Liger-Kernel and apex.

    python benchmarks/kernels.py [--ops rms_norm,rope,swiglu,flce,adam] [--quick] [--out benchmarks/results]

Needs a CUDA GPU. Without one it prints one line saying so and exits with status 2. On the lent GPU
machine run it through benchmarks/gpu_suite.sh, which installs what the machine lacks first.

Steps
1. Two ceilings of this device, measured with CUDA events (median of 20 after 3 warm-ups): copy
   bandwidth, `dst.copy_(src)` on a 1 GiB bf16 tensor counting bytes = 2 x size (one read, one write),
   and the bf16 matmul rate of an 8192 x 8192 x 8192 product on random data (2 * 8192^3 FLOPs).
2. Correctness pre-pass at the benchmark sizes: every Triton op on bf16 inputs against
   `megatrain.kernels.reference` run on the same values upcast to fp32 (fp32 math), forward outputs and
   every input gradient, as ||out - ref|| / ||ref|| <= --rtol (1e-2, the bf16 tolerance). Kernel outputs
   are poisoned with NaN (MEGATRAIN_KERNELS_POISON=1) so an element a kernel never writes fails.
3. Timings with triton.testing.do_bench (median, 20th and 80th percentile; the L2 cache is flushed
   before every run) of: "megatrain-triton" (the public API with MEGATRAIN_KERNELS=triton),
   "torch-eager" (kernels.reference; for flce the unfused `F.cross_entropy(h @ W.T, target)` on bf16
   logits, with no fp32 upcast, the fastest plain form), "torch-compile" (torch.compile of that eager
   function, default mode, static shapes), "liger" (Liger-Kernel, when `liger_kernel` imports), "apex"
   (rms_norm only, `megatrain.kernels.apex_rms_norm`, when apex's CUDA extension imports). Modes: "fwd" runs under
   torch.no_grad(); "fwd+bwd" runs the forward and backward (upstream gradients random, fixed).
4. Adam: one optimizer step over the fp32 parameters of megatrain's 1.3b preset (vocab 32000; the shapes
   come from building the model on the meta device): torch AdamW foreach, torch AdamW fused, apex
   FusedAdam when importable.

Byte accounting (memory-bound ops): every tensor the op must read or write, counted once; bf16 is 2
bytes (e), the fp32 RoPE tables and Adam state 4. Extra traffic an implementation chooses (saved
statistics, partial sums, fp32 copies) is not counted, so GB/s compares implementations on the same work.
    rms_norm  fwd: read x [T, D] and weight [D], write y [T, D]            2*T*D*e + D*e
              bwd: read dy, x, weight; write dx, dweight                   3*T*D*e + 2*D*e
    rope      fwd: read q, k, cos, sin [N, d/2]; write q_rot, k_rot        2*(|q| + |k|)*e + 2*N*(d/2)*4
              bwd: the same counts for the gradients
    swiglu    fwd: read gate, up [T, F]; write out                         3*T*F*e
              bwd: read dout, gate, up; write dgate, dup                   5*T*F*e
    adam      read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq   7*P*4
"fwd+bwd" counts the forward's bytes plus the backward's.

FLOP accounting (flce, h [T, D], W [V, D]): fwd 2*T*D*V (the logits); fwd+bwd 6*T*D*V (the logits,
dh = dlogits @ W and dW = dlogits^T @ h). Softmax arithmetic is not counted, and an implementation that
recomputes the logits in its backward does more work than is counted: the figure is useful work.

Low-rank ops (FLOPs, useful work only; x [T, D_in], a [D_in, r], b [r, D_out]): lowrank fwd
2*T*r*(D_in + D_out), fwd+bwd three times that; its eager baseline is F.silu(x @ a) @ b (two cuBLAS
matmuls plus a separate activation kernel), "megatrain-triton-recompute" is CoLA-M (one more matmul in
backward, x @ a again) and "dense-linear" is the dense x @ W layer CoLA replaces (2*T*D_in*D_out
FLOPs, x3 for fwd+bwd: its time over megatrain-triton's is the speed-up of the factorisation; its
TFLOP/s column counts CoLA's work, it is a time bar only). sparse_lowrank adds 2*T*nnz (fwd; x6 for
fwd+bwd) for S with nnz = 0.03*D_in*D_out; its baseline materialises W = scale * a @ b + S densely (as
SLTrain's reference code does) and does one [T, D_in] x [D_in, D_out] matmul, which is also what the
Triton path does per call (W rebuilt in backward, never kept): the FLOP column counts the factored
useful work, less than either runs. Target: lowrank faster than its eager baseline in both modes;
sparse_lowrank is reported only.

Interleaved head attention (iha; q, k, v [B, H, N, d], P pseudo-tokens, rotary, bf16; causal unless the
shape names token_causal or a window W of virtual tokens): FLOPs 4*B*H*pairs*d for QK^T and PV over the
attending (query, key) pairs of the N*P virtual tokens (about (N*P)^2/2 causal, N*P*W windowed) plus the
mixing and collapse, x3.5 for fwd+bwd (see iha_flops). Rows: megatrain-triton (GEMM mixing, rotary, the
FlashAttention-2 Triton kernel, GEMM collapse), torch-eager (the unfused path in bf16: batched-GEMM mixing
straight into the interleaved layout, rotary, torch SDPA, flash for the plain causal mask and a boolean mask
otherwise, collapse; kernels.reference.iha_attention with compute_dtype=bf16), flex-attention (the same
mixing with torch's compiled flex_attention, the layer's mask as mask_mod + block mask) and sdpa-mha
(plain causal SDPA over the N tokens of the same heads: MHA, the floor IHA at P = 2 is 4x of; its TFLOP/s
column counts IHA's work, it is a time bar only). Targets: >= 2x torch-eager's speed, never slower than
flex-attention, at P = 2 (causal) fwd+bwd at most 5x sdpa-mha's time, and fwd+bwd peak memory <=
torch-eager's.

Peak memory (flce, lowrank, sparse_lowrank, iha, fwd+bwd): torch.cuda.max_memory_allocated() during one
forward+backward minus the memory allocated just before it. The inputs h, W and target exist before and
are not counted; the gradients dh and dW, which every version must produce, are counted.

Targets (judged for megatrain-triton, printed PASS/FAIL, never assumed):
- rms_norm, rope, swiglu, every shape and mode: achieved GB/s >= 85% of the measured copy bandwidth,
  and not slower than torch.compile (median <= compile's median x (1 + --noise); --noise 0.02 allows
  for the run-to-run spread of medians).
- flce, every shape: speed >= 90% of the unfused torch-eager version in each mode (its median time
  over ours), and fwd+bwd peak memory < 10% of the unfused version's.

GaLore / Fira's projected Adam step (projected_adam; weight W [M, N] fp32, rank r, GaLore's right side
when M >= N): one step, mode "step", of megatrain-triton (kernels.projected_adam_update: Adam on the
[M, r] moments, back-projection psi @ P and the weight update in one pass over W) against torch-eager
(kernels.reference.projected_adam_update, the torch path) and, when `galore_torch` imports, galore-torch
(GaLoreAdamW.step on one [M, N] parameter, which also projects the full gradient down: more work than
counted). FLOPs 2*M*N*r (the back-projection); its % matmul peak is against the bf16 peak, though the
step is fp32. Reported only (no target).

The torch path (MEGATRAIN_KERNELS=auto's choice where its table, kernels/measured.py, has no Triton
row): for rms_norm, rope, swiglu and projected_adam the torch-eager row is it (kernels.reference); for
flce, lowrank, sparse_lowrank and iha, whose torch-eager rows are the plain unfused forms, a
"megatrain-torch" row times the public API under MEGATRAIN_KERNELS=torch (the references computing in
the inputs' dtype; for flce chunked, without the full logits). `--auto-table RESULTS.json` prints the
table rows of a run (each op's megatrain-triton median against the torch path's, per shape class and
mode; no GPU needed) to paste into kernels/measured.py.

Writes benchmarks/results/kernels-<gpu-name-slug>.json and .md ("-quick" is added with --quick).
Exit status: 0; 1 when a correctness check failed or the Triton path raised (after writing the
results), and with --strict also when a target FAILed; 2 without a CUDA GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from typing import Callable, Optional, Sequence

_HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(_HERE)
# Run as a script, benchmarks/ comes first on sys.path, and this file would then answer any
# `import kernels` or find_spec("kernels") that a library makes. megatrain is imported installed.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

from megatrain.constants import IGNORE_INDEX  # noqa: E402

OPS = ("rms_norm", "rope", "swiglu", "flce", "adam", "lowrank", "sparse_lowrank", "iha", "projected_adam")
# Compute-bound ops, reported in TFLOP/s against an unfused eager baseline, with peak memory.
FLOP_OPS = ("flce", "lowrank", "sparse_lowrank", "iha", "projected_adam")
SLTRAIN_DENSITY = 0.03  # sparse_lowrank: SLTrain's delta
SLTRAIN_SCALE = 0.125  # sparse_lowrank: alpha / r (any value: the cost does not depend on it)
MEMORY_BOUND_OPS = ("rms_norm", "rope", "swiglu")
MODES = ("fwd", "fwd+bwd")
BF16_BYTES = 2
FP32_BYTES = 4

TARGET_COPY_FRACTION = 0.85  # memory-bound ops: fraction of the measured copy bandwidth
TARGET_FLCE_SPEED = 0.90  # flce: fraction of the unfused version's speed
TARGET_FLCE_MEMORY = 0.10  # flce: fused peak memory below this fraction of the unfused one
TARGET_IHA_SPEED = 2.0  # iha: times the unfused reference path's speed
TARGET_IHA_VS_SDPA = 5.0  # iha at P = 2, causal, fwd+bwd: at most this many times MHA's causal SDPA time
IHA_SDPA = "sdpa-mha"  # iha: plain causal SDPA over the N tokens (a bar, not an IHA)
IHA_FLEX = "flex-attention"  # iha: the unfused mixing with torch's compiled flex_attention and a block mask
LOWRANK_DENSE = (
    "dense-linear"  # lowrank: the dense D_in x D_out layer it replaces (a bar; its FLOPs column counts CoLA's work)
)

DEVICE = "cuda"
EPS = 1e-6
TRITON = "megatrain-triton"
EAGER = "torch-eager"
COMPILE = "torch-compile"
TORCH_PATH = "megatrain-torch"  # the public API under MEGATRAIN_KERNELS=torch: what auto falls back to
GALORE_TORCH = "galore-torch"  # projected_adam: galore_torch's GaLoreAdamW step, when it imports
# The dispatcher's name of each benchmarked op (kernels/measured.py's table is keyed by it).
KERNEL_OPS = {
    "rms_norm": "rms_norm",
    "rope": "rope",
    "swiglu": "swiglu",
    "flce": "fused_linear_cross_entropy",
    "lowrank": "lowrank_linear",
    "sparse_lowrank": "sparse_lowrank_linear",
    "iha": "iha_attention",
    "projected_adam": "projected_adam_update",
}
# Ops whose torch-eager row is the torch path itself (kernels.reference); the others get TORCH_PATH rows.
TORCH_IS_REFERENCE = ("rms_norm", "rope", "swiglu", "projected_adam")


# ----------------------------------------------------------------------------------------------
# shapes


def sweep(op: str, quick: bool = False) -> list[dict]:
    """The benchmark shapes of `op`: realistic bf16 training sizes.

    Sequences of 2048-8192 tokens per batch row, the batch chosen so a step holds 4096-16384 tokens;
    rope with 32 query heads, 8 key/value heads, head dim 128; flce with D = 4096. --quick keeps one
    shape of the full sweep, so its numbers compare with a full run's.
    """
    if op == "rms_norm":
        full = [dict(batch=b, seq=n, hidden=d) for d in (2048, 4096, 8192) for b, n in ((2, 2048), (2, 8192))]
        pick = [dict(batch=2, seq=8192, hidden=4096)]
    elif op == "rope":
        full = [dict(batch=b, seq=n, heads=32, kv_heads=8, head_dim=128) for b, n in ((2, 2048), (1, 8192), (4, 4096))]
        pick = [dict(batch=1, seq=8192, heads=32, kv_heads=8, head_dim=128)]
    elif op == "swiglu":
        full = [dict(batch=b, seq=n, ffn=f) for f in (11008, 14336) for b, n in ((2, 2048), (2, 8192))]
        pick = [dict(batch=2, seq=8192, ffn=14336)]
    elif op == "flce":
        full = [dict(tokens=t, hidden=4096, vocab=v) for v in (32000, 128256) for t in (8192, 16384)]
        pick = [dict(tokens=8192, hidden=4096, vocab=128256)]
    elif op == "adam":
        full = pick = [dict(preset="1.3b", vocab=32000)]
    elif op == "lowrank":
        # CoLA's ranks: r = d/4 and d/8 of square projections, 8192 tokens.
        full = [dict(tokens=8192, d_in=d, d_out=d, rank=d // f) for d in (2048, 4096) for f in (4, 8)]
        pick = [dict(tokens=8192, d_in=4096, d_out=4096, rank=1024)]
    elif op == "sparse_lowrank":
        full = [dict(tokens=8192, d_in=d, d_out=d, rank=d // 4) for d in (2048, 4096)]
        pick = [dict(tokens=8192, d_in=2048, d_out=2048, rank=512)]
    elif op == "iha":
        # Interleaved head attention, H 32, d = 128, rotary: causal at N 2k-8k and P 2, 4; token_causal;
        # a sliding window of N/(2P) virtual tokens (the flop_matched schedule's windowed layers).
        full = [dict(batch=1, seq=n, heads=32, head_dim=128, pseudo=p) for p in (2, 4) for n in (2048, 4096, 8192)]
        full += [
            dict(batch=1, seq=4096, heads=32, head_dim=128, pseudo=2, mask="token_causal"),
            dict(batch=1, seq=8192, heads=32, head_dim=128, pseudo=2, window=8192 // 4),
        ]
        pick = [dict(batch=1, seq=4096, heads=32, head_dim=128, pseudo=2)]
    elif op == "projected_adam":
        # GaLore's ranks on the MLP and attention weights of the 1.3b (r 512) and 7b (r 1024) models.
        full = [
            dict(rows=5632, cols=2048, rank=512),
            dict(rows=4096, cols=4096, rank=1024),
            dict(rows=11008, cols=4096, rank=1024),
        ]
        pick = [dict(rows=11008, cols=4096, rank=1024)]
    else:
        raise ValueError(f"unknown op {op!r} (choose from {', '.join(OPS)})")
    return pick if quick else full


def tokens_of(shape: dict) -> int:
    return shape["tokens"] if "tokens" in shape else shape["batch"] * shape["seq"]


def shape_label(op: str, shape: dict) -> str:
    """A short, unambiguous name of one benchmark shape, e.g. 'B2 N8192 D4096'."""
    if op == "rms_norm":
        return f"B{shape['batch']} N{shape['seq']} D{shape['hidden']}"
    if op == "rope":
        return f"B{shape['batch']} N{shape['seq']} H{shape['heads']}/{shape['kv_heads']} d{shape['head_dim']}"
    if op == "swiglu":
        return f"B{shape['batch']} N{shape['seq']} F{shape['ffn']}"
    if op == "flce":
        return f"T{shape['tokens']} D{shape['hidden']} V{shape['vocab']}"
    if op == "adam":
        return f"{shape['preset']} (V{shape['vocab']})"
    if op == "lowrank":
        return f"T{shape['tokens']} D{shape['d_in']}x{shape['d_out']} r{shape['rank']}"
    if op == "sparse_lowrank":
        return f"T{shape['tokens']} D{shape['d_in']}x{shape['d_out']} r{shape['rank']} delta{SLTRAIN_DENSITY:g}"
    if op == "iha":
        label = f"B{shape['batch']} N{shape['seq']} H{shape['heads']} d{shape['head_dim']} P{shape['pseudo']}"
        if shape.get("mask", "causal") != "causal":
            label += f" {shape['mask']}"
        if shape.get("window") is not None:
            label += f" W{shape['window']}"
        return label
    if op == "projected_adam":
        return f"W{shape['rows']}x{shape['cols']} r{shape['rank']}"
    raise ValueError(f"unknown op {op!r}")


def op_modes(op: str) -> tuple:
    """The modes `op` is timed in: one optimizer step for projected_adam, fwd and fwd+bwd otherwise."""
    return ("step",) if op == "projected_adam" else MODES


def parse_ops(text: str) -> list[str]:
    """'rms_norm,flce' -> ['rms_norm', 'flce'], in the order given; unknown names raise ValueError."""
    ops = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in ops if name not in OPS]
    if unknown or not ops:
        raise ValueError(f"--ops: unknown {', '.join(unknown) or '(empty list)'}; choose from {', '.join(OPS)}")
    return list(dict.fromkeys(ops))


# ----------------------------------------------------------------------------------------------
# byte and FLOP accounting (see the module docstring)


def rms_norm_bytes(tokens: int, hidden: int, backward: bool, elem: int = BF16_BYTES) -> int:
    forward = 2 * tokens * hidden * elem + hidden * elem
    grads = 3 * tokens * hidden * elem + 2 * hidden * elem
    return forward + (grads if backward else 0)


def rope_bytes(
    batch: int,
    seq: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    backward: bool,
    elem: int = BF16_BYTES,
    table_elem: int = FP32_BYTES,
) -> int:
    q_elems, k_elems = batch * heads * seq * head_dim, batch * kv_heads * seq * head_dim
    one_pass = 2 * (q_elems + k_elems) * elem + 2 * seq * (head_dim // 2) * table_elem
    return one_pass * (2 if backward else 1)


def swiglu_bytes(tokens: int, ffn: int, backward: bool, elem: int = BF16_BYTES) -> int:
    return (3 + (5 if backward else 0)) * tokens * ffn * elem


def adam_bytes(num_params: int, elem: int = FP32_BYTES) -> int:
    return 7 * num_params * elem


def flce_flops(tokens: int, hidden: int, vocab: int, backward: bool) -> int:
    return (6 if backward else 2) * tokens * hidden * vocab


def lowrank_flops(tokens: int, d_in: int, d_out: int, rank: int, backward: bool) -> int:
    """x @ a and s @ b; backward three times that (dz, db; da, dx). The activation is not counted."""
    return (6 if backward else 2) * tokens * rank * (d_in + d_out)


def sparse_nnz(d_in: int, d_out: int) -> int:
    return int(SLTRAIN_DENSITY * d_in * d_out)


def sparse_lowrank_flops(tokens: int, d_in: int, d_out: int, rank: int, backward: bool) -> int:
    """The low-rank matmuls plus 2 FLOPs per (token, support entry): x @ S; backward adds dy @ S^T and
    dvalues. A dense-materialised version does T*D_in*D_out work instead: this is the useful work."""
    return lowrank_flops(tokens, d_in, d_out, rank, backward) + (6 if backward else 2) * tokens * sparse_nnz(
        d_in, d_out
    )


def iha_pairs(seq: int, pseudo: int, mask: str = "causal", window: Optional[int] = None) -> int:
    """(query, key) pairs over the N*P virtual tokens that attend (kernels.reference.iha_allowed)."""

    def ramp(length: int, cap: Optional[int]) -> int:  # sum over i < length of min(i + 1, cap)
        if cap is None or cap >= length:
            return length * (length + 1) // 2
        return cap * (cap + 1) // 2 + (length - cap) * cap

    if mask == "causal":
        return ramp(seq * pseudo, window)
    return pseudo * pseudo * ramp(seq, None if window is None else window // pseudo)


def iha_flops(
    batch: int,
    seq: int,
    heads: int,
    head_dim: int,
    pseudo: int,
    backward: bool,
    mask: str = "causal",
    window: Optional[int] = None,
) -> int:
    """Attention over the N*P virtual tokens (QK^T and PV on the attending pairs: 4*B*H*pairs*d;
    backward 2.5 times that) plus the q/k/v mixing and the collapse. Recomputation is not counted."""
    attention = 4 * batch * heads * iha_pairs(seq, pseudo, mask, window) * head_dim
    mixing = 3 * 2 * batch * heads * heads * pseudo * seq * head_dim + 2 * batch * heads * seq * pseudo * head_dim
    return (attention + mixing) * (7 if backward else 2) // 2


def op_cost(op: str, shape: dict, mode: str) -> int:
    """Bytes moved (memory-bound ops) or FLOPs (flce) of one call of `op` at `shape` in `mode`."""
    backward = mode == "fwd+bwd"
    if op == "rms_norm":
        return rms_norm_bytes(tokens_of(shape), shape["hidden"], backward)
    if op == "rope":
        return rope_bytes(shape["batch"], shape["seq"], shape["heads"], shape["kv_heads"], shape["head_dim"], backward)
    if op == "swiglu":
        return swiglu_bytes(tokens_of(shape), shape["ffn"], backward)
    if op == "flce":
        return flce_flops(shape["tokens"], shape["hidden"], shape["vocab"], backward)
    if op == "lowrank":
        return lowrank_flops(shape["tokens"], shape["d_in"], shape["d_out"], shape["rank"], backward)
    if op == "sparse_lowrank":
        return sparse_lowrank_flops(shape["tokens"], shape["d_in"], shape["d_out"], shape["rank"], backward)
    if op == "iha":
        return iha_flops(
            shape["batch"],
            shape["seq"],
            shape["heads"],
            shape["head_dim"],
            shape["pseudo"],
            backward,
            shape.get("mask", "causal"),
            shape.get("window"),
        )
    if op == "projected_adam":
        return 2 * shape["rows"] * shape["cols"] * shape["rank"]  # the back-projection psi @ P
    raise ValueError(f"no cost model for {op!r}")


def gb_per_s(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def tflop_per_s(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


# ----------------------------------------------------------------------------------------------
# judging the targets


@dataclasses.dataclass
class Target:
    op: str
    shape: str
    mode: str
    name: str  # what is judged, e.g. ">= 85% of copy bandwidth"
    value: str  # what was measured, formatted
    ok: Optional[bool]  # None: could not be judged (a baseline is missing)

    @property
    def verdict(self) -> str:
        return verdict(self.ok)


def verdict(ok: Optional[bool]) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def not_slower(ms: float, baseline_ms: float, noise: float) -> bool:
    """Whether a median time `ms` is no slower than `baseline_ms`, allowing `noise` relative spread."""
    return ms <= baseline_ms * (1.0 + noise)


def judge_memory_bound(
    op: str,
    shape: str,
    mode: str,
    triton_ms: Optional[float],
    compile_ms: Optional[float],
    nbytes: int,
    copy_gbps: float,
    noise: float,
) -> list[Target]:
    """The two targets of a memory-bound op at one shape and mode.

    A missing Triton time (it raised) FAILs both; a missing torch.compile time leaves that one n/a.
    """
    if triton_ms is None:
        fraction = Target(op, shape, mode, f">= {TARGET_COPY_FRACTION:.0%} of copy bandwidth", "error", False)
    else:
        achieved = gb_per_s(nbytes, triton_ms) / copy_gbps
        fraction = Target(
            op,
            shape,
            mode,
            f">= {TARGET_COPY_FRACTION:.0%} of copy bandwidth",
            f"{achieved:.1%}",
            achieved >= TARGET_COPY_FRACTION,
        )
    name = "not slower than torch.compile"
    if triton_ms is None:
        speed = Target(op, shape, mode, name, "error", False)
    elif compile_ms is None:
        speed = Target(op, shape, mode, name, "no torch.compile time", None)
    else:
        speed = Target(
            op,
            shape,
            mode,
            name,
            f"{compile_ms / triton_ms:.2f}x compile's speed",
            not_slower(triton_ms, compile_ms, noise),
        )
    return [fraction, speed]


def judge_flce(
    shape: str,
    mode: str,
    fused_ms: Optional[float],
    unfused_ms: Optional[float],
    fused_peak: Optional[int] = None,
    unfused_peak: Optional[int] = None,
) -> list[Target]:
    """flce's targets at one shape and mode: speed in every mode, peak memory where it was measured."""
    name = f">= {TARGET_FLCE_SPEED:.0%} of unfused speed"
    if fused_ms is None:
        targets = [Target("flce", shape, mode, name, "error", False)]
    elif unfused_ms is None:
        targets = [Target("flce", shape, mode, name, "no unfused time", None)]
    else:
        ratio = unfused_ms / fused_ms
        targets = [Target("flce", shape, mode, name, f"{ratio:.1%}", ratio >= TARGET_FLCE_SPEED)]
    if mode == "fwd+bwd":
        name = f"< {TARGET_FLCE_MEMORY:.0%} of unfused peak memory"
        if fused_peak is None:
            targets.append(Target("flce", shape, mode, name, "error", False))
        elif not unfused_peak:
            targets.append(Target("flce", shape, mode, name, "no unfused peak", None))
        else:
            ratio = fused_peak / unfused_peak
            targets.append(Target("flce", shape, mode, name, f"{ratio:.1%}", ratio < TARGET_FLCE_MEMORY))
    return targets


def judge_lowrank(shape: str, mode: str, fused_ms: Optional[float], unfused_ms: Optional[float]) -> list[Target]:
    """lowrank's target: faster than two cuBLAS matmuls with a separate SiLU (torch-eager)."""
    name = "faster than 2 matmuls + separate silu"
    if fused_ms is None:
        return [Target("lowrank", shape, mode, name, "error", False)]
    if unfused_ms is None:
        return [Target("lowrank", shape, mode, name, "no unfused time", None)]
    return [Target("lowrank", shape, mode, name, f"{unfused_ms / fused_ms:.2f}x", fused_ms < unfused_ms)]


def judge_iha(
    shape: str,
    mode: str,
    pseudo: int,
    fused_ms: Optional[float],
    unfused_ms: Optional[float],
    sdpa_ms: Optional[float],
    fused_peak: Optional[int] = None,
    unfused_peak: Optional[int] = None,
    flex_ms: Optional[float] = None,
    causal: bool = True,
    noise: float = 0.02,
) -> list[Target]:
    """iha's targets: >= 2x the unfused path's speed; never slower than flex_attention (within
    `noise`); at P = 2 with the plain causal mask, fwd+bwd within 5x of causal SDPA-MHA's time (IHA
    does 4x its attention FLOPs); fwd+bwd peak memory at most the unfused path's (both store the P
    pseudo-heads; the kernel stores no N*P x N*P tensor and no unrotated copy)."""

    def ratio_target(name, baseline_ms, value, ok):
        if fused_ms is None:
            return Target("iha", shape, mode, name, "error", False)
        if baseline_ms is None:
            return Target("iha", shape, mode, name, "no baseline time", None)
        return Target("iha", shape, mode, name, value(baseline_ms), ok(baseline_ms))

    targets = [
        ratio_target(
            f">= {TARGET_IHA_SPEED:g}x unfused speed",
            unfused_ms,
            lambda base: f"{base / fused_ms:.2f}x",
            lambda base: base / fused_ms >= TARGET_IHA_SPEED,
        ),
        ratio_target(
            "not slower than flex_attention",
            flex_ms,
            lambda base: f"{base / fused_ms:.2f}x",
            lambda base: not_slower(fused_ms, base, noise),
        ),
    ]
    if pseudo == 2 and causal and mode == "fwd+bwd":
        targets.append(
            ratio_target(
                f"<= {TARGET_IHA_VS_SDPA:g}x causal SDPA-MHA time",
                sdpa_ms,
                lambda base: f"{fused_ms / base:.2f}x",
                lambda base: fused_ms <= TARGET_IHA_VS_SDPA * base,
            )
        )
    if mode == "fwd+bwd":
        name = "<= unfused peak memory"
        if fused_peak is None:
            targets.append(Target("iha", shape, mode, name, "error", False))
        elif not unfused_peak:
            targets.append(Target("iha", shape, mode, name, "no unfused peak", None))
        else:
            ratio = fused_peak / unfused_peak
            targets.append(Target("iha", shape, mode, name, f"{ratio:.1%}", ratio <= 1.0))
    return targets


# ----------------------------------------------------------------------------------------------
# formatting


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; every cell through str()."""
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {row!r} has {len(row)} cells for {len(headers)} headers")
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines)


def fmt(value: Optional[float], spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (file-name safe)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def render_markdown(report: dict) -> str:
    """The whole report as markdown: header, correctness, one table per op, Adam, targets."""
    env = report["environment"]
    ceilings = report["ceilings"]
    out = [
        f"# megatrain kernel benchmarks on {env['device']}",
        "",
        f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, Python {env['python']}; "
        f"Liger-Kernel: {env['liger']}; apex: {env['apex']}",
        f"Command: `{report['command']}`",
        f"Measured ceilings: copy {ceilings['copy_gbps']:.0f} GB/s ({ceilings['copy_bytes'] / 2 / 2**30:g} GiB bf16 "
        f"copy_, read + write counted), bf16 matmul {ceilings['matmul_tflops']:.0f} TFLOP/s "
        f"({ceilings['matmul_n']}^3, random data)",
        "Times are do_bench medians (L2 flushed before each run); fwd runs under no_grad.",
    ]

    if report["correctness"]:
        rows = [
            [
                c["op"],
                c["shape"],
                c["tensor"],
                fmt(c["rel_error"], ".2e", "error"),
                fmt(c["max_abs_error"], ".2e", "error"),
                "PASS" if c["ok"] else "FAIL",
            ]
            for c in report["correctness"]
        ]
        out += [
            "",
            f"## Correctness: Triton (bf16) vs reference (fp32 math), ||out - ref|| / ||ref|| <= {report['rtol']:g}",
            "",
            markdown_table(["op", "shape", "tensor", "rel. error", "max abs error", "result"], rows),
        ]
        errors = [c for c in report["correctness"] if c.get("error")]
        out += [f"- {c['op']} {c['shape']}: {c['error']}" for c in errors]

    for op in OPS:
        rows_of_op = [r for r in report["results"] if r["op"] == op]
        if not rows_of_op:
            continue
        out += ["", f"## {op}", ""]
        if op in MEMORY_BOUND_OPS:
            headers = ["shape", "mode", "impl", "median ms (p20-p80)", "GB/s", "% copy BW", "speed vs compile"]
        elif op in FLOP_OPS:
            headers = [
                "shape",
                "mode",
                "impl",
                "median ms (p20-p80)",
                "TFLOP/s",
                "% matmul peak",
                "speed vs unfused",
                "peak mem GiB",
                "mem vs unfused",
            ]
        else:
            headers = ["shape", "impl", "median ms (p20-p80)", "GB/s", "% copy BW"]
        rows = []
        for r in rows_of_op:
            if r.get("error"):
                time_cell = "error: " + r["error"].replace("|", "/")[:80]
            else:
                time_cell = f"{r['median_ms']:.3f} ({r['p20_ms']:.3f}-{r['p80_ms']:.3f})"
            if op in MEMORY_BOUND_OPS:
                rows.append(
                    [
                        r["shape"],
                        r["mode"],
                        r["impl"],
                        time_cell,
                        fmt(r.get("gbps"), ".0f"),
                        fmt(None if r.get("copy_fraction") is None else 100 * r["copy_fraction"], ".1f"),
                        fmt(r.get("speed_vs_compile"), ".2f"),
                    ]
                )
            elif op in FLOP_OPS:
                peak = r.get("peak_mem_bytes")
                rows.append(
                    [
                        r["shape"],
                        r["mode"],
                        r["impl"],
                        time_cell,
                        fmt(r.get("tflops"), ".0f"),
                        fmt(None if r.get("matmul_fraction") is None else 100 * r["matmul_fraction"], ".1f"),
                        fmt(r.get("speed_vs_unfused"), ".2f"),
                        fmt(None if peak is None else peak / 2**30, ".2f"),
                        fmt(r.get("mem_vs_unfused"), ".3f"),
                    ]
                )
            else:
                rows.append(
                    [
                        r["shape"],
                        r["impl"],
                        time_cell,
                        fmt(r.get("gbps"), ".0f"),
                        fmt(None if r.get("copy_fraction") is None else 100 * r["copy_fraction"], ".1f"),
                    ]
                )
        out.append(markdown_table(headers, rows))
        skipped = report.get("skipped", {}).get(op)
        if skipped:
            out += ["", "Not run: " + "; ".join(f"{k} ({v})" for k, v in skipped.items())]

    if report["targets"]:
        rows = [[t["op"], t["shape"], t["mode"], t["name"], t["value"], t["verdict"]] for t in report["targets"]]
        counts = {v: sum(t["verdict"] == v for t in report["targets"]) for v in ("PASS", "FAIL", "n/a")}
        out += [
            "",
            f"## Targets (megatrain-triton; not-slower allows {report['noise']:.0%} noise)",
            "",
            markdown_table(["op", "shape", "mode", "target", "measured", "verdict"], rows),
            "",
            f"{counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['n/a']} n/a",
        ]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------
# correctness helpers


def rel_error(out: Tensor, ref: Tensor) -> float:
    """||out - ref|| / ||ref|| in fp32; inf when `out` holds a NaN or an infinity."""
    out32, ref32 = out.detach().float(), ref.detach().float()
    if not bool(torch.isfinite(out32).all()):
        return math.inf
    denom = ref32.norm().item()
    diff = (out32 - ref32).norm().item()
    return diff / denom if denom > 0 else diff


def max_abs_error(out: Tensor, ref: Tensor) -> float:
    return (out.detach().float() - ref.detach().float()).abs().max().item()


# ----------------------------------------------------------------------------------------------
# everything below needs a CUDA GPU


@dataclasses.dataclass
class Case:
    """One op at one shape: its inputs and every implementation to time."""

    op: str
    shape: dict
    inputs: tuple  # positional arguments (tensors; floats are bf16 or fp32 tables)
    input_names: tuple
    output_names: tuple
    grad_outputs: Optional[tuple]  # upstream gradients; None when the output is a scalar loss
    impls: dict  # name -> fn(*inputs)
    reference: Callable  # the fp32-math oracle, fn(*inputs upcast)
    modes: tuple = MODES  # op_modes(op)

    @property
    def label(self) -> str:
        return shape_label(self.op, self.shape)

    @property
    def grad_inputs(self) -> list:
        return [t for t in self.inputs if isinstance(t, Tensor) and t.requires_grad]


def _optional_backends() -> dict:
    """Liger-Kernel's functional module and apex's RMSNorm where they import, with why not otherwise."""
    found = {
        "liger": None,
        "liger_status": "not importable",
        "apex_rms_norm": None,
        "apex_status": "not importable",
        "apex_adam": None,
    }
    try:
        import liger_kernel
        from liger_kernel.transformers import functional as liger_functional

        found["liger"] = liger_functional
        version = getattr(liger_kernel, "__version__", None)
        if version is None:
            from importlib import metadata

            version = metadata.version("liger-kernel")
        found["liger_status"] = str(version)
    except Exception as exc:  # a broken install raises more than ImportError; it only costs the row
        found["liger_status"] = f"not importable ({first_line(exc)})"
    from megatrain import kernels

    if getattr(kernels, "apex_rms_norm", None) is not None:
        try:
            probe = torch.ones(2, 8, device=DEVICE, dtype=torch.bfloat16)
            kernels.apex_rms_norm(probe, torch.ones(8, device=DEVICE), EPS)
            found["apex_rms_norm"] = kernels.apex_rms_norm
            found["apex_status"] = "fused RMSNorm importable"
        except Exception as exc:
            found["apex_status"] = f"not importable ({first_line(exc)})"
    try:
        from apex.optimizers import FusedAdam

        found["apex_adam"] = FusedAdam
    except Exception:
        pass
    return found


def _compiled(fn: Callable) -> Callable:
    # Static shapes: each shape gets the kernels Inductor specialises for it, its best case.
    return torch.compile(fn, dynamic=False)


def build_case(op: str, shape: dict, backends: dict) -> Case:
    """Inputs on the GPU (random, never zeros) and the implementations of `op` to time."""
    from megatrain import kernels
    from megatrain.kernels import reference

    dev, bf16 = DEVICE, torch.bfloat16
    liger = backends["liger"]
    if op == "rms_norm":
        b, n, d = shape["batch"], shape["seq"], shape["hidden"]
        x = torch.randn(b, n, d, device=dev, dtype=bf16, requires_grad=True)
        w = (1 + 0.1 * torch.randn(d, device=dev)).to(bf16).requires_grad_()

        def eager(x, w):
            return reference.rms_norm(x, w, EPS)

        impls = {TRITON: lambda x, w: kernels.rms_norm(x, w, EPS), EAGER: eager, COMPILE: _compiled(eager)}
        if liger is not None:
            impls["liger"] = lambda x, w: liger.liger_rms_norm(x, w, EPS, in_place=False)
        if backends["apex_rms_norm"] is not None:
            impls["apex"] = lambda x, w: backends["apex_rms_norm"](x, w, EPS)
        return Case(op, shape, (x, w), ("x", "weight"), ("y",), (torch.randn_like(x),), impls, eager)

    if op == "rope":
        from megatrain.models.transformer import rope_tables

        b, n, h, hk, d = shape["batch"], shape["seq"], shape["heads"], shape["kv_heads"], shape["head_dim"]
        q = torch.randn(b, h, n, d, device=dev, dtype=bf16, requires_grad=True)
        k = torch.randn(b, hk, n, d, device=dev, dtype=bf16, requires_grad=True)
        cos, sin = rope_tables(d, n, 10000.0, device=dev)  # fp32 [N, d/2], what the model passes

        def eager(q, k, cos, sin):
            return reference.rope(q, k, cos, sin)

        impls = {TRITON: kernels.rope, EAGER: eager, COMPILE: _compiled(eager)}
        if liger is not None:
            # Liger takes Hugging Face's duplicated [N, d] tables in the activations' dtype.
            cos_full, sin_full = torch.cat((cos, cos), -1).to(bf16), torch.cat((sin, sin), -1).to(bf16)
            impls["liger"] = lambda q, k, cos, sin: liger.liger_rope(q, k, cos_full, sin_full)
        grads = (torch.randn_like(q), torch.randn_like(k))
        return Case(op, shape, (q, k, cos, sin), ("q", "k", "cos", "sin"), ("q_rot", "k_rot"), grads, impls, eager)

    if op == "swiglu":
        b, n, f = shape["batch"], shape["seq"], shape["ffn"]
        gate = torch.randn(b, n, f, device=dev, dtype=bf16, requires_grad=True)
        up = torch.randn(b, n, f, device=dev, dtype=bf16, requires_grad=True)

        def eager(gate, up):
            return reference.swiglu(gate, up)

        impls = {TRITON: kernels.swiglu, EAGER: eager, COMPILE: _compiled(eager)}
        if liger is not None:
            impls["liger"] = liger.liger_swiglu
        return Case(op, shape, (gate, up), ("gate", "up"), ("out",), (torch.randn_like(gate),), impls, eager)

    if op == "flce":
        t, d, v = shape["tokens"], shape["hidden"], shape["vocab"]
        h = torch.randn(t, d, device=dev, dtype=bf16, requires_grad=True)
        # Scaled like a trained head: logits of unit-order spread, so the softmax is neither flat nor one-hot.
        w = (torch.randn(v, d, device=dev) * d**-0.5).to(bf16).requires_grad_()
        target = torch.randint(0, v, (t,), device=dev)
        target[torch.rand(t, device=dev) < 0.05] = IGNORE_INDEX  # some ignored rows, as padding gives

        def unfused(h, w, target):
            return F.cross_entropy(h @ w.T, target, ignore_index=IGNORE_INDEX)

        def chunked(h, w, target):
            return reference.fused_linear_cross_entropy(h, w, target, IGNORE_INDEX)

        # The chunked reference is the correctness oracle only: its fp32 matmuls take about a second per
        # call at these sizes, and nothing runs it on a GPU.
        impls = {
            TRITON: lambda h, w, target: kernels.fused_linear_cross_entropy(h, w, target, IGNORE_INDEX),
            EAGER: unfused,
            COMPILE: _compiled(unfused),
        }
        if liger is not None:
            impls["liger"] = lambda h, w, target: liger.liger_fused_linear_cross_entropy(
                h, w, target, ignore_index=IGNORE_INDEX
            )
        return Case(op, shape, (h, w, target), ("h", "weight", "target"), ("loss",), None, impls, chunked)

    if op == "lowrank":
        t, d_in, d_out, r = shape["tokens"], shape["d_in"], shape["d_out"], shape["rank"]
        x = torch.randn(t, d_in, device=dev, dtype=bf16, requires_grad=True)
        a = (torch.randn(d_in, r, device=dev) * d_in**-0.5).to(bf16).requires_grad_()
        b = (torch.randn(r, d_out, device=dev) * r**-0.5).to(bf16).requires_grad_()

        # The dense D_in x D_out layer CoLA replaces, for the ratio (its own weight; its gradient is
        # dropped before each call so it is written, not accumulated, as the factors' are).
        dense_weight = (torch.randn(d_in, d_out, device=dev) * d_in**-0.5).to(bf16).requires_grad_()

        def unfused(x, a, b):
            return F.silu(x @ a) @ b  # two cuBLAS matmuls and a separate activation kernel

        def dense(x, a, b):
            dense_weight.grad = None
            return x @ dense_weight

        impls = {
            TRITON: lambda x, a, b: kernels.lowrank_linear(x, a, b),
            TRITON + "-recompute": lambda x, a, b: kernels.lowrank_linear(x, a, b, recompute=True),
            EAGER: unfused,
            COMPILE: _compiled(unfused),
            LOWRANK_DENSE: dense,
        }
        return Case(
            op,
            shape,
            (x, a, b),
            ("x", "a", "b"),
            ("y",),
            (torch.randn(t, d_out, device=dev, dtype=bf16),),
            impls,
            lambda x, a, b: reference.lowrank_linear(x, a, b),
        )

    if op == "sparse_lowrank":
        t, d_in, d_out, r = shape["tokens"], shape["d_in"], shape["d_out"], shape["rank"]
        x = torch.randn(t, d_in, device=dev, dtype=bf16, requires_grad=True)
        a = (torch.randn(d_in, r, device=dev) * d_in**-0.5).to(bf16).requires_grad_()
        b = (torch.randn(r, d_out, device=dev) * r**-0.5).to(bf16).requires_grad_()
        index = torch.randperm(d_in * d_out, device=dev)[: sparse_nnz(d_in, d_out)].sort().values
        values = (torch.randn(index.numel(), device=dev) * d_in**-0.5).to(bf16).requires_grad_()

        def dense_materialised(x, a, b, values, index):
            # SLTrain's own approach: W = scale * a @ b + S built densely, then one matmul.
            sparse = torch.zeros(d_in * d_out, device=dev, dtype=bf16).index_put((index,), values).view(d_in, d_out)
            return x @ torch.addmm(sparse, a, b, alpha=SLTRAIN_SCALE)

        impls = {
            TRITON: lambda x, a, b, values, index: kernels.sparse_lowrank_linear(x, a, b, values, index, SLTRAIN_SCALE),
            EAGER: dense_materialised,
            COMPILE: _compiled(dense_materialised),
        }
        return Case(
            op,
            shape,
            (x, a, b, values, index),
            ("x", "a", "b", "values", "index"),
            ("y",),
            (torch.randn(t, d_out, device=dev, dtype=bf16),),
            impls,
            lambda x, a, b, values, index: reference.sparse_lowrank_linear(x, a, b, values, index, SLTRAIN_SCALE),
        )

    if op == "iha":
        return iha_case(shape, dev)

    if op == "projected_adam":
        return projected_adam_case(shape, dev)

    raise ValueError(f"no case builder for {op!r}")


def iha_mask_mod(pseudo: int, mask: str, window: Optional[int]) -> Callable:
    """The layer's visibility rule (kernels.reference.iha_allowed) as a flex_attention mask_mod over
    virtual positions q_idx = n*P + p, kv_idx = n'*P + p'."""

    def causal(b, h, q_idx, kv_idx):
        ok = kv_idx <= q_idx
        return ok & (kv_idx > q_idx - window) if window is not None else ok

    def token_causal(b, h, q_idx, kv_idx):
        ok = kv_idx // pseudo <= q_idx // pseudo
        return ok & (kv_idx // pseudo > q_idx // pseudo - window // pseudo) if window is not None else ok

    return causal if mask == "causal" else token_causal


def iha_case(shape: dict, device) -> Case:
    """Interleaved head attention on `device` (a function of its own so the CPU tests can build it).

    Near-MHA mixes (identity + noise) and collapse 1/P, as a layer starts; rotary tables over the
    N*P virtual positions; the shape's mask (default causal) and window (default none).
    Implementations: megatrain's path (GEMM mixing, rotary, the FlashAttention-2 Triton kernel, GEMM
    collapse); the unfused path in bf16 (einsum mixing + interleave + rotary + torch SDPA, which
    picks flash for the causal mask and the memory-efficient kernel with a boolean mask otherwise,
    + the collapse); the same unfused mixing with torch's flex_attention (compiled, the layer's
    mask as a mask_mod and a block mask, so masked blocks are skipped) for the attention; and, as
    a bar, plain causal SDPA over the N tokens of the same heads (MHA).
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from megatrain import kernels
    from megatrain.kernels import reference
    from megatrain.models.transformer import rope_tables

    b, n, h, d, p = shape["batch"], shape["seq"], shape["heads"], shape["head_dim"], shape["pseudo"]
    mask, window = shape.get("mask", "causal"), shape.get("window")
    bf16 = torch.bfloat16
    q, k, v = (torch.randn(b, h, n, d, device=device, dtype=bf16, requires_grad=True) for _ in range(3))
    eye = torch.eye(h, device=device)[:, :, None].expand(h, h, p)
    mixes = [(eye + 0.02 * torch.randn(h, h, p, device=device)).to(bf16).requires_grad_() for _ in range(3)]
    collapse = torch.full((h, p), 1.0 / p, device=device, dtype=bf16, requires_grad=True)
    cos, sin = rope_tables(d, n * p, 10000.0, device=device)
    block_mask = create_block_mask(iha_mask_mod(p, mask, window), None, None, n * p, n * p, device=device)
    # Compiled on a GPU (its fused kernel); eager on CPU, where the tests only check the mask logic.
    flex = _compiled(flex_attention) if torch.device(device).type == "cuda" else flex_attention

    def fused(*args):
        return kernels.iha_attention(*args, mask=mask, window=window)

    def unfused(*args):
        return reference.iha_attention(*args, mask=mask, window=window, compute_dtype=args[0].dtype)

    def with_flex(q, k, v, mix_q, mix_k, mix_v, collapse, cos, sin):
        def pseudo_heads(x, mix):  # the unfused path's mixing: [B, H, N, d] -> [B, H, N*P, d]
            return torch.einsum("bmnd,mhp->bhnpd", x, mix).reshape(b, h, n * p, d)

        pq, pk = reference.rope(pseudo_heads(q, mix_q), pseudo_heads(k, mix_k), cos, sin)
        o = flex(pq, pk, pseudo_heads(v, mix_v), block_mask=block_mask)
        return torch.einsum("bhnpd,hp->bhnd", o.reshape(b, h, n, p, d), collapse)

    def sdpa(q, k, v, *_):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def oracle(*args):
        return reference.iha_attention(*args, mask=mask, window=window)

    impls = {TRITON: fused, EAGER: unfused, IHA_FLEX: with_flex, IHA_SDPA: sdpa}
    names = ("q", "k", "v", "mix_q", "mix_k", "mix_v", "collapse", "cos", "sin")
    return Case(
        "iha",
        shape,
        (q, k, v, *mixes, collapse, cos, sin),
        names,
        ("o",),
        (torch.randn(b, h, n, d, device=device, dtype=bf16),),
        impls,
        oracle,
    )


def projected_adam_case(shape: dict, device) -> Case:
    """One GaLore step on an fp32 weight [M, N] at rank r (GaLore's right side when M >= N): an
    orthonormal projection, a random projected gradient and moments. Every implementation returns
    (weight, exp_avg, exp_avg_sq) after the step; the weight is updated in place, so repeated timed
    calls keep stepping it (by ~1e-3 of its size each: harmless for the timing)."""
    from megatrain import kernels
    from megatrain.kernels import reference

    m, n, r = shape["rows"], shape["cols"], shape["rank"]
    side = "right" if m >= n else "left"
    moments = (m, r) if side == "right" else (r, n)
    weight = torch.randn(m, n, device=device) * 0.02
    proj = torch.linalg.qr(torch.randn(n if side == "right" else m, r, device=device)).Q
    proj = (proj.T if side == "right" else proj).contiguous()  # [r, N] or [M, r], orthonormal
    low_rank_grad = torch.randn(moments, device=device) * 1e-3
    exp_avg = torch.randn(moments, device=device) * 1e-4
    exp_avg_sq = torch.rand(moments, device=device) * 1e-6
    hyper = dict(side=side, beta1=0.9, beta2=0.999, eps=1e-8, step_size=1e-3, scale=0.25, decay=1e-5)

    def eager(w, p, g, m1, v1):
        return (w, *reference.projected_adam_update(w, p, g, m1, v1, **hyper))

    def fused(w, p, g, m1, v1):
        return (w, *kernels.projected_adam_update(w, p, g, m1, v1, **hyper))

    impls = {TRITON: fused, EAGER: eager}
    galore = _galore_step(weight, r)
    if galore is not None:
        impls[GALORE_TORCH] = galore
    return Case(
        "projected_adam",
        shape,
        (weight, proj, low_rank_grad, exp_avg, exp_avg_sq),
        ("weight", "proj", "low_rank_grad", "exp_avg", "exp_avg_sq"),
        ("weight", "exp_avg", "exp_avg_sq"),
        None,
        impls,
        eager,
        modes=op_modes("projected_adam"),
    )


def _galore_step(weight: Tensor, rank: int) -> Optional[Callable]:
    """galore_torch's GaLoreAdamW.step on a copy of `weight` with a fixed random gradient (the
    projection is computed once, by a first step here), or None when galore_torch does not import."""
    try:
        from galore_torch import GaLoreAdamW
    except Exception:
        return None
    param = torch.nn.Parameter(weight.detach().clone())
    param.grad = torch.randn_like(param) * 1e-3
    optimizer = GaLoreAdamW(
        [{"params": [param], "rank": rank, "update_proj_gap": 10**9, "scale": 0.25, "proj_type": "std"}],
        lr=1e-3,
        weight_decay=1e-2,
    )
    optimizer.step()
    return lambda *inputs: optimizer.step()


def with_torch_path(case: Case) -> Case:
    """Add the TORCH_PATH row (the public API under MEGATRAIN_KERNELS=torch: the reference through the
    dispatcher, what MEGATRAIN_KERNELS=auto runs where its table has no Triton row) to an op whose
    torch-eager row is some other, faster unfused form."""
    if case.op in TORCH_IS_REFERENCE or TRITON not in case.impls:
        return case
    public = case.impls[TRITON]  # reads MEGATRAIN_KERNELS at every call

    def torch_path(*inputs):
        previous = os.environ.get("MEGATRAIN_KERNELS", "triton")
        os.environ["MEGATRAIN_KERNELS"] = "torch"
        try:
            return public(*inputs)
        finally:
            os.environ["MEGATRAIN_KERNELS"] = previous

    case.impls[TORCH_PATH] = torch_path
    return case


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def _backward(outputs: tuple, grad_outputs: Optional[tuple]) -> None:
    torch.autograd.backward(outputs, grad_outputs)


def check_case(case: Case, rtol: float) -> list[dict]:
    """Triton forward outputs and input gradients against the fp32-math reference at this shape."""
    rows, base = [], dict(op=case.op, shape=case.label)
    grad_positions = [i for i, t in enumerate(case.inputs) if isinstance(t, Tensor) and t.requires_grad]
    backward = "fwd+bwd" in case.modes
    # The same values upcast, taken before the Triton call (an optimizer op updates its inputs in
    # place): the reference then computes in fp32 (no tf32 in its matmuls).
    ref_inputs = tuple(
        t.detach().float().requires_grad_(t.requires_grad) if isinstance(t, Tensor) and t.is_floating_point() else t
        for t in case.inputs
    )
    old_poison = os.environ.get("MEGATRAIN_KERNELS_POISON")
    os.environ["MEGATRAIN_KERNELS_POISON"] = "1"
    try:
        for t in case.grad_inputs:
            t.grad = None
        outputs = _as_tuple(case.impls[TRITON](*case.inputs))
        if backward:
            _backward(outputs, case.grad_outputs)
        got = [o.detach() for o in outputs] + [case.inputs[i].grad for i in grad_positions]
    except Exception as exc:
        return [dict(base, tensor="(all)", rel_error=None, max_abs_error=None, ok=False, error=first_line(exc))]
    finally:
        if old_poison is None:
            os.environ.pop("MEGATRAIN_KERNELS_POISON", None)
        else:
            os.environ["MEGATRAIN_KERNELS_POISON"] = old_poison
        for t in case.grad_inputs:
            t.grad = None

    previous_precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        ref_outputs = _as_tuple(case.reference(*ref_inputs))
        ref_grads = None if case.grad_outputs is None else tuple(g.float() for g in case.grad_outputs)
        if backward:
            _backward(ref_outputs, ref_grads)
    finally:
        torch.set_float32_matmul_precision(previous_precision)
    want = [o.detach() for o in ref_outputs] + [ref_inputs[i].grad for i in grad_positions]
    names = list(case.output_names) + ["d" + case.input_names[i] for i in grad_positions]
    for name, a, b in zip(names, got, want):
        if a is None or b is None:
            rows.append(dict(base, tensor=name, rel_error=None, max_abs_error=None, ok=False, error="gradient missing"))
            continue
        if a.shape != b.shape:
            rows.append(
                dict(
                    base,
                    tensor=name,
                    rel_error=None,
                    max_abs_error=None,
                    ok=False,
                    error=f"shape {tuple(a.shape)} != reference {tuple(b.shape)}",
                )
            )
            continue
        err = rel_error(a, b)
        rows.append(dict(base, tensor=name, rel_error=err, max_abs_error=max_abs_error(a, b), ok=err <= rtol))
    return rows


def _timed(fn: Callable, grad_to_none: Optional[list], warmup_ms: int, rep_ms: int) -> tuple[float, float, float]:
    from triton.testing import do_bench

    median, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])
    return median, p20, p80


def _peak_bytes(fn: Callable, grad_inputs: list) -> int:
    """Peak allocated memory of one call of `fn` above what was allocated before it."""
    for t in grad_inputs:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    for t in grad_inputs:
        t.grad = None
    return peak


def _runner(case: Case, impl: Callable, mode: str) -> Callable:
    if mode in ("fwd", "step"):  # an optimizer step runs under no_grad too

        def run():
            with torch.no_grad():
                impl(*case.inputs)
    else:

        def run():
            _backward(_as_tuple(impl(*case.inputs)), case.grad_outputs)

    return run


def _free_memory() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def time_case(case: Case, ceilings: dict, args, log: Callable) -> list[dict]:
    """One row per (mode, impl) with the median time and what it achieves against the ceilings."""
    rows = []
    for mode in case.modes:
        cost = op_cost(case.op, case.shape, mode)
        mode_rows = []
        for name, impl in case.impls.items():
            row = dict(op=case.op, shape=case.label, shape_params=case.shape, mode=mode, impl=name)
            run = _runner(case, impl, mode)
            try:
                row["median_ms"], row["p20_ms"], row["p80_ms"] = _timed(
                    run, case.grad_inputs if mode == "fwd+bwd" else None, args.warmup, args.rep
                )
                if case.op in FLOP_OPS:
                    row["flops"] = cost
                    row["tflops"] = tflop_per_s(cost, row["median_ms"])
                    row["matmul_fraction"] = row["tflops"] / ceilings["matmul_tflops"]
                    if mode == "fwd+bwd":
                        row["peak_mem_bytes"] = _peak_bytes(run, case.grad_inputs)
                else:
                    row["bytes"] = cost
                    row["gbps"] = gb_per_s(cost, row["median_ms"])
                    row["copy_fraction"] = row["gbps"] / ceilings["copy_gbps"]
                log(f"{case.op:8s} {case.label:28s} {mode:7s} {name:18s} {row['median_ms']:9.3f} ms")
            except Exception as exc:  # one failing implementation (OOM, compile error) must not end the run
                row["error"] = first_line(exc)
                log(f"{case.op:8s} {case.label:28s} {mode:7s} {name:18s} error: {row['error']}")
                for t in case.grad_inputs:
                    t.grad = None
                _free_memory()
            mode_rows.append(row)
        baseline = COMPILE if case.op in MEMORY_BOUND_OPS else EAGER
        key = "speed_vs_compile" if case.op in MEMORY_BOUND_OPS else "speed_vs_unfused"
        base = next((r for r in mode_rows if r["impl"] == baseline), {})
        for r in mode_rows:
            if base.get("median_ms") and r.get("median_ms"):
                r[key] = base["median_ms"] / r["median_ms"]
            if base.get("peak_mem_bytes") and r.get("peak_mem_bytes") is not None:
                r["mem_vs_unfused"] = r["peak_mem_bytes"] / base["peak_mem_bytes"]
        rows += mode_rows
    return rows


def targets_for(op: str, rows: list[dict], ceilings: dict, noise: float) -> list[Target]:
    """Judge the targets of one op at every shape and mode from its timing rows."""

    def find(shape, mode, impl, key):
        return next((r.get(key) for r in rows if (r["shape"], r["mode"], r["impl"]) == (shape, mode, impl)), None)

    targets = []
    shapes = {r["shape"]: r["shape_params"] for r in rows}  # label -> parameters, in sweep order
    for shape, params in shapes.items():
        for mode in MODES:
            if op in MEMORY_BOUND_OPS:
                targets += judge_memory_bound(
                    op,
                    shape,
                    mode,
                    find(shape, mode, TRITON, "median_ms"),
                    find(shape, mode, COMPILE, "median_ms"),
                    op_cost(op, params, mode),
                    ceilings["copy_gbps"],
                    noise,
                )
            elif op == "lowrank":
                targets += judge_lowrank(
                    shape, mode, find(shape, mode, TRITON, "median_ms"), find(shape, mode, EAGER, "median_ms")
                )
            elif op == "iha":
                targets += judge_iha(
                    shape,
                    mode,
                    params["pseudo"],
                    find(shape, mode, TRITON, "median_ms"),
                    find(shape, mode, EAGER, "median_ms"),
                    find(shape, mode, IHA_SDPA, "median_ms"),
                    find(shape, mode, TRITON, "peak_mem_bytes"),
                    find(shape, mode, EAGER, "peak_mem_bytes"),
                    find(shape, mode, IHA_FLEX, "median_ms"),
                    params.get("mask", "causal") == "causal" and params.get("window") is None,
                    noise,
                )
            elif op == "flce":
                targets += judge_flce(
                    shape,
                    mode,
                    find(shape, mode, TRITON, "median_ms"),
                    find(shape, mode, EAGER, "median_ms"),
                    find(shape, mode, TRITON, "peak_mem_bytes"),
                    find(shape, mode, EAGER, "peak_mem_bytes"),
                )
    return targets


def _event_median_ms(fn: Callable, iters: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def measure_ceilings(copy_numel: int = 2**29, n: int = 8192) -> dict:
    """The device's copy bandwidth and bf16 matmul rate, measured (datasheet figures are only leads).

    Defaults: a 1 GiB bf16 copy, far past any L2, and an n^3 product of random bf16 matrices.
    """
    src = torch.randn(copy_numel, device=DEVICE, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_bytes = 2 * src.numel() * src.element_size()
    copy_ms = _event_median_ms(lambda: dst.copy_(src))
    src = dst = None  # freed before the matmul operands exist
    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    mm_ms = _event_median_ms(lambda: torch.mm(a, b))
    a = b = None
    _free_memory()
    return dict(
        copy_gbps=gb_per_s(copy_bytes, copy_ms),
        copy_ms=copy_ms,
        copy_bytes=copy_bytes,
        matmul_tflops=tflop_per_s(2 * n**3, mm_ms),
        matmul_ms=mm_ms,
        matmul_n=n,
    )


def adam_param_shapes(preset: str, vocab: int) -> list[tuple]:
    """Parameter shapes of megatrain's model at `preset`, built on the meta device (no memory)."""
    from megatrain.models.config import ModelConfig
    from megatrain.models.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(ModelConfig(preset=preset, vocab_size=vocab))
    return [tuple(p.shape) for p in model.parameters()]


def bench_adam(shape: dict, ceilings: dict, backends: dict, args, log: Callable) -> list[dict]:
    """One AdamW step over fp32 parameters and gradients of a 1.3B-parameter model, per implementation."""
    shapes = adam_param_shapes(shape["preset"], shape["vocab"])
    params = [torch.nn.Parameter(torch.randn(s, device=DEVICE) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    num_params = sum(p.numel() for p in params)
    nbytes = adam_bytes(num_params)
    label = shape_label("adam", shape) + f" {num_params / 1e9:.2f}B params"
    makers = {
        "torch-adamw-foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.1, foreach=True),
        "torch-adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.1, fused=True),
    }
    if backends["apex_adam"] is not None:
        makers["apex-fusedadam"] = lambda ps: backends["apex_adam"](ps, lr=1e-4, weight_decay=0.1, adam_w_mode=True)
    rows = []
    for name, make in makers.items():
        row = dict(
            op="adam", shape=label, shape_params=dict(shape, params=num_params), mode="step", impl=name, bytes=nbytes
        )
        optimizer = None
        try:
            optimizer = make(params)
            optimizer.step()  # the first step allocates exp_avg and exp_avg_sq; steady state is what counts
            row["median_ms"], row["p20_ms"], row["p80_ms"] = _timed(optimizer.step, None, args.warmup, args.rep)
            row["gbps"] = gb_per_s(nbytes, row["median_ms"])
            row["copy_fraction"] = row["gbps"] / ceilings["copy_gbps"]
            log(f"adam     {label:28s} step    {name:18s} {row['median_ms']:9.3f} ms")
        except Exception as exc:
            row["error"] = first_line(exc)
            log(f"adam     {label:28s} step    {name:18s} error: {row['error']}")
        del optimizer
        _free_memory()
        rows.append(row)
    del params
    _free_memory()
    return rows


def environment(backends: dict) -> dict:
    import triton

    props = torch.cuda.get_device_properties(0)
    try:
        commit = (
            subprocess.run(
                ["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    return dict(
        device=torch.cuda.get_device_name(0),
        arch=f"sm_{props.major}{props.minor}",
        multiprocessors=props.multi_processor_count,
        memory_gib=round(props.total_memory / 2**30, 1),
        torch=torch.__version__,
        triton=triton.__version__,
        cuda=torch.version.cuda,
        python=platform.python_version(),
        liger=backends["liger_status"],
        apex=backends["apex_status"],
        git_commit=commit,
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    )


# Compute capability of GPUs by name, for result files written before `environment` recorded "arch".
_ARCH_BY_NAME = (
    ("GH200", "sm_90"),
    ("H100", "sm_90"),
    ("H200", "sm_90"),
    ("B200", "sm_100"),
    ("A100", "sm_80"),
    ("A10G", "sm_86"),
    ("L40S", "sm_89"),
    ("L4", "sm_89"),
)


def auto_table(report: dict, source: str) -> str:
    """kernels/measured.py TABLE rows (Python source) from a results report: for every op, shape and mode
    with a megatrain-triton median, "triton" when it is <= the torch path's median (TORCH_PATH, or
    torch-eager for TORCH_IS_REFERENCE ops), else "torch". A shape whose torch path was not timed (an
    old file: flce, lowrank, sparse_lowrank and iha without a megatrain-torch row) gets a comment, no row."""
    from megatrain.kernels import measured

    env = report["environment"]
    arch = env.get("arch") or next((a for name, a in _ARCH_BY_NAME if name in env["device"]), None)
    if arch is None:
        raise ValueError(f"auto_table: no compute capability for {env['device']!r} (the file has no 'arch')")
    lines = [
        f"    # {env['device']} ({arch}), {env.get('date')}, commit {env.get('git_commit')}, "
        f"triton {env.get('triton')}: {source}"
    ]
    medians = {(r["op"], r["shape"], r["mode"], r["impl"]): r.get("median_ms") for r in report["results"]}
    for r in report["results"]:
        if r["impl"] != TRITON or r["op"] not in KERNEL_OPS:
            continue
        op, label, mode = r["op"], r["shape"], r["mode"]
        torch_impl = (
            TORCH_PATH if (op, label, mode, TORCH_PATH) in medians else (EAGER if op in TORCH_IS_REFERENCE else None)
        )
        torch_ms = medians.get((op, label, mode, torch_impl))
        if r.get("median_ms") is None or torch_ms is None:
            why = (
                "no megatrain-torch row (the torch path was not timed)"
                if torch_impl is None
                else "no median for " + (TRITON if r.get("median_ms") is None else torch_impl)
            )
            lines.append(f"    # {op} {label} {mode}: {why}: unmeasured")
            continue
        kernel_op = KERNEL_OPS[op]
        cls = measured.shape_class(kernel_op, [r["shape_params"][name] for name, _ in measured.CLASS_DIMS[kernel_op]])
        choice = "TRITON" if r["median_ms"] <= torch_ms else "TORCH"
        extra = "" if torch_impl == EAGER else f', "{torch_impl}"'
        lines.append(
            f'    Row("{kernel_op}", "{arch}", "{cls}", "{mode}", {choice}, {r["median_ms"]:.3f}, '
            f'{torch_ms:.3f}, "{label}", "{source}"{extra}),'
        )
    return "\n".join(lines) + "\n"


def _ops_argument(text: str) -> list[str]:
    try:
        return parse_ops(text)
    except ValueError as exc:  # argparse shows an ArgumentTypeError's own message
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--ops: ")) from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", type=_ops_argument, default=list(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--quick", action="store_true", help="one shape per op")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"), help="results folder")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up time per measurement (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench measuring time per measurement (ms)")
    p.add_argument("--rtol", type=float, default=1e-2, help="correctness tolerance, relative L2 error")
    p.add_argument("--noise", type=float, default=0.02, help="relative slack of the not-slower-than-compile target")
    p.add_argument("--strict", action="store_true", help="also exit 1 when a performance target FAILs")
    p.add_argument(
        "--auto-table",
        metavar="RESULTS.json",
        help="print kernels/measured.py rows from a results file and exit (no GPU needed)",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.auto_table:
        with open(args.auto_table) as fh:
            report = json.load(fh)
        source = os.path.relpath(os.path.abspath(args.auto_table), REPO)
        print(auto_table(report, source), end="")
        return 0
    if not torch.cuda.is_available():
        print(
            "benchmarks/kernels.py: no CUDA GPU here; kernel timings need a GPU "
            "(run benchmarks/gpu_suite.sh on the GPU machine)",
            file=sys.stderr,
        )
        return 2
    # The public API dispatches on this at every call; reference and torch.compile rows call their
    # functions directly, so only the megatrain-triton rows see it.
    os.environ["MEGATRAIN_KERNELS"] = "triton"
    from torch import _dynamo as dynamo

    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)

    backends = _optional_backends()
    env = environment(backends)
    log(
        f"{env['device']}: torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; "
        f"liger {env['liger']}; apex {env['apex']}"
    )
    ceilings = measure_ceilings()
    log(f"ceilings: copy {ceilings['copy_gbps']:.0f} GB/s, bf16 matmul {ceilings['matmul_tflops']:.0f} TFLOP/s")

    kernel_ops = [op for op in args.ops if op != "adam"]
    correctness = []
    for op in kernel_ops:
        for shape in sweep(op, args.quick):
            torch.manual_seed(0)
            try:
                case = build_case(op, shape, backends)
                checked = check_case(case, args.rtol)
            except Exception as exc:
                checked = [
                    dict(
                        op=op,
                        shape=shape_label(op, shape),
                        tensor="(all)",
                        rel_error=None,
                        max_abs_error=None,
                        ok=False,
                        error=first_line(exc),
                    )
                ]
            case = None
            _free_memory()
            correctness += checked
            worst = max((c["rel_error"] for c in checked if c["rel_error"] is not None), default=None)
            log(
                f"check {op:8s} {shape_label(op, shape):28s} "
                f"{'ok' if all(c['ok'] for c in checked) else 'FAILED'} (worst rel. error {fmt(worst, '.2e')})"
            )

    results, targets = [], []
    skipped = {}
    for op in args.ops:
        if op == "adam":
            for shape in sweep(op, args.quick):
                results += bench_adam(shape, ceilings, backends, args, log)
            if backends["apex_adam"] is None:
                skipped["adam"] = {"apex-fusedadam": "apex not importable"}
            continue
        op_rows = []
        for shape in sweep(op, args.quick):
            torch.manual_seed(0)
            dynamo.reset()  # every shape compiles afresh instead of filling one cache up to its limit
            try:
                case = with_torch_path(build_case(op, shape, backends))
                op_rows += time_case(case, ceilings, args, log)
            except Exception as exc:
                op_rows.append(
                    dict(
                        op=op,
                        shape=shape_label(op, shape),
                        shape_params=shape,
                        mode="fwd",
                        impl=TRITON,
                        error=first_line(exc),
                    )
                )
                log(f"{op} {shape_label(op, shape)}: could not be set up: {first_line(exc)}")
            case = None
            _free_memory()
        results += op_rows
        targets += targets_for(op, op_rows, ceilings, args.noise)
        missing = {}
        if backends["liger"] is None and op != "iha":  # Liger-Kernel has no interleaved head attention
            missing["liger"] = backends["liger_status"]
        if op == "rms_norm" and backends["apex_rms_norm"] is None:
            missing["apex"] = backends["apex_status"]
        if op == "projected_adam":  # Liger-Kernel has no optimizer step; galore_torch may be absent
            missing.pop("liger", None)
            try:
                import galore_torch  # noqa: F401
            except Exception as exc:
                missing[GALORE_TORCH] = f"not importable ({first_line(exc)})"
        if missing:
            skipped[op] = missing

    # What to type to repeat this run from the repository root.
    command = "python " + shlex.join(["benchmarks/kernels.py"] + (sys.argv[1:] if argv is None else list(argv)))
    report = dict(
        environment=env,
        command=command,
        quick=args.quick,
        ops=args.ops,
        rtol=args.rtol,
        noise=args.noise,
        ceilings=ceilings,
        correctness=correctness,
        results=results,
        targets=[dict(dataclasses.asdict(t), verdict=t.verdict) for t in targets],
        skipped=skipped,
        elapsed_s=round(time.perf_counter() - started, 1),
    )
    markdown = render_markdown(report)
    print()
    print(markdown)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"kernels-{slug(env['device'])}" + ("-quick" if args.quick else ""))
    with open(stem + ".json", "w") as fh:
        json.dump(report, fh, indent=1, default=str)
    with open(stem + ".md", "w") as fh:
        fh.write(markdown)
    log(f"wrote {stem}.json and {stem}.md")

    broken = [c for c in correctness if not c["ok"]]
    triton_errors = [r for r in results if r["impl"] == TRITON and r.get("error")]
    failed_targets = [t for t in targets if t.ok is False]
    if broken or triton_errors:
        print(
            f"FAILED: {len(broken)} correctness check(s), {len(triton_errors)} Triton timing error(s)", file=sys.stderr
        )
        return 1
    if args.strict and failed_targets:
        print(f"FAILED: {len(failed_targets)} performance target(s) (--strict)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
