"""IHA vs MHA on CPU: forward+backward time against FLOPs, through the torch path.

    python benchmarks/iha_cpu_cost.py                        # dim 256, 4 layers, seq 256, batch 8
    python benchmarks/iha_cpu_cost.py --warmup 2 --repeats 5 # a quick look

Builds two models from the same seed: MHA (dim 256, 4 layers, 8 heads, kv_heads 8) and the same
model with model.attention=iha and the default IHA settings (P=2, causal over the virtual tokens,
RoPE at n*P + p, per-head collapse, full attention in every layer). Both run with
MEGATRAIN_KERNELS=torch, so IHA goes through kernels.reference.iha_attention (the CPU path).

FLOPs: `Transformer.flops_per_token(seq_len)` (the trainer's MFU accounting: 6 x non-embedding
parameters, the PaLM attention term 12*L*H*d*T, and for IHA the mixing, collapse and P^2 attention)
times the tokens of a step. Time: process CPU time (time.process_time) with torch.set_num_threads(1),
the clock of `megatrain bench --clock cpu` (docs/benchmarks.md), so other jobs on a shared machine
do not count. Steps alternate MHA / IHA (warm-up steps first, not counted); the ratio uses the
medians. The table gives the time ratio, the FLOP ratio and their quotient: 1.00 means IHA costs
exactly what its FLOPs imply. A third row is the floor of the torch path: MHA's step plus, per layer,
causal SDPA (forward+backward, same B, H, d, timed in the same loop) over the N*P virtual tokens minus
over N tokens, i.e. IHA with free mixing, rotary and collapse.
Writes benchmarks/results/iha-cpu-cost.{md,json} (or --out).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

# Run as a script, this folder comes first on sys.path, and its kernels.py would then answer the
# `import kernels` that transformers makes (Hugging Face's package). megatrain is imported installed.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

from megatrain.bench.report import cpu_name, write_table  # noqa: E402
from megatrain.models.config import IHAConfig, ModelConfig  # noqa: E402
from megatrain.models.transformer import Transformer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--pseudo-heads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=10, help="warm-up steps per model (not timed)")
    p.add_argument("--repeats", type=int, default=30, help="timed steps per model, alternating MHA / IHA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output prefix (default benchmarks/results/iha-cpu-cost)")
    return p.parse_args(argv)


def model_configs(args) -> dict[str, ModelConfig]:
    base = dict(
        preset=None,
        dim=args.dim,
        layers=args.layers,
        heads=args.heads,
        kv_heads=args.heads,
        vocab_size=args.vocab,
        max_seq_len=args.seq_len,
    )
    return {
        "MHA": ModelConfig(**base),
        f"IHA P={args.pseudo_heads}": ModelConfig(
            **base, attention="iha", iha=IHAConfig(pseudo_heads=args.pseudo_heads)
        ),
    }


def step_seconds(model: Transformer, ids: torch.Tensor, labels: torch.Tensor) -> float:
    """Process CPU seconds of one forward + backward (loss on every token)."""
    start = time.process_time()
    loss = model(ids, labels=labels)
    loss.backward()
    elapsed = time.process_time() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def sdpa_seconds(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor) -> float:
    """Process CPU seconds of one causal SDPA forward + backward."""
    start = time.process_time()
    torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)
    elapsed = time.process_time() - start
    q.grad = k.grad = v.grad = None
    return elapsed


def sdpa_inputs(args, length: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """q, k, v [B, H, length, d] (requires_grad) and an output gradient, in the layout the models use."""
    shape = (args.batch, length, args.heads, args.dim // args.heads)
    qkv = [torch.randn(shape, generator=gen).transpose(1, 2).requires_grad_() for _ in range(3)]
    return (*qkv, torch.randn(shape, generator=gen).transpose(1, 2))


def measure(args) -> list[dict]:
    torch.set_num_threads(1)
    models = {name: Transformer(cfg, seed=args.seed) for name, cfg in model_configs(args).items()}
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=gen)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    # The attention alone at N (MHA) and N*P (IHA): the floor IHA's torch path can reach is MHA's
    # step plus, per layer, what SDPA over N*P virtual tokens costs beyond SDPA over N tokens.
    sdpa = {length: sdpa_inputs(args, length, gen) for length in (args.seq_len, args.seq_len * args.pseudo_heads)}
    times: dict = {name: [] for name in models} | {length: [] for length in sdpa}
    for i in range(args.warmup + args.repeats):
        for name, model in models.items():  # alternating, so drifts of the machine hit all alike
            t = step_seconds(model, inputs, labels)
            if i >= args.warmup:
                times[name].append(t)
        for length, tensors in sdpa.items():
            t = sdpa_seconds(*tensors)
            if i >= args.warmup:
                times[length].append(t)
    tokens = args.batch * args.seq_len
    rows = []
    for name, model in models.items():
        flops = model.flops_per_token(args.seq_len) * tokens
        med = statistics.median(times[name])
        rows.append(
            {
                "model": name,
                "params_non_embedding": model.num_params(non_embedding=True),
                "flops_per_step": flops,
                "median_s": med,
                "min_s": min(times[name]),
                "times_s": times[name],
                "gflop_per_s": flops / med / 1e9,
            }
        )
    mha, iha = rows
    sdpa_n, sdpa_np = (statistics.median(times[length]) for length in sdpa)
    floor = mha["median_s"] + args.layers * (sdpa_np - sdpa_n)
    rows.append(
        {
            "model": f"floor: MHA + {args.layers} x (SDPA at N*P - SDPA at N)",
            "flops_per_step": iha["flops_per_step"],
            "median_s": floor,
            "gflop_per_s": iha["flops_per_step"] / floor / 1e9,
            "sdpa_n_s": sdpa_n,
            "sdpa_np_s": sdpa_np,
            "times_sdpa_n_s": times[args.seq_len],
            "times_sdpa_np_s": times[args.seq_len * args.pseudo_heads],
        }
    )
    for row in rows:
        row["time_ratio"] = row["median_s"] / mha["median_s"]
        row["flop_ratio"] = row["flops_per_step"] / mha["flops_per_step"]
        row["cost_ratio"] = row["time_ratio"] / row["flop_ratio"]
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"`{meta['command']}` on {meta['cpu']}, torch {meta['torch']}, 1 thread, process CPU time; "
        f"dim {meta['dim']}, {meta['layers']} layers, {meta['heads']} heads, seq {meta['seq_len']}, "
        f"batch {meta['batch']}, {meta['repeats']} timed steps each (after {meta['warmup']} warm-up), "
        f"MEGATRAIN_KERNELS=torch.",
        "",
        "| model | GFLOP / step (fwd+bwd) | median s / step | GFLOP/s | time ratio | FLOP ratio | time / FLOP ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['flops_per_step'] / 1e9:.1f} | {r['median_s']:.3f} | "
            f"{r['gflop_per_s']:.1f} | {r['time_ratio']:.2f}x | {r['flop_ratio']:.2f}x | "
            f"{r['cost_ratio']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["MEGATRAIN_KERNELS"] = "torch"  # IHA through kernels.reference.iha_attention, the CPU path
    rows = measure(args)
    meta = {
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": "python benchmarks/iha_cpu_cost.py" + "".join(f" {a}" for a in (argv or sys.argv[1:])),
        "clock": "process CPU time, 1 torch thread",
        "kernels": "torch",
        **{
            k: getattr(args, k)
            for k in (
                "dim",
                "layers",
                "heads",
                "seq_len",
                "batch",
                "vocab",
                "pseudo_heads",
                "warmup",
                "repeats",
                "seed",
            )
        },
    }
    table = markdown(rows, meta)
    print(table)
    prefix = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "iha-cpu-cost")
    write_table(prefix, table, {"meta": meta, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
