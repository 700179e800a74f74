"""Scaling-law fits: the parametric law L(N, D) = E + A/N^alpha + B/D^beta, compute-optimal allocation,
and IsoFLOP parabola minima (Chinchilla's approach 2). numpy + scipy only.

The parametric fit follows Hoffmann et al. (2022, approach 3) as re-done by Besiroglu et al. (2024,
"Chinchilla scaling: a replication attempt"): the law is written in log space as

    log L(N, D) = LSE(a - alpha log N, b - beta log D, e),   A = exp(a), B = exp(b), E = exp(e),

the objective is the Huber loss (delta 1e-3) of log L_fit - log L_observed summed over the runs, and
L-BFGS-B starts from every point of a grid of initialisations; the lowest minimum is kept.
"""

from __future__ import annotations

import itertools
import time
from typing import Optional, Sequence

import numpy as np

__all__ = [
    "fit_chinchilla",
    "chinchilla_init_grid",
    "chinchilla_loss",
    "compute_optimal",
    "isoflop_minima",
    "power_law_exponent",
]

HUBER_DELTA = 1e-3
PARAM_NAMES = ("E", "A", "B", "alpha", "beta")


def chinchilla_init_grid() -> np.ndarray:
    """The grid of initialisations `[S, 5]`, columns (a, b, e, alpha, beta): a, b in {0, 5, ..., 25},
    e in {-1, -0.5, ..., 1}, alpha, beta in {0, 0.5, ..., 2} (S = 6 * 6 * 5 * 5 * 5 = 4500)."""
    a = b = np.arange(0.0, 26.0, 5.0)
    e = np.arange(-1.0, 1.01, 0.5)
    alpha = beta = np.arange(0.0, 2.01, 0.5)
    return np.array(list(itertools.product(a, b, e, alpha, beta)), dtype=np.float64)


def chinchilla_loss(params: dict, N, D) -> np.ndarray:
    """E + A / N^alpha + B / D^beta for a fit's dict (`fit_chinchilla`'s)."""
    N, D = np.asarray(N, dtype=np.float64), np.asarray(D, dtype=np.float64)
    return params["E"] + params["A"] / N ** params["alpha"] + params["B"] / D ** params["beta"]


def _objective(
    theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray, delta: float
) -> tuple[float, np.ndarray]:
    """Summed Huber loss of the log-space residuals and its gradient over theta = (a, b, e, alpha, beta).

    log_n, log_d, log_loss: `[P]` over the P runs. The residual r = LSE(...) - log L; Huber's derivative
    is clip(r, -delta, delta), and d LSE / d t_i is the softmax weight of term i.
    """
    a, b, e, alpha, beta = theta
    t_n = a - alpha * log_n
    t_d = b - beta * log_d
    top = np.maximum(np.maximum(t_n, t_d), e)
    w_n, w_d, w_e = np.exp(t_n - top), np.exp(t_d - top), np.exp(e - top)
    total = w_n + w_d + w_e
    r = top + np.log(total) - log_loss
    g = np.clip(r, -delta, delta)
    # Huber: 0.5 r^2 inside [-delta, delta], delta (|r| - delta/2) outside; both are g (r - g/2).
    value = float(g @ (r - 0.5 * g))
    g_over = g / total
    g_n, g_d = g_over * w_n, g_over * w_d
    grad = np.array([g_n.sum(), g_d.sum(), g_over @ w_e, -(g_n @ log_n), -(g_d @ log_d)])
    return value, grad


def _objective_at_grid(grid: np.ndarray, log_n, log_d, log_loss, delta: float) -> np.ndarray:
    """The objective at every row of `grid` `[S, 5]` at once -> `[S]` (screening the starts)."""
    a, b, e, alpha, beta = (grid[:, i : i + 1] for i in range(5))
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, (len(grid), len(log_n)))])
    top = terms.max(axis=0)
    r = top + np.log(np.exp(terms - top).sum(axis=0)) - log_loss
    g = np.clip(r, -delta, delta)
    return (g * (r - 0.5 * g)).sum(axis=1)


