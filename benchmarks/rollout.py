"""Rollout speed: generated tokens/s of `megatrain.generate` against transformers' `generate` on the
same weights.

    python benchmarks/rollout.py                                  # CPU, fp32, small-cpu preset
    python benchmarks/rollout.py --export runs/demo-hf --batch 1,8,32 --new-tokens 128
    python benchmarks/rollout.py --device cuda --dtype bf16 --tag rollout-gpu

Part 1 (generation): a megatrain model is exported with `megatrain export` (a fresh 2-step run of
--preset unless --run or --export names one), loaded back with `megatrain.load` and with
transformers' `LlamaForCausalLM.from_pretrained`, and both decode the same B random prompts of
--prompt-len tokens greedily for exactly --new-tokens tokens (no EOS), each with its own KV cache
(transformers: its default dynamic cache and SDPA attention). Calls alternate between the two so
drift in machine speed hits both; the table gives the median generated tokens/s over --repeats
calls (prefill included), by wall clock and by the process's CPU time (the steadier figure on a
machine shared with other jobs: it does not count time spent waiting for a core), and the fraction
of rows whose tokens agree. Without transformers
installed (`pip install megatrain[bench]`) the transformers column is skipped with a note.
Writes a markdown table and JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

# Run as a script, this folder comes first on sys.path, and its kernels.py would then answer the
# `import kernels` that transformers makes (Hugging Face's package). megatrain is imported installed.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

import megatrain  # noqa: E402
from megatrain.bench.report import cpu_name  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--export", default=None, help="an exported Hugging Face Llama folder (megatrain export)")
    p.add_argument("--run", default=None, help="a megatrain run or checkpoint directory to export")
    p.add_argument("--preset", default="small-cpu", help="model preset of the fresh run (no --run/--export)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="measured calls per side and batch size")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--tag", default=None, help="results file name stem (default: rollout-<device type>)")
    return p.parse_args()


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "megatrain.cli", *args], check=True, stdout=subprocess.DEVNULL)


def export_folder(args, workdir: str) -> str:
    """The exported folder to load: --export, or --run exported, or a fresh 2-step run exported."""
    if args.export:
        return args.export
    run = args.run
    if run is None:
        run = os.path.join(workdir, "run")
        max_len = max(512, args.prompt_len + args.new_tokens)
        cli(
            "pretrain",
            f"model.preset={args.preset}",
            f"model.max_seq_len={max_len}",
            "data.source=embedded",
            "data.seq_len=64",
            f"data.vocab_size={args.vocab_size}",
            "train.steps=2",
            "train.micro_batch=2",
            "train.global_batch=2",
            "parallel.zero_stage=0",
            "log.eval_every=0",
            "log.progress=false",
            f"run.dir={run}",
        )
    out = os.path.join(workdir, "hf")
    cli("export", run, "--output", out)
    return out


def load_transformers(folder: str, device, dtype):
    try:
        import transformers
        from transformers import LlamaForCausalLM
    except ImportError:
        return None, None
    model = LlamaForCausalLM.from_pretrained(folder).to(device=device, dtype=dtype).eval()
    return model, transformers.__version__


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_megatrain(model, ids: torch.Tensor, new_tokens: int) -> list[list[int]]:
    return megatrain.generate(model, ids.tolist(), max_new_tokens=new_tokens)


def run_transformers(model, ids: torch.Tensor, new_tokens: int) -> list[list[int]]:
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=3,
        )
    return out[:, ids.shape[1] :].tolist()


def measure(fn, model, ids, new_tokens, device) -> tuple[float, float, list[list[int]]]:
    """(wall seconds, CPU seconds of this process, generated tokens) of one call."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    tokens = fn(model, ids, new_tokens)
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu, tokens


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    batches = [int(b) for b in args.batch.split(",")]
    with tempfile.TemporaryDirectory() as workdir:
        folder = export_folder(args, workdir)
        ours, _, model_cfg = megatrain.load(folder, device=device)
        ours = ours.to(dtype)
        theirs, hf_version = load_transformers(folder, device, dtype)
    if ours.config.max_seq_len < args.prompt_len + args.new_tokens:
        sys.exit(
            f"rollout.py: the model's max_seq_len={ours.config.max_seq_len} is shorter than --prompt-len + --new-tokens"
        )
    note = (
        None if theirs is not None else "transformers is not installed (pip install megatrain[bench]): column skipped"
    )
    rows = []
    gen = torch.Generator().manual_seed(0)
    for batch in batches:
        ids = torch.randint(4, model_cfg.vocab_size, (batch, args.prompt_len), generator=gen).to(device)
        sides = {"megatrain": (run_megatrain, ours)}
        if theirs is not None:
            sides["transformers"] = (run_transformers, theirs)
        times: dict[str, list[float]] = {name: [] for name in sides}
        cpu_times: dict[str, list[float]] = {name: [] for name in sides}
        outputs = {}
        for name, (fn, model) in sides.items():  # warm-up (allocator, kernels, lazy inits)
            measure(fn, model, ids, min(8, args.new_tokens), device)
        for _ in range(args.repeats):
            for name, (fn, model) in sides.items():
                seconds, cpu_seconds, outputs[name] = measure(fn, model, ids, args.new_tokens, device)
                times[name].append(seconds)
                cpu_times[name].append(cpu_seconds)
        generated = batch * args.new_tokens
        row = {"batch": batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
        for name in sides:
            row[f"{name}_tokens_per_s"] = generated / statistics.median(times[name])
            row[f"{name}_tokens_per_cpu_s"] = generated / statistics.median(cpu_times[name])
            row[f"{name}_seconds"], row[f"{name}_cpu_seconds"] = times[name], cpu_times[name]
        if theirs is not None:
            row["ratio"] = row["megatrain_tokens_per_s"] / row["transformers_tokens_per_s"]
            row["cpu_ratio"] = row["megatrain_tokens_per_cpu_s"] / row["transformers_tokens_per_cpu_s"]
            row["rows_equal"] = sum(a == b for a, b in zip(outputs["megatrain"], outputs["transformers"])) / batch
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("seconds")}), flush=True)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    info = {
        "benchmark": "rollout generation (greedy, KV cache, fixed length)",
        "command": "python " + " ".join(sys.argv),
        "device": device_name,
        "device_type": device.type,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "load_average_1min": round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None,
        "model": {k: getattr(model_cfg, k) for k in ("dim", "layers", "heads", "kv_heads", "ffn_dim", "vocab_size")},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": hf_version,
            "megatrain": megatrain.__version__,
        },
        "note": note,
        "rows": rows,
    }
    write_results(args, info)


