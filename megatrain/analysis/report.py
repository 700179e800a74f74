"""Writes the results of `megatrain.analysis.analyze.analyze` to a folder:

report.md          tables and the plots below, with what each number means
analysis.json      every number (singular values in spectra.npz instead)
spectra.npz        singular values of every matrix and update ("<run>/<matrix>/weight|update")
*.png              spectra_ranks, spectra_values, landscape, interpolation, cka
tb/                the same scalars and figures as tensorboard events
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

import numpy as np

from megatrain.analysis.spectra import ENERGY_KS, KIND_ORDER

__all__ = ["write_report", "default_output"]


def default_output(run: str, vs: Optional[str]) -> str:
    """RUN/analysis (one run) or RUN/analysis/vs-OTHER (a comparison)."""
    root = os.path.join(run, "analysis")
    if vs is None:
        return root
    return os.path.join(root, "vs-" + os.path.basename(os.path.normpath(vs)))


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}g}"
    return str(value)


def _table(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _kinds(rows: list[dict]) -> list[str]:
    present = {r["kind"] for r in rows}
    return [k for k in KIND_ORDER if k in present]


# ----------------------------------------------------------------------------------------------


def _spectra_md(sections: list[dict]) -> str:
    out = [
        "## Spectra",
        "",
        "Effective rank = exp(entropy of the L1-normalised singular values); stable rank = "
        "||M||_F^2 / ||M||_2^2; energy topk = share of ||M||_F^2 in the top k singular directions. "
        "The update is W_t - W_0. Low-rank layers are merged to their dense equivalent [D_out, D_in] first.",
        "",
    ]
    for sec in sections:
        out += [f"### {sec['label']} (step {sec['step']}, model.linear={sec['linear']}; W_0: {sec['base']})", ""]
        notes = sorted({r["note"] for r in sec["rows"] if r["note"]})
        out += [f"- {n}" for n in notes] + ([""] if notes else [])
        means = sec["kind_means"]
        out.append("Mean over layers, per projection kind:\n")
        out.append(
            _table(
                [
                    "kind",
                    "weight eff. rank",
                    "weight stable rank",
                    "update eff. rank",
                    "update stable rank",
                    "|update| / |W|",
                ],
                [
                    [
                        k,
                        means["weight_effective_rank"].get(k),
                        means["weight_stable_rank"].get(k),
                        means["update_effective_rank"].get(k),
                        means["update_stable_rank"].get(k),
                        means["update_relative_norm"].get(k),
                    ]
                    for k in _kinds(sec["rows"])
                ],
            )
        )
        out += ["", "Every matrix:", ""]
        head = [
            "matrix",
            "shape",
            "W eff. rank",
            "W stable rank",
            "update eff. rank",
            "update stable rank",
            *[f"update energy top{k}" for k in ENERGY_KS],
            "update sigma_1",
            "|update| / |W|",
        ]
        out.append(
            _table(
                head,
                [
                    [
                        r["name"],
                        "x".join(map(str, r["shape"])),
                        r["weight_effective_rank"],
                        r["weight_stable_rank"],
                        r.get("update_effective_rank"),
                        r.get("update_stable_rank"),
                        *[r.get(f"update_energy_top{k}") for k in ENERGY_KS],
                        r.get("update_spectral_norm"),
                        r.get("update_relative_norm"),
                    ]
                    for r in sec["rows"]
                ],
            )
        )
        out.append("")
    out += ["![ranks per layer](spectra_ranks.png)", "", "![update spectra](spectra_values.png)", ""]
    return "\n".join(out)


def _plot_spectra(sections: list[dict], folder: str) -> list[tuple[str, object]]:
    plt = _plt()
    figures = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), squeeze=False)
    for sec_idx, sec in enumerate(sections):
        style = "-" if sec_idx == 0 else "--"
        for kind in _kinds(sec["rows"]):
            rows = [r for r in sec["rows"] if r["kind"] == kind and r["layer"] is not None]
            if not rows or "update_effective_rank" not in rows[0]:
                continue
            layers = [r["layer"] for r in rows]
            axes[0][0].plot(
                layers, [r["update_effective_rank"] for r in rows], style, marker="o", label=f"{sec['label']} {kind}"
            )
            axes[0][1].plot(
                layers, [r["update_stable_rank"] for r in rows], style, marker="o", label=f"{sec['label']} {kind}"
            )
    axes[0][0].set_title("effective rank of W_t - W_0")
    axes[0][1].set_title("stable rank of W_t - W_0")
    from matplotlib.ticker import MaxNLocator

    for ax in axes[0]:
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "spectra_ranks.png"), dpi=110)
    figures.append(("spectra/ranks", fig))

    fig, axes = plt.subplots(1, len(sections), figsize=(5 * len(sections), 3.8), squeeze=False)
    for ax, sec in zip(axes[0], sections):
        for kind in _kinds(sec["rows"]):
            names = [r["name"] for r in sec["rows"] if r["kind"] == kind]
            curves = [sec["singular_values"].get(f"{n}/update") for n in names]
            curves = [c for c in curves if c is not None and c.size and c[0] > 0]
            if not curves:
                continue
            width = min(len(c) for c in curves)
            mean = np.mean([c[:width] / c[0] for c in curves], axis=0)
            ax.semilogy(np.arange(1, width + 1), mean, label=kind)
        ax.set_title(f"{sec['label']}: update singular values / sigma_1")
        ax.set_xlabel("index")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "spectra_values.png"), dpi=110)
    figures.append(("spectra/values", fig))
    return figures


def _landscape_md(sec: dict) -> str:
    out = [
        "## Loss landscape",
        "",
        f"Loss on the fixed held-out batch at theta + alpha * d around step {sec['step']}. Random directions are "
        "Gaussian with each filter scaled to the norm of the weights' filter (Li et al., 2018; norm gains and "
        "biases not moved); alpha = 1 is a move as large as the weights. Principal directions are unit vectors "
        "of the PCA of the saved checkpoints minus the end point (alpha in parameter-space distance). "
        "Curvature: second derivative at 0 of a parabola through the 5 nearest grid points; rise: mean loss "
        "at +-radius minus the loss at 0 (radius scaled by the curve's extent for principal directions).",
        "",
    ]
    rows = []
    for c in sec["curves"]:
        s = c["sharpness"]
        rows.append([c["direction"], s["loss_at_0"], s["curvature"], s["radius"], s["rise_at_radius"]])
    out.append(_table(["direction", "loss at 0", "curvature at 0", "radius", "loss rise at radius"], rows))
    if sec.get("note"):
        out += ["", f"Note: {sec['note']}"]
    out += ["", "![landscape](landscape.png)", ""]
    return "\n".join(out)


def _plot_landscape(sec: dict, folder: str):
    plt = _plt()
    kinds = [k for k in ("random", "pca") if any(c["kind"] == k for c in sec["curves"])]
    fig, axes = plt.subplots(1, max(1, len(kinds)), figsize=(5 * max(1, len(kinds)), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for c in (c for c in sec["curves"] if c["kind"] == kind):
            ax.plot(c["alphas"], c["losses"], marker=".", label=c["direction"])
            for point in c.get("checkpoints", []):
                ax.axvline(point["alpha"], color="grey", alpha=0.3)
        ax.set_xlabel("alpha" if kind == "random" else "distance along the component")
        ax.set_ylabel("loss")
        ax.set_title("random filter-normalised" if kind == "random" else "trajectory PCA (grey: checkpoints)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "landscape.png"), dpi=110)
    return [("landscape/curves", fig)]


def _interpolation_md(sec: dict) -> str:
    if "losses" not in sec:
        return f"## Interpolation\n\nSkipped: {sec['note']}.\n"
    init = "from the same seed (same init)" if sec["same_init"] else "from different seeds (different inits)"
    return "\n".join(
        [
            "## Interpolation",
            "",
            f"Loss on the fixed batch along (1 - alpha) * A + alpha * B, A = {sec['a']} (step {sec['a_step']}), "
            f"B = {sec['b']} (step {sec['b_step']}), {init}. Barrier = max over alpha of the loss above the straight "
            f"line between the end losses.",
            "",
            _table(["alpha", *[_fmt(a, 3) for a in sec["alphas"]]], [["loss", *sec["losses"]]]),
            "",
            f"**Barrier height: {_fmt(sec['barrier'])}**",
            "",
            "![interpolation](interpolation.png)",
            "",
        ]
    )


def _plot_interpolation(sec: dict, folder: str):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot(sec["alphas"], sec["losses"], marker="o")
    ax.plot([0, 1], [sec["losses"][0], sec["losses"][-1]], "--", color="grey")
    ax.set_xlabel(f"alpha (0: {sec['a']}, 1: {sec['b']})")
    ax.set_ylabel("loss")
    ax.set_title(f"barrier {sec['barrier']:.4g}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "interpolation.png"), dpi=110)
    return [("interpolation/curve", fig)]


def _cka_md(sec: dict) -> str:
    return "\n".join(
        [
            "## Representations (linear CKA)",
            "",
            f"Linear CKA of the residual stream (after the embedding and after each block) of {sec['a']} against "
            f"{sec['b']} on the same {sec['samples']} held-out tokens; 1 = the same representation up to rotation "
            "and scale.",
            "",
            _table(["layer", "CKA"], [[name, v] for name, v in zip(sec["layers"], sec["per_layer"])]),
            "",
            "![cka](cka.png)",
            "",
        ]
    )


def _plot_cka(sec: dict, folder: str):
    plt = _plt()
    matrix = np.asarray(sec["matrix"])
    fig, ax = plt.subplots(figsize=(4.6, 4))
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis", origin="lower")
    ax.set_xlabel(f"{sec['b']} layer")
    ax.set_ylabel(f"{sec['a']} layer")
    ax.set_title("linear CKA")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "cka.png"), dpi=110)
    return [("cka/matrix", fig)]


def _exposure_md(sections: list[dict]) -> str:
    out = ["## Exposure", ""]
    for sec in sections:
        if "note" in sec:
            out += [f"### {sec['label']} by step {sec['step']}", "", f"Skipped: {sec['note']}.", ""]
            continue
        out += [
            f"### {sec['label']} by step {sec['step']}",
            "",
            f"{sec['ngrams']} indexed {sec['n']}-grams over {sec['train_blocks']} training blocks; "
            f"global batch {sec['global_batch']}, so {sec['epochs_by_step']:.3g} epochs consumed by this step. "
            "An item is seen when its whole token sequence lay inside a training sequence the sampler had "
            "handed out by then; count = how many times; overlap = share of its n-grams seen.",
            "",
        ]
        if not sec["items"]:
            out += ["No items queried (pass --phrases FILE).", ""]
            continue
        out += [f"**{sec['seen']} seen, {sec['unseen']} unseen.**", ""]
        out.append(
            _table(
                ["item", "tokens", "seen", "count", "first step", "n-gram overlap"],
                [
                    [
                        i["text"][:60].replace("|", "\\|"),
                        i["tokens"],
                        "yes" if i["seen"] else "no",
                        i["count"],
                        i["first_step"],
                        i["ngram_overlap"],
                    ]
                    for i in sec["items"]
                ],
            )
        )
        out.append("")
    return "\n".join(out)


def _tensorboard(results: dict, figures: list, folder: str) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(os.path.join(folder, "tb"))
    step = results["step"]
    for sec in results.get("spectra", []):
        for row in sec["rows"]:
            for key in ("weight_effective_rank", "weight_stable_rank", "update_effective_rank", "update_stable_rank"):
                if row.get(key) is not None:
                    writer.add_scalar(f"spectra/{sec['label']}/{key}/{row['name']}", row[key], sec["step"])
    land = results.get("landscape")
    if land:
        for i, c in enumerate(land["curves"]):
            for j, loss in enumerate(c["losses"]):
                writer.add_scalar(f"landscape/{c['kind']}{i}", loss, j)
            writer.add_scalar(f"landscape/curvature/{c['kind']}{i}", c["sharpness"]["curvature"], step)
            writer.add_scalar(f"landscape/rise/{c['kind']}{i}", c["sharpness"]["rise_at_radius"], step)
    interp = results.get("interpolation")
    if interp and "losses" in interp:
        for j, loss in enumerate(interp["losses"]):
            writer.add_scalar("interpolation/loss", loss, j)
        writer.add_scalar("interpolation/barrier", interp["barrier"], step)
    cka = results.get("cka")
    if cka:
        for layer, value in enumerate(cka["per_layer"]):
            writer.add_scalar("cka/per_layer", value, layer)
    for sec in results.get("exposure", []):
        if sec["items"]:
            writer.add_scalar(f"exposure/{sec['label']}/seen", sec["seen"], sec["step"])
    for tag, fig in figures:
        writer.add_figure(tag, fig, step, close=False)
    writer.close()


def write_report(results: dict, folder: str, tensorboard: bool = True) -> str:
    """Write report.md, analysis.json, spectra.npz, the PNGs and tb/ into `folder`; returns report.md's path."""
    os.makedirs(folder, exist_ok=True)
    plt = _plt()
    figures = []
    title = results["label"] if not results.get("vs_label") else f"{results['label']} vs {results['vs_label']}"
    md = [
        f"# Analysis: {title}",
        "",
        f"- run: `{results['run']}`, checkpoint `{results['checkpoint']}` (step {results['step']})",
    ]
    if results.get("vs"):
        md.append(f"- vs: `{results['vs']}`, checkpoint `{results['vs_checkpoint']}`")
    if results.get("batch"):
        md.append(f"- held-out batch: {results['batch']['sequences']} sequences, {results['batch']['source']}")
    md.append("")
    if "spectra" in results:
        md.append(_spectra_md(results["spectra"]))
        figures += _plot_spectra(results["spectra"], folder)
        np.savez(
            os.path.join(folder, "spectra.npz"),
            **{f"{sec['label']}/{k}": v for sec in results["spectra"] for k, v in sec["singular_values"].items()},
        )
    if "landscape" in results:
        md.append(_landscape_md(results["landscape"]))
        figures += _plot_landscape(results["landscape"], folder)
    if "interpolation" in results:
        md.append(_interpolation_md(results["interpolation"]))
        if "losses" in results["interpolation"]:
            figures += _plot_interpolation(results["interpolation"], folder)
    if "cka" in results:
        md.append(_cka_md(results["cka"]))
        figures += _plot_cka(results["cka"], folder)
    if "exposure" in results:
        md.append(_exposure_md(results["exposure"]))
    if tensorboard:
        _tensorboard(results, figures, folder)
    for _, fig in figures:
        plt.close(fig)
    serialisable = json.loads(
        json.dumps(
            {
                **results,
                "spectra": [
                    {k: v for k, v in sec.items() if k != "singular_values"} for sec in results.get("spectra", [])
                ],
            },
            default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o),
        )
    )
    if "spectra" not in results:
        serialisable.pop("spectra")
    with open(os.path.join(folder, "analysis.json"), "w", encoding="utf-8") as fh:
        json.dump(serialisable, fh, indent=1)
    path = os.path.join(folder, "report.md")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(md))
    return path
