"""Scaling-law sweeps: sweep files and their plan (spec.py), runners (runner.py), collection (collect.py),
fits (fit.py) and the report with its plots (report.py). docs/scaling.md describes them.

`megatrain.scaling.fit_chinchilla(N, D, loss, bootstrap=0)` is the Python API; `megatrain sweep` /
launch/sweep.py run a sweep file. Only fit.py is imported here, so the fits need numpy and scipy only.
"""

from megatrain.scaling.fit import compute_optimal, fit_chinchilla, isoflop_minima

__all__ = ["fit_chinchilla", "compute_optimal", "isoflop_minima"]
