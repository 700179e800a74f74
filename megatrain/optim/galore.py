"""GaLore: AdamW whose moments live in a low-rank projection of each 2-D gradient.

For a parameter group with a `rank`, every weight W [m, n] is stepped like this (t counts this
parameter's steps from 1; T = update_proj_gap):

    before step t, when t - 1 is a multiple of T (so on the first step too), refresh P from the SVD
    of the fp32 gradient G = U S V^T, keeping r = rank singular vectors:
        right (m >= n for proj_type "std"):  P = V_r^T [r, n],  R = G P^T [m, r],  back(X) = X P
        left  (m <  n for proj_type "std"):  P = U_r   [m, r],  R = P^T G [r, n],  back(X) = P X
    m <- b1 m + (1 - b1) R;  v <- b2 v + (1 - b2) R^2        (moments are kept across refreshes)
    N  = m / (sqrt(v) + eps)
    W <- W - lr * sqrt(1 - b2^t) / (1 - b1^t) * scale * back(N)
    W <- W - lr * weight_decay * W                            (decoupled, after the update)

Groups without `rank` get the same AdamW rule on the raw gradient. This is the update of the
reference implementation (github.com/jiaweizzhao/GaLore, galore_torch/adamw.py, itself the
Hugging Face AdamW): bias correction folded into the step size with eps added to sqrt(v) before
correction, weight decay applied after the update, projection refreshed when the step counter
before the update is a multiple of T, moments not reset at a refresh. With the same settings
GaLoreAdamW follows its trajectory (tests/optim/test_galore.py checks this). In the bias-corrected
notation m^ = m / (1 - b1^t), v^ = v / (1 - b2^t) the same update reads
N^ = m^ / (sqrt(v^) + eps / sqrt(1 - b2^t)).

proj_type: "std" (right if m >= n else left: the smaller side is projected), "reverse_std" (the
opposite), "right", "left", "full" (both sides: R = U_r^T G V_r, back(X) = U_r X V_r^T; GaLore
only). The side is fixed per parameter at its first step.

Differences from the reference, all deliberate: the projection is computed and kept in fp32 even
for bf16 gradients (the reference casts it back to the gradient dtype); a bf16 parameter in a
projected group gets an fp32 master copy in the optimizer state (the update is applied there and
copied back, as DeepSpeed's mixed precision does); an SVD that raises or returns non-finite
values keeps the previous projection (or, on a parameter's first step, skips that parameter's
update and retries next step) with a logged warning, counted in `svd_failures`, where the
reference raises. Tensor (>2-D) GaLore and int4-quantised projections are not implemented
(`dim` > 2 or `proj_quant=True` is refused).

The inner update runs as one fused kernel (megatrain.kernels.projected_adam_update) on CUDA.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor

from megatrain import kernels

log = logging.getLogger(__name__)

__all__ = ["GaLoreAdamW", "ProjectedAdamW", "PROJ_TYPES", "projection_side"]

PROJ_TYPES = ("std", "reverse_std", "right", "left", "full")


def projection_side(proj_type: str, shape) -> str:
    """Which side of a [m, n] gradient `proj_type` projects: "right", "left" or "full"."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("right", "left", "full"):
        return proj_type
    raise ValueError(f"proj_type={proj_type!r} is not known (allowed: {', '.join(PROJ_TYPES)})")


def _svd(matrix: Tensor):
    """torch.linalg.svd (thin); a module-level seam so tests can make it fail."""
    return torch.linalg.svd(matrix, full_matrices=False)


def _projection(grad32: Tensor, rank: int, side: str) -> tuple[Tensor, Optional[Tensor]]:
    """(P, P_right) from the SVD of an fp32 gradient; P_right only for side "full"."""
    u, _, vh = _svd(grad32)
    if side == "right":
        return vh[:rank].contiguous(), None
    if side == "left":
        return u[:, :rank].contiguous(), None
    return u[:, :rank].contiguous(), vh[:rank].contiguous()


def _project(grad32: Tensor, proj: Tensor, proj_right: Optional[Tensor], side: str) -> Tensor:
    if side == "right":
        return grad32 @ proj.t()
    if side == "left":
        return proj.t() @ grad32
    return proj.t() @ grad32 @ proj_right.t()


