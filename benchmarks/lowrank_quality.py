"""Validation perplexity of the low-rank pretraining methods after the same token budget.

    python benchmarks/lowrank_quality.py --preset tiny --steps 300

Trains the same model preset once per method through `megatrain pretrain` (one process, same seed,
same data order, same learning-rate schedule and token budget) and reads the final validation loss
from each run's metrics.jsonl. Methods: dense (AdamW), cola, sltrain, relora (model.linear=...),
galore, fira (optim.name=..., dense weights). The low-rank rank and the GaLore/Fira rank are the
same (--rank, default model.dim / 4). Writes a markdown table and JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Run as a script, this folder comes first on sys.path, and its kernels.py would then answer the
# `import kernels` that transformers makes (Hugging Face's package). megatrain is imported installed.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

METHODS = ("dense", "cola", "sltrain", "relora", "galore", "fira")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=512, help="tokenizer vocabulary trained on the corpus")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--rank", type=int, default=None, help="rank of every method (default: model.dim / 4)")
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    p.add_argument("--tag", default=None, help="results file name stem (default: lowrank-quality-<device>)")
    return p.parse_args()


def method_overrides(method: str, steps: int, rank: int) -> list[str]:
    if method == "dense":
        return []
    if method in ("galore", "fira"):
        return [f"optim.name={method}", f"optim.rank={rank}"]
    out = [f"model.linear={method}", f"model.lowrank.rank={rank}"]
    if method == "relora":  # three cycles; re-warm-up 5% of a cycle as in ReLoRA's scripts
        every = max(2, steps // 3)
        out += [f"train.relora.every={every}", f"train.relora.restart_warmup={max(1, every // 20)}"]
    return out


def param_counts(preset: str, vocab: int, method: str, rank: int) -> tuple[int, int]:
    import torch

    from megatrain.models.config import ModelConfig
    from megatrain.models.transformer import Transformer

    cfg = ModelConfig(
        preset=preset, vocab_size=vocab, linear=method if method in ("cola", "sltrain", "relora") else "dense"
    )
    if cfg.linear != "dense":
        cfg.lowrank.rank = rank
    torch.manual_seed(0)
    model = Transformer(cfg)
    total = sum(p.numel() for p in model.parameters())
    return total, sum(p.numel() for p in model.parameters() if p.requires_grad)


def main():
    args = parse_args()
    import torch

    from megatrain.models.config import PRESETS

    dim = PRESETS[args.preset]["dim"]
    rank = args.rank or max(1, dim // 4)
    common = [
        f"model.preset={args.preset}",
        "data.source=embedded",
        f"data.seq_len={args.seq_len}",
        f"data.vocab_size={args.vocab_size}",
        f"train.steps={args.steps}",
        f"train.micro_batch={args.micro_batch}",
        "train.grad_accum=1",
        f"train.lr={args.lr}",
        f"train.warmup_steps={max(1, args.steps // 10)}",
        "train.seed=1234",
        "log.every=10",
        "log.eval_every=0",
        f"log.eval_batches={args.eval_batches}",
        "log.progress=false",
        "log.tensorboard=false",
        "parallel.zero_stage=0",
        "checkpoint.keep=1",
    ]
    tokens = args.steps * args.micro_batch * args.seq_len
    rows = []
    with tempfile.TemporaryDirectory(prefix="lowrank-quality-") as tmp:
        for method in args.methods.split(","):
            overrides = method_overrides(method, args.steps, rank)
            run_dir = os.path.join(tmp, method)
            cmd = [sys.executable, "-m", "megatrain.cli", "pretrain", *common, *overrides, f"run.dir={run_dir}"]
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                print(f"{method}: failed ({tail})", flush=True)
                rows.append({"method": method, "overrides": overrides, "error": tail})
                continue
            with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
                records = [json.loads(line) for line in fh if line.strip()]
            final = records[-1]
            total, trainable = param_counts(args.preset, args.vocab_size, method, rank)
            row = {
                "method": method,
                "overrides": overrides,
                "val_loss": final["val_loss"],
                "val_ppl": final["val_ppl"],
                "train_loss_last10": sum(r["loss"] for r in records[-10:]) / len(records[-10:]),
                "params": total,
                "trainable_params": trainable,
                "wall_s": round(wall, 1),
            }
            rows.append(row)
            print(
                f"{method:8s} val_ppl {row['val_ppl']:8.2f}  val_loss {row['val_loss']:.4f}  ({wall:.0f} s)", flush=True
            )

    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    )
    import deepspeed

    meta = {
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "command": "python " + " ".join(sys.argv),
        "preset": args.preset,
        "steps": args.steps,
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "tokens": tokens,
        "lr": args.lr,
        "rank": rank,
        "vocab_size": args.vocab_size,
        "eval_sequences": args.eval_batches * args.micro_batch,
        "common_overrides": common,
    }
    lines = [
        f"# Low-rank pretraining: validation perplexity after {tokens:,} tokens ({args.preset})",
        "",
        f"Device: {device}; torch {torch.__version__}, deepspeed {deepspeed.__version__}. "
        f"Command: `{meta['command']}`.",
        "",
        f"Same seed, data order, schedule (cosine, {args.lr} peak, 10% warm-up) and token budget for every "
        f"method; rank {rank} for every low-rank method and for GaLore/Fira; validation on the held-out novel "
        f"({meta['eval_sequences']} sequences of {args.seq_len} tokens).",
        "",
        "| method | overrides | params | trainable | val loss | val ppl | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | `{' '.join(r['overrides'])}` | | | failed: {r['error']} | | |")
        else:
            lines.append(
                f"| {r['method']} | `{' '.join(r['overrides']) or '-'}` | {r['params']:,} | "
                f"{r['trainable_params']:,} | {r['val_loss']:.4f} | {r['val_ppl']:.2f} | {r['wall_s']} |"
            )
    table = "\n".join(lines) + "\n"
    print(table)
    tag = args.tag or f"lowrank-quality-{'gpu' if torch.cuda.is_available() else 'cpu'}"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{tag}.md"), "w") as fh:
        fh.write(table)
    with open(os.path.join(args.out, f"{tag}.json"), "w") as fh:
        json.dump({"meta": meta, "results": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
