"""`log.analyze_every`: the cheap instrument during training, spectra of the learned updates.

Every N steps, `UpdateSpectra(trainer)` forms W_t - W_0 for every matrix `megatrain analyze` reports
(low-rank layers merged to their dense equivalent), one matrix at a time, and returns the mean
effective and stable rank and relative update norm per projection kind as metrics
(`analysis/update_effective_rank/<kind>`, ...), which the trainer logs to metrics.jsonl and
tensorboard. W_0 is rebuilt once from train.seed with the model's own init (on rank 0, kept on the
CPU). Collective: every rank calls it; ZeRO-3 partitions are gathered and tensor-parallel slices
joined one parameter at a time, and rank 0 computes.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatrain.analysis.spectra import kind_means, matrix_summary, model_matrices, singular_values
from megatrain.analysis.weights import ModuleWeights, build_model
from megatrain.engine.checkpoint import join_tensor_parallel
from megatrain.models.layers import lowrank_options

__all__ = ["UpdateSpectra", "training_instruments"]

METRICS = ("update_effective_rank", "update_stable_rank", "update_relative_norm")


class _LiveWeights:
    """The training module's full tensors as a weight source; `get` is collective (same order on every rank)."""

    def __init__(self, trainer):
        from megatrain.parallel.plan import shard_specs

        module = trainer.engine.module
        self.params = dict(module.named_parameters())
        self.buffers = {
            f"{m}.{b}" if m else b: buf
            for m, mod in module.named_modules()
            for b, buf in mod.named_buffers(recurse=False)
            if buf is not None and b not in mod._non_persistent_buffers_set
        }
        self.names = sorted(set(self.params) | set(self.buffers))
        self.dtypes = {name: p.dtype for name, p in self.params.items()}
        self.groups = trainer.groups
        self.zero3 = trainer.cfg.parallel.zero_stage == 3
        tp = self.groups.tp_size if self.groups is not None else 1
        self.specs = shard_specs(self.names, trainer.model_cfg, tp) if tp > 1 else {}

    def get(self, name: str) -> torch.Tensor:
        if name in self.buffers:
            return self.buffers[name].detach().cpu()
        param = self.params[name]
        if self.zero3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                return param.detach().to("cpu", torch.float32, copy=True)
        dim, replicas = self.specs.get(name, (None, 1))
        if dim is not None:
            return join_tensor_parallel(param, dim, replicas, self.groups).float()
        return param.detach().to("cpu", torch.float32)


class UpdateSpectra:
    """Callable the trainer runs every log.analyze_every steps: trainer -> metrics dict (empty off rank 0)."""

    def __init__(self):
        self.base: Optional[ModuleWeights] = None

    def __call__(self, trainer) -> dict:
        main = trainer.env.is_main
        live = _LiveWeights(trainer)
        if main and self.base is None:  # rounded like the live weights (bf16 runs), see ModuleWeights
            self.base = ModuleWeights(build_model(trainer.model_cfg, trainer.cfg.train.seed), live.dtypes)
        alpha = lowrank_options(trainer.model_cfg).alpha
        rows = []
        base = model_matrices(self.base.names, self.base.get, alpha) if main else None
        for spec, matrix in model_matrices(live.names, live.get, alpha):
            if not main:
                continue
            _, w0 = next(base)
            summary = matrix_summary(singular_values(matrix - w0))
            norm = float(matrix.norm())
            rows.append(
                {
                    "kind": spec.kind,
                    "update_effective_rank": summary["effective_rank"],
                    "update_stable_rank": summary["stable_rank"],
                    "update_relative_norm": summary["fro_norm"] / norm if norm > 0 else 0.0,
                }
            )
        out = {}
        for key in METRICS:
            for kind, value in kind_means(rows, key).items():
                out[f"analysis/{key}/{kind}"] = value
        return out


def training_instruments(cfg) -> Optional[UpdateSpectra]:
    """What the trainer runs every log.analyze_every steps (None when it is 0)."""
    return UpdateSpectra() if cfg.log.analyze_every > 0 else None
