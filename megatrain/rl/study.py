"""The study's outputs: RUN/eval.jsonl (one object per checkpoint x pipeline x k), a markdown
table (RUN/eval.md), a plot of pass@k against the pretraining step with one line per pipeline
(RUN/eval.png), and the same numbers in tensorboard (RUN/tb, tags pass@K/PIPELINE)."""

from __future__ import annotations

import json
import os
from collections import defaultdict

from megatrain.files import write_atomic


def write_results(run_dir: str, rows: list[dict], tensorboard: bool = True) -> None:
    write_atomic(os.path.join(run_dir, "eval.jsonl"), "".join(json.dumps(row) + "\n" for row in rows))
    with open(os.path.join(run_dir, "eval.md"), "w", encoding="utf-8") as fh:
        fh.write(table(rows) + "\n")
    plot(rows, os.path.join(run_dir, "eval.png"))
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(run_dir, "tb"))
        for row in rows:
            writer.add_scalar(f"pass@{row['k']}/{row['pipeline']}", row["pass_at_k"], row["pretrain_step"])
            if row.get("val_ppl") is not None:
                writer.add_scalar(f"val_ppl/{row['pipeline']}", row["val_ppl"], row["pretrain_step"])
        writer.close()


def _by_run(rows: list[dict]) -> tuple[list[int], list[str], dict]:
    ks = sorted({r["k"] for r in rows})
    pipelines = list(dict.fromkeys(r["pipeline"] for r in rows))
    grid: dict = defaultdict(dict)
    for r in rows:
        grid[(r["pretrain_step"], r["pipeline"])][r["k"]] = r
    return ks, pipelines, grid


def table(rows: list[dict]) -> str:
    """One line per (pretraining step, pipeline): pass@k for each k, mean reward, validation perplexity.
    Pipeline `none` is the start checkpoint before any update."""
    ks, pipelines, grid = _by_run(rows)
    head = ["pretrain step", "pipeline", *[f"pass@{k}" for k in ks], "mean reward", "val ppl"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for step in sorted({s for s, _ in grid}):
        for p in pipelines:
            cells = grid.get((step, p))
            if not cells:
                continue
            any_row = next(iter(cells.values()))
            ppl = any_row.get("val_ppl")
            lines.append(
                "| "
                + " | ".join(
                    [
                        str(step),
                        p,
                        *[f"{cells[k]['pass_at_k']:.3f}" if k in cells else "" for k in ks],
                        f"{any_row['mean_reward']:.3f}",
                        f"{ppl:.1f}" if ppl is not None else "",
                    ]
                )
                + " |"
            )
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    """pass@k vs pretraining step, one panel per k, one line per pipeline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks, pipelines, grid = _by_run(rows)
    steps = sorted({s for s, _ in grid})
    fig, axes = plt.subplots(1, len(ks), figsize=(4 * len(ks), 3.4), squeeze=False)
    for ax, k in zip(axes[0], ks):
        for p in pipelines:
            xs = [s for s in steps if k in grid.get((s, p), {})]
            ax.plot(
                xs,
                [grid[(s, p)][k]["pass_at_k"] for s in xs],
                marker="o",
                label=p,
                linestyle="--" if p == "none" else "-",
            )
        ax.set_title(f"pass@{k}")
        ax.set_xlabel("pretraining step")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out pass@k")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
