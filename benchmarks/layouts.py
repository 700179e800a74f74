"""Per-rank memory and step time of the 3D layouts (DP x TP x PP, and Ulysses context parallelism), as ratios to
one process on the same model, global batch and seed.

    python benchmarks/layouts.py                                   # the tiny-cpu model, the default layouts
    python benchmarks/layouts.py --layouts "pp=2;cp=2;pp=2,tp=2" --steps 10 --clock wall

Every layout runs under `megatrain bench` (megatrain.bench: alternating blocks, the median step, each rank's
peak memory; here only megatrain's side) with ZeRO-1, the stage the pipeline engine allows, so the layouts
differ only in how the model and the sequence are split. Beside the measured figures each row has the plan of
that layout (`megatrain plan`: the largest pipeline stage's rank; model states plus the activations of the
micro-batches it holds) and its ratio to one process: on a model this small the measured resident memory is
the interpreter, torch and DeepSpeed (~0.4 GiB per process), so what the layout saves shows in the plan and in
the step's own memory (peak minus what was resident before the step).

On a CPU machine with fewer cores than processes the step time says what the layout costs in
communication and oversubscription, not what it gains; `--clock cpu` (the default) times each step by rank 0's
CPU time, which other processes on the machine disturb least.

Writes benchmarks/results/layouts-<device>.{md,json} (or --tag) with the machine, versions and command.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

# Run as a script, this folder comes first on sys.path, and its kernels.py would then answer the
# `import kernels` that transformers makes (Hugging Face's package). megatrain is imported installed.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

from megatrain.errors import MegatrainError  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, "..", "launch", "configs", "tiny-cpu.yaml")
# base first: every ratio is to it. procs=4 with pp=2 / cp=2 adds DP=2.
DEFAULT_LAYOUTS = "base;procs=2;tp=2;pp=2;cp=2;pp=2,tp=2;pp=2,procs=4;cp=2,tp=2;cp=2,procs=4"
GIB = 1024**3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--layouts", default=DEFAULT_LAYOUTS, help="';'-separated `megatrain bench` settings, base first")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--block", type=int, default=5)
    p.add_argument("--clock", choices=("wall", "cpu"), default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--tag", default=None, help="results file stem (default: layouts-<device>)")
    p.add_argument("overrides", nargs="*", help="config overrides for every layout (a.b=c)")
    return p.parse_args(argv)


def layout_settings(text: str) -> list:
    """The layouts as bench settings, each with ZeRO-1 unless it names a stage."""
    from megatrain.bench import parse_settings

    settings = parse_settings([text])
    for s in settings:
        if not any(o.startswith("parallel.zero_stage=") for o in s.overrides):
            s.overrides.append("parallel.zero_stage=1")
    return settings


def planned(config: str, overrides: list[str], setting, procs: int) -> dict:
    """The plan of one layout: the rank that needs the most (a pipeline's largest stage)."""
    from megatrain.config import load_config
    from megatrain.engine.memory_plan import plan_stages

    cfg = load_config(config, [*overrides, *setting.overrides]).resolve(procs)
    stages = plan_stages(cfg, procs)
    rank = max(stages, key=lambda plan: plan.total_bytes)
    return {
        "model_state_bytes": rank.model_state_bytes,
        "activation_bytes": rank.activation_bytes,
        "total_bytes": rank.total_bytes,
        "in_flight": rank.in_flight,
        "stages": [plan.as_dict() for plan in stages],
        "layout": {
            "tensor": cfg.parallel.tensor,
            "pipeline": cfg.parallel.pipeline,
            "context": cfg.parallel.context,
            "data": procs // (cfg.parallel.tensor * cfg.parallel.pipeline * cfg.parallel.context),
        },
    }


def rows(result: dict, plans: dict[str, dict]) -> list[dict]:
    """One row per layout with its ratios to the first (one process)."""
    out, base = [], None
    for s in result["settings"]:
        plan = plans[s["label"]]
        row = {"label": s["label"], "procs": s["procs"], **plan["layout"], "plan": plan}
        if "error" in s:
            row["error"] = s["error"]
            out.append(row)
            continue
        ours = s["sides"]["megatrain"]
        row.update(
            step_s=s["tokens_per_step"] / ours["tokens_per_s"],
            tokens_per_s=ours["tokens_per_s"],
            peak_gib=max(ours["peak_memory_gib_per_rank"]),
            step_gib=max(ours["step_memory_gib_per_rank"]),
            first_loss=ours["first_step_loss"],
        )
        base = base or row
        row["step_ratio"] = row["step_s"] / base["step_s"]
        row["plan_ratio"] = plan["total_bytes"] / base["plan"]["total_bytes"]
        row["plan_activation_ratio"] = plan["activation_bytes"] / base["plan"]["activation_bytes"]
        out.append(row)
    return out


def markdown(result: dict, table: list[dict], command: str) -> str:
    v = result["versions"]
    first = next(s for s in result["settings"] if "error" not in s)
    lines = [
        "# Per-rank memory and step time by layout (CPU)",
        "",
        f"{result['model']['description']}. Global batch {first['global_batch']} x {first['seq_len']} tokens per "
        f"step in every layout, ZeRO-1, {first['dtype']}; median of {len(first['sides']['megatrain']['step_times_s'])} "
        f"steps after the warm-up, timed by {first['clock']} clock, {first.get('threads') or 'default'} thread(s) "
        f"per process, on {result['device']}.",
        "",
        "| layout | procs | TP | PP | C | DP | step (ms) | step / 1 proc | planned per rank (MiB) | planned / 1 proc "
        "| planned activations / 1 proc | micro-batches in flight | measured peak per rank (GiB) | step memory (GiB) "
        "| first-step loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in table:
        head = f"| {r['label']} | {r['procs']} | {r['tensor']} | {r['pipeline']} | {r['context']} | {r['data']} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error']} |" + " |" * 9)
            continue
        p = r["plan"]
        lines.append(
            f"{head} {r['step_s'] * 1e3:.1f} | {r['step_ratio']:.2f} | {p['total_bytes'] / 2**20:.2f} | "
            f"{r['plan_ratio']:.2f} | {r['plan_activation_ratio']:.2f} | {p['in_flight']} | {r['peak_gib']:.2f} | "
            f"{r['step_gib']:.3f} | {r['first_loss']:.6f} |"
        )
    lines += [
        "",
        "- planned: `megatrain plan` of the layout (model states + activations of the micro-batches held at once, "
        "without activation checkpointing); with a pipeline the largest stage's rank.",
        "- measured peak: the largest resident set of any rank while it ran (the interpreter, torch and DeepSpeed "
        "are most of it at this size); step memory: that peak minus what was resident before the timed steps.",
        "- the same first-step loss in every layout: the same model, seed and batch (fp32).",
        "",
        "- 4-process layouts on a machine with fewer cores share them (the step time then includes the "
        "oversubscription); `--clock cpu` times rank 0's CPU time instead, which leaves out waits (a pipeline's "
        "bubble among them).",
        "",
        f"Versions: torch {v.get('torch')}, deepspeed {v.get('deepspeed')}, python {v.get('python')}; "
        f"commit {result.get('commit') or 'unknown'}.",
        "",
        f"Command: `{command}`",
        "",
    ]
    return "\n".join(lines)


def _commit():
    """The checkout's commit (with `-dirty` when it has changes), or None outside a git checkout."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "-C", HERE, "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatrain.bench import run_bench

    command = "python " + shlex.join(["benchmarks/layouts.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        settings = layout_settings(args.layouts)
        plans = {}
        for s in settings:
            from megatrain.config import load_config

            cfg = load_config(args.config, [*args.overrides, *s.overrides])
            procs = s.process_count(cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.context)
            plans[s.label] = planned(args.config, args.overrides, s, procs)
        scratch = os.path.join(args.out, ".layouts-bench")
        result = run_bench(
            args.config,
            args.overrides,
            settings,
            out_dir=scratch,
            warmup=args.warmup,
            steps=args.steps,
            block=args.block,
            baseline=False,
            plain=False,
            command=command,
            echo=True,
            clock=args.clock,
            threads=args.threads,
        )
    except MegatrainError as exc:
        print(f"megatrain: error: {exc}", file=sys.stderr)
        return 2
    for path in result["paths"].values():
        os.remove(path)
    os.rmdir(scratch)
    result["commit"] = _commit()
    table = rows(result, plans)
    device = "gpu" if "cuda" in result["device"].lower() or "nvidia" in result["device"].lower() else "cpu"
    stem = args.tag or f"layouts-{device}"
    text = markdown(result, table, command)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, stem + ".md"), "w", encoding="utf-8") as fh:
        fh.write(text)
    with open(os.path.join(args.out, stem + ".json"), "w", encoding="utf-8") as fh:
        json.dump(
            {
                "device": result["device"],
                "versions": result["versions"],
                "command": command,
                "commit": result["commit"],
                "model": result["model"],
                "rows": table,
                "bench": result["settings"],
            },
            fh,
            indent=1,
        )
    print(text)
    print(f"wrote {os.path.join(args.out, stem)}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