class ProjectedAdamW(torch.optim.Optimizer):
    """AdamW with GaLore gradient projection for groups that set `rank` (see the module docstring).

    Args:
        params: parameters or param-group dicts. Group keys as in the reference code: `rank`
            (projected groups; None or absent = plain AdamW), `update_proj_gap` (T), `scale`
            (alpha; Fira's code calls it `alpha`, accepted as an alias), `proj_type`.
        lr, betas, eps, weight_decay, correct_bias: as the reference AdamW (defaults 1e-3,
            (0.9, 0.999), 1e-6, 0.0, True).
        rank, update_proj_gap, scale, proj_type: defaults for groups that do not set them.
        no_deprecation_warning: accepted for drop-in compatibility; ignored.
    """

    _fira = False  # FiraAdamW adds the scaled residual

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
        no_deprecation_warning: bool = False,
        **extra_defaults,
    ):
        if lr < 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        for i, b in enumerate(betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"betas[{i}] must be in [0, 1), got {b}")
        if eps < 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            correct_bias=correct_bias,
            rank=rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            proj_type=proj_type,
            **extra_defaults,
        )
        self.svd_failures = 0
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups

    def add_param_group(self, param_group: dict) -> None:
        group = dict(param_group)
        if "alpha" in group:  # Fira's name for the scale
            if "scale" in group and group["scale"] != group["alpha"]:
                raise ValueError(
                    f"param group sets both scale={group['scale']} and alpha={group['alpha']}; "
                    f"they are the same setting, give one"
                )
            group["scale"] = group.pop("alpha")
        if group.get("proj_quant"):
            raise ValueError("proj_quant=True (int4 projections) is not supported; leave proj_quant unset or False")
        if group.get("dim", 2) > 2:
            raise ValueError(f"dim={group['dim']}: tensor (>2-D) GaLore is not supported; only 2-D weights")
        super().add_param_group(group)
        self._check_group(self.param_groups[-1])

    def _check_group(self, group: dict) -> None:
        name = type(self).__name__
        if group["rank"] is None:
            return
        rank = group["rank"]
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"{name}: rank must be a positive integer, got {rank!r}")
        gap = group["update_proj_gap"]
        if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
            raise ValueError(f"{name}: update_proj_gap must be a positive integer, got {gap!r}")
        if not group["scale"] > 0:
            raise ValueError(f"{name}: scale must be > 0, got {group['scale']!r}")
        if group["proj_type"] not in PROJ_TYPES:
            raise ValueError(
                f"{name}: proj_type={group['proj_type']!r} is not known (allowed: {', '.join(PROJ_TYPES)})"
            )
        if self._fira and group["proj_type"] == "full":
            raise ValueError(
                f"{name}: proj_type='full' is not supported by Fira (its residual scaling is per "
                f"row or column of a one-sided projection); use std, reverse_std, left or right"
            )
        for p in group["params"]:
            if p.dim() != 2:
                raise ValueError(
                    f"{name}: a group with rank={rank} holds a parameter of shape {tuple(p.shape)}; "
                    f"projected groups take 2-D weights only (put it in a group without rank)"
                )
            if rank > min(p.shape):
                raise ValueError(
                    f"{name}: rank={rank} exceeds min(d_in, d_out)={min(p.shape)} of a parameter of "
                    f"shape {tuple(p.shape)}"
                )

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                if group["rank"] is None:
                    self._adamw_step(p, group)
                else:
                    self._projected_step(p, group)
        return loss

    @staticmethod
    def _step_size(group: dict, step: int) -> float:
        beta1, beta2 = group["betas"]
        if not group["correct_bias"]:
            return group["lr"]
        return group["lr"] * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)

    def _adamw_step(self, p: Tensor, group: dict) -> None:
        """The reference AdamW rule, elementwise (so it also runs on ZeRO's flat partitions)."""
        state = self.state[p]
        grad = p.grad
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = exp_avg_sq.sqrt().add_(group["eps"])
        p.addcdiv_(exp_avg, denom, value=-self._step_size(group, state["step"]))
        if group["weight_decay"] > 0.0:
            p.mul_(1.0 - group["lr"] * group["weight_decay"])

    def _refresh(self, state: dict, grad32: Tensor, rank: int, side: str, step: int) -> None:
        """New projection from the SVD of grad32; on failure keep the old one (warn, count)."""
        try:
            proj, proj_right = _projection(grad32, rank, side)
            ok = bool(torch.isfinite(proj).all()) and (proj_right is None or bool(torch.isfinite(proj_right).all()))
            reason = "non-finite singular vectors"
        except (RuntimeError, ValueError) as exc:  # torch.linalg.LinAlgError is a RuntimeError
            ok, reason = False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
        if ok:
            state["proj"] = proj
            if proj_right is not None:
                state["proj_right"] = proj_right
            return
        self.svd_failures += 1
        fallback = (
            "keeping the previous projection"
            if state.get("proj") is not None
            else "no projection yet, so this parameter is not updated this step (retried next step)"
        )
        log.warning(
            "%s: SVD of a %s gradient failed at step %d (%s); %s [%d failure(s) so far]",
            type(self).__name__,
            list(grad32.shape),
            step + 1,
            reason,
            fallback,
            self.svd_failures,
        )

    def _projected_step(self, p: Tensor, group: dict) -> None:
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
            state["side"] = projection_side(group["proj_type"], p.shape)
        side, rank, step = state["side"], group["rank"], state["step"]
        grad32 = p.grad.float()
        if state.get("proj") is None or step % group["update_proj_gap"] == 0:
            self._refresh(state, grad32, rank, side, step)
        if state.get("proj") is None:
            return
        if p.dtype != torch.float32 and "master" not in state:
            state["master"] = p.detach().float()
        weight = state.get("master", p)
        proj = state["proj"]
        low_rank = _project(grad32, proj, state.get("proj_right"), side)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(low_rank)
            state["exp_avg_sq"] = torch.zeros_like(low_rank)
        state["step"] += 1
        step_size = self._step_size(group, state["step"])
        decay = group["lr"] * group["weight_decay"]
        if side == "full":
            self._full_step(weight, state, low_rank, group, step_size, decay)
        else:
            self._one_sided_update(weight, state, grad32, low_rank, group, step_size, decay)
        if weight is not p:
            p.copy_(weight)

    def _full_step(
        self, weight: Tensor, state: dict, low_rank: Tensor, group: dict, step_size: float, decay: float
    ) -> None:
        """proj_type "full": both sides projected, r x r moments (plain torch; no fused kernel)."""
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(low_rank, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(low_rank, low_rank, value=1.0 - beta2)
        normed = exp_avg / (exp_avg_sq.sqrt() + group["eps"])
        update = state["proj"] @ normed @ state["proj_right"]
        weight.add_(update, alpha=-step_size * group["scale"])
        weight.mul_(1.0 - decay)

    def _one_sided_update(
        self, weight: Tensor, state: dict, grad32: Tensor, low_rank: Tensor, group: dict, step_size: float, decay: float
    ) -> None:
        """One-sided projection: Adam in the r-dim space, back-projection, scale and decay in one fused
        pass. FiraAdamW overrides it to add the scaled out-of-subspace residual."""
        beta1, beta2 = group["betas"]
        state["exp_avg"], state["exp_avg_sq"] = kernels.projected_adam_update(
            weight,
            state["proj"],
            low_rank,
            state["exp_avg"],
            state["exp_avg_sq"],
            side=state["side"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            step_size=step_size,
            scale=group["scale"],
            decay=decay,
        )

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        out = super().state_dict()
        out["svd_failures"] = self.svd_failures
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Like torch's, but state tensors keep their dtype (fp32 moments, master and projection of a
        bf16 parameter stay fp32) and move to the device of their parameter."""
        state_dict = dict(state_dict)
        self.svd_failures = int(state_dict.pop("svd_failures", 0))
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state has {len(saved_groups)} parameter groups, the optimizer has {len(self.param_groups)}"
            )
        id_map = {}
        for saved, group in zip(saved_groups, self.param_groups):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError("loaded state has a parameter group of a different size than the optimizer's")
            id_map.update(zip(saved["params"], group["params"]))
        state = defaultdict(dict)
        for key, values in state_dict["state"].items():
            p = id_map[key]
            state[p] = {k: (v.to(p.device) if torch.is_tensor(v) else v) for k, v in values.items()}
        self.state = state
        for saved, group in zip(saved_groups, self.param_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})


class GaLoreAdamW(ProjectedAdamW):
    """GaLore AdamW (Zhao et al., 2024). Drop-in for `galore_torch.GaLoreAdamW`:

    param_groups = [{"params": other_params},
                    {"params": galore_params, "rank": 128, "update_proj_gap": 200,
                     "scale": 0.25, "proj_type": "std"}]
    optimizer = GaLoreAdamW(param_groups, lr=0.01)
    """
