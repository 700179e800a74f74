"""Studies: a sweep with a tuned key and repeated seeds, reported as means and spreads (docs/scaling.md).

A study file is a sweep file (megatrain.scaling.spec) with three more sections:

    tune:                       # chosen per point: every value runs at the first seed, the best one wins
      key: train.lr
      values: [1.0e-3, 3.0e-3, 1.0e-2]
      metric: best_val_loss     # a column of the collected table (megatrain.scaling.collect)
      goal: min                 # or max (e.g. final_val_exact_match)
    seeds:                      # the point is repeated at its best value with each seed
      key: train.seed
      values: [1, 2, 3]
    study:                      # the report
      title: Low-rank methods vs full rank
      metrics: [final_val_ppl, optimizer_bytes, train_s]   # mean and spread over seeds, in this order
      baseline: {axis: variant, value: dense, metric: final_val_ppl}   # gap to the baseline point
      plots:
        - {x: tokens, y: final_val_ppl, group: variant, panel: size, logx: true}

A point is one combination of the other axes (size, tokens, variant, ...). It is run in two stages:
every tune value at the first seed, then the other seeds at the value that scored best on
`tune.metric` (ties go to the earlier value; a point whose tuning runs all failed is left out). Every run
is a normal sweep run (its own run directory and config under the sweep directory), so the local runner
skips what finished before and a study can be resumed, extended or reported again.
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Callable, Optional

from megatrain.errors import ConfigError
from megatrain.scaling.spec import METRIC_GOALS, TUNE_VALUES

__all__ = [
    "is_study",
    "study_spec",
    "plan_study",
    "split_stages",
    "select_best",
    "run_study",
    "aggregate",
    "write_study_report",
    "METRIC_GOALS",
]


def is_study(spec) -> bool:
    return bool(spec.study)


def study_spec(spec):
    """The sweep spec with the tune and seed keys added as axes (the plan of every run the study may need)."""
    full = copy.copy(spec)
    full.axes = dict(spec.axes)
    tune, seeds = spec.study.get("tune"), spec.study["seeds"]
    if tune:
        values = list(tune["values"])
        for axis_values in spec.axes.values():
            for value in axis_values:
                if isinstance(value, dict):
                    values += [v for v in value.get(TUNE_VALUES, []) if v not in values]
        full.axes[tune["key"]] = values
    if seeds["values"] != [None]:
        full.axes[seeds["key"]] = seeds["values"]
    return full


def tune_values_of(spec, axes: dict) -> list:
    """The tune values of a point (its axes' labels): a linked axis value's own `tune_values`, else tune.values."""
    for key, label in axes.items():
        for value in spec.axes.get(key, []):
            if isinstance(value, dict) and value.get("name") == label and TUNE_VALUES in value:
                return value[TUNE_VALUES]
    return spec.study["tune"]["values"] if spec.study.get("tune") else [None]


def plan_study(spec) -> list:
    """Every run the study may need: each point at each of its tune values and each seed."""
    from megatrain.scaling.spec import plan_runs

    runs = plan_runs(study_spec(spec))
    if not spec.study.get("tune"):
        return runs
    key = spec.study["tune"]["key"]
    return [r for r in runs if any(str(r.axes[key]) == str(v) for v in tune_values_of(spec, r.axes))]


def _point(run, spec) -> tuple:
    """A run's point: its axes without the tuned and seeded keys."""
    skip = {spec.study["seeds"]["key"]} | ({spec.study["tune"]["key"]} if spec.study.get("tune") else set())
    return tuple((k, str(v)) for k, v in run.axes.items() if k not in skip)


def _seed(run, spec):
    seeds = spec.study["seeds"]
    return run.axes.get(seeds["key"], seeds["values"][0])


def _tuned(run, spec):
    tune = spec.study.get("tune")
    return run.axes.get(tune["key"]) if tune else None


def split_stages(spec, runs: list) -> tuple[list, list]:
    """(tuning runs: every tune value at the first seed, the other seeds' runs at every value)."""
    first = spec.study["seeds"]["values"][0]
    stage1 = [r for r in runs if _seed(r, spec) == first]
    stage2 = [r for r in runs if _seed(r, spec) != first]
    return stage1, stage2


def select_best(spec, stage1: list, rows: dict) -> dict:
    """point -> the tune value that scored best at the first seed (points whose runs all failed are absent).
    rows: run name -> collected row."""
    tune = spec.study.get("tune")
    best: dict = {}
    for run in stage1:
        point = _point(run, spec)
        value = rows[run.name].get(tune["metric"]) if tune else 0.0
        if value is None or (isinstance(value, float) and math.isnan(value)) or rows[run.name]["status"] != "finished":
            continue
        score = value if not tune or tune["goal"] == "min" else -value
        if point not in best or score < best[point][0]:
            best[point] = (score, _tuned(run, spec))
    return {point: value for point, (_, value) in best.items()}


def chosen_runs(spec, runs: list, best: dict) -> list:
    """The runs at their point's chosen tune value (every seed)."""
    return [r for r in runs if _point(r, spec) in best and _tuned(r, spec) == best[_point(r, spec)]]


def run_study(spec, *, jobs: int = 1, echo: Callable[[str], None] = print, launch=None) -> tuple[list, dict]:
    """Run the study's two stages locally; returns (every planned run, point -> chosen tune value)."""
    from megatrain.scaling.collect import collect
    from megatrain.scaling.runner import run_local, write_plan

    runs = plan_study(spec)
    write_plan(spec, runs)
    stage1, stage2 = split_stages(spec, runs)
    echo(f"study {spec.dir}: stage 1, {len(stage1)} tuning runs")
    run_local(spec, stage1, nproc=spec.nproc_per_node, echo=echo, launch=launch, jobs=jobs, planned=True)
    rows = {row["name"]: row for row in collect(spec, stage1)}
    best = select_best(spec, stage1, rows)
    todo = chosen_runs(spec, stage2, best)
    echo(
        f"study {spec.dir}: stage 2, {len(todo)} runs at the chosen "
        f"{spec.study['tune']['key'] if spec.study.get('tune') else 'settings'}"
    )
    if todo:
        run_local(spec, todo, nproc=spec.nproc_per_node, echo=echo, launch=launch, jobs=jobs, planned=True)
    return runs, best


# ----------------------------------------------------------------------------------------------
# the report


def _finite(values: list) -> list:
    return [v for v in values if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))]


