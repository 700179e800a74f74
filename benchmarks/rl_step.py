"""RL step time split into generation / reward / log-probabilities / update.

Runs `megatrain rl` (GRPO) for a few iterations from a run or checkpoint and summarises the
per-iteration timings the job logs (generate_s, reward_s, logprob_s, update_s in metrics.jsonl):

    python benchmarks/rl_step.py --init runs/tiny-cpu --steps 5 [overrides ...]

Prints a markdown table and writes benchmarks/results/rl-step-<tag>.{json,md}. The first iteration
is dropped as warm-up when there are more than two.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

PARTS = ("generate_s", "reward_s", "logprob_s", "update_s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init", required=True, help="run or checkpoint directory to start from")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--nproc-per-node", type=int, default=1)
    ap.add_argument("overrides", nargs="*", help="rl.* / train.* overrides (e.g. rl.group_size=16)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = os.path.join(tmp, "run")
        cmd = [sys.executable, "-m", "megatrain.cli", "rl", f"rl.init={args.init}", f"run.dir={run}",
               f"rl.steps={args.steps}", "rl.pipeline=grpo", "rl.eval.k=[1]", "rl.eval.samples=1", "rl.eval.problems=1",
               "log.progress=false", "log.eval_batches=1", "--nproc-per-node", str(args.nproc_per_node), *args.overrides]
        subprocess.run(cmd, check=True)
        start = next(d for d in os.listdir(run) if d.startswith("from_step_"))
        with open(os.path.join(run, start, "grpo", "metrics.jsonl")) as fh:
            records = [json.loads(line) for line in fh]
    kept = records[1:] if len(records) > 2 else records
    mean = {p: statistics.mean(r[p] for r in kept) for p in PARTS}
    total = sum(mean.values())
    result = {"init": args.init, "steps": args.steps, "measured_iterations": len(kept), "overrides": args.overrides,
              "nproc_per_node": args.nproc_per_node, "seconds": mean, "total_s": total,
              "share": {p: mean[p] / total for p in PARTS}}
    lines = ["| part | seconds / iteration | share |", "|---|---|---|"]
    lines += [f"| {p[:-2]} | {mean[p]:.3f} | {mean[p] / total:.1%} |" for p in PARTS]
    lines.append(f"| total | {total:.3f} | 100% |")
    table = "\n".join(lines)
    print(table)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"rl-step-{args.tag}")
    with open(out + ".json", "w") as fh:
        json.dump(result, fh, indent=1)
    with open(out + ".md", "w") as fh:
        fh.write(f"RL step time (GRPO), `python benchmarks/rl_step.py --init {args.init} --steps {args.steps} "
                 f"{' '.join(args.overrides)}`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
