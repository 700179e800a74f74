"""Training-state memory per method, measured from the live tensors after one optimizer step.

    python benchmarks/memory.py --presets 350m,1.3b --device cuda
    python benchmarks/memory.py --presets 350m --methods dense,cola,sltrain --dtype bf16

For every preset and method the model and optimizer are built exactly as the trainer builds them
(`load_config` overrides -> `Transformer` -> `relora_controller` -> `build_optimizer`), one
forward/backward/step runs on a tiny random batch, and then the bytes held by parameters, their
gradients, the optimizer state (every tensor reachable from `optimizer.state`) and the module
buffers (e.g. SLTrain's sparse index) are summed from the tensors themselves, each storage counted
once. "proj" columns restrict the sums to the attention and MLP projections (parameters under a
block's `attn.` / `mlp.` modules: dense W, or CoLA/SLTrain/ReLoRA factors, values and frozen W),
where the methods differ; embeddings, head and norms are the same for all.

Methods: dense (AdamW), galore, fira (dense layers, projected-gradient optimizers), cola, sltrain,
relora (their layers with AdamW). A method that cannot be built here (not implemented yet, refused
by the config) is reported with one line and left out; the exit status is then 1.

Layouts (`--layouts`): per-rank memory from the planner (`megatrain.engine.memory_plan`, what
`megatrain plan` prints) for every preset x TP x ZeRO stage on a --world of ranks, and with `--measure`
the same layouts built for real through `megatrain plan --build` where they fit this machine (each
rank's parameters held, host RSS before building and its peak while building):

    python benchmarks/memory.py --layouts --presets 125m,1.3b,7b --tp 1,2,4,8 --zero 1,2,3 --world 8 \
        --measure 125m:1:1,125m:2:1,125m:4:1,125m:1:3,1.3b:4:1

Results: a markdown table on stdout and benchmarks/results/memory-<preset>.{md,json} (layouts:
memory-layouts.{md,json}) with the machine, versions and command. No DeepSpeed: this is the single-process
state of one model copy in --dtype (fp32 by default, as the trainer holds master weights); ZeRO partitions
these same bytes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field

import torch

# Run as a script, this folder comes first on sys.path, and its kernels.py would then answer the
# `import kernels` that transformers makes (Hugging Face's package). megatrain is imported installed.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

# name -> (model.linear, optim.name). Extra keys per method come from --set METHOD:key=value.
METHODS: dict[str, tuple[str, str]] = {
    "dense": ("dense", "adamw"),
    "galore": ("dense", "galore"),
    "fira": ("dense", "fira"),
    "cola": ("cola", "adamw"),
    "sltrain": ("sltrain", "adamw"),
    "relora": ("relora", "adamw"),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# A parameter is a projection weight if it lives under a block's attention or MLP module.
PROJ_PATTERN = re.compile(r"(^|\.)(attn|mlp)\.")
# GaLore/Fira: optimizer state of the projected weights at most this fraction of AdamW's.
STATE_TARGET = 0.35


@dataclass
class Usage:
    """Bytes (and element counts) of one kind of tensor, split into projections and the rest."""

    proj_bytes: int = 0
    other_bytes: int = 0
    proj_numel: int = 0
    other_numel: int = 0

    def add(self, nbytes: int, numel: int, proj: bool) -> None:
        if proj:
            self.proj_bytes += nbytes
            self.proj_numel += numel
        else:
            self.other_bytes += nbytes
            self.other_numel += numel

    @property
    def bytes(self) -> int:
        return self.proj_bytes + self.other_bytes


@dataclass
class Measurement:
    params: Usage = field(default_factory=Usage)
    trainable: Usage = field(default_factory=Usage)
    grads: Usage = field(default_factory=Usage)
    state: Usage = field(default_factory=Usage)
    buffers: Usage = field(default_factory=Usage)

    @property
    def total(self) -> int:
        return self.params.bytes + self.grads.bytes + self.state.bytes + self.buffers.bytes

    def to_dict(self) -> dict:
        out = {}
        for kind in ("params", "trainable", "grads", "state", "buffers"):
            u = getattr(self, kind)
            out[kind] = dict(
                bytes=u.bytes,
                proj_bytes=u.proj_bytes,
                other_bytes=u.other_bytes,
                proj_numel=u.proj_numel,
                other_numel=u.other_numel,
            )
        out["total_bytes"] = self.total
        return out


def _tensors(obj):
    """Every tensor inside an optimizer-state value (tensors, lists, tuples, dicts, nested)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def optimizers(optimizer) -> list:
    """`optimizer` and the optimizers it holds as attributes (GaLore/Fira keep the projected weights
    in `optimizer.projected`, stepped next to DeepSpeed's by megatrain.optim.zero_bridge)."""
    found = [optimizer]
    for value in vars(optimizer).values():
        if isinstance(value, torch.optim.Optimizer) and all(value is not o for o in found):
            found += optimizers(value)
    return found


