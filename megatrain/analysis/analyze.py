"""`megatrain analyze RUN [--vs OTHER_RUN]`: every instrument on a run's checkpoints, into one results
dict that `megatrain.analysis.report` writes out (markdown, PNG plots, tensorboard, JSON).

Instruments (the `--only` names):
  spectra        singular values and ranks of every weight matrix and of its learned update W_t - W_0
  landscape      1-D loss curves along filter-normalised random directions and the trajectory's PCs
  interpolation  loss along the straight line between two checkpoints (two runs with --vs), barrier
  cka            per-layer linear CKA of the residual stream on a fixed held-out batch
  exposure       n-gram exposure index of the training order; phrases seen / unseen by the step

Memory: weights are read tensor by tensor from the checkpoints' model.safetensors; at most one model
(the one evaluated, or W_0 rebuilt from the seed) is held at a time, plus one matrix.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from megatrain.analysis import landscape as ls
from megatrain.analysis.cka import cka_matrix
from megatrain.analysis.exposure import DEFAULT_NGRAM, ExposureIndex
from megatrain.analysis.spectra import kind_means, matrix_summary, model_matrices, singular_values
from megatrain.analysis.weights import (
    CheckpointWeights,
    build_model,
    checkpoint_dir,
    fill_model,
    heldout_batches,
    initial_weights,
    list_checkpoints,
    run_config,
    same_model,
    same_tokenizer,
)
from megatrain.errors import ConfigError, DataError
from megatrain.models.layers import lowrank_options

__all__ = ["INSTRUMENTS", "AnalyzeOptions", "analyze", "spectra_of", "layer_activations", "read_phrases"]

INSTRUMENTS = ("spectra", "landscape", "interpolation", "cka", "exposure")


@dataclass
class AnalyzeOptions:
    """What `megatrain analyze` was asked for (the CLI's flags)."""

    only: tuple = INSTRUMENTS
    checkpoint: Optional[str] = None  # step_N / N / path in RUN (default: latest)
    vs_checkpoint: Optional[str] = None  # the same in OTHER_RUN
    base: str = "init"  # W_0 for the update spectra: init (rebuilt from the seed) or first
    directions: int = 2  # random filter-normalised directions
    components: int = 2  # trajectory principal directions
    points: int = 21  # grid points per 1-D curve (odd: 0 is on the grid)
    radius: float = 0.2  # sharpness: loss rise at this distance (random directions)
    interp_points: int = 11
    batches: int = 2  # held-out micro-batches ...
    micro_batch: int = 4  # ... of this many sequences
    seed: int = 0  # seed of the random directions
    phrases: Optional[str] = None  # file: one phrase / evaluation item per line (.jsonl: "text")
    ngram: int = DEFAULT_NGRAM

    def validate(self) -> None:
        unknown = [x for x in self.only if x not in INSTRUMENTS]
        if unknown or not self.only:
            raise ConfigError(
                f"--only: unknown instrument {', '.join(unknown) or '(none)'} (allowed: {', '.join(INSTRUMENTS)})"
            )
        if self.base not in ("init", "first"):
            raise ConfigError(f"--base must be init or first, got {self.base!r}")
        if self.points < 5 or self.points % 2 == 0:
            raise ConfigError(f"--points must be odd and >= 5 (0 on the grid, a parabola at 0), got {self.points}")
        if self.interp_points < 3:
            raise ConfigError(f"--interp-points must be >= 3, got {self.interp_points}")
        for name in ("directions", "components", "batches", "micro_batch"):
            if getattr(self, name) < (0 if name in ("directions", "components") else 1):
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be >= {0 if name in ('directions', 'components') else 1}"
                )
        if not 0 < self.radius <= 1:
            raise ConfigError(f"--radius must be in (0, 1], got {self.radius}")
        if self.phrases is not None and not os.path.isfile(self.phrases):
            raise DataError(f"--phrases: file '{self.phrases}' does not exist")


# ----------------------------------------------------------------------------------------------
# spectra


