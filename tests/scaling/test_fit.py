"""Scaling-law fits: the Chinchilla parametric fit on data drawn from a known law, the compute-optimal
allocation, the IsoFLOP parabola minima."""

import numpy as np
import pytest
from scipy.optimize import check_grad

from megatrain.errors import ConfigError
from megatrain.scaling import compute_optimal, fit_chinchilla, isoflop_minima
from megatrain.scaling.fit import _objective, chinchilla_init_grid, chinchilla_loss, optimal_n, power_law_exponent

TRUE = {"E": 1.7, "A": 400.0, "alpha": 0.34, "B": 410.0, "beta": 0.28}


def synthetic(points=40, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    N = np.exp(rng.uniform(np.log(1e5), np.log(1e7), points))
    D = np.exp(rng.uniform(np.log(1e6), np.log(1e8), points))
    loss = chinchilla_loss(TRUE, N, D) * np.exp(rng.normal(0.0, noise, points))
    return N, D, loss


def test_init_grid_is_the_published_one():
    grid = chinchilla_init_grid()
    assert grid.shape == (4500, 5)
    columns = [sorted(set(np.round(grid[:, i], 6))) for i in range(5)]  # a, b, e, alpha, beta
    assert columns[0] == columns[1] == [0.0, 5.0, 10.0, 15.0, 20.0, 25.0]
    assert columns[2] == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert columns[3] == columns[4] == [0.0, 0.5, 1.0, 1.5, 2.0]


def test_objective_gradient_is_exact():
    N, D, loss = synthetic(12)
    args = (np.log(N), np.log(D), np.log(loss), 1e-3)
    for theta in ([6.0, 6.0, 0.5, 0.35, 0.3], [2.0, 9.0, -0.5, 0.1, 0.6]):
        theta = np.array(theta)
        err = check_grad(lambda t: _objective(t, *args)[0], lambda t: _objective(t, *args)[1], theta)
        assert err < 1e-6 * max(1.0, np.abs(_objective(theta, *args)[1]).max())


def test_fit_recovers_a_known_law_within_its_bootstrap_interval():
    N, D, loss = synthetic()
    fit = fit_chinchilla(N, D, loss, bootstrap=30, max_starts=16)
    for name, value in TRUE.items():
        low, high = fit[f"{name}_ci"]
        assert low <= value <= high, (name, value, fit[f"{name}_ci"], fit[name])
        assert low <= fit[name] * 1.0001 and fit[name] <= high * 1.0001
    assert abs(fit["alpha"] - TRUE["alpha"]) < 0.05 and abs(fit["beta"] - TRUE["beta"]) < 0.05
    assert fit["bootstrap"] == 30 and fit["starts"] == 16 and fit["points"] == 40
    # on noiseless data the law itself is found
    exact = fit_chinchilla(N, D, chinchilla_loss(TRUE, N, D), max_starts=16)
    for name, value in TRUE.items():
        assert exact[name] == pytest.approx(value, rel=0.02), name
    assert "alpha_ci" not in exact


def test_fit_refuses_bad_input():
    with pytest.raises(ConfigError, match="at least 5"):
        fit_chinchilla([1e5] * 4, [1e6] * 4, [3.0] * 4)
    with pytest.raises(ConfigError, match="same length"):
        fit_chinchilla([1e5] * 5, [1e6] * 6, [3.0] * 5)
    with pytest.raises(ConfigError, match="> 0"):
        fit_chinchilla([1e5] * 5, [1e6] * 5, [3.0, 3.0, 3.0, 3.0, -1.0])


def test_compute_optimal_minimises_the_law_at_fixed_compute():
    opt = compute_optimal(TRUE)
    assert opt["a"] == pytest.approx(0.28 / 0.62) and opt["b"] == pytest.approx(0.34 / 0.62)
    for C in (1e18, 1e21):
        n = np.geomspace(1e5, 1e12, 200001)
        best = n[np.argmin(chinchilla_loss(TRUE, n, C / (6 * n)))]
        assert optimal_n(TRUE, C) == pytest.approx(best, rel=1e-3)
    assert np.isnan(compute_optimal({**TRUE, "alpha": 0.0})["a"])


def test_isoflop_minima_find_each_parabola_vertex():
    # loss = 0.2 (log N - log N*)^2 + L*, with N* = 1e6 (C = 1e15) and 1e7 (C = 1e17)
    budget, N, loss = [], [], []
    for C, n_opt, l_opt in ((1e15, 1e6, 3.0), (1e17, 1e7, 2.5)):
        for n in np.geomspace(n_opt / 30, n_opt * 10, 5):
            budget.append(C)
            N.append(n)
            loss.append(0.2 * np.log(n / n_opt) ** 2 + l_opt)
    budget.append(1e19)  # a budget with too few runs
    N.append(1e8)
    loss.append(2.0)
    minima = isoflop_minima(budget, N, loss)
    assert [m["C"] for m in minima] == [1e15, 1e17, 1e19]
    assert minima[0]["N_opt"] == pytest.approx(1e6, rel=1e-6) and minima[0]["loss_opt"] == pytest.approx(3.0)
    assert minima[1]["N_opt"] == pytest.approx(1e7, rel=1e-6) and minima[1]["inside"]
    assert np.isnan(minima[2]["N_opt"]) and minima[2]["runs"] == 1
    exponent, _ = power_law_exponent([1e15, 1e17], [1e6, 1e7])
    assert exponent == pytest.approx(0.5)
