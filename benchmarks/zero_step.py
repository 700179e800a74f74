"""DeepSpeed's optimizer step, stock against megatrain's lean step: ops, host reads, kernels and host time.

    python benchmarks/zero_step.py                              # the 125m preset, ZeRO 0 (bf16), 1 and 2
    python benchmarks/zero_step.py --preset tiny --steps 3      # a quick look

The lean step (megatrain.optim.deepspeed_adapter.lean_zero_step, docs/architecture.md "The DeepSpeed
seam") takes the gradient norm with one multi-tensor fp64 norm and, in bf16, drops DeepSpeed's
per-gradient inf/NaN scan for a check of that norm; the clip factor stays on the device. Without ZeRO
(stage 0, bf16 only: in fp32 DeepSpeed steps the client optimizer directly) DeepSpeed's unfused bf16
optimizer gets `lean_stage0_step`: the same rules with one norm and one host read. Its cost does not
depend on the model's width but on its number of parameter tensors, so a preset's real parameter list
(125m: 111 tensors) shows what a GPU step pays, even on a CPU. For each ZeRO stage and dtype, one
process builds the preset twice from the same seed under `deepspeed.initialize` (megatrain's generated
config: clipping 1.0, AdamW), stock and lean, and runs forward + backward on a short random batch and
then `engine.step()` --steps times. Per step of `engine.step()` alone:
- ATen ops: every operator the dispatcher ran (torch.profiler, nested calls included, as
  `megatrain bench` counts them);
- host reads: values read out of tensors (megatrain.bench.measure.HostReads), each a sync on a GPU;
  on a CPU the reads torch's own optimizer makes of its CPU step counters are left out (host tensors
  on a GPU too);
- kernels: device kernels launched (GPU only);
- host ms: the process's CPU time in the call (median; one torch thread on a CPU), what the host
  spends on it, which bounds a host-bound step;
- wall ms: its wall time, synchronised on a GPU (median).
The two paths must end with the same weights (checked: the maximum difference is printed; at stage 0
the fp64 norm may move the clip factor, and so the weights, in the last bits).
Writes benchmarks/results/zero-step-<cpu|gpu>.{md,json} (or --out).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import statistics
import sys
import time

import torch

# Run as a script, this folder comes first on sys.path, and its kernels.py would then answer the
# `import kernels` that transformers makes (Hugging Face's package). megatrain is imported installed.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

from megatrain.bench.measure import HostReads  # noqa: E402
from megatrain.bench.report import cpu_name, source_commit, write_table  # noqa: E402
from megatrain.models.config import ModelConfig  # noqa: E402
from megatrain.models.transformer import Transformer  # noqa: E402
from megatrain.optim import deepspeed_adapter as adapter  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="125m")
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary (the embedding is one tensor either way)")
    p.add_argument(
        "--dim",
        type=int,
        default=None,
        help="hidden size instead of the preset's (its layers, so its tensors, stay): with a small width the "
        "optimizer's own math is negligible and the host time is the per-tensor bookkeeping, as on a GPU",
    )
    p.add_argument("--stages", default="0,1,2", help="comma-separated ZeRO stages (0: bf16 only, 1, 2)")
    p.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: bf16, fp32")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per path (after one warm-up)")
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--out", default=None, help="output prefix (default benchmarks/results/zero-step-<cpu|gpu>)")
    return p.parse_args(argv)


def ds_config(stage: int, bf16: bool) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }


def run_path(base: Transformer, stage: int, bf16: bool, lean: bool, args, device) -> dict:
    import deepspeed
    from torch.profiler import ProfilerActivity, profile

    model = copy.deepcopy(base).to(device)
    config = ds_config(stage, bf16)
    check = adapter.lean_bf16_config(config, {}) if lean else False
    client = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=client, config=config)
    install = adapter.lean_stage0_step if stage == 0 else (lambda opt: adapter.lean_zero_step(opt, check))
    if lean and not install(engine.optimizer):
        raise SystemExit(f"zero_step.py: the lean step did not install on {type(engine.optimizer).__name__}")
    generator = torch.Generator().manual_seed(1)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    ops, reads, kernels, host, wall = [], [], [], [], []
    for step in range(1 + 2 * args.steps):  # a warm-up step, then counted and timed steps alternating
        ids = torch.randint(0, args.vocab, (1, args.seq_len), generator=generator).to(device)
        engine.backward(engine(ids, labels=ids))
        if cuda:
            torch.cuda.synchronize()
        if step % 2 == 1:  # counted steps (the profiler's own overhead stays out of the timed ones)
            with profile(activities=activities) as prof, HostReads(device) as counter:
                engine.step()
            events = prof.key_averages()
            ops.append(sum(e.count for e in events if e.key.startswith("aten::")))
            reads.append(sum(n for site, n in counter.sites.items() if cuda or not site.startswith("torch/")))
            if cuda:
                kernels.append(sum(e.count for e in prof.events() if e.device_type.name == "CUDA"))
            continue
        cpu0, wall0 = time.process_time(), time.perf_counter()
        engine.step()
        cpu1 = time.process_time()
        if cuda:
            torch.cuda.synchronize()
        if step > 0:
            host.append((cpu1 - cpu0) * 1e3)
            wall.append((time.perf_counter() - wall0) * 1e3)
    weights = torch.cat([p.detach().float().flatten().cpu() for p in model.parameters()])
    result = {
        "aten_ops": statistics.median(ops),
        "host_reads": statistics.median(reads),
        "kernels": statistics.median(kernels) if kernels else None,
        "host_ms": statistics.median(host) if host else None,
        "wall_ms": statistics.median(wall) if wall else None,
        "tensors": sum(1 for _ in model.parameters()),
        "weights": weights,
    }
    del engine, model, client
    gc.collect()  # the next path's engine starts without this one's masters and moments
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    import deepspeed

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # the process's CPU time is then the host time of one thread
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
    torch.manual_seed(0)
    sizes = {} if args.dim is None else dict(dim=args.dim, heads=4, kv_heads=4, ffn_dim=None)
    base = Transformer(
        ModelConfig(preset=args.preset, vocab_size=args.vocab, max_seq_len=max(args.seq_len, 16), **sizes)
    )
    rows, record = [], {"preset": args.preset, "rows": []}
    for dtype in args.dtypes.split(","):
        for stage in (int(s) for s in args.stages.split(",")):
            if stage == 0 and dtype != "bf16":
                continue  # fp32 without ZeRO: DeepSpeed steps the client optimizer itself, nothing to make lean
            stock = run_path(base, stage, dtype == "bf16", False, args, device)
            lean = run_path(base, stage, dtype == "bf16", True, args, device)
            diff = float((stock.pop("weights") - lean.pop("weights")).abs().max())
            ratio = lean["aten_ops"] / stock["aten_ops"]
            row = {"dtype": dtype, "zero": stage, "stock": stock, "lean": lean, "max_weight_diff": diff}
            record["rows"].append(row)

            def fmt(x, spec=",.0f"):
                return "n/a" if x is None else format(x, spec)

            rows.append(
                f"| {dtype} | {stage} | {stock['tensors']} | {fmt(stock['aten_ops'])} | {fmt(lean['aten_ops'])} | "
                f"{ratio:.2f}x | {fmt(stock['host_reads'])} | {fmt(lean['host_reads'])} | "
                f"{fmt(stock['kernels'])} | {fmt(lean['kernels'])} | "
                f"{fmt(stock['host_ms'], '.1f')} | {fmt(lean['host_ms'], '.1f')} | "
                f"{fmt(stock['wall_ms'], '.1f')} | {fmt(lean['wall_ms'], '.1f')} | {diff:.1e} |"
            )
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu_name()})"
    versions = (
        f"megatrain commit {source_commit()}, torch {torch.__version__}, deepspeed {deepspeed.__version__}, "
        f"python {platform.python_version()}, on {where}"
    )
    table = (
        f"# DeepSpeed's optimizer step: stock vs megatrain's lean step ({args.preset} preset"
        f"{'' if args.dim is None else f', dim {args.dim}'})\n\n"
        f"Per `engine.step()` call, one process, {args.steps} steps per path (medians), the preset's parameter "
        f"tensors at vocabulary {args.vocab}. {versions}.\n\n"
        "| dtype | ZeRO | tensors | ATen ops stock | ATen ops lean | lean / stock | host reads stock | host reads lean "
        "| kernels stock | kernels lean | host ms stock | host ms lean | wall ms stock | wall ms lean "
        "| max weight diff |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        "Host reads: values read out of tensors in `engine.step()` (a sync each on a GPU); on a CPU, reads by "
        "torch's own optimizer of its CPU step counters are left out. ZeRO 0 (bf16): DeepSpeed's unfused bf16 "
        "optimizer against `lean_stage0_step`, whose fp64 norm may move the clip factor, so the weights, in the "
        "last bits.\n\n"
        f"Command: `python benchmarks/zero_step.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n"
    )
    record.update(versions=versions, command=sys.argv)
    print(table)
    prefix = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", f"zero-step-{'gpu' if device.type == 'cuda' else 'cpu'}"
    )
    write_table(prefix, table, record)


if __name__ == "__main__":
    main()
