"""A sweep's report: the table of runs, the fits per method, the plots (PNG and SVG) and report.md.

Written under `<sweep dir>/report/`: runs.csv, runs.parquet, fits.json, report.md and the figures
loss_vs_compute, isoflop (isoflop sweeps), fit and methods.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

import numpy as np

from megatrain.scaling.collect import collect, write_table
from megatrain.scaling.fit import (
    chinchilla_loss,
    compute_optimal,
    fit_chinchilla,
    isoflop_minima,
    optimal_n,
    power_law_exponent,
)
from megatrain.scaling.spec import SweepRun, SweepSpec

__all__ = ["fit_methods", "pareto_frontier", "write_report"]


def pareto_frontier(compute, loss) -> tuple[np.ndarray, np.ndarray]:
    """The runs no cheaper run beats: sorted by compute, each with a lower loss than every cheaper one.
    Returns (compute, loss) of the frontier, `[F]` each."""
    compute, loss = np.asarray(compute, dtype=float), np.asarray(loss, dtype=float)
    order = np.argsort(compute)
    xs, ys, best = [], [], math.inf
    for i in order:
        if loss[i] < best:
            best = loss[i]
            xs.append(compute[i])
            ys.append(loss[i])
    return np.array(xs), np.array(ys)


def fit_methods(rows: list[dict], *, bootstrap: int, max_starts: Optional[int], isoflop: bool) -> dict:
    """Per method: the parametric fit (with compute-optimal exponents) and, for isoflop sweeps, approach 2.

    Uses the finished runs with a validation loss: N = params_non_embedding, D = tokens, loss =
    final_val_loss. Returns {method: {"runs": P, "parametric": dict or {"error": ...}, "optimal": ...,
    "isoflop": [...], "isoflop_exponents": {...}}}.
    """
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        done = [
            r
            for r in rows
            if r["method"] == method and r["status"] == "finished" and math.isfinite(r["final_val_loss"])
        ]
        entry: dict = {"runs": len(done)}
        N = np.array([r["params_non_embedding"] for r in done], dtype=float)
        D = np.array([r["tokens"] for r in done], dtype=float)
        L = np.array([r["final_val_loss"] for r in done], dtype=float)
        if len(done) >= 5:
            fit = fit_chinchilla(N, D, L, bootstrap=bootstrap, max_starts=max_starts)
            entry["parametric"] = fit
            entry["optimal"] = compute_optimal(fit)
            predicted = chinchilla_loss(fit, N, D)
            entry["parametric"]["rms_log_residual"] = float(np.sqrt(np.mean((np.log(predicted) - np.log(L)) ** 2)))
        else:
            entry["parametric"] = {"error": f"{len(done)} finished runs; the law has 5 parameters"}
        if isoflop and done:
            budgets = np.array([r["budget"] for r in done], dtype=float)
            minima = isoflop_minima(budgets, N, L)
            entry["isoflop"] = minima
            found = [m for m in minima if math.isfinite(m["N_opt"])]
            a, _ = power_law_exponent([m["C"] for m in found], [m["N_opt"] for m in found])
            b, _ = power_law_exponent([m["C"] for m in found], [m["C"] / (6 * m["N_opt"]) for m in found])
            entry["isoflop_exponents"] = {
                "a": a,
                "b": b,
                "budgets": len(found),
                "inside": sum(m["inside"] for m in found),
            }
        out[method] = entry
    return out


def _fmt(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return f"{x:,}"
    return f"{x:.{digits}g}"


def _interval(fit: dict, name: str) -> str:
    ci = fit.get(f"{name}_ci")
    return f"{_fmt(fit[name])} [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else _fmt(fit[name])


def _save(fig, out_dir: str, stem: str) -> str:
    for ext in ("png", "svg"):
        fig.savefig(os.path.join(out_dir, f"{stem}.{ext}"), dpi=130, bbox_inches="tight")
    return f"{stem}.png"


def _plots(rows: list[dict], fits: dict, out_dir: str, isoflop: bool) -> list[tuple[str, str]]:
    """Draw the figures; returns (title, png file name) of each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["status"] == "finished" and math.isfinite(r["final_val_loss"])]
    if not done:
        return []
    figures = []
    methods = list(fits)
    colors = plt.get_cmap("tab10")
    log_n = np.log10([r["params_non_embedding"] for r in done])
    norm = matplotlib.colors.Normalize(vmin=log_n.min(), vmax=max(log_n.max(), log_n.min() + 1e-9))
    size_map = plt.get_cmap("viridis")

    # loss against compute, with the frontier and the law's compute-optimal loss
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    sc = ax.scatter(
        [r["flops_6nd"] for r in done],
        [r["final_val_loss"] for r in done],
        c=log_n,
        cmap=size_map,
        norm=norm,
        s=28,
        zorder=3,
    )
    fig.colorbar(sc, ax=ax, label="log10 N (non-embedding parameters)")
    for i, method in enumerate(methods):
        mine = [r for r in done if r["method"] == method]
        fx, fy = pareto_frontier([r["flops_6nd"] for r in mine], [r["final_val_loss"] for r in mine])
        label = "frontier" if len(methods) == 1 else f"frontier {method}"
        ax.step(fx, fy, where="post", color=colors(i), lw=1.2, label=label)
        fit = fits[method].get("parametric", {})
        if "alpha" in fit and math.isfinite(compute_optimal(fit)["G"]):
            C = np.geomspace(min(r["flops_6nd"] for r in mine), max(r["flops_6nd"] for r in mine), 100)
            n_opt = optimal_n(fit, C)
            ax.plot(
                C,
                chinchilla_loss(fit, n_opt, C / (6 * n_opt)),
                ls="--",
                color=colors(i),
                label="fitted law at N*(C)" if len(methods) == 1 else f"law {method}",
            )
    ax.set(
        xscale="log", xlabel="compute C = 6 N D (FLOPs)", ylabel="final validation loss", title="Loss against compute"
    )
    ax.legend(fontsize=8)
    figures.append(("Loss against compute", _save(fig, out_dir, "loss_vs_compute")))
    plt.close(fig)

    # IsoFLOP curves: loss against N per budget, parabolas in log N and their minima
    if isoflop:
        fig, axes = plt.subplots(1, len(methods), figsize=(6.4 * len(methods), 4.4), squeeze=False)
        for ax, method in zip(axes[0], methods):
            mine = [r for r in done if r["method"] == method]
            budgets = sorted({r["budget"] for r in mine})
            bmap = plt.get_cmap("plasma")
            for j, C in enumerate(budgets):
                pts = sorted((r["params_non_embedding"], r["final_val_loss"]) for r in mine if r["budget"] == C)
                color = bmap(j / max(1, len(budgets)))
                ax.plot(*zip(*pts), "o", color=color, label=f"C = {C:.2g}")
                m = next((m for m in fits[method].get("isoflop", []) if m["C"] == C), None)
                if m and m["coeffs"]:
                    xs = np.linspace(np.log(pts[0][0]), np.log(pts[-1][0]), 100)
                    ax.plot(np.exp(xs), np.polyval(m["coeffs"], xs), "-", color=color, lw=1)
                    if math.isfinite(m["N_opt"]):
                        ax.plot(m["N_opt"], m["loss_opt"], "*", color=color, ms=12, mec="k")
            ax.set(
                xscale="log",
                xlabel="N (non-embedding parameters)",
                ylabel="final validation loss",
                title="IsoFLOP curves" + ("" if len(methods) == 1 else f": {method}"),
            )
            ax.legend(fontsize=8)
        figures.append(("IsoFLOP curves (stars: the parabola minima)", _save(fig, out_dir, "isoflop")))
        plt.close(fig)

    # the fitted law over the data: loss against tokens per size, and predicted against observed
    fitted = [m for m in methods if "alpha" in fits[m].get("parametric", {})]
    if fitted:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.4))
        for i, method in enumerate(fitted):
            fit = fits[method]["parametric"]
            mine = [r for r in done if r["method"] == method]
            for n in sorted({r["params_non_embedding"] for r in mine}):
                pts = sorted((r["tokens"], r["final_val_loss"]) for r in mine if r["params_non_embedding"] == n)
                color = size_map(norm(np.log10(n)))
                ax.plot(*zip(*pts), "o" if i == 0 else "s", color=color)
                D = np.geomspace(pts[0][0] / 1.5, pts[-1][0] * 1.5, 60)
                ax.plot(
                    D,
                    chinchilla_loss(fit, n, D),
                    "-" if i == 0 else ":",
                    color=color,
                    lw=1,
                    label=f"N = {n:.3g}" if i == 0 else None,
                )
            obs = np.array([r["final_val_loss"] for r in mine])
            pred = chinchilla_loss(fit, [r["params_non_embedding"] for r in mine], [r["tokens"] for r in mine])
            ax2.plot(obs, pred, "o", color=colors(i), label=method)
        ax.set(xscale="log", xlabel="tokens D", ylabel="final validation loss", title="Fitted law over the data")
        ax.legend(fontsize=7)
        lo = min(r["final_val_loss"] for r in done)
        hi = max(r["final_val_loss"] for r in done)
        ax2.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax2.set(xlabel="observed loss", ylabel="law's prediction", title="Prediction against observation")
        ax2.legend(fontsize=8)
        figures.append(("Fitted law over the data", _save(fig, out_dir, "fit")))
        plt.close(fig)

    # methods side by side: frontiers and compute-optimal N*(C)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.4))
    for i, method in enumerate(methods):
        mine = [r for r in done if r["method"] == method]
        fx, fy = pareto_frontier([r["flops_6nd"] for r in mine], [r["final_val_loss"] for r in mine])
        ax.step(fx, fy, where="post", color=colors(i), label=method)
        ax.plot(fx, fy, "o", color=colors(i), ms=4)
        fit = fits[method].get("parametric", {})
        C = np.geomspace(min(r["flops_6nd"] for r in done), max(r["flops_6nd"] for r in done), 50)
        if "alpha" in fit and math.isfinite(compute_optimal(fit)["G"]):
            ax2.plot(C, optimal_n(fit, C), "-", color=colors(i), label=f"{method}: law")
        found = [m for m in fits[method].get("isoflop", []) if math.isfinite(m["N_opt"])]
        if found:
            ax2.plot(
                [m["C"] for m in found],
                [m["N_opt"] for m in found],
                "*",
                color=colors(i),
                ms=10,
                label=f"{method}: IsoFLOP minima",
            )
    ax.set(
        xscale="log", xlabel="compute C = 6 N D (FLOPs)", ylabel="final validation loss", title="Frontier per method"
    )
    ax.legend(fontsize=8)
    ax2.set(
        xscale="log",
        yscale="log",
        xlabel="compute C (FLOPs)",
        ylabel="compute-optimal N*",
        title="Compute-optimal size per method",
    )
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend(fontsize=8)
    figures.append(("Methods side by side", _save(fig, out_dir, "methods")))
    plt.close(fig)
    return figures


