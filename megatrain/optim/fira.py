"""Fira: GaLore plus the gradient outside the projected subspace, rescaled.

For a projected weight (notation of megatrain.optim.galore; "right" side shown, the "left" side
swaps rows and columns), after GaLore's moment update in the r-dim space:

    psi = m / (sqrt(v) + eps)                                   [m, r]
    phi_i = ||psi_i,:|| / (||R_i,:|| + 1e-8)                    one factor per row i (per column
                                                                 for a left projection)
    S   = phi (.) (G - back(R))                                 the residual outside the subspace
    if a previous S exists and ||S|| > gamma (||S_prev|| + 1e-8):  S <- S * gamma (||S_prev|| + 1e-8) / ||S||
    remember ||S|| (after limiting) for the next step           norm-growth limiter, gamma = 1.01
    W  <- W - lr * sqrt(1 - b2^t) / (1 - b1^t) * (scale * back(psi) + S)
    W  <- W - lr * weight_decay * W

as in the reference code (github.com/xichen-fy/Fira, optimizer_torch/fira_adamw.py): psi and S
carry no bias correction (it is in the step size, which multiplies both), the limiter's state is
the limited norm and survives projection refreshes, and the first step of a parameter is not
limited. One deliberate difference: the reference subtracts scale * back(R) (its projector's
back-projection multiplies by alpha), which for scale != 1 leaves (1 - scale) * back(R) of the
in-subspace gradient in the "residual"; the Fira paper and megatrain use the orthogonal residual
G - back(R). `residual="reference"` in a param group (or the constructor) reproduces the
reference code exactly; the two agree whenever scale = 1.

Fused path: the limiter needs ||S|| over the whole matrix before any element of W is written, so
Fira runs a small pre-pass in the r-dim space (moments, psi, phi) plus one row-norm reduction of
G, gets ||S|| in closed form (P has orthonormal rows / columns, so ||G_i - c back(R)_i||^2 =
||G_i||^2 - (2c - c^2) ||R_i||^2), and then the same single pass over W as GaLore
(megatrain.kernels.projected_adam_update with the residual fused in). S itself is never stored.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor

from megatrain import kernels
from megatrain.optim.galore import ProjectedAdamW

__all__ = ["FiraAdamW", "RESIDUALS"]

RESIDUALS = ("orthogonal", "reference")


class FiraAdamW(ProjectedAdamW):
    """Fira AdamW (Chen et al., 2024). Drop-in for the reference `FiraAdamW`; param-group keys
    `rank`, `update_proj_gap`, `scale` (or Fira's `alpha`), `proj_type`, plus `limiter` (gamma,
    default 1.01) and `residual` ("orthogonal" default, or "reference": see the module docstring).

        param_groups = [{"params": other_params},
                        {"params": fira_params, "rank": 128, "update_proj_gap": 200, "alpha": 0.25,
                         "proj_type": "std"}]
        optimizer = FiraAdamW(param_groups, lr=0.01)
    """

    _fira = True

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        *,
        rank: Optional[int] = None,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        proj_type: str = "std",
        limiter: float = 1.01,
        residual: str = "orthogonal",
        no_deprecation_warning: bool = False,
    ):
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            correct_bias,
            rank=rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            proj_type=proj_type,
            no_deprecation_warning=no_deprecation_warning,
            limiter=limiter,
            residual=residual,
        )

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        if group["rank"] is None:
            return
        if not group["limiter"] >= 1.0:
            raise ValueError(f"FiraAdamW: limiter (gamma) must be >= 1, got {group['limiter']!r}")
        if group["residual"] not in RESIDUALS:
            raise ValueError(
                f"FiraAdamW: residual={group['residual']!r} is not known (allowed: {', '.join(RESIDUALS)})"
            )

    def _one_sided_update(
        self, weight: Tensor, state: dict, grad32: Tensor, low_rank: Tensor, group: dict, step_size: float, decay: float
    ) -> None:
        beta1, beta2 = group["betas"]
        side = state["side"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(low_rank, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(low_rank, low_rank, value=1.0 - beta2)
        psi = exp_avg / (exp_avg_sq.sqrt() + group["eps"])
        rank_dim = 1 if side == "right" else 0  # reduce over the rank axis: one value per kept index
        psi_norm = torch.linalg.vector_norm(psi, dim=rank_dim)
        r_sq = low_rank.pow(2).sum(dim=rank_dim)
        phi = psi_norm / (r_sq.sqrt() + 1e-8)
        coef = group["scale"] if group["residual"] == "reference" else 1.0
        g_sq = grad32.pow(2).sum(dim=1 if side == "right" else 0)
        residual_sq = (g_sq - (2.0 * coef - coef * coef) * r_sq).clamp_(min=0.0)
        s_norm = torch.sqrt((phi.pow(2) * residual_sq).sum())
        if "limiter_norm" in state:
            # Device-side max(): no host sync. Same arithmetic as the reference's limiter.
            gamma = group["limiter"]
            limit = torch.clamp(s_norm / (state["limiter_norm"] + 1e-8), min=gamma) / gamma
            phi = phi / limit
            s_norm = s_norm / limit
        state["limiter_norm"] = s_norm
        kernels.projected_adam_update(
            weight,
            state["proj"],
            low_rank,
            exp_avg,
            exp_avg_sq,
            side=side,
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            step_size=step_size,
            scale=group["scale"],
            decay=decay,
            update_moments=False,
            grad=grad32,
            residual_scale=phi,
            residual_coef=coef,
        )