def measure(model: torch.nn.Module, optimizer) -> Measurement:
    """Bytes of parameters, gradients, optimizer state and buffers, each storage counted once.

    A tensor's cost is its whole storage (a view into a bigger buffer counts the buffer, once).
    Optimizer state (of `optimizer` and of every optimizer it holds, see `optimizers`) is attributed
    to the parameter it is keyed by.
    """
    m = Measurement()
    seen: set = set()

    def count(t: torch.Tensor, usage: Usage, proj: bool) -> None:
        storage = t.untyped_storage()
        key = (t.device.type, t.device.index, storage.data_ptr())
        if key in seen or storage.nbytes() == 0:
            return
        seen.add(key)
        usage.add(storage.nbytes(), t.numel(), proj)

    names = {}
    for name, p in model.named_parameters():
        names[p] = name
        proj = bool(PROJ_PATTERN.search(name))
        count(p, m.params, proj)
        if p.requires_grad:
            m.trainable.add(p.numel() * p.element_size(), p.numel(), proj)
    for name, p in model.named_parameters():
        if p.grad is not None:
            count(p.grad, m.grads, bool(PROJ_PATTERN.search(name)))
    for name, b in model.named_buffers():
        count(b, m.buffers, bool(PROJ_PATTERN.search(name)))
    for opt in optimizers(optimizer):
        for key, value in opt.state.items():
            proj = isinstance(key, torch.Tensor) and bool(PROJ_PATTERN.search(names.get(key, "")))
            for t in _tensors(value):
                count(t, m.state, proj)
    return m