def spectra_of(weights, base, lowrank_alpha: float) -> tuple[list[dict], dict]:
    """Rows (one per matrix: name, layer, kind, note, `weight_*` and `update_*` summaries) and the
    singular values {"<name>/weight": s, "<name>/update": s} of W_t and W_t - W_0. base None: weights only."""
    rows, values = [], {}
    base_matrices = None
    if base is not None:
        base_matrices = model_matrices(base.names, base.get, lowrank_alpha)
    for spec, matrix in model_matrices(weights.names, weights.get, lowrank_alpha):
        row = {
            "name": spec.name,
            "layer": spec.layer,
            "kind": spec.kind,
            "note": spec.note,
            "shape": list(matrix.shape),
        }
        s = singular_values(matrix)
        values[f"{spec.name}/weight"] = s.numpy()
        row.update({f"weight_{k}": v for k, v in matrix_summary(s).items()})
        if base_matrices is not None:
            base_spec, base_matrix = next(base_matrices)
            if base_spec.name != spec.name or base_matrix.shape != matrix.shape:
                raise ConfigError(
                    f"spectra: the base weights do not match ({base_spec.name} "
                    f"{tuple(base_matrix.shape)} vs {spec.name} {tuple(matrix.shape)})"
                )
            s_update = singular_values(matrix - base_matrix)
            values[f"{spec.name}/update"] = s_update.numpy()
            row.update({f"update_{k}": v for k, v in matrix_summary(s_update).items()})
            row["update_relative_norm"] = (
                row["update_fro_norm"] / row["weight_fro_norm"] if row["weight_fro_norm"] > 0 else 0.0
            )
        rows.append(row)
    return rows, values


def _spectra_section(label: str, run: str, ckpt: str, opts: AnalyzeOptions) -> dict:
    weights = CheckpointWeights(ckpt)
    if opts.base == "init":
        base = initial_weights(weights.meta, weights.dtypes)
        base_label = f"init rebuilt from seed {weights.meta.get('seed')}"
    else:
        first = list_checkpoints(run)
        if not first or os.path.samefile(first[0][1], ckpt):
            raise ConfigError(f"--base first: run '{run}' has no checkpoint before step {weights.step}")
        base, base_label = CheckpointWeights(first[0][1]), f"first checkpoint (step {first[0][0]})"
    alpha = lowrank_options(weights.model_cfg).alpha
    rows, values = spectra_of(weights, base, alpha)
    del base
    return {
        "label": label,
        "checkpoint": ckpt,
        "step": weights.step,
        "base": base_label,
        "linear": weights.model_cfg.linear,
        "rows": rows,
        "singular_values": values,
        "kind_means": {
            key: kind_means(rows, key)
            for key in (
                "update_effective_rank",
                "update_stable_rank",
                "weight_effective_rank",
                "weight_stable_rank",
                "update_relative_norm",
            )
        },
    }


# ----------------------------------------------------------------------------------------------
# landscape and interpolation


def _eval_model(weights: CheckpointWeights):
    model = build_model(weights.model_cfg, int(weights.meta.get("seed", 0)))
    fill_model(model, weights.get)
    return model


def _landscape_section(run: str, ckpt: str, batches, opts: AnalyzeOptions) -> dict:
    weights = CheckpointWeights(ckpt)
    model = _eval_model(weights)
    grid = np.linspace(-1.0, 1.0, opts.points)
    curves = []
    for i in range(opts.directions):
        direction = ls.RandomDirection(opts.seed + i, weights.get)
        losses = ls.loss_curve(model, weights.get, direction, grid, batches)
        curves.append(
            {
                "direction": direction.label,
                "kind": "random",
                "alphas": grid.tolist(),
                "losses": losses,
                "sharpness": ls.sharpness(grid, losses, opts.radius),
            }
        )
    trajectory = [(s, p) for s, p in list_checkpoints(run) if s < weights.step]
    pca_note = None
    if opts.components and trajectory:
        points = [CheckpointWeights(p) for _, p in trajectory]
        pca = ls.TrajectoryPCA(points, weights, opts.components)
        for j in range(len(pca.components)):
            direction = pca.direction(j)
            coords = pca.coords[j]
            extent = 1.5 * max(abs(c) for c in coords) if coords else 1.0
            alphas = grid * extent
            losses = ls.loss_curve(model, weights.get, direction, alphas, batches)
            curves.append(
                {
                    "direction": direction.label,
                    "kind": "pca",
                    "alphas": alphas.tolist(),
                    "losses": losses,
                    "explained_variance": pca.explained[j],
                    "checkpoints": [{"step": s, "alpha": c} for (s, _), c in zip(trajectory, coords)],
                    "sharpness": ls.sharpness(alphas, losses, opts.radius * extent),
                }
            )
    elif opts.components:
        pca_note = (
            "no principal directions: the trajectory needs at least one saved checkpoint before "
            f"step {weights.step} (set checkpoint.every and checkpoint.keep when training)"
        )
    return {"checkpoint": ckpt, "step": weights.step, "radius": opts.radius, "curves": curves, "note": pca_note}


