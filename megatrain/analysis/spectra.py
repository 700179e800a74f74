"""Spectra of weight matrices and of learned updates.

The scalar summaries of a matrix m [rows, cols] with singular values s_1 >= s_2 >= ... :

  effective_rank(m) = exp(H(p)), p_i = s_i / sum_j s_j, H the Shannon entropy (Roy & Vetterli, 2007):
                      r for r equal singular values, between 1 and min(rows, cols) otherwise
  stable_rank(m)    = ||m||_F^2 / ||m||_2^2 = sum_i s_i^2 / s_1^2
  top_k_energy(m,k) = sum_{i<=k} s_i^2 / sum_i s_i^2  (the share of ||m||_F^2 in the top k directions)

`model_matrices` turns a weight source (a checkpoint read tensor by tensor, or a module) into the
matrices whose spectra mean something, one at a time: every projection of every block as its dense
equivalent [D_out, D_in] (low-rank kinds merged first), the embedding and the output head. Matrices
are yielded one by one, so a large checkpoint is never held twice.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from megatrain.models.layers import lora_dense_weight, sltrain_dense_weight

__all__ = [
    "singular_values",
    "effective_rank",
    "stable_rank",
    "top_k_energy",
    "matrix_summary",
    "MatrixSpec",
    "model_matrices",
    "ENERGY_KS",
    "KIND_ORDER",
]

# Top-k energies reported for every matrix (clipped to the matrix's rank).
ENERGY_KS = (1, 8, 32)
# Projection kinds in the order tables and plots list them.
KIND_ORDER = ("embed", "attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down", "head")

_PROJ = re.compile(r"^blocks\.(\d+)\.(attn|mlp)\.(\w+)_proj$")


def singular_values(m: Tensor) -> Tensor:
    """Singular values of a 2-D matrix, descending, fp64 on CPU ([min(rows, cols)])."""
    if m.dim() != 2:
        raise ValueError(f"singular values need a 2-D matrix, got shape {tuple(m.shape)}")
    # fp64 keeps the small singular values of an update meaningful; svdvals does no U, V work.
    return torch.linalg.svdvals(m.detach().to("cpu", torch.float64))


def _as_values(m_or_s: Tensor) -> Tensor:
    return m_or_s.to(torch.float64) if m_or_s.dim() == 1 else singular_values(m_or_s)


def effective_rank(m: Tensor) -> float:
    """exp of the entropy of the L1-normalised singular values of m (2-D matrix, or its singular values).

    0.0 for an all-zero matrix (no direction at all)."""
    s = _as_values(m).clamp_min(0)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def stable_rank(m: Tensor) -> float:
    """||m||_F^2 / ||m||_2^2 of a 2-D matrix (or of its singular values); 0.0 for an all-zero matrix."""
    s = _as_values(m)
    if s.numel() == 0 or s.max() <= 0:
        return 0.0
    return float((s**2).sum() / s.max() ** 2)


def top_k_energy(m: Tensor, k: int) -> float:
    """Share of ||m||_F^2 held by the top k singular directions (1.0 when k >= rank; 0.0 for zero m)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    s2 = torch.sort(_as_values(m), descending=True).values ** 2
    total = s2.sum()
    if total <= 0:
        return 0.0
    return float(s2[:k].sum() / total)


def matrix_summary(s: Tensor) -> dict:
    """The scalars reported per matrix, from its singular values s (descending)."""
    s = s.to(torch.float64)
    out = {
        "fro_norm": float(s.pow(2).sum().sqrt()),
        "spectral_norm": float(s.max()) if s.numel() else 0.0,
        "effective_rank": effective_rank(s),
        "stable_rank": stable_rank(s),
        "max_rank": int(s.numel()),
    }
    for k in ENERGY_KS:
        out[f"energy_top{k}"] = top_k_energy(s, min(k, max(1, s.numel())))
    return out


