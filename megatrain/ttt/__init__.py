"""qTTT: query-only test-time training on a cached context (the algorithm: megatrain/ttt/adapt.py).

`megatrain.ttt.adapt(model, context_ids, *, steps=32, span=128, lr=1e-5, target="q", seed=0)` is
the Python API; `megatrain ttt` / launch/ttt.py run the evaluation job (megatrain/ttt/job.py), whose
modules are imported only by the job.
"""

# Bound after the submodule import, so the package attribute `adapt` is the function, not the module.
from megatrain.ttt.adapt import adapt

__all__ = ["adapt"]
