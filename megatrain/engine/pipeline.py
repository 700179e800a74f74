"""Training through DeepSpeed's pipeline engine (parallel.pipeline > 1; docs/parallelism.md).

`build_pipeline_model` builds this stage's share of the model (meta-device Transformer, the other stages'
modules dropped, the rest materialised and tensor-split by `parallelize`) as a PipelineModule
(megatrain.parallel.pipeline). `PipelineSteps` runs the trainer's step as the engine's `train_batch`
(the 1F1B schedule over train.grad_accum micro-batches) and agrees, right before the schedule's optimizer
step, on what `Trainer.train_step` agrees on before `engine.step()`: the loss of the global batch, whether
any micro-batch's loss was non-finite (the update is then skipped everywhere) and whether a rank was asked
to stop. `PipelineEvaluator` gives the validator a `model(inputs, labels=labels)` that runs `eval_batch`.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatrain.engine.resilience import fault_point
from megatrain.errors import ConfigError

__all__ = ["build_pipeline_model", "PipelineSteps", "PipelineEvaluator"]


def build_pipeline_model(cfg, model_cfg, groups, initial_state: Optional[dict] = None):
    """This stage's PipelineModule (collective): only its layers are ever materialised."""
    from megatrain.models.transformer import Transformer
    from megatrain.parallel.parallelize import parallelize
    from megatrain.parallel.pipeline import (
        drop_other_stages,
        layer_weights,
        pipeline_module,
        stage_bounds,
        stage_layers,
    )

    p = cfg.parallel
    model = Transformer(model_cfg, seed=cfg.train.seed, device="meta")
    model.initial_state = initial_state
    bounds = stage_bounds(layer_weights(model), p.pipeline, p.pipeline_partition)
    if model_cfg.tie_embeddings:  # the tied head is a layer of its own, on the stage of the final norm
        bounds[-1] += 1
    drop_other_stages(model, stage_layers(bounds, groups.pp_rank))
    parallelize(model, groups, sequence_parallel=p.sequence)  # materialises (and TP-splits) this stage's modules
    model.initial_state = None
    return pipeline_module(
        model, groups, bounds, checkpointed=cfg.train.activation_checkpointing, seq_factor=p.tensor if p.sequence else 1
    )


class PipelineSteps:
    """The trainer's optimizer step as DeepSpeed's `train_batch` (see the module docstring)."""

    def __init__(self, trainer):
        from megatrain.optim.deepspeed_adapter import before_pipeline_step

        self.trainer = trainer
        self.micro_batches = 0
        self.agreed = None
        self.evaluator = PipelineEvaluator(trainer.engine)
        before_pipeline_step(trainer.engine, self._before_step)

    def train_step(self, micro: list) -> tuple:
        """Forward and backward of the micro-batches `micro` (the sampler's index lists for this step) through
        the schedule, then the agreed optimizer step. Returns what `Trainer._step_record` takes after the lr."""
        t = self.trainer
        self.micro_batches, self.agreed = len(micro), None
        fault_point("step", t.step + 1, t.env.rank)
        t._phase("pipeline forward and backward")
        t.engine.train_batch(data_iter=(t._batch(t.data.train, indices) for indices in micro))
        if self.agreed is None:
            raise RuntimeError("DeepSpeed's pipeline schedule ran no optimizer step")
        return self.agreed

    def _before_step(self, total_loss: Optional[torch.Tensor]) -> None:
        t = self.trainer
        local = torch.zeros(3, dtype=torch.float64, device=t.env.device)
        if total_loss is not None:  # the last stage: the sum of this batch's micro-batch losses
            total = total_loss.detach().double()
            finite = torch.isfinite(total)
            # Only the last stage holds the loss; counted once per stage, the world's mean is the global loss.
            local[0] = torch.where(finite, total, torch.zeros_like(total)) * t.groups.pp_size
            local[1] = (~finite).double()
        agreed = t._agree_before_step(local, self.micro_batches)  # ZeRO-1: DeepSpeed's norm covers every stage
        t._phase("optimizer step")
        self.agreed = agreed


class PipelineEvaluator:
    """`model(inputs, labels=labels)` -> the mean loss of that micro-batch, through the engine's `eval_batch`
    (every stage gets the loss); eval() / train() set the module's mode. Collective."""

    def __init__(self, engine):
        self.engine, self.module = engine, engine.module

    def eval(self):
        self.module.eval()
        return self

    def train(self, mode: bool = True):
        self.module.train(mode)
        return self

    def __call__(self, inputs: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if labels is None:
            raise ConfigError(
                "logits of a pipelined model are not available during training (parallel.pipeline "
                "> 1 computes the loss on the last stage only); validate on loss"
            )
        loss = self.engine.eval_batch(iter([(inputs, labels)]), num_micro_batches=1)
        return loss.reshape(()).to(inputs.device)
