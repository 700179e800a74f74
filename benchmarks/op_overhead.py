"""Host time per call of each kernel op: torch's custom-op dispatcher against megatrain's eager fast path.

    python benchmarks/op_overhead.py                  # every forward op, 3000 calls per measurement
    python benchmarks/op_overhead.py --calls 500      # a quick look

What a host-bound training step pays per kernel call on the CPU side, separated from the kernel: each
op's implementation is replaced by its fake implementation (it allocates the outputs and launches
nothing), and the call is timed (median of --repeats blocks of --calls calls, time.perf_counter, one
torch thread) two ways on the small sample inputs of tests/kernels/test_custom_ops.py:
- op: `torch.ops.megatrain.<op>(...)`, the dispatcher path (what torch.compile, autocast and the
  meta device use);
- fast: the `KernelOp` the public functions call (kernels/library.py): in eager mode the
  implementation under an autograd.Function, or called directly when no gradient can be needed;
each with inputs that require gradients (the training forward: autograd records a node) and under
torch.no_grad() (evaluation, generation). Needs no GPU: the kernels never run (TRITON_INTERPRET is
set so that the kernel modules import on a CPU).
Writes benchmarks/results/op-overhead-<cpu|gpu>.{md,json} (or --out).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # only for importing the kernel modules: no kernel runs

import torch  # noqa: E402

# Run as a script, this folder comes first on sys.path, and its kernels.py would then answer the
# `import kernels` that transformers makes (Hugging Face's package). megatrain is imported installed.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

from megatrain.bench.report import cpu_name, write_table  # noqa: E402
from megatrain.kernels import activation, cross_entropy, iha, lowrank, norm, rotary, sparse_lowrank  # noqa: E402


def samples() -> dict:
    """(KernelOp, small arguments) per forward op with an autograd formula; leaves require gradients."""
    gen = torch.Generator().manual_seed(0)

    def t(*shape, grad=True, scale=1.0):
        x = torch.randn(*shape, generator=gen) * scale
        return x.requires_grad_(grad)

    angles = t(6, 8, grad=False)
    index = torch.randperm(16 * 12, generator=gen)[:20].sort().values
    x = t(2, 5, 16)
    return {
        "rms_norm": (norm._rms_norm_op, (x, t(16), t(2, 5, 16), 1e-6, True)),
        "rope": (rotary._rope_op, (t(1, 4, 6, 16), t(1, 2, 6, 16), angles.cos(), angles.sin(), False)),
        "swiglu": (activation._swiglu_op, (t(3, 7), t(3, 7))),
        "fused_linear_cross_entropy": (
            cross_entropy._flce_op,
            (t(9, 16), t(40, 16), torch.randint(0, 40, (9,), generator=gen), -100, None, 4, True, True),
        ),
        "lowrank_linear": (lowrank._lowrank_op, (x, t(16, 4), t(4, 12), t(12), True, True)),
        "sparse_lowrank_linear": (sparse_lowrank._sparse_lowrank_op, (x, t(16, 4), t(4, 12), t(20), index, 0.5)),
        "iha_flash_attention": (iha._attention_op, (*[t(1, 2, 2, 5, 16) for _ in range(3)], "causal", None)),
    }


def per_call_us(fn, args, calls: int, repeats: int) -> float:
    for _ in range(min(calls, 200)):
        fn(*args)
    blocks = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn(*args)
        blocks.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(blocks)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=3000, help="calls per timed block")
    p.add_argument("--repeats", type=int, default=5, help="timed blocks per measurement (the median is kept)")
    p.add_argument("--out", default=None, help="output prefix (default benchmarks/results/op-overhead-<cpu|gpu>)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows, record = [], {"rows": []}
    for name, (kernel, inputs) in samples().items():
        stub = kernel.op._abstract_fn  # the fake implementation: the outputs, no kernel
        saved = kernel._fn, kernel.op._backend_fns[None]
        kernel._fn = kernel.op._backend_fns[None] = stub
        try:
            op = getattr(torch.ops.megatrain, name)
            row = {"op": name}
            row["op_grad_us"] = per_call_us(op, inputs, args.calls, args.repeats)
            row["fast_grad_us"] = per_call_us(kernel, inputs, args.calls, args.repeats)
            with torch.no_grad():
                row["op_nograd_us"] = per_call_us(op, inputs, args.calls, args.repeats)
                row["fast_nograd_us"] = per_call_us(kernel, inputs, args.calls, args.repeats)
        finally:
            kernel._fn, kernel.op._backend_fns[None] = saved
        record["rows"].append(row)
        rows.append(
            f"| {name} | {row['op_grad_us']:.1f} | {row['fast_grad_us']:.1f} | "
            f"{row['op_grad_us'] / row['fast_grad_us']:.2f}x | {row['op_nograd_us']:.1f} | "
            f"{row['fast_nograd_us']:.1f} | {row['op_nograd_us'] / row['fast_nograd_us']:.2f}x |"
        )
    where = f"CPU ({cpu_name()})"
    versions = f"torch {torch.__version__}, python {platform.python_version()}, on {where}, one torch thread"
    table = (
        "# Host time per kernel-op call: torch's custom-op dispatcher vs megatrain's eager fast path\n\n"
        f"Microseconds per call, the kernel replaced by the op's fake implementation (outputs allocated, nothing "
        f"launched); median of {args.repeats} blocks of {args.calls} calls. {versions}.\n\n"
        "| op | op, grad (us) | fast, grad (us) | op / fast | op, no_grad (us) | fast, no_grad (us) | op / fast |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        f"Command: `python benchmarks/op_overhead.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n"
    )
    record.update(versions=versions, calls=args.calls, repeats=args.repeats)
    print(table)
    prefix = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "op-overhead-cpu")
    write_table(prefix, table, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