def _interpolation_section(a_path: str, b_path: str, batches, opts: AnalyzeOptions, a_label: str, b_label: str) -> dict:
    a, b = CheckpointWeights(a_path), CheckpointWeights(b_path)
    same_model(a.model_cfg, b.model_cfg, "interpolation")
    model = _eval_model(a)
    alphas = np.linspace(0.0, 1.0, opts.interp_points)
    losses = ls.interpolation_curve(model, a.get, b.get, alphas, batches)
    same_init = a.meta.get("seed") == b.meta.get("seed")
    return {
        "a": a_label,
        "b": b_label,
        "a_step": a.step,
        "b_step": b.step,
        "alphas": alphas.tolist(),
        "losses": losses,
        "barrier": ls.barrier_height(alphas, losses),
        "same_init": same_init,
    }


# ----------------------------------------------------------------------------------------------
# CKA


@torch.no_grad()
def layer_activations(model, batches) -> list[torch.Tensor]:
    """Residual stream after the embedding and after each block on the fixed batches: a list of
    [tokens, dim] fp32 matrices (tokens = every position of every batch)."""
    captured: list[list[torch.Tensor]] = [[] for _ in range(len(model.blocks) + 1)]
    hooks = [model.embed.register_forward_hook(lambda m, i, o: captured[0].append(o.detach().float()))]

    def stream(out) -> torch.Tensor:
        # A block whose residual add is left to the next norm returns (MLP output, stream) un-added.
        return (out[0] + out[1] if isinstance(out, tuple) else out).detach().float()

    for idx, block in enumerate(model.blocks):
        hooks.append(block.register_forward_hook(lambda m, i, o, idx=idx: captured[idx + 1].append(stream(o))))
    try:
        for inputs, _ in batches.items:
            model(inputs)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat([t.reshape(-1, t.shape[-1]) for t in per_layer]) for per_layer in captured]


def _activations_of(ckpt: str, batches) -> list[torch.Tensor]:
    weights = CheckpointWeights(ckpt)
    model = _eval_model(weights)
    out = layer_activations(model, batches)
    del model
    return out


def _cka_section(a_path: str, b_path: Optional[str], batches, a_label: str, b_label: str) -> dict:
    xs = _activations_of(a_path, batches)
    if b_path is None:  # the run's own start: W_0 rebuilt from the seed
        meta = CheckpointWeights(a_path)
        model = build_model(meta.model_cfg, int(meta.meta.get("seed", 0)))
        ys = layer_activations(model, batches)
        del model
    else:
        ys = _activations_of(b_path, batches)
    if xs[0].shape[0] != ys[0].shape[0]:
        raise ConfigError("cka: the two runs produced different numbers of tokens on the same batch")
    table = cka_matrix(xs, ys)
    names = ["embed", *[f"block {i}" for i in range(len(xs) - 1)]]
    diagonal = [float(table[i, i]) for i in range(min(table.shape))]
    return {
        "a": a_label,
        "b": b_label,
        "layers": names,
        "matrix": table.tolist(),
        "per_layer": diagonal,
        "samples": int(xs[0].shape[0]),
    }


# ----------------------------------------------------------------------------------------------
# exposure


def read_phrases(path: str) -> list[str]:
    """Items of a phrases file: one per non-empty line; in a .jsonl file, each object's "text"."""
    items = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                try:
                    line = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError):
                    raise DataError(
                        f"--phrases: line {number} of '{path}' is not a JSON object with a \"text\" field"
                    ) from None
            items.append(line)
    return items


def _index_cache(cfg, blocks, n: int) -> Optional[str]:
    """Where the n-gram index of these training blocks is kept: next to their token cache (it depends on
    nothing else), so runs on the same data share it and run directories stay untouched."""
    from megatrain.data.sources import cache_dir

    path = getattr(blocks.tokens, "path", None)
    if path is None:
        return None
    key = os.path.basename(path)[: -len(".bin")] if path.endswith(".bin") else os.path.basename(path)
    return os.path.join(
        cache_dir(cfg.data), "exposure", f"{key}-seq{blocks.seq_len}-blocks{blocks.start_block}-{blocks.end_block}-n{n}"
    )


