"""Trainer throughput against a plain PyTorch loop of the same model and batches, in one process.

    python benchmarks/throughput.py --preset small-cpu --seq-len 256 --micro-batch 8 --steps 20

    python benchmarks/throughput.py --preset small-cpu --tp 1,2,4 --steps 10

Both sides train the same model (same seed, same init) on the same packed batches of the embedded
corpus. "megatrain" is `Trainer.train_step` (DeepSpeed engine, sampler, schedule, loss reduction);
"plain" is model -> loss -> backward -> clip -> AdamW.step. Measurement blocks alternate between
the two so drift in machine speed hits both; the figure that matters is the ratio. On a GPU, MFU
uses 6N + 12·L·H·Q·T FLOPs per token and the device's bf16 peak. Writes a markdown table and JSON
to benchmarks/results/.

With `--tp 1,2,4` it measures tensor parallelism instead: for each TP size T, T processes (TP=T x
DP=1) run the trainer on the same global batch; the table gives tokens/s, peak memory per rank
(GPU: max allocated; CPU: peak resident set) and the bytes per rank the TP collectives send per
layer and per step, computed by `megatrain.parallel.parallelize.tp_comm_volume` (checked against
the bytes a run really sends in tests/parallel) for each T and for TP 8.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatrain.config import load_config  # noqa: E402
from megatrain.engine.deepspeed import init_distributed, use_bf16  # noqa: E402
from megatrain.engine.metrics import device_peak_flops, mfu  # noqa: E402
from megatrain.engine.trainer import Trainer, resolve_config  # noqa: E402
from megatrain.models.transformer import Transformer  # noqa: E402


def parse_args():
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
    p.add_argument("--tag", default=None, help="results file name stem (default: throughput-<device>)")
    p.add_argument("--tp", default=None, help="comma-separated TP sizes to compare (e.g. 1,2,4): TP mode")
    p.add_argument("--sequence-parallel", action="store_true", help="TP mode: with sequence parallelism")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after timing, profile STEPS steps of each side with torch.profiler and write the "
                        "op tables (self device time) next to the results")
    p.add_argument("--tp-worker", type=str, default=None, help=argparse.SUPPRESS)  # internal: result file
    return p.parse_args()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class PlainLoop:
    """The baseline: the same model and batches, eager PyTorch, no framework."""

    def __init__(self, cfg, model_cfg, data, device, bf16: bool):
        torch.manual_seed(cfg.train.seed)
        self.model = Transformer(model_cfg).to(device)
        self.model.gradient_checkpointing = cfg.train.activation_checkpointing
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.train.lr, betas=(0.9, 0.95),
                                     weight_decay=0.1, fused=device.type == "cuda" or None)
        self.cfg, self.data, self.device, self.bf16 = cfg, data, device, bf16
        self.position = 0

    def step(self):
        t = self.cfg.train
        for _ in range(t.grad_accum):
            idx = [(self.position + i) % len(self.data.train) for i in range(t.micro_batch)]
            self.position += t.micro_batch
            x, y = self.data.train.batch(idx)
            x, y = x.to(self.device), y.to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss = self.model(x, labels=y)
            (loss / t.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _config(args, run_dir, extra=()):
    return load_config(None, [
        f"model.preset={args.preset}", f"model.max_seq_len={max(args.seq_len, 512)}", "data.source=embedded",
        f"data.seq_len={args.seq_len}", f"data.vocab_size={args.vocab_size}", f"train.micro_batch={args.micro_batch}",
        f"train.grad_accum={args.grad_accum}", f"train.steps={10**6}", "train.warmup_steps=10",
        f"parallel.zero_stage={args.zero_stage}", f"run.dir={run_dir}", "log.progress=false",
        "log.tensorboard=false", f"train.activation_checkpointing={str(args.activation_checkpointing).lower()}",
        *extra])


def main():
    args = parse_args()
    os.environ.setdefault("MEGATRAIN_CACHE", os.path.expanduser("~/.cache/megatrain"))
    if args.tp_worker:
        return tp_worker(args)
    if args.tp:
        return tp_sweep(args)
    run_dir = os.path.join(os.environ["MEGATRAIN_CACHE"], "bench-run")
    cfg = _config(args, run_dir)
    env = init_distributed(cfg)
    resolve_config(cfg, env.world_size)
    trainer = Trainer(cfg, env, resume_path=None)
    bf16 = use_bf16(cfg)
    plain = PlainLoop(cfg, trainer.model_cfg, trainer.data, env.device, bf16)

    sides = {"megatrain": trainer.train_step, "plain": plain.step}
    for fn in sides.values():
        for _ in range(args.warmup):
            fn()
    _sync(env.device)
    times: dict[str, list[float]] = {name: [] for name in sides}
    done = 0
    while done < args.steps:
        n = min(args.block, args.steps - done)
        for name, fn in sides.items():
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                _sync(env.device)
                times[name].append(time.perf_counter() - t0)
        done += n
    profiles = {name: _profile(fn, args.profile, env.device) for name, fn in sides.items()} if args.profile else {}
    trainer.logger.close()

    tokens = cfg.train.global_batch * cfg.data.seq_len
    peak = device_peak_flops(env.device)
    device_name = torch.cuda.get_device_name() if env.device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        tps = tokens / med
        rows.append({"side": name, "median_step_s": med, "tokens_per_s": tps,
                     "mfu": mfu(tps, trainer.flops_per_token, 1, peak)})
    ratio = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    mem = torch.cuda.max_memory_allocated() / 2**30 if env.device.type == "cuda" else None
    result = {
        "device": device_name, "torch": torch.__version__, "python": platform.python_version(),
        "deepspeed": __import__("deepspeed").__version__,
        "command": "python " + " ".join(sys.argv),
        "preset": args.preset, "params": trainer.num_params, "seq_len": cfg.data.seq_len,
        "micro_batch": cfg.train.micro_batch, "grad_accum": cfg.train.grad_accum, "zero_stage": cfg.parallel.zero_stage,
        "dtype": "bf16" if bf16 else "fp32", "tokens_per_step": tokens, "measured_steps": args.steps,
        "flops_per_token": trainer.flops_per_token, "rows": rows, "megatrain_over_plain": ratio,
        "peak_memory_gib": mem,
    }
    lines = [f"Throughput, {args.preset} ({trainer.num_params / 1e6:.1f}M params), seq {cfg.data.seq_len}, "
             f"batch {cfg.train.global_batch}, {result['dtype']}, ZeRO-{cfg.parallel.zero_stage}, on {device_name}",
             "", "| loop | median step (s) | tokens/s | MFU |", "|---|---|---|---|"]
    for r in rows:
        shown_mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        lines.append(f"| {r['side']} | {r['median_step_s']:.4f} | {r['tokens_per_s']:,.0f} | {shown_mfu} |")
    lines += ["", f"megatrain / plain tokens/s: **{ratio:.3f}**", "", f"Command: `{result['command']}`",
              f"torch {torch.__version__}, deepspeed {result['deepspeed']}, Python {result['python']}"]
    table = "\n".join(lines)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    stem = args.tag or ("throughput-" + ("gpu" if env.device.type == "cuda" else "cpu"))
    with open(os.path.join(args.out, stem + ".json"), "w") as fh:
        json.dump(result, fh, indent=1)
    with open(os.path.join(args.out, stem + ".md"), "w") as fh:
        fh.write(table + "\n")
    for name, text in profiles.items():
        path = os.path.join(args.out, f"{stem}-profile-{name}.txt")
        with open(path, "w") as fh:
            fh.write(text)
        print(f"\n--- profile of {args.profile} {name} steps (top 20 by self time; all in {path})")
        print("\n".join(text.splitlines()[:24]))


def _profile(step_fn, steps: int, device) -> str:
    """torch.profiler op table of `steps` calls of step_fn, sorted by self device (or CPU) time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step_fn()
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=60, max_name_column_width=70)


