"""Loss landscapes: 1-D curves along filter-normalised random directions and along the top principal
directions of a run's checkpoint trajectory, a sharpness summary, and linear interpolation between
two checkpoints with its barrier.

Points are set one tensor at a time: for a point theta + sum_k alpha_k d_k, each parameter is
read from the base checkpoint (memory-mapped), the directions' slices for that tensor are formed
(random ones regenerated from a seed per tensor, principal ones from the checkpoints' slices), and
the sum is copied into the one model held in memory. Nothing holds a second copy of the model.
"""

from __future__ import annotations

import math
import zlib
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from megatrain.analysis.weights import Batches, fill_model, mean_loss

__all__ = [
    "filter_dim",
    "filter_normalize",
    "RandomDirection",
    "TrajectoryPCA",
    "loss_curve",
    "sharpness",
    "interpolation_curve",
    "barrier_height",
]

# Low-rank factors are stored [D_in, D_out] (x @ a @ b): their filters (one per output unit) are columns.
_INPUT_MAJOR = (".cola_a", ".cola_b", ".lora_a", ".lora_b")


def filter_dim(name: str) -> int:
    """The dimension along which a tensor's filters (one per output unit) are laid out: 0 for
    nn.Linear-style [D_out, D_in] weights and the embedding rows, 1 for the [D_in, D_out] factors."""
    return 1 if name.endswith(_INPUT_MAJOR) else 0


def filter_normalize(direction: Tensor, weight: Tensor, dim: int = 0, eps: float = 1e-10) -> Tensor:
    """Li et al. (2018) filter normalisation: each filter of `direction` (slice along `dim`) rescaled to
    the norm of the same filter of `weight`. direction, weight: the same shape (>= 2-D)."""
    if direction.shape != weight.shape or direction.dim() < 2:
        raise ValueError(
            f"filter_normalize needs two tensors of one shape with >= 2 dims, got "
            f"{tuple(direction.shape)} and {tuple(weight.shape)}"
        )
    reduce = [d for d in range(direction.dim()) if d != dim]
    d_norm = direction.norm(dim=reduce, keepdim=True)
    w_norm = weight.norm(dim=reduce, keepdim=True)
    return direction * (w_norm / (d_norm + eps))


class RandomDirection:
    """A Gaussian direction, filter-normalised against the base weights, regenerated per tensor from
    (seed, tensor name). 1-D tensors (norm gains, biases) and integer buffers get no component, as in
    Li et al.: perturbing a gain by its own norm is not a comparable move."""

    def __init__(self, seed: int, base: Callable[[str], Tensor]):
        self.seed, self.base = int(seed), base
        self.label = f"random (filter-normalised, seed {seed})"

    def __call__(self, name: str, weight: Optional[Tensor] = None) -> Optional[Tensor]:
        weight = self.base(name) if weight is None else weight
        if not weight.is_floating_point() or weight.dim() < 2:
            return None
        generator = torch.Generator().manual_seed((self.seed * 1000003 + zlib.crc32(name.encode())) % (1 << 63))
        d = torch.randn(weight.shape, generator=generator, dtype=torch.float32)
        return filter_normalize(d, weight.float(), filter_dim(name))