def build_and_step(preset: str, method: str, args, extra: list[str]) -> tuple[Measurement, dict]:
    """Build `method` at `preset` through megatrain's builders, run one step, measure."""
    from megatrain.config import load_config
    from megatrain.models.transformer import Transformer
    from megatrain.optim import build_optimizer
    from megatrain.optim.relora import relora_controller

    linear, optim_name = METHODS[method]
    overrides = [
        f"model.preset={preset}",
        f"model.vocab_size={args.vocab_size}",
        f"model.linear={linear}",
        f"optim.name={optim_name}",
        f"data.seq_len={args.seq_len}",
        *extra,
    ]
    device = torch.device(args.device)
    cfg = load_config(overrides=overrides).resolve(1, cuda=device.type == "cuda")  # fills ReLoRA's periods
    model_cfg = cfg.model.resolved()
    torch.manual_seed(0)
    model = Transformer(model_cfg).to(device=device, dtype=DTYPES[args.dtype])
    relora = relora_controller(cfg, model)
    optimizer = build_optimizer(cfg.optim, model, cfg.train.lr, on_cuda=device.type == "cuda")
    ids = torch.randint(0, args.vocab_size, (args.batch, args.seq_len), device=device)
    loss = model(ids, labels=ids)
    loss.backward()
    for opt in optimizers(optimizer):  # the trainer's engine steps a nested (projected) optimizer too
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    result = measure(model, optimizer)
    info = dict(
        overrides=overrides,
        loss=float(loss.detach()),
        rank=model_cfg.lowrank.rank,
        num_params=sum(p.numel() for p in model.parameters()),
    )
    if device.type == "cuda":
        info["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    del model, optimizer, relora, loss
    return result, info


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def _ratio(a: int, b: int) -> str:
    return f"{a / b:.1%}" if b else "-"


def table(rows: dict, preset: str) -> str:
    """Markdown table of the measured methods (MiB), with ratios against dense AdamW."""
    dense = rows.get("dense", {}).get("measurement")
    lines = [
        f"### Training-state memory, preset {preset} (MiB)",
        "",
        "| method | params | grads | optim state | buffers | total | proj params | proj grads | "
        "proj optim state | proj state vs AdamW | total vs AdamW | target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for method, row in rows.items():
        if "measurement" not in row:
            lines.append(f"| {method} | not measured: {row['error']} |||||||||||")
            continue
        m = row["measurement"]
        target = "-"
        if dense is not None and method in ("galore", "fira"):
            ok = m["state"]["proj_bytes"] <= STATE_TARGET * dense["state"]["proj_bytes"]
            target = f"{'PASS' if ok else 'FAIL'} (<= {STATE_TARGET:.0%})"
        lines.append(
            "| "
            + " | ".join(
                [
                    method,
                    _mib(m["params"]["bytes"]),
                    _mib(m["grads"]["bytes"]),
                    _mib(m["state"]["bytes"]),
                    _mib(m["buffers"]["bytes"]),
                    _mib(m["total_bytes"]),
                    _mib(m["params"]["proj_bytes"]),
                    _mib(m["grads"]["proj_bytes"]),
                    _mib(m["state"]["proj_bytes"]),
                    _ratio(m["state"]["proj_bytes"], dense["state"]["proj_bytes"]) if dense else "-",
                    _ratio(m["total_bytes"], dense["total_bytes"]) if dense else "-",
                    target,
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def machine() -> dict:
    import triton

    info = dict(
        python=platform.python_version(),
        torch=torch.__version__,
        triton=triton.__version__,
        platform=platform.platform(),
        processor=platform.processor() or platform.machine(),
        cpus=os.cpu_count(),
    )
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="350m", help="comma-separated model presets (e.g. 350m,1.3b)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from: {', '.join(METHODS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="parameter dtype (optimizer state follows)")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="METHOD:KEY=VALUE",
        help="extra config override for one method, e.g. galore:optim.rank=256 (repeatable)",
    )
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--layouts", action="store_true", help="per-rank plan of TP x ZeRO layouts instead of methods")
    p.add_argument("--tp", default="1,2,4,8", help="--layouts: tensor-parallel sizes")
    p.add_argument("--zero", default="1,2,3", help="--layouts: ZeRO stages")
    p.add_argument("--world", type=int, default=8, help="--layouts: ranks of every layout (DP = world / TP)")
    p.add_argument("--layout-dtype", default="bf16", choices=["bf16", "fp32"], help="--layouts: train.dtype")
    p.add_argument("--layout-seq-len", type=int, default=2048, help="--layouts: tokens per sequence")
    p.add_argument(
        "--measure",
        default="",
        metavar="PRESET:TP:ZERO,...",
        help="--layouts: build these layouts here (fp32, gloo, world = TP, or 2 for ZeRO-3 at TP 1) and "
        "report their measured peaks",
    )
    args = p.parse_args(argv)
    args.preset_list = [s for s in args.presets.split(",") if s]
    args.method_list = [s for s in args.methods.split(",") if s]
    unknown = [m for m in args.method_list if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)} (allowed: {', '.join(METHODS)})")
    args.extra = {m: [] for m in METHODS}
    for item in args.set:
        method, sep, kv = item.partition(":")
        if not sep or method not in METHODS or "=" not in kv:
            p.error(f"--set {item!r}: expected METHOD:KEY=VALUE with METHOD one of {', '.join(METHODS)}")
        args.extra[method].append(kv)
    return args


def _layout_config(preset: str, tp: int, zero: int, args, dtype: str, extra=()):
    from megatrain.config import load_config

    return load_config(
        None,
        [
            f"model.preset={preset}",
            f"model.vocab_size={args.vocab_size}",
            f"data.seq_len={args.layout_seq_len}",
            "train.micro_batch=1",
            f"parallel.tensor={tp}",
            f"parallel.zero_stage={zero}",
            f"train.dtype={dtype}",
            "parallel.sequence=false",
            *extra,
        ],
    )


def _measure_layout(preset: str, tp: int, zero: int, args) -> dict:
    """`megatrain plan --build` for one layout on this machine (fp32 on the host); its measured rows."""
    import subprocess

    world = tp if not (zero == 3 and tp == 1) else 2
    cmd = [
        sys.executable,
        "-m",
        "megatrain.cli",
        "plan",
        f"model.preset={preset}",
        f"model.vocab_size={args.vocab_size}",
        f"data.seq_len={args.layout_seq_len}",
        "train.micro_batch=1",
        f"train.global_batch={world // tp}",
        f"parallel.tensor={tp}",
        f"parallel.zero_stage={zero}",
        "train.dtype=fp32",
        "--world",
        str(world),
        "--build",
    ]
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    )
    if proc.returncode != 0:
        return dict(error=(proc.stderr.strip().splitlines() or ["failed"])[-1])
    unit = {"MiB": 2**20, "GiB": 2**30}
    ranks = []
    for m in re.finditer(
        r"^\s+(\d+) \|\s+([\d,]+) \|\s+([\d,]+) \|\s+([\d.]+) (MiB|GiB) \|\s+([\d.]+) (MiB|GiB) \|"
        r"\s+([\d.]+) (MiB|GiB) \|",
        proc.stdout,
        flags=re.M,
    ):
        ranks.append(
            dict(
                rank=int(m[1]),
                params_planned=int(m[2].replace(",", "")),
                params_held=int(m[3].replace(",", "")),
                weights_held=float(m[4]) * unit[m[5]],
                rss_before=float(m[6]) * unit[m[7]],
                rss_peak=float(m[8]) * unit[m[9]],
            )
        )
    return dict(world=world, ranks=ranks, seconds=round(time.perf_counter() - start, 1))


def layouts_main(args, argv) -> int:
    """--layouts: the planner's per-rank bytes for every preset x TP x ZeRO, then the measured builds."""
    from megatrain.engine.memory_plan import plan_memory
    from megatrain.errors import ConfigError

    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    tps = [int(x) for x in args.tp.split(",") if x]
    zeros = [int(x) for x in args.zero.split(",") if x]
    rows, lines = (
        [],
        [
            f"### Per-rank memory by layout ({args.world} ranks, {args.layout_dtype}, seq "
            f"{args.layout_seq_len}, micro-batch 1, vocab {args.vocab_size}; planner, GiB)",
            "",
            "| preset | TP | DP | ZeRO | params/rank | weights | grads | fp32 master | optimizer | "
            "model states | activations | activations (ckpt) | total (ckpt) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ],
    )
    for preset in args.preset_list:
        for tp in tps:
            for zero in zeros:
                row = dict(preset=preset, tp=tp, zero=zero, world=args.world)
                try:
                    plan = plan_memory(
                        _layout_config(
                            preset, tp, zero, args, args.layout_dtype, ["train.activation_checkpointing=true"]
                        ),
                        args.world,
                    )
                except ConfigError as exc:
                    row["refused"] = str(exc)
                    lines.append(
                        f"| {preset} | {tp} | {args.world // tp} | {zero} | refused: TP > 1 with ZeRO-3 "
                        f"| | | | | | | | |"
                        if "zero_stage=3" in str(exc)
                        else f"| {preset} | {tp} | {args.world // tp} | {zero} | refused: {exc} | | | | | | | | |"
                    )
                    rows.append(row)
                    continue
                row.update(plan.as_dict())
                rows.append(row)
                lines.append(
                    f"| {preset} | {tp} | {plan.dp} | {zero} | {plan.params:,} | {gib(plan.param_bytes)} | "
                    f"{gib(plan.grad_bytes)} | {gib(plan.master_bytes)} | {gib(plan.optimizer_bytes)} | "
                    f"{gib(plan.model_state_bytes)} | {gib(plan.activation_bytes)} | "
                    f"{gib(plan.activation_bytes_checkpointed)} | {gib(plan.total_bytes)} |"
                )
    measured = []
    if args.measure:
        lines += [
            "",
            "### Measured builds on this machine (`megatrain plan --build`, fp32 on the host, gloo)",
            "",
            "| preset | TP | ZeRO | ranks | params/rank planned | params/rank held | host RSS before (GiB) | "
            "host peak while building (GiB) | growth vs full fp32 model | wall s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        from megatrain.engine.memory_plan import plan_model_config
        from megatrain.models.transformer import Transformer

        for item in args.measure.split(","):
            preset, tp, zero = item.split(":")
            tp, zero = int(tp), int(zero)
            full = 4 * Transformer(
                plan_model_config(_layout_config(preset, 1, 1, args, "fp32")), seed=0, device="meta"
            ).num_params(non_embedding=False)
            result = dict(
                preset=preset, tp=tp, zero=zero, full_fp32_bytes=full, **_measure_layout(preset, tp, zero, args)
            )
            measured.append(result)
            if "error" in result:
                lines.append(f"| {preset} | {tp} | {zero} | - | not measured: {result['error']} | | | | | |")
                continue
            r0 = max(result["ranks"], key=lambda r: r["rss_peak"] - r["rss_before"])
            lines.append(
                f"| {preset} | {tp} | {zero} | {result['world']} | {r0['params_planned']:,} | "
                f"{r0['params_held']:,} | {gib(r0['rss_before'])} | {gib(r0['rss_peak'])} | "
                f"{(r0['rss_peak'] - r0['rss_before']) / full:.1%} | {result['seconds']} |"
            )
            gc.collect()
    lines += [
        "",
        f"Machine: {json.dumps(machine())}",
        "",
        f"Command: `python benchmarks/memory.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
    ]
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "memory-layouts")
    with open(stem + ".json", "w") as fh:
        json.dump(
            dict(
                machine=machine(),
                world=args.world,
                dtype=args.layout_dtype,
                seq_len=args.layout_seq_len,
                vocab_size=args.vocab_size,
                layouts=rows,
                measured=measured,
            ),
            fh,
            indent=2,
        )
    with open(stem + ".md", "w") as fh:
        fh.write(text + "\n")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatrain.models.config import PRESETS

    if args.layouts:
        return layouts_main(args, argv)

    bad = [p for p in args.preset_list if p not in PRESETS]
    if bad:
        print(f"memory.py: unknown preset(s) {', '.join(bad)} (allowed: {', '.join(PRESETS)})", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    failed = False
    for preset in args.preset_list:
        rows: dict = {}
        for method in args.method_list:
            start = time.perf_counter()
            try:
                result, info = build_and_step(preset, method, args, args.extra[method])
            except Exception as exc:  # one line per method that cannot be built here, then go on
                message = (str(exc).strip().splitlines() or [""])[0]
                rows[method] = dict(error=f"{type(exc).__name__}: {message}")
                print(f"{preset} {method}: not measured: {rows[method]['error']}", file=sys.stderr)
                failed = True
            else:
                rows[method] = dict(measurement=result.to_dict(), seconds=round(time.perf_counter() - start, 2), **info)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        text = table(rows, preset)
        print(text)
        stem = os.path.join(args.out, f"memory-{preset}")
        record = dict(
            preset=preset,
            device=args.device,
            dtype=args.dtype,
            vocab_size=args.vocab_size,
            seq_len=args.seq_len,
            batch=args.batch,
            machine=machine(),
            command=" ".join([os.path.basename(sys.executable), *sys.argv])
            if argv is None
            else "memory.py " + " ".join(argv),
            methods=rows,
        )
        with open(stem + ".json", "w") as fh:
            json.dump(record, fh, indent=2)
        with open(stem + ".md", "w") as fh:
            fh.write(
                text
                + "\nMachine: "
                + json.dumps(record["machine"])
                + "\n\nCommand: `"
                + record["command"]
                + f"` (device {args.device}, dtype {args.dtype}, vocab {args.vocab_size})\n"
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
