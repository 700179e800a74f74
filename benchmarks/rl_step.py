"""RL step time split into generation / reward / log-probabilities / update.

Runs `megatrain rl` (GRPO) for a few iterations from a run or checkpoint and summarises the
per-iteration timings the job logs (generate_s, reward_s, logprob_s, update_s in metrics.jsonl):

    python benchmarks/rl_step.py --init runs/tiny-cpu --steps 5 [overrides ...]

Prints a markdown table and writes benchmarks/results/rl-step-<tag>.{json,md} (or under --out)
with the command, the device, the model and the versions; the generation share of the step is the
`generate` row. The first iteration is dropped as warm-up when there are more than two.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile

import torch

# Run as a script, this folder comes first on sys.path, and its kernels.py would then answer the
# `import kernels` that transformers makes (Hugging Face's package). megatrain is imported installed.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

import megatrain  # noqa: E402
from megatrain.bench.report import cpu_name  # noqa: E402

PARTS = ("generate_s", "reward_s", "logprob_s", "update_s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init", required=True, help="run or checkpoint directory to start from")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--nproc-per-node", type=int, default=1)
    ap.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
        help="folder for rl-step-<tag>.{json,md}",
    )
    ap.add_argument("--note", default="", help="a sentence for the results (e.g. the machine's state)")
    ap.add_argument("overrides", nargs="*", help="rl.* / train.* overrides (e.g. rl.group_size=16)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = os.path.join(tmp, "run")
        cmd = [
            sys.executable,
            "-m",
            "megatrain.cli",
            "rl",
            f"rl.init={args.init}",
            f"run.dir={run}",
            f"rl.steps={args.steps}",
            "rl.pipeline=grpo",
            "rl.eval.k=[1]",
            "rl.eval.samples=1",
            "rl.eval.problems=1",
            "log.progress=false",
            "log.eval_batches=1",
            "--nproc-per-node",
            str(args.nproc_per_node),
            *args.overrides,
        ]
        subprocess.run(cmd, check=True)
        start = next(d for d in os.listdir(run) if d.startswith("from_step_"))
        with open(os.path.join(run, start, "grpo", "metrics.jsonl")) as fh:
            records = [json.loads(line) for line in fh]
        with open(os.path.join(run, start, "grpo", "config.yaml")) as fh:
            import yaml

            rl_cfg = yaml.safe_load(fh)["rl"]
    from megatrain.engine.checkpoint import read_meta, resolve_checkpoint_dir

    model_cfg = read_meta(resolve_checkpoint_dir(args.init))["model"]
    kept = records[1:] if len(records) > 2 else records
    mean = {p: statistics.mean(r[p] for r in kept) for p in PARTS}
    total = sum(mean.values())
    rollout = {
        k: rl_cfg[k]
        for k in (
            "group_size",
            "prompts_per_step",
            "max_new_tokens",
            "micro_batch",
            "mini_batch",
            "ppo_epochs",
            "kl_coef",
        )
    }
    model = {k: model_cfg[k] for k in ("dim", "layers", "heads", "kv_heads", "ffn_dim", "vocab_size")}
    response = statistics.mean(r["response_length"] for r in kept)
    result = {
        "benchmark": "RL step time split (GRPO)",
        "command": "python " + shlex.join(sys.argv),
        # the job runs on the GPU when torch sees one (train.dtype auto: bf16 there)
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_name(),
        "device_type": "cuda" if torch.cuda.is_available() else "cpu",
        "host_cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "deepspeed": _version("deepspeed"),
            "megatrain": megatrain.__version__,
        },
        "init": args.init,
        "model": model,
        "rollout": rollout,
        "steps": args.steps,
        "measured_iterations": len(kept),
        "overrides": args.overrides,
        "nproc_per_node": args.nproc_per_node,
        "mean_response_tokens": response,
        "seconds": mean,
        "total_s": total,
        "share": {p: mean[p] / total for p in PARTS},
        "generation_share": mean["generate_s"] / total,
        "note": args.note,
    }
    lines = ["| part | seconds / iteration | share |", "|---|---|---|"]
    lines += [f"| {p[:-2]} | {mean[p]:.3f} | {mean[p] / total:.1%} |" for p in PARTS]
    lines.append(f"| total | {total:.3f} | 100% |")
    table = "\n".join(lines)
    print(table)
    print(f"generation share of the step: {result['generation_share']:.1%}")
    os.makedirs(args.out, exist_ok=True)
    out = os.path.join(args.out, f"rl-step-{args.tag}")
    with open(out + ".json", "w") as fh:
        json.dump(result, fh, indent=1)
    header = [
        f"# RL step time (GRPO) on {result['device']}",
        "",
        f"Command: `{result['command']}`",
        "",
        f"{args.nproc_per_node} process(es) on "
        f"{'the GPU, ' if result['device_type'] == 'cuda' else ''}{result['cpu_count']} host CPUs (load average "
        f"{result['load_average_1min']} at the end). Model: dim {model['dim']}, {model['layers']} layers, "
        f"{model['heads']} heads ({model['kv_heads']} KV), FFN {model['ffn_dim']}, vocab {model['vocab_size']}. "
        f"Rollout: {rollout['prompts_per_step']} prompts x {rollout['group_size']} samples of up to "
        f"{rollout['max_new_tokens']} tokens (mean {response:.1f}). Mean of {len(kept)} iterations "
        f"(the first dropped as warm-up).",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        "",
        f"Generation share of the step: **{result['generation_share']:.1%}**",
        "",
    ]
    if args.note:
        header[-2:-2] = [f"Note: {args.note}", ""]
    with open(out + ".md", "w") as fh:
        fh.write("\n".join(header) + "\n" + table + "\n")
    return 0


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