def write_report(
    spec: SweepSpec, runs: list[SweepRun], *, bootstrap: Optional[int] = None, max_starts: Optional[int] = -1
) -> str:
    """Collect, fit, plot; write `<sweep dir>/report/` and return the path of report.md.

    bootstrap / max_starts default to the sweep's `fit:` settings (max_starts -1 = the sweep's)."""
    out_dir = os.path.join(spec.dir, "report")
    rows = collect(spec, runs)
    csv_path, _ = write_table(rows, out_dir)
    isoflop = spec.mode == "isoflop"
    fits = fit_methods(
        rows,
        bootstrap=spec.bootstrap if bootstrap is None else bootstrap,
        max_starts=spec.max_starts if max_starts == -1 else max_starts,
        isoflop=isoflop,
    )
    with open(os.path.join(out_dir, "fits.json"), "w", encoding="utf-8") as fh:
        json.dump(fits, fh, indent=1, default=float)
    figures = _plots(rows, fits, out_dir, isoflop)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("finished", "failed", "pending")}
    lines = [
        f"# Sweep report: {spec.dir}",
        "",
        f"Mode {spec.mode}; {len(rows)} runs: {counts['finished']} finished, {counts['failed']} failed, "
        f"{counts['pending']} not run. N = non-embedding parameters (without the embedding and output "
        f"head), D = training tokens, loss = final validation loss; compute C = 6 N D. Table: "
        f"[runs.csv]({os.path.basename(csv_path)}) (and runs.parquet), fits: fits.json.",
        "",
    ]
    lines += [
        "## Fits per method",
        "",
        "Parametric law L(N, D) = E + A/N^alpha + B/D^beta (log-sum-exp form, Huber delta 1e-3 on log L, "
        "L-BFGS-B from a grid of starts; brackets: bootstrap interval). a, b: exponents of N*(C) ~ C^a and "
        "D*(C) ~ C^b, from the law and, for IsoFLOP sweeps, from the parabola minima (approach 2).",
        "",
        "| method | runs | E | A | alpha | B | beta | a (law) | b (law) | a (IsoFLOP) | b (IsoFLOP) | "
        "rms log residual | fit s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, entry in fits.items():
        fit, opt = entry["parametric"], entry.get("optimal", {})
        iso = entry.get("isoflop_exponents", {})
        if "error" in fit:
            params = [f"no fit: {fit['error']}"] + [""] * 4 + ["–", "–"]
        else:
            params = [_interval(fit, k) for k in ("E", "A", "alpha", "B", "beta")] + [
                _fmt(opt.get("a")),
                _fmt(opt.get("b")),
            ]
        lines.append(
            "| "
            + " | ".join(
                [
                    method,
                    str(entry["runs"]),
                    *params,
                    _fmt(iso.get("a")),
                    _fmt(iso.get("b")),
                    _fmt(fit.get("rms_log_residual")),
                    _fmt(fit.get("seconds"), 3),
                ]
            )
            + " |"
        )
    if isoflop:
        lines += [
            "",
            "## IsoFLOP minima (approach 2)",
            "",
            "| method | C | runs | N* | loss at N* | vertex inside the sizes trained |",
            "|---|---|---|---|---|---|",
        ]
        for method, entry in fits.items():
            for m in entry.get("isoflop", []):
                lines.append(
                    f"| {method} | {m['C']:.3g} | {m['runs']} | {_fmt(m['N_opt'])} | {_fmt(m['loss_opt'])} "
                    f"| {'yes' if m['inside'] else 'no'} |"
                )
    for title, png in figures:
        lines += ["", f"## {title}", "", f"![{title}]({png})"]
    lines += [
        "",
        "## Runs",
        "",
        "| run | method | N | D | C = 6ND | final val loss | best val loss | wall s | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        status = r["status"] if not r["error"] else f"{r['status']}: {r['error']}"
        lines.append(
            f"| {r['name']} | {r['method']} | {_fmt(r['params_non_embedding'])} | {_fmt(r['tokens'])} | "
            f"{r['flops_6nd']:.3g} | {_fmt(r['final_val_loss'])} | {_fmt(r['best_val_loss'])} | "
            f"{_fmt(r['wall_s'], 3)} | {status.replace('|', '/')} |"
        )
    path = os.path.join(out_dir, "report.md")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return path