def _one_blas_thread():
    """Run L-BFGS-B with one BLAS thread: a 5-parameter problem gains nothing from more, and on a busy
    machine the waiting OpenBLAS threads made every iteration ~25x slower (measured on 2 shared cores)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, user_api="blas")


# L-BFGS-B's stopping rule, set explicitly: the Huber objective of log-loss residuals is tiny (~1e-4 for
# 1% noise), so the defaults (projected gradient < 1e-5, relative decrease < 2.2e-9) already hold at a
# warm start, and with scipy 1.17 every bootstrap refit stopped where it began: intervals that did not
# contain the true law of synthetic data (tests/scaling/test_fit.py). These run each fit to its minimum.
LBFGS_OPTIONS = {"ftol": 1e-15, "gtol": 1e-10, "maxiter": 2000}


def _minimize_from(starts: np.ndarray, args: tuple) -> list[tuple[float, np.ndarray]]:
    """L-BFGS-B from each row of `starts`; (objective, theta) of every run that ended finite."""
    from scipy.optimize import minimize

    out = []
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"), _one_blas_thread():
        for x0 in starts:
            res = minimize(_objective, x0, args=args, jac=True, method="L-BFGS-B", options=LBFGS_OPTIONS)
            if np.isfinite(res.fun) and np.all(np.isfinite(res.x)):
                out.append((float(res.fun), res.x))
    return out


def _as_dict(theta: np.ndarray) -> dict:
    a, b, e, alpha, beta = (float(x) for x in theta)
    return {"E": float(np.exp(e)), "A": float(np.exp(a)), "B": float(np.exp(b)), "alpha": alpha, "beta": beta}


def _distinct(results: list[tuple[float, np.ndarray]], count: int) -> np.ndarray:
    """Up to `count` lowest minima that differ from each other (warm starts for the bootstrap)."""
    kept: list[np.ndarray] = []
    for _, theta in sorted(results, key=lambda item: item[0]):
        if all(np.max(np.abs(theta - other)) > 1e-3 for other in kept):
            kept.append(theta)
        if len(kept) == count:
            break
    return np.array(kept)


def fit_chinchilla(
    N: Sequence[float],
    D: Sequence[float],
    loss: Sequence[float],
    bootstrap: int = 0,
    *,
    max_starts: Optional[int] = None,
    confidence: float = 0.95,
    seed: int = 0,
    delta: float = HUBER_DELTA,
) -> dict:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta to runs with N parameters, D tokens and final loss `loss`.

    Args:
        N, D, loss: `[P]` per run (P >= 5, all > 0).
        bootstrap: resample the runs with replacement this many times and refit each, for confidence
            intervals. A resample starts L-BFGS-B from the 4 lowest distinct minima of the full fit
            (not the whole grid again: the resampled optimum lies near one of them).
        max_starts: None = L-BFGS-B from every point of `chinchilla_init_grid()` (the published
            method); k = only from the k grid points with the lowest objective (a faster screen).
        confidence: the central interval reported from the bootstrap fits.
        seed: of the bootstrap's resampling.
        delta: Huber's delta on the log-loss residuals.

    Returns a dict with E, A, B, alpha, beta (floats), `objective` (the summed Huber loss), `points`,
    `starts` (L-BFGS-B runs), `seconds`; with bootstrap > 0 also `E_ci`, `A_ci`, `B_ci`, `alpha_ci`,
    `beta_ci` ((low, high) tuples) and `bootstrap` (the number of resamples that converged).
    """
    from megatrain.errors import ConfigError

    n, d, y = (np.asarray(x, dtype=np.float64).ravel() for x in (N, D, loss))
    if not (len(n) == len(d) == len(y)):
        raise ConfigError(f"fit_chinchilla: N, D and loss must have the same length, got {len(n)}, {len(d)}, {len(y)}")
    if len(n) < 5:
        raise ConfigError(f"fit_chinchilla: the law has 5 parameters; give at least 5 runs, got {len(n)}")
    if not (np.all(n > 0) and np.all(d > 0) and np.all(y > 0) and np.all(np.isfinite(y))):
        raise ConfigError("fit_chinchilla: N, D and loss must be finite and > 0")
    started = time.perf_counter()
    args = (np.log(n), np.log(d), np.log(y), delta)
    grid = chinchilla_init_grid()
    if max_starts is not None and max_starts < len(grid):
        with np.errstate(over="ignore", invalid="ignore"):
            screen = _objective_at_grid(grid, *args)
        grid = grid[np.argsort(np.nan_to_num(screen, nan=np.inf))[: max(1, max_starts)]]
    results = _minimize_from(grid, args)
    if not results:
        raise ConfigError("fit_chinchilla: no L-BFGS-B run converged to a finite loss")
    best_value, best_theta = min(results, key=lambda item: item[0])
    out = _as_dict(best_theta)
    out.update(objective=best_value, points=len(n), starts=len(grid))
    if bootstrap > 0:
        warm = _distinct(results, 4)
        rng = np.random.default_rng(seed)
        fits = []
        for _ in range(bootstrap):
            idx = rng.integers(0, len(n), len(n))
            sample = (args[0][idx], args[1][idx], args[2][idx], delta)
            found = _minimize_from(warm, sample)
            if found:
                fits.append(_as_dict(min(found, key=lambda item: item[0])[1]))
        tail = 100 * (1 - confidence) / 2
        for name in PARAM_NAMES:
            values = np.array([f[name] for f in fits])
            out[f"{name}_ci"] = (float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail)))
        out["bootstrap"] = len(fits)
    out["seconds"] = time.perf_counter() - started
    return out


