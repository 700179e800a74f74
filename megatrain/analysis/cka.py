"""Linear centred kernel alignment (Kornblith et al., 2019) between two representations.

For X [n, p] and Y [n, q] (the same n samples, e.g. tokens of one fixed batch, in each network),
with columns centred:

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)

1 for X against itself; invariant to orthogonal transforms and isotropic scaling of either side;
near 0 for unrelated features (its floor for independent random features is about p*q/n^2-ish, so
use n well above the feature counts for a meaningful low value).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["linear_cka", "cka_matrix"]


def _centred(x: Tensor) -> Tensor:
    if x.dim() != 2:
        raise ValueError(f"linear_cka takes [samples, features] matrices, got shape {tuple(x.shape)}")
    x = x.detach().to("cpu", torch.float64)
    return x - x.mean(dim=0, keepdim=True)


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA of x [n, p] and y [n, q] (same rows); a float in [0, 1]. 0.0 if either side is constant."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs the same samples on both sides, got {x.shape[0]} and {y.shape[0]} rows")
    x, y = _centred(x), _centred(y)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    norm_x = torch.linalg.matrix_norm(x.T @ x)
    norm_y = torch.linalg.matrix_norm(y.T @ y)
    if norm_x <= 0 or norm_y <= 0:
        return 0.0
    return float(cross / (norm_x * norm_y))


def cka_matrix(xs: list[Tensor], ys: list[Tensor]) -> Tensor:
    """[len(xs), len(ys)] fp64 table of linear_cka(xs[i], ys[j]) (layers of one network against another's)."""
    out = torch.zeros(len(xs), len(ys), dtype=torch.float64)
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            out[i, j] = linear_cka(x, y)
    return out