@dataclass
class MatrixSpec:
    """One matrix of a model: `name` (its module or tensor name), `layer` (block index, None for the
    embedding / head), `kind` (a KIND_ORDER entry), and `note` (how it was formed, for the report)."""

    name: str
    layer: Optional[int]
    kind: str
    note: str = ""
    parts: list = field(default_factory=list)  # the tensor names it is built from


def _classify(names: set[str]) -> list[MatrixSpec]:
    specs = []
    prefixes = sorted(
        {n.rsplit(".", 1)[0] for n in names if "." in n},
        key=lambda p: [int(t) if t.isdigit() else t for t in p.split(".")],
    )
    for prefix in prefixes:
        match = _PROJ.match(prefix)
        if not match:
            continue
        layer, kind = int(match.group(1)), f"{match.group(2)}.{match.group(3)}"
        has = {
            suffix
            for suffix in ("weight", "lora_a", "lora_b", "sparse_values", "sparse_index", "cola_a", "cola_b")
            if f"{prefix}.{suffix}" in names
        }
        if {"cola_a", "cola_b"} <= has:
            specs.append(
                MatrixSpec(
                    prefix,
                    layer,
                    kind,
                    "cola: the product a @ b without the SiLU between its factors (CoLA has no exact dense equivalent)",
                    [f"{prefix}.cola_a", f"{prefix}.cola_b"],
                )
            )
        elif {"lora_a", "lora_b", "sparse_values", "sparse_index"} <= has:
            specs.append(
                MatrixSpec(
                    prefix,
                    layer,
                    kind,
                    "sltrain: alpha/r * a @ b + S",
                    [f"{prefix}.{s}" for s in ("lora_a", "lora_b", "sparse_values", "sparse_index")],
                )
            )
        elif {"weight", "lora_a", "lora_b"} <= has:
            specs.append(
                MatrixSpec(
                    prefix,
                    layer,
                    kind,
                    "lora/relora: W + alpha/r * a @ b",
                    [f"{prefix}.{s}" for s in ("weight", "lora_a", "lora_b")],
                )
            )
        elif "weight" in has:
            specs.append(MatrixSpec(prefix, layer, kind, "", [f"{prefix}.weight"]))
    if "embed.weight" in names:
        specs.insert(0, MatrixSpec("embed", None, "embed", "", ["embed.weight"]))
    if "head.weight" in names:
        specs.append(MatrixSpec("head", None, "head", "", ["head.weight"]))
    return specs


def model_matrices(names, get: Callable[[str], Tensor], lowrank_alpha: float) -> Iterator[tuple[MatrixSpec, Tensor]]:
    """(spec, dense-equivalent matrix fp32 [D_out, D_in]) for every projection, the embedding and the head.

    Args:
        names: the tensor names the source holds (a tied head appears once, as embed.weight).
        get: name -> tensor, called lazily (one matrix's parts at a time).
        lowrank_alpha: model.lowrank.alpha as resolved (scale alpha / r of sltrain and lora).
    """
    for spec in _classify(set(names)):
        parts = [get(n) for n in spec.parts]
        note = spec.note
        if note.startswith("cola"):
            a, b = parts
            matrix = (a.float() @ b.float()).T
        elif note.startswith("sltrain"):
            a, b, values, index = parts
            matrix = sltrain_dense_weight(a, b, values, index, lowrank_alpha / a.shape[1])
        elif note.startswith("lora"):
            w, a, b = parts
            matrix = lora_dense_weight(w, a, b, lowrank_alpha / a.shape[1])
        else:
            matrix = parts[0].float()
        del parts
        if matrix.dim() != 2:
            continue
        yield spec, matrix.contiguous()


def kind_means(rows: list[dict], key: str) -> dict[str, float]:
    """Mean of `key` over the rows of each projection kind (rows as built by the report)."""
    sums: dict[str, list[float]] = {}
    for row in rows:
        value = row.get(key)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            sums.setdefault(row["kind"], []).append(value)
    return {kind: sum(v) / len(v) for kind, v in sums.items()}