def _mean_std(values: list) -> tuple[float, float, int]:
    vals = _finite(values)
    if not vals:
        return float("nan"), float("nan"), 0
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, std, len(vals)


def aggregate(spec, runs: list, rows: list[dict]) -> list[dict]:
    """One record per point at its chosen tune value: axes, the chosen value, seeds done, and for every
    reported metric its mean, sample standard deviation and count over seeds; gap to the baseline point."""
    by_name = {row["name"]: row for row in rows}
    stage1, _ = split_stages(spec, runs)
    best = select_best(spec, stage1, by_name)
    metrics = list(
        dict.fromkeys(
            spec.study.get("study", {}).get("metrics", ["best_val_loss"])
            + [p["y"] for p in spec.study.get("study", {}).get("plots", []) if p["y"] != "gap"]
        )
    )
    baseline = spec.study.get("study", {}).get("baseline")
    if baseline and baseline["metric"] not in metrics:
        metrics.append(baseline["metric"])
    points: dict = {}
    for run in chosen_runs(spec, runs, best):
        points.setdefault(_point(run, spec), []).append(run)
    out = []
    for point, members in points.items():
        done = [by_name[r.name] for r in members if by_name[r.name]["status"] == "finished"]
        first = members[0]
        record = {
            "point": dict(point),
            "axes": {k: v for k, v in first.axes.items() if k != spec.study["seeds"]["key"]},
            "tuned": best[point],
            "seeds": len(done),
            "runs": [r.name for r in members],
            "plan": {"params_non_embedding": first.params_non_embedding, "tokens": first.tokens},
        }
        for metric in metrics:
            mean, std, n = _mean_std([row.get(metric) for row in done])
            record[metric] = {"mean": mean, "std": std, "n": n}
        record["keys"] = done[0].get("keys", {}) if done else {}
        out.append(record)
    if baseline:
        axis, metric = baseline["axis"], baseline["metric"]
        index = {
            tuple((k, v) for k, v in r["point"].items() if k != axis): r
            for r in out
            if str(r["point"].get(axis)) == str(baseline["value"])
        }
        for record in out:
            base = index.get(tuple((k, v) for k, v in record["point"].items() if k != axis))
            if base is not None and base[metric]["n"]:
                gap = record[metric]["mean"] - base[metric]["mean"]
                record["gap"] = {
                    "metric": metric,
                    "abs": gap,
                    "rel": gap / base[metric]["mean"],
                    "std": math.sqrt(record[metric]["std"] ** 2 + base[metric]["std"] ** 2),
                }
    return out


