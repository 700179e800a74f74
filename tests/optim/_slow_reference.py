"""Slow, explicit transcriptions of the GaLore and Fira update rules, one weight at a time.

Written from the equations (docs/galore-fira.md), in the bias-corrected notation, with the
conventions of the reference code (eps added before bias correction, decay after the update,
refresh when the step count before the update is a multiple of T, moments kept at a refresh,
Fira's limiter on the uncorrected residual). Everything is fp64 except the SVD input (fp32, as the
optimizers take it), so the comparison tests the fp32 optimizers against exact arithmetic.
"""

from __future__ import annotations

import math

import torch


class SlowProjected:
    def __init__(
        self,
        weight,
        *,
        rank,
        gap,
        scale,
        proj_type="std",
        lr,
        betas,
        eps,
        wd,
        fira=False,
        limiter=1.01,
        residual="orthogonal",
    ):
        self.w = weight.detach().double().clone()
        self.rank, self.gap, self.scale, self.lr, self.eps, self.wd = rank, gap, scale, lr, eps, wd
        self.b1, self.b2 = betas
        self.fira, self.gamma, self.residual = fira, limiter, residual
        m, n = weight.shape
        self.side = {"std": "right" if m >= n else "left", "reverse_std": "left" if m >= n else "right"}.get(
            proj_type, proj_type
        )
        self.t = 0
        self.P = None
        self.m = self.v = None
        self.prev_norm = None

    def step(self, grad: torch.Tensor) -> None:
        if self.P is None or self.t % self.gap == 0:
            U, _, Vh = torch.linalg.svd(grad.float(), full_matrices=False)
            self.P = (Vh[: self.rank] if self.side == "right" else U[:, : self.rank]).double()
        G = grad.double()
        P = self.P
        R = G @ P.T if self.side == "right" else P.T @ G
        if self.m is None:
            self.m, self.v = torch.zeros_like(R), torch.zeros_like(R)
        self.t += 1
        t = self.t
        self.m = self.b1 * self.m + (1 - self.b1) * R
        self.v = self.b2 * self.v + (1 - self.b2) * R * R
        c1, c2 = 1 - self.b1**t, 1 - self.b2**t
        m_hat, v_hat = self.m / c1, self.v / c2
        eps_hat = self.eps / math.sqrt(c2)
        n_hat = m_hat / (v_hat.sqrt() + eps_hat)  # = sqrt(c2)/c1 * m / (sqrt(v) + eps)

        def back(x):
            return x @ P if self.side == "right" else P @ x

        update = self.scale * back(n_hat)
        if self.fira:
            psi = self.m / (self.v.sqrt() + self.eps)  # uncorrected, as the reference
            dim = 1 if self.side == "right" else 0
            phi = psi.norm(dim=dim) / (R.norm(dim=dim) + 1e-8)
            phi = phi[:, None] if self.side == "right" else phi[None, :]
            coef = self.scale if self.residual == "reference" else 1.0
            S = phi * (G - coef * back(R))
            norm = S.norm()
            if self.prev_norm is not None and norm > self.gamma * (self.prev_norm + 1e-8):
                S = S * (self.gamma * (self.prev_norm + 1e-8) / norm)
                norm = S.norm()
            self.prev_norm = norm
            update = update + math.sqrt(c2) / c1 * S  # the step size multiplies S too
        self.w = self.w - self.lr * update
        self.w = self.w - self.lr * self.wd * self.w


class SlowAdamW:
    """The reference AdamW rule for non-projected parameters."""

    def __init__(self, weight, *, lr, betas, eps, wd):
        self.w = weight.detach().double().clone()
        self.lr, self.eps, self.wd = lr, eps, wd
        self.b1, self.b2 = betas
        self.t = 0
        self.m = torch.zeros_like(self.w)
        self.v = torch.zeros_like(self.w)

    def step(self, grad):
        g = grad.double()
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * g * g
        size = self.lr * math.sqrt(1 - self.b2**self.t) / (1 - self.b1**self.t)
        self.w = self.w - size * self.m / (self.v.sqrt() + self.eps)
        self.w = self.w - self.lr * self.wd * self.w
