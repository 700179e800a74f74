"""ATen ops the host dispatches per decode step of `megatrain.generate`: eager, and with the step as a CUDA graph.

    python benchmarks/decode_ops.py                         # tiny preset, MHA/GQA/IHA, batch 1 and 4
    python benchmarks/decode_ops.py --preset small-cpu --batch 1,8

A count, not a clock, so it is exact on any machine and needs no GPU. For each attention kind and
batch size, `generate` decodes B random prompts of --prompt-len tokens greedily (no EOS) twice, for
--short and for --short + --steps new tokens, under a TorchDispatchMode that counts every ATen op;
the difference divided by --steps is the cost of one decode step (prefill and set-up cancel).

Columns (ops per decode step; at batch 1 that is per generated token):
- dynamic fwd: one decode forward on a growing KVCache (KVCache(capacity=...), the cache generate
  decoded with before the static cache): the forward alone, for comparison.
- static fwd: the decode forward on generate's static cache (what a CUDA graph captures).
- eager step: everything generate dispatches per step on CPU (forward, sampling, stop checks,
  next inputs, the slot index).
- graph step: what the host still dispatches per step when the forward is a CUDA graph replay,
  counted with the replay as one op: the step run as on CUDA (all static slots attended, inputs
  copied into the graph's tensors) with a stand-in capture (tests/generate_checks.py's
  `emulated_graphs`, inlined here) whose replay reruns the forward uncounted.
Writes benchmarks/results/decode-ops.{md,json} (or --out).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Run as a script, this folder comes first on sys.path, and its kernels.py would then answer the
# `import kernels` that transformers makes (Hugging Face's package). megatrain is imported installed.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

import megatrain.generate as gen  # noqa: E402
from megatrain.bench.report import cpu_name, write_table  # noqa: E402
from megatrain.models.attention import KVCache  # noqa: E402
from megatrain.models.config import IHAConfig, ModelConfig  # noqa: E402
from megatrain.models.transformer import Transformer  # noqa: E402

KINDS = {
    "MHA": lambda heads: dict(kv_heads=heads),
    "GQA": lambda heads: dict(kv_heads=max(1, heads // 2)),
    "IHA P=2": lambda heads: dict(attention="iha", iha=IHAConfig(pseudo_heads=2)),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--batch", default="1,4", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument(
        "--short",
        type=int,
        default=4,
        help="new tokens of the shorter call (>= 2: both calls then capture their graph)",
    )
    p.add_argument("--steps", type=int, default=16, help="extra decode steps of the longer call")
    p.add_argument("--out", default=None, help="output prefix (default benchmarks/results/decode-ops)")
    args = p.parse_args(argv)
    if args.short < 2 or args.steps < 1:
        p.error("--short must be >= 2 and --steps >= 1")
    return args


class OpCounter(TorchDispatchMode):
    """Counts ATen ops: `total`, and `forward` (those inside generate's decode forward, `_DecodeStep.forward`)."""

    def __init__(self):
        super().__init__()
        self.total = self.forward = self.depth = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.total += 1
        self.forward += self.depth > 0
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counted_forward(counter: OpCounter):
    original = gen._DecodeStep.forward

    def forward(step, ids, positions):
        counter.depth += 1
        try:
            return original(step, ids, positions)
        finally:
            counter.depth -= 1

    gen._DecodeStep.forward = forward
    try:
        yield
    finally:
        gen._DecodeStep.forward = original


@contextlib.contextmanager
def graph_stand_in():
    """generate's CUDA-graph path on CPU; the replay is one counted op (a copy of the logits), its
    forward is not counted (a real replay dispatches nothing)."""

    def capture(step, ids, positions):
        static_ids, static_positions = ids.clone(), positions.clone()
        logits = step.forward(static_ids, static_positions)

        def replay():
            with torch.utils._python_dispatch._disable_current_modes():
                fresh = step.forward(static_ids, static_positions)
            logits.copy_(fresh)  # the one op that stands for the graph launch

        return gen._Graph(replay, static_ids, static_positions, logits)

    saved = gen._use_graphs, gen._capture
    gen._use_graphs, gen._capture = (lambda setting, model, device: True), capture
    try:
        yield
    finally:
        gen._use_graphs, gen._capture = saved


def per_step(run, steps: int) -> tuple[float, float]:
    """(ops, forward ops) per decode step: run(n) for n = short and short + steps, differenced."""
    counts = []
    for n in (0, steps):
        counter = OpCounter()
        with counted_forward(counter), counter:
            run(n)
        counts.append((counter.total, counter.forward))
    (t0, f0), (t1, f1) = counts
    return (t1 - t0) / steps, (f1 - f0) / steps


@torch.no_grad()
def dynamic_forward_ops(model, prompts, steps: int) -> float:
    """Ops of one decode forward on a growing KVCache(capacity=...)."""
    batch, width = prompts.shape
    cache = KVCache(model.config.layers, capacity=width + steps)
    model(prompts, cache=cache, positions=torch.arange(width)[None].expand(batch, -1))
    token = torch.zeros(batch, 1, dtype=torch.long)
    counter = OpCounter()
    with counter:
        for t in range(steps):
            model(token, cache=cache, positions=torch.full((batch, 1), width + t))
    return counter.total / steps


def measure(args) -> list[dict]:
    rows = []
    heads = ModelConfig(preset=args.preset).resolved().heads
    generator = torch.Generator().manual_seed(0)
    for kind, extra in KINDS.items():
        cfg = ModelConfig(
            preset=args.preset,
            vocab_size=args.vocab,
            max_seq_len=args.prompt_len + args.short + args.steps + 8,
            **extra(heads),
        )
        torch.manual_seed(0)
        model = Transformer(cfg).eval()
        for batch in [int(b) for b in args.batch.split(",")]:
            prompts = torch.randint(0, args.vocab, (batch, args.prompt_len), generator=generator)
            ids = prompts.tolist()

            def run(n, ids=ids):
                gen.generate(model, ids, max_new_tokens=args.short + n)

            eager, static_forward = per_step(run, args.steps)
            with graph_stand_in():
                graph, _ = per_step(run, args.steps)
            rows.append(
                {
                    "attention": kind,
                    "batch": batch,
                    "dynamic_forward": dynamic_forward_ops(model, prompts, 8),
                    "static_forward": static_forward,
                    "eager_step": eager,
                    "graph_step": graph,
                }
            )
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = measure(args)
    meta = {
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "preset": args.preset,
        "vocab": args.vocab,
        "prompt_len": args.prompt_len,
        "steps": args.steps,
        "kernels": os.environ.get("MEGATRAIN_KERNELS", "auto"),
    }
    lines = [
        f"# megatrain.generate: ATen ops per decode step ({args.preset} preset, fp32, CPU)",
        "",
        "| attention | batch | dynamic fwd | static fwd | eager step | graph step |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['attention']} | {r['batch']} | {r['dynamic_forward']:.0f} | {r['static_forward']:.0f} | "
            f"{r['eager_step']:.0f} | {r['graph_step']:.0f} |"
        )
    lines += [
        "",
        "graph step: the host's ops per step with the decode forward replayed as one CUDA graph "
        "(counted as 1). python benchmarks/decode_ops.py; see its docstring.",
        "",
    ]
    table = "\n".join(lines)
    print(table)
    prefix = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "decode-ops")
    write_table(prefix, table, {"meta": meta, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