def _exposure_section(run: str, ckpt: str, opts: AnalyzeOptions, label: str) -> dict:
    from megatrain.data import open_data, prepare_data

    from megatrain.data.sources import source_kind

    cfg = run_config(run, ckpt)
    step = CheckpointWeights(ckpt).step
    if source_kind(cfg.data.source) is not None:
        return {
            "label": label,
            "step": step,
            "items": [],
            "note": f"data.source={cfg.data.source} is generated on the fly: there is no token array to index",
        }
    prepare_data(cfg)
    data = open_data(cfg)
    index = ExposureIndex.for_blocks(
        data.train, cfg.train.global_batch, cfg.train.seed, opts.ngram, cache=_index_cache(cfg, data.train, opts.ngram)
    )
    consumed = step * cfg.train.global_batch
    out = {
        "label": label,
        "step": step,
        "n": opts.ngram,
        "ngrams": int(len(index.ngrams.hashes)),
        "train_blocks": len(data.train),
        "global_batch": cfg.train.global_batch,
        "epochs_by_step": consumed / len(data.train),
        "items": [],
    }
    if opts.phrases is None:
        return out
    for text in read_phrases(opts.phrases):
        ids = data.tokenizer.encode(text)
        e = index.exposure(ids, step)
        out["items"].append(
            {
                "text": text,
                "tokens": len(ids),
                "seen": e["seen"],
                "count": e["count"],
                "first_step": e["first_step"],
                "ngram_overlap": index.ngram_overlap(ids, step),
            }
        )
    out["seen"] = sum(1 for i in out["items"] if i["seen"])
    out["unseen"] = len(out["items"]) - out["seen"]
    return out


# ----------------------------------------------------------------------------------------------


def analyze(run: str, vs: Optional[str] = None, opts: Optional[AnalyzeOptions] = None) -> dict:
    """Run the chosen instruments on RUN (and OTHER_RUN); returns the results dict for the report."""
    opts = opts or AnalyzeOptions()
    opts.validate()
    ckpt = checkpoint_dir(run, opts.checkpoint)
    other = checkpoint_dir(vs, opts.vs_checkpoint) if vs is not None else None
    label = os.path.basename(os.path.normpath(run))
    other_label = os.path.basename(os.path.normpath(vs)) if vs is not None else None
    if other_label == label:
        other_label = f"{other_label} (--vs)"
    results: dict = {
        "run": os.path.abspath(run),
        "vs": os.path.abspath(vs) if vs else None,
        "label": label,
        "vs_label": other_label,
        "checkpoint": ckpt,
        "vs_checkpoint": other,
        "step": CheckpointWeights(ckpt).step,
        "only": list(opts.only),
    }
    needs_batch = {"landscape", "interpolation", "cka"} & set(opts.only)
    batches = None
    if needs_batch:
        if other is not None:
            same_tokenizer(ckpt, other, "--vs")
        batches = heldout_batches(run_config(run, ckpt), opts.batches, opts.micro_batch)
        results["batch"] = {"source": batches.source, "sequences": opts.batches * opts.micro_batch}
    if "spectra" in opts.only:
        results["spectra"] = [_spectra_section(label, run, ckpt, opts)]
        if other is not None:
            results["spectra"].append(_spectra_section(other_label, vs, other, opts))
    if "landscape" in opts.only:
        results["landscape"] = _landscape_section(run, ckpt, batches, opts)
    if "interpolation" in opts.only:
        if other is not None:
            try:
                results["interpolation"] = _interpolation_section(ckpt, other, batches, opts, label, other_label)
            except ConfigError as exc:  # e.g. dense vs CoLA: no straight line between them; the rest still runs
                results["interpolation"] = {"note": str(exc)}
        else:
            earlier = [(s, p) for s, p in list_checkpoints(run) if s < results["step"]]
            if earlier:
                results["interpolation"] = _interpolation_section(
                    earlier[0][1],
                    ckpt,
                    batches,
                    opts,
                    f"{label} step {earlier[0][0]}",
                    f"{label} step {results['step']}",
                )
            else:
                results["interpolation"] = {"note": "needs --vs OTHER_RUN or an earlier saved checkpoint"}
    if "cka" in opts.only:
        if other is not None:
            results["cka"] = _cka_section(ckpt, other, batches, label, other_label)
        else:
            results["cka"] = _cka_section(ckpt, None, batches, f"{label} step {results['step']}", f"{label} init")
    if "exposure" in opts.only:
        results["exposure"] = [_exposure_section(run, ckpt, opts, label)]
        if vs is not None:
            results["exposure"].append(_exposure_section(vs, other, opts, other_label))
    return results
