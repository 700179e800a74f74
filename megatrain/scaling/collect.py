"""Collecting a sweep's results: one row per run into `<sweep dir>/report/runs.csv` and `runs.parquet`.

Everything is read from the run directories (metrics.jsonl, the final checkpoint's metadata for the
vocabulary size, the local runner's sweep_status.json), so runs started by the emitted Slurm or torchrun
scripts are collected the same way.
"""

from __future__ import annotations

import math
import os

from megatrain.scaling.runner import _read_status, read_metrics, run_dir, run_state
from megatrain.scaling.spec import SweepRun, SweepSpec, linked_keys, model_counts

__all__ = ["COLUMNS", "collect", "write_table"]

# The table's fixed columns, in order; one `axis:<key>` column per sweep axis follows them.
COLUMNS = (
    "name",
    "status",
    "error",
    "method",
    "budget",
    "size",
    "dim",
    "layers",
    "heads",
    "params",
    "params_non_embedding",
    "steps",
    "tokens",
    "flops",
    "flops_6nd",
    "final_loss",
    "final_val_loss",
    "best_val_loss",
    "final_val_ppl",
    "best_val_ppl",
    "final_val_exact_match",
    "final_val_answer_acc",
    "best_val_exact_match",
    "optimizer_bytes",
    "model_state_bytes",
    "train_s",
    "wall_s",
    "cpu_s",
)


def _vocab_size(path: str, config) -> int:
    """The run's vocabulary: its checkpoint metadata when it has one, else the config's."""
    from megatrain.engine.checkpoint import read_meta, resolve_checkpoint_dir
    from megatrain.errors import MegatrainError

    try:
        meta = read_meta(resolve_checkpoint_dir(path))
        if meta.get("model", {}).get("vocab_size"):
            return int(meta["model"]["vocab_size"])
    except (MegatrainError, OSError, ValueError, KeyError):
        pass
    return config.model.vocab_size or config.data.vocab_size


def _dotted(config: dict, key: str):
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def plan_memory(config, world: int, model):
    """The run's per-rank memory plan (megatrain.engine.memory_plan): optimizer state and model-state bytes."""
    from megatrain.engine.memory_plan import plan_memory as plan

    return plan(config, max(world, config.parallel.tensor), model)


def _train_seconds(records: list[dict], tokens_per_step: int) -> float:
    """Time spent in training steps, from the logged windows (tokens per window / tokens_per_s)."""
    total, previous = 0.0, 0
    for record in records:
        tps = record.get("tokens_per_s")
        if tps:
            total += (record["step"] - previous) * tokens_per_step / tps
        previous = record["step"]
    return total


def collect(spec: SweepSpec, runs: list[SweepRun]) -> list[dict]:
    """One row per run (COLUMNS, then `axis:<key>` per axis). Unfinished runs have nan results."""
    from megatrain.config import load_config

    rows = []
    for run in runs:
        path = run_dir(spec, run)
        state, error = run_state(spec, run)
        config_file = os.path.join(spec.dir, "configs", f"{run.name}.yaml")
        config = load_config(config_file)
        model = config.model.resolved()
        model.vocab_size = _vocab_size(path, config)
        counts = model_counts(model, config.data.seq_len)
        records = read_metrics(path)
        vals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
        matches = [r["val_exact_match"] for r in records if r.get("val_exact_match") is not None]
        answers = [r["val_answer_acc"] for r in records if r.get("val_answer_acc") is not None]
        memory = plan_memory(config, spec.nproc_per_node, model)
        losses = [r["loss"] for r in records if r.get("loss") is not None]
        tokens = run.tokens
        status = _read_status(path)
        nan = float("nan")
        row = {
            "name": run.name,
            "status": state,
            "error": error,
            "method": run.method,
            "budget": run.budget if run.budget is not None else nan,
            "size": run.size,
            "dim": model.dim,
            "layers": model.layers,
            "heads": model.heads,
            "params": counts["params"],
            "params_non_embedding": counts["params_non_embedding"],
            "steps": run.steps,
            "tokens": tokens,
            "flops": float(counts["flops_per_token"]) * tokens,
            "flops_6nd": 6.0 * counts["params_non_embedding"] * tokens,
            "final_loss": losses[-1] if state == "finished" and losses else nan,
            "final_val_loss": vals[-1] if state == "finished" and vals else nan,
            "best_val_loss": min(vals) if state == "finished" and vals else nan,
            "train_s": _train_seconds(records, tokens // run.steps) if state == "finished" else nan,
            "wall_s": status.get("wall_s", nan) if state == "finished" else nan,
            "cpu_s": (status.get("cpu_s") if status.get("cpu_s") is not None else nan) if state == "finished" else nan,
            "optimizer_bytes": memory.optimizer_bytes,
            "model_state_bytes": memory.model_state_bytes,
        }
        done = state == "finished"
        row["final_val_ppl"] = math.exp(min(vals[-1], 50.0)) if done and vals else nan
        row["best_val_ppl"] = math.exp(min(min(vals), 50.0)) if done and vals else nan
        row["final_val_exact_match"] = matches[-1] if done and matches else nan
        row["best_val_exact_match"] = max(matches) if done and matches else nan
        row["final_val_answer_acc"] = answers[-1] if done and answers else nan
        row = {**{c: row[c] for c in COLUMNS}, "keys": {key: _dotted(run.config, key) for key in linked_keys(spec)}}
        for key, value in run.axes.items():
            row[f"axis:{key}"] = value
        rows.append(row)
    return rows


def write_table(rows: list[dict], out_dir: str) -> tuple[str, str]:
    """runs.csv and runs.parquet under `out_dir`; returns their paths."""
    import pandas as pd

    os.makedirs(out_dir, exist_ok=True)
    frame = pd.DataFrame(
        [
            {k: v for k, v in row.items() if k != "keys"} | {f"key:{k}": v for k, v in row.get("keys", {}).items()}
            for row in rows
        ]
    )
    ordered = [c for c in COLUMNS if c in frame.columns] + [c for c in frame.columns if c not in COLUMNS]
    frame = frame[ordered]
    csv_path, parquet_path = os.path.join(out_dir, "runs.csv"), os.path.join(out_dir, "runs.parquet")
    frame.to_csv(csv_path, index=False)
    # Axis columns mix types across sweeps (a size label, a learning rate): parquet wants one type a column.
    frame.astype({c: str for c in frame.columns if c.startswith("axis:") and frame[c].dtype == object}).to_parquet(
        parquet_path, index=False
    )
    return csv_path, parquet_path