def _peak_memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def tp_worker(args):
    """One process of a TP=T x DP=1 run: time the trainer's steps; rank 0 writes the result."""
    import torch.distributed as dist

    tp = int(os.environ["WORLD_SIZE"])
    run_dir = os.path.join(os.environ["MEGATRAIN_CACHE"], f"bench-tp{tp}")
    cfg = _config(args, run_dir, [f"parallel.tensor={tp}", f"parallel.sequence={str(args.sequence_parallel and tp > 1).lower()}"])
    env = init_distributed(cfg)
    resolve_config(cfg, env.world_size)
    trainer = Trainer(cfg, env, resume_path=None)
    for _ in range(args.warmup):
        trainer.train_step()
    _sync(env.device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        trainer.train_step()
        _sync(env.device)
        times.append(time.perf_counter() - t0)
    trainer.logger.close()
    peaks = [None] * env.world_size
    dist.all_gather_object(peaks, _peak_memory_gib(env.device))
    local_params = sum(p.numel() * p.element_size() for p in trainer.engine.module.parameters())
    param_bytes = [None] * env.world_size
    dist.all_gather_object(param_bytes, local_params)
    if env.rank == 0:
        with open(args.tp_worker, "w") as fh:
            json.dump({"tp": tp, "median_step_s": statistics.median(times), "peak_memory_gib_per_rank": peaks,
                       "param_mib_per_rank": [b / 2**20 for b in param_bytes], "global_batch": cfg.train.global_batch,
                       "tokens_per_step": cfg.train.global_batch * cfg.data.seq_len,
                       "bf16": use_bf16(cfg), "params": trainer.num_params}, fh)


def tp_sweep(args):
    """Run each TP size in its own torchrun job and tabulate tokens/s, memory and comm volume."""
    import subprocess
    import tempfile

    from megatrain.parallel.parallelize import tp_comm_volume

    sizes = [int(x) for x in args.tp.split(",")]
    on_gpu = torch.cuda.is_available()
    results = []
    for tp in sizes:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
            out = fh.name
        argv = sys.argv[1:]
        from megatrain.engine.deepspeed import _free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(tp), "--master-addr",
               "127.0.0.1", "--master-port", str(_free_port()), os.path.abspath(__file__), *argv, "--tp-worker", out]
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // tp)))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"throughput --tp: the TP={tp} run failed:\n{proc.stderr[-3000:]}")
        with open(out) as fh:
            results.append(json.load(fh))
        os.unlink(out)
    cfg = _config(args, os.path.join(os.environ["MEGATRAIN_CACHE"], "bench-tp-cfg"))
    model_cfg = cfg.model.resolved()
    model_cfg.vocab_size = args.vocab_size
    tokens = results[0]["tokens_per_step"]
    elem = 2 if results[0]["bf16"] else 4
    device_name = torch.cuda.get_device_name() if on_gpu else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores shared by all ranks)"
    rows = []
    for r in results:
        vol = tp_comm_volume(model_cfg, tokens, r["tp"], sequence_parallel=args.sequence_parallel, bytes_per_element=elem)
        rows.append({**r, "tokens_per_s": r["tokens_per_step"] / r["median_step_s"], "comm": vol})
    plan = {tp: tp_comm_volume(model_cfg, tokens, tp, sequence_parallel=args.sequence_parallel, bytes_per_element=elem)
            for tp in sorted(set(sizes) | {8})}
    mem_label = "peak allocated per rank (GiB)" if on_gpu else "peak RSS per rank (GiB)"
    lines = [f"Tensor parallelism, {args.preset} ({results[0]['params'] / 1e6:.1f}M params), seq {cfg.data.seq_len}, "
             f"global batch {results[0]['global_batch']} ({tokens} tokens/step), {'bf16' if elem == 2 else 'fp32'}, "
             f"ZeRO-{cfg.parallel.zero_stage}, sequence parallel {args.sequence_parallel}, on {device_name}", "",
             f"| TP | median step (s) | tokens/s | vs TP={sizes[0]} | {mem_label} | parameters per rank (MiB) | "
             f"TP comm per layer (MiB/rank) |", "|---|---|---|---|---|---|---|"]
    base = rows[0]["tokens_per_s"]
    for r in rows:
        mem = ", ".join(f"{m:.2f}" for m in r["peak_memory_gib_per_rank"])
        lines.append(f"| {r['tp']} | {r['median_step_s']:.4f} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base:.2f}x | "
                     f"{mem} | {r['param_mib_per_rank'][0]:.2f} | {r['comm']['per_layer'] / 2**20:.2f} |")
    lines += ["", f"Computed TP communication per rank for one step of {tokens} tokens (forward + backward, ring "
              f"collectives, {elem}-byte activations):", "",
              "| TP | per layer (MiB) | embedding + head (MiB) | loss (MiB) | per step (MiB) |", "|---|---|---|---|---|"]
    for tp, v in plan.items():
        lines.append(f"| {tp} | {v['per_layer'] / 2**20:.2f} | {v['embedding_and_head'] / 2**20:.2f} | "
                     f"{v['loss'] / 2**20:.2f} | {v['per_step'] / 2**20:.2f} |")
    command = "python " + " ".join(sys.argv)
    lines += ["", f"Command: `{command}`",
              f"torch {torch.__version__}, deepspeed {__import__('deepspeed').__version__}, Python {platform.python_version()}"]
    table = "\n".join(lines)
    print(table)
    result = {"device": device_name, "torch": torch.__version__, "deepspeed": __import__("deepspeed").__version__,
              "command": command, "preset": args.preset, "rows": rows, "computed_comm_bytes": plan}
    os.makedirs(args.out, exist_ok=True)
    stem = args.tag or ("throughput-tp-" + ("gpu" if on_gpu else "cpu"))
    with open(os.path.join(args.out, stem + ".json"), "w") as fh:
        json.dump(result, fh, indent=1)
    with open(os.path.join(args.out, stem + ".md"), "w") as fh:
        fh.write(table + "\n")


if __name__ == "__main__":
    main()