def write_results(args, info) -> None:
    os.makedirs(args.out, exist_ok=True)
    stem = args.tag or f"rollout-{info['device_type']}"
    with open(os.path.join(args.out, stem + ".json"), "w") as fh:
        json.dump(info, fh, indent=1)
    m = info["model"]
    lines = [
        f"# Rollout generation: megatrain.generate vs transformers generate ({info['device']})",
        "",
        f"Greedy decoding of B random prompts of {args.prompt_len} tokens for exactly {args.new_tokens} new "
        f"tokens, same weights (megatrain export -> LlamaForCausalLM), {info['dtype']}, "
        f"{info['torch_threads']} torch threads on {info['cpu_count']} CPUs (load average "
        f"{info['load_average_1min']} at the end). Model: dim {m['dim']}, "
        f"{m['layers']} layers, {m['heads']} heads ({m['kv_heads']} KV), FFN {m['ffn_dim']}, vocab "
        f"{m['vocab_size']}. Median of {args.repeats} alternating calls; prefill included.",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
        "",
        f"Command: `{info['command']}`",
        "",
    ]
    if info["note"]:
        lines += [f"Note: {info['note']}", ""]
        lines += ["| batch | megatrain tok/s | megatrain tok/CPU-s |", "|---:|---:|---:|"]
        lines += [
            f"| {r['batch']} | {r['megatrain_tokens_per_s']:.0f} | {r['megatrain_tokens_per_cpu_s']:.0f} |"
            for r in info["rows"]
        ]
    else:
        lines += [
            "| batch | megatrain tok/s | transformers tok/s | ratio | megatrain tok/CPU-s | "
            "transformers tok/CPU-s | CPU ratio | rows with equal tokens |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['batch']} | {r['megatrain_tokens_per_s']:.0f} | {r['transformers_tokens_per_s']:.0f} | "
            f"{r['ratio']:.2f}x | {r['megatrain_tokens_per_cpu_s']:.0f} | "
            f"{r['transformers_tokens_per_cpu_s']:.0f} | {r['cpu_ratio']:.2f}x | {r['rows_equal']:.0%} |"
            for r in info["rows"]
        ]
    with open(os.path.join(args.out, stem + ".md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
