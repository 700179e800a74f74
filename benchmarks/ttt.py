"""qTTT step cost: one query-only update on a k-token span against one forward + backward over the
whole context, per context length T.

    python benchmarks/ttt.py                          # CPU: T = 512, 1024, 2048, 4096
    python benchmarks/ttt.py --lengths 1024 4096 16384 --preset 125m   # on a GPU

One qTTT step (megatrain.ttt.adapt: the span's forward over the frozen cache of its prefix,
backward to the query weights, AdamW step) is timed as (best time of adapt with S steps - best time
with 0 steps) / S, so the context's prefill is not counted; the full pass is `model(ids, labels)` then
`backward()` over all T tokens with every weight trainable (what fine-tuning on the context would
pay per step). The step's cost grows like k projections plus k x (span start) attention while the
full pass grows like T projections plus T^2/2 attention, so the ratio should approach k/T. Also
listed: the same ratio from megatrain.ttt.flops (mean span start). Writes benchmarks/results/
ttt-{cpu,gpu}.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

# Run as a script, this folder comes first on sys.path, and its kernels.py would then answer the
# `import kernels` that transformers makes (Hugging Face's package). megatrain is imported installed.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

from megatrain.models.config import ModelConfig  # noqa: E402
from megatrain.models.transformer import Transformer  # noqa: E402
from megatrain.ttt import adapt  # noqa: E402
from megatrain.ttt.flops import forward_flops, qttt_flops  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_qttt_step(model, context, span, steps, device) -> float:
    def run(n):
        _sync(device)
        start = time.perf_counter()
        with adapt(model, context, steps=n, span=span, lr=1e-5):
            _sync(device)
            return time.perf_counter() - start

    run(1)  # warm-up
    # Best of three of each on a shared machine: the difference isolates the steps from the prefill.
    return (min(run(steps) for _ in range(3)) - min(run(0) for _ in range(3))) / steps


def time_full_pass(model, ids, repeats, device) -> float:
    for p in model.parameters():
        p.requires_grad_(True)
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        model(ids[:, :-1], labels=ids[:, 1:]).backward()
        _sync(device)
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return min(times[1:])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--span", type=int, default=128)
    p.add_argument("--steps", type=int, default=4, help="qTTT steps timed per length")
    p.add_argument("--repeats", type=int, default=2, help="full passes timed per length (best kept)")
    p.add_argument("--preset", default="small-cpu")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    p.add_argument("--out", default=None, help="output prefix (default benchmarks/results/ttt-{cpu,gpu})")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(preset=args.preset, vocab_size=args.vocab, max_seq_len=max(args.lengths) + 1)
    model = Transformer(cfg).to(device)
    dtype = "bf16" if device.type == "cuda" else "fp32"
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    rows = []
    for length in args.lengths:
        g = torch.Generator().manual_seed(length)
        ids = torch.randint(0, args.vocab, (1, length + 1), generator=g)
        step = time_qttt_step(model, ids[0, :length].tolist(), args.span, args.steps, device)
        full = time_full_pass(model, ids.to(device), args.repeats, device)
        flops = qttt_flops(model.config, length, steps=1, span=args.span)
        full_flops = 3 * forward_flops(model.config, length)
        rows.append(
            {
                "length": length,
                "span": args.span,
                "qttt_step_s": step,
                "full_fwd_bwd_s": full,
                "time_ratio": step / full,
                "k_over_T": args.span / length,
                "flop_ratio": flops["qttt_step"] / full_flops,
            }
        )
        r = rows[-1]
        print(
            f"T={length:>6}  qTTT step {step * 1e3:8.1f} ms  full fwd+bwd {full * 1e3:8.1f} ms  "
            f"ratio {r['time_ratio']:.3f}  (FLOPs {r['flop_ratio']:.3f}, k/T {r['k_over_T']:.3f})",
            flush=True,
        )
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    meta = {
        "device": device_name,
        "dtype": dtype,
        "preset": args.preset,
        "vocab": args.vocab,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "steps_timed": args.steps,
        "command": "python benchmarks/ttt.py " + " ".join(sys.argv[1:]),
    }
    prefix = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", f"ttt-{'gpu' if device.type == 'cuda' else 'cpu'}"
    )
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    with open(prefix + ".json", "w", encoding="utf-8") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    lines = [
        f"# qTTT step vs full forward+backward ({meta['device']}, {dtype}, preset {args.preset}, "
        f"span k={args.span}, {meta['threads']} threads)",
        "",
        f"`{meta['command']}`",
        "",
        "| T | qTTT step (ms) | full fwd+bwd (ms) | time ratio | FLOP ratio | k/T |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['length']} | {r['qttt_step_s'] * 1e3:.1f} | {r['full_fwd_bwd_s'] * 1e3:.1f} | "
            f"{r['time_ratio']:.3f} | {r['flop_ratio']:.3f} | {r['k_over_T']:.3f} |"
        )
    with open(prefix + ".md", "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"wrote {prefix}.md and {prefix}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
