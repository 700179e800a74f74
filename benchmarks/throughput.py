"""Trainer throughput against HF+DeepSpeed and plain PyTorch: the old flags of this script, run by `megatrain bench`.

    python benchmarks/throughput.py --preset small-cpu --seq-len 256 --micro-batch 8 --steps 20

    python benchmarks/throughput.py --preset small-cpu --tp 1,2,4 --steps 10

The flags become a `megatrain bench` run over the embedded corpus (megatrain.bench does the work;
docs/benchmarks.md describes the report): one setting, or with `--tp 1,2,4` one setting per TP size
(T processes, TP=T x DP=1, the same global batch) with the computed TP communication per rank.
`--profile STEPS` writes torch.profiler op tables next to the results. Results go to
benchmarks/results/throughput-cpu.* (TP mode: throughput-tp-cpu.*; -gpu on a GPU) unless --tag.
"""

from __future__ import annotations

import argparse
import os
import sys

# Run as a script, this folder comes first on sys.path, and its kernels.py would then answer the
# `import kernels` that transformers makes (Hugging Face's package). megatrain is imported installed.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

from megatrain.errors import MegatrainError  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small-cpu")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--zero-stage", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=4096, help="tokenizer vocabulary trained on the corpus")
    p.add_argument("--steps", type=int, default=20, help="measured steps per side")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured steps per side first")
    p.add_argument("--block", type=int, default=5, help="steps per alternating measurement block")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--tag", default=None, help="results file name stem (default: throughput[-tp]-<device>)")
    p.add_argument("--tp", default=None, help="comma-separated TP sizes to compare (e.g. 1,2,4): TP mode")
    p.add_argument("--sequence-parallel", action="store_true", help="TP mode: with sequence parallelism")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="after timing, profile STEPS steps of each side with torch.profiler and write the "
        "op tables (self device time) next to the results",
    )
    p.add_argument("--plot", action="store_true", help="also draw tokens/s and memory per setting")
    p.add_argument("--no-baseline", action="store_true", help="leave out the HF LlamaForCausalLM + DeepSpeed side")
    return p.parse_args(argv)


def bench_overrides(args) -> list[str]:
    return [
        f"model.preset={args.preset}",
        f"model.max_seq_len={max(args.seq_len, 512)}",
        "data.source=embedded",
        f"data.seq_len={args.seq_len}",
        f"data.vocab_size={args.vocab_size}",
        f"train.micro_batch={args.micro_batch}",
        f"train.grad_accum={args.grad_accum}",
        "train.warmup_steps=10",
        f"parallel.zero_stage={args.zero_stage}",
        f"train.activation_checkpointing={str(args.activation_checkpointing).lower()}",
    ]


def bench_settings(args) -> list[str]:
    if not args.tp:
        return []
    try:
        sizes = [int(x) for x in args.tp.split(",")]
    except ValueError:
        raise MegatrainError(f"--tp {args.tp}: give comma-separated integers such as 1,2,4") from None
    return [f"tp={t}" + (",sp=1" if args.sequence_parallel and t > 1 else "") for t in sizes]


def main(argv=None) -> int:
    import torch

    from megatrain.bench import parse_settings, run_bench

    args = parse_args(argv)
    os.environ.setdefault("MEGATRAIN_CACHE", os.path.expanduser("~/.cache/megatrain"))
    device = "gpu" if torch.cuda.is_available() else "cpu"
    stem = args.tag or (f"throughput-tp-{device}" if args.tp else f"throughput-{device}")
    try:
        run_bench(
            None,
            bench_overrides(args),
            parse_settings(bench_settings(args)),
            out_dir=args.out,
            stem=stem,
            warmup=args.warmup,
            steps=args.steps,
            block=args.block,
            profile_steps=args.profile,
            baseline=not args.no_baseline,
            plot=args.plot,
            command="python benchmarks/throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
        )
    except MegatrainError as exc:
        print(f"megatrain: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