class TrajectoryPCA:
    """Principal directions of a trajectory theta_1..theta_k, theta_end (weight sources, same model).

    With M the [k, P] matrix of rows theta_i - theta_end over every float tensor, the Gram matrix
    G = M M^T is accumulated tensor by tensor; G = V diag(lam) V^T gives unit directions
    u_j = M^T v_j / sqrt(lam_j), their explained variance lam_j / sum(lam), and the coordinates of
    the checkpoints along them, <theta_i - theta_end, u_j> = sqrt(lam_j) v_ij.
    """

    def __init__(self, points: Sequence, end, components: int = 2):
        if len(points) < 1:
            raise ValueError("a trajectory PCA needs at least one checkpoint besides the end point")
        self.points, self.end = list(points), end
        names = [n for n in end.names if end.get(n).is_floating_point()]
        self.names = names
        k = len(points)
        gram = torch.zeros(k, k, dtype=torch.float64)
        for name in names:
            theta = end.get(name).double().reshape(-1)
            rows = torch.stack([p.get(name).double().reshape(-1) - theta for p in self.points])
            gram += rows @ rows.T
        lam, vecs = torch.linalg.eigh(gram)
        order = torch.argsort(lam, descending=True)
        lam, vecs = lam[order].clamp_min(0), vecs[:, order]
        total = float(lam.sum())
        keep = [j for j in range(min(components, k)) if lam[j] > 1e-12 * max(total, 1e-300)]
        self.eigenvalues = lam
        self.vectors = vecs
        self.components = keep
        self.explained = [float(lam[j] / total) if total > 0 else 0.0 for j in keep]
        # coords[j][i]: where checkpoint i sits along component j
        self.coords = [(math.sqrt(float(lam[j])) * vecs[:, j]).tolist() for j in keep]

    def direction(self, j: int) -> Callable[[str, Optional[Tensor]], Optional[Tensor]]:
        """Unit direction of component j (0-based among `components`) as a per-tensor function."""
        comp = self.components[j]
        weights = self.vectors[:, comp] / math.sqrt(float(self.eigenvalues[comp]))

        def slice_of(name: str, weight: Optional[Tensor] = None) -> Optional[Tensor]:
            end = self.end.get(name)
            if not end.is_floating_point():
                return None
            out = torch.zeros_like(end, dtype=torch.float64)
            for w, p in zip(weights.tolist(), self.points):
                out += w * (p.get(name).double() - end.double())
            return out.float()

        slice_of.label = f"trajectory PC{j + 1} ({100 * self.explained[j]:.1f}% of the variance)"
        return slice_of


def _set_point(model: nn.Module, base: Callable[[str], Tensor], directions, alphas: Sequence[float]) -> None:
    def value(name: str) -> Tensor:
        w = base(name)
        for d, a in zip(directions, alphas):
            if a == 0:
                continue
            step = d(name, w)
            if step is not None:
                w = w + a * step
        return w

    fill_model(model, value)


def loss_curve(
    model: nn.Module, base: Callable[[str], Tensor], direction, alphas: Sequence[float], batches: Batches
) -> list[float]:
    """Loss on the fixed batches at theta + alpha * d for each alpha (the model ends at theta)."""
    losses = []
    for alpha in alphas:
        _set_point(model, base, [direction], [float(alpha)])
        losses.append(mean_loss(model, batches))
    fill_model(model, base)
    return losses


def sharpness(alphas: Sequence[float], losses: Sequence[float], radius: float) -> dict:
    """Summary of a 1-D curve around alpha = 0.

    curvature: second derivative at 0 of the least-squares parabola through the 5 grid points nearest 0;
    rise: mean of L(+radius) and L(-radius) (linear interpolation on the grid) minus L(0).
    """
    a, losses = np.asarray(alphas, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    order = np.argsort(a)
    a, losses = a[order], losses[order]
    near = np.argsort(np.abs(a))[:5]
    curvature = float(2.0 * np.polyfit(a[near], losses[near], 2)[0]) if len(near) >= 3 else float("nan")
    at0 = float(np.interp(0.0, a, losses))
    rise = float((np.interp(radius, a, losses) + np.interp(-radius, a, losses)) / 2 - at0)
    return {"loss_at_0": at0, "curvature": curvature, "radius": float(radius), "rise_at_radius": rise}


def interpolation_curve(
    model: nn.Module, a: Callable[[str], Tensor], b: Callable[[str], Tensor], alphas: Sequence[float], batches: Batches
) -> list[float]:
    """Loss on the fixed batches at (1 - alpha) * theta_a + alpha * theta_b for each alpha. Integer buffers
    (SLTrain's support) come from a."""
    losses = []
    for alpha in alphas:
        alpha = float(alpha)

        def value(name: str) -> Tensor:
            wa = a(name)
            if not wa.is_floating_point() or alpha == 0.0:
                return wa
            return torch.lerp(wa, b(name), alpha)

        fill_model(model, value)
        losses.append(mean_loss(model, batches))
    return losses


def barrier_height(alphas: Sequence[float], losses: Sequence[float]) -> float:
    """max over alpha of L(alpha) - ((1 - alpha) L(0) + alpha L(1)): how far the path rises above the
    straight line between its end losses (0 when it never does). alphas must include 0 and 1."""
    a, losses = np.asarray(alphas, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    l0, l1 = float(np.interp(0.0, a, losses)), float(np.interp(1.0, a, losses))
    inside = (a >= 0) & (a <= 1)
    return float(max(0.0, np.max(losses[inside] - ((1 - a[inside]) * l0 + a[inside] * l1))))