def compute_optimal(params: dict) -> dict:
    """Compute-optimal allocation under C = 6 N D from a fit of the law (Hoffmann et al., eq. 4):
    N*(C) = G (C/6)^a, D*(C) = G^-1 (C/6)^b with a = beta/(alpha+beta), b = alpha/(alpha+beta),
    G = (alpha A / (beta B))^(1/(alpha+beta)). Returns a, b and G (floats; nan if alpha or beta is 0)."""
    alpha, beta = params["alpha"], params["beta"]
    if alpha <= 0 or beta <= 0:
        return {"a": float("nan"), "b": float("nan"), "G": float("nan")}
    total = alpha + beta
    G = (alpha * params["A"] / (beta * params["B"])) ** (1.0 / total)
    return {"a": beta / total, "b": alpha / total, "G": float(G)}


def optimal_n(params: dict, C) -> np.ndarray:
    """N*(C) of `compute_optimal(params)` (C in FLOPs, array-like)."""
    opt = compute_optimal(params)
    return opt["G"] * (np.asarray(C, dtype=np.float64) / 6.0) ** opt["a"]


def isoflop_minima(budget, N, loss) -> list[dict]:
    """Chinchilla's approach 2: for each compute budget, a parabola in log N fitted to the loss; its vertex
    is that budget's loss-optimal size.

    budget, N, loss: `[P]` per run (budget = the IsoFLOP budget the run belongs to). Budgets with
    fewer than 3 runs, or whose parabola opens downwards (no minimum), are reported with N_opt nan.
    Returns one dict per budget: C, N_opt, loss_opt, coeffs (of loss = c2 x^2 + c1 x + c0, x = log N),
    runs, and inside (whether the vertex lies within the sizes trained).
    """
    budget, N, loss = (np.asarray(x, dtype=np.float64) for x in (budget, N, loss))
    out = []
    for C in np.unique(budget):
        mask = budget == C
        x, y = np.log(N[mask]), loss[mask]
        row = {
            "C": float(C),
            "N_opt": float("nan"),
            "loss_opt": float("nan"),
            "coeffs": None,
            "runs": int(mask.sum()),
            "inside": False,
        }
        if mask.sum() >= 3 and len(np.unique(x)) >= 3:
            c2, c1, c0 = np.polyfit(x, y, 2)
            row["coeffs"] = (float(c2), float(c1), float(c0))
            if c2 > 0:
                x_opt = -c1 / (2 * c2)
                row.update(
                    N_opt=float(np.exp(x_opt)),
                    loss_opt=float(c0 - c1 * c1 / (4 * c2)),
                    inside=bool(x.min() <= x_opt <= x.max()),
                )
        out.append(row)
    return out


def power_law_exponent(x, y) -> tuple[float, float]:
    """(exponent, prefactor) of y = k x^exponent fitted by least squares in log-log space (finite, > 0 pairs)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    if ok.sum() < 2:
        return float("nan"), float("nan")
    slope, intercept = np.polyfit(np.log(x[ok]), np.log(y[ok]), 1)
    return float(slope), float(np.exp(intercept))
