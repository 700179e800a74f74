"""Research instruments: what a run learned, not only its loss (docs/analysis.md).

`megatrain analyze RUN [--vs OTHER_RUN] [--only ...]` runs them on a run's checkpoints
(`megatrain.analysis.analyze`, `megatrain.analysis.report`); `log.analyze_every` runs the cheap one
(spectra of the learned updates) during training (`megatrain.analysis.live`).

The metrics, on plain tensors:
  linear_cka(x, y)        x [n, p], y [n, q]: linear CKA, a float in [0, 1]
  effective_rank(m)       exp of the entropy of m's L1-normalised singular values
  stable_rank(m)          ||m||_F^2 / ||m||_2^2
  top_k_energy(m, k)      share of ||m||_F^2 in the top k singular directions
"""

from megatrain.analysis.cka import linear_cka
from megatrain.analysis.spectra import effective_rank, stable_rank, top_k_energy

__all__ = ["linear_cka", "effective_rank", "stable_rank", "top_k_energy"]