def _fmt(value: float, metric: str) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    if metric.endswith("_bytes"):
        return f"{value / 2**20:.2f} MiB" if value >= 2**20 else f"{value / 2**10:.1f} KiB"
    if metric in ("params", "params_non_embedding", "tokens"):
        return f"{value:,.0f}"
    if metric.endswith("_s"):
        return f"{value:.1f}"
    if "exact_match" in metric or "acc" in metric:
        return f"{value:.3f}"
    return f"{value:.4g}"


def _axis_value(record: dict, key: str):
    """The value of `key` at a record: an axis label, a config key a linked axis set, or tokens/params."""
    if key in record["axes"]:
        return record["axes"][key]
    if key in record.get("keys", {}):
        return record["keys"][key]
    if key in ("tokens", "params_non_embedding"):
        return record["plan"][key]
    raise ConfigError(f"study plot: '{key}' is neither an axis nor a key the axes set")


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _matches(record: dict, where: dict) -> bool:
    return all(str(_axis_value(record, k)) == str(v) for k, v in (where or {}).items())


def write_plots(spec, records: list[dict], out_dir: str) -> list[str]:
    """One PNG per study plot: y (mean, error bars one standard deviation over seeds) against x, one line
    per group value, one panel per panel value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for i, plot in enumerate(spec.study.get("study", {}).get("plots", [])):
        chosen = [r for r in records if _matches(r, plot.get("where"))]
        if not chosen:
            continue
        panels = (
            sorted({str(_axis_value(r, plot["panel"])) for r in chosen}, key=_sort_key) if plot.get("panel") else [None]
        )
        fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
        for ax, panel in zip(axes[0], panels):
            members = [r for r in chosen if panel is None or str(_axis_value(r, plot["panel"])) == panel]
            groups = sorted(
                {str(_axis_value(r, plot["group"])) if plot.get("group") else "" for r in members}, key=_sort_key
            )
            for group in groups:
                line = [r for r in members if not plot.get("group") or str(_axis_value(r, plot["group"])) == group]
                pts = []
                for r in line:
                    x = _number(_axis_value(r, plot["x"]))
                    if plot["y"] == "gap":
                        if "gap" not in r:
                            continue
                        y = 100.0 * r["gap"]["rel"]
                        base_mean = r[r["gap"]["metric"]]["mean"] - r["gap"]["abs"]
                        err = 100.0 * r["gap"]["std"] / base_mean if base_mean else 0.0
                    else:
                        y, err = r[plot["y"]]["mean"], r[plot["y"]]["std"]
                    if x is not None and y is not None and not math.isnan(y):
                        pts.append((x, y, err))
                pts.sort()
                if pts:
                    ax.errorbar(
                        [p[0] for p in pts],
                        [p[1] for p in pts],
                        yerr=[p[2] for p in pts],
                        marker="o",
                        capsize=3,
                        label=group or None,
                    )
            ax.set_xlabel(plot["x"])
            ax.set_ylabel("gap to baseline (%)" if plot["y"] == "gap" else plot["y"])
            if plot.get("logx"):
                ax.set_xscale("log")
            if plot.get("logy"):
                ax.set_yscale("log")
            if panel is not None:
                ax.set_title(f"{plot['panel']} = {panel}", fontsize=9)
            ax.grid(alpha=0.3)
            if any(ax.get_legend_handles_labels()[1]):
                ax.legend(fontsize=7)
        if plot.get("title"):
            fig.suptitle(plot["title"], fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, f"study-plot-{i + 1}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _sort_key(text: str):
    number = _number(text)
    return (0, number, "") if number is not None else (1, 0.0, text)


def tuning_table(spec, runs: list, rows: list[dict]) -> list[str]:
    """Markdown: each point's tuning runs (metric per tune value) and the value chosen."""
    tune = spec.study.get("tune")
    if not tune:
        return []
    by_name = {row["name"]: row for row in rows}
    stage1, _ = split_stages(spec, runs)
    best = select_best(spec, stage1, by_name)
    values = study_spec(spec).axes[tune["key"]]
    values = sorted(values, key=lambda v: _sort_key(str(v)))
    out = [
        "| point | " + " | ".join(f"{tune['key']}={v}" for v in values) + " | chosen |",
        "|---|" + "---|" * (len(values) + 1),
    ]
    points: dict = {}
    for run in stage1:
        points.setdefault(_point(run, spec), {})[str(_tuned(run, spec))] = by_name[run.name]
    for point, cells in points.items():
        label = ", ".join(f"{k}={v}" for k, v in point) or "base"
        row = []
        own = sorted(tune_values_of(spec, dict(point)), key=lambda v: _sort_key(str(v)))
        for v in values:
            r = cells.get(str(v))
            if not any(str(v) == str(o) for o in own):
                row.append("")
            else:
                row.append(
                    "failed" if r is None or r["status"] != "finished" else _fmt(r.get(tune["metric"]), tune["metric"])
                )
        chosen = best.get(point, "none")
        edge = " (edge of the grid)" if len(own) > 2 and str(chosen) in (str(own[0]), str(own[-1])) else ""
        out.append(f"| {label} | " + " | ".join(row) + f" | {chosen}{edge} |")
    return out


def study_markdown(
    spec, runs: list, rows: list[dict], records: list[dict], plots: list[str], cpu_seconds: float
) -> str:
    study = spec.study.get("study", {})
    metrics = study.get("metrics", ["best_val_loss"])
    seeds = spec.study["seeds"]
    tune = spec.study.get("tune")
    stage1, _ = split_stages(spec, runs)
    wanted = {r.name for r in stage1} | {name for record in records for name in record["runs"]}
    rows = [r for r in rows if r["name"] in wanted]  # the seed runs at values not chosen never run
    finished = sum(1 for r in rows if r["status"] == "finished")
    out = [f"# {study.get('title', 'Study')}", ""]
    if study.get("notes"):
        out += [study["notes"].strip(), ""]
    out += [
        f"Sweep directory `{spec.dir}`: {finished} of {len(rows)} runs finished; "
        f"{sum(r.get('wall_s') or 0 for r in rows if r['status'] == 'finished'):.0f} s of run wall time "
        f"(children), {cpu_seconds:.0f} s of CPU time.",
        "",
    ]
    if tune:
        own = [
            f"{v['name']}: {v[TUNE_VALUES]}"
            for values in spec.axes.values()
            for v in values
            if isinstance(v, dict) and TUNE_VALUES in v
        ]
        grid = f"{tune['values']}" + (f" ({'; '.join(own)})" if own else "")
        out += [
            f"Tuned per point: `{tune['key']}` over {grid} at the first seed, by "
            f"`{tune['metric']}` ({tune['goal']}); then `{seeds['key']}` in {seeds['values']} at the chosen "
            f"value. Mean ± sample standard deviation over seeds (n = seeds finished).",
            "",
        ]
    axes = [k for k in spec.axes]
    header = axes + ([tune["key"]] if tune else []) + ["n"] + metrics
    baseline = study.get("baseline")
    if baseline:
        header.append(f"gap to {baseline['axis']}={baseline['value']} ({baseline['metric']})")
    out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for record in sorted(records, key=lambda r: [_sort_key(str(r["point"].get(k, ""))) for k in axes]):
        cells = [str(record["point"].get(k, "")) for k in axes]
        if tune:
            cells.append(str(record["tuned"]))
        cells.append(str(record["seeds"]))
        for metric in metrics:
            m = record[metric]
            spread = m["n"] > 1 and not (isinstance(m["std"], float) and (math.isnan(m["std"]) or m["std"] == 0))
            cells.append(_fmt(m["mean"], metric) + (f" ± {_fmt(m['std'], metric)}" if spread else ""))
        if baseline:
            gap = record.get("gap")
            cells.append("" if gap is None else f"{gap['abs']:+.4g} ({100 * gap['rel']:+.1f}%)")
        out.append("| " + " | ".join(cells) + " |")
    if tune:
        out += ["", f"## Tuning runs ({tune['metric']} at the first seed)", ""] + tuning_table(spec, runs, rows)
    if plots:
        out += ["", "## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    return "\n".join(out) + "\n"


def write_study_report(spec, runs: Optional[list] = None, out_dir: Optional[str] = None) -> str:
    """Collect every run of the study, aggregate and write report/study.md, study.json, runs.csv and the
    plots; returns the markdown path."""
    from megatrain.scaling.collect import collect, write_table

    runs = runs if runs is not None else plan_study(spec)
    out_dir = out_dir or os.path.join(spec.dir, "report")
    os.makedirs(out_dir, exist_ok=True)
    rows = collect(spec, runs)
    write_table(rows, out_dir)
    records = aggregate(spec, runs, rows)
    plots = write_plots(spec, records, out_dir)
    cpu = sum(r.get("cpu_s") or 0 for r in rows if r["status"] == "finished")
    text = study_markdown(spec, runs, rows, records, plots, cpu)
    path = os.path.join(out_dir, "study.md")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    with open(os.path.join(out_dir, "study.json"), "w", encoding="utf-8") as fh:
        json.dump({"spec": spec.to_dict(), "points": records, "runs": rows}, fh, indent=1, default=str)
    return path
