"""`Validator`: the validation-loss loop of every job (pretraining's eval steps, an RL run's perplexity).

As torchtitan's Validator: the training loop asks `should_validate(step)` and calls `validate(model)`.
Each data-parallel rank scores its share of `log.eval_batches` micro-batches of validation blocks
(`megatrain.data.sampler.val_batches`), and one all-reduce gives every rank the mean over all of them.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist


class Validator:
    """Mean validation loss (and perplexity) of a model over `blocks` (a `PackedBlocks`-like: `batch(indices)`).

    micro_batch blocks per forward, `batches` micro-batches per rank; every `every` steps (0: never) and at
    `last_step`. group: the process group the sums are reduced over (None: every rank; the tensor-parallel
    copies then count alike in the loss and in the count). Blocks that can score their answers (the
    synthetic tasks' `answer_counts`) add val_exact_match and val_answer_acc. context: the ranks whose losses
    are parts that sum to one micro-batch's loss (context parallelism, megatrain.parallel.context_parallel).
    """

    def __init__(
        self,
        blocks,
        *,
        micro_batch: int,
        batches: int,
        dp_rank: int,
        dp_size: int,
        device,
        every: int = 0,
        last_step: Optional[int] = None,
        group=None,
        context: int = 1,
    ):
        self.context = context
        self.blocks, self.micro_batch, self.batches = blocks, micro_batch, batches
        self.dp_rank, self.dp_size, self.device = dp_rank, dp_size, device
        self.every, self.last_step, self.group = every, last_step, group

    def should_validate(self, step: int) -> bool:
        return (self.every > 0 and step % self.every == 0) or step == self.last_step

    @torch.no_grad()
    def validate(self, model) -> dict:
        """{val_loss, val_ppl[, val_exact_match, val_answer_acc]}: `model(inputs, labels=labels)` is the mean
        loss of a micro-batch. Collective. The model is put in eval mode and back."""
        from megatrain.data.sampler import val_batches

        answer_counts = getattr(self.blocks, "answer_counts", None)
        total = torch.zeros(2 if answer_counts is None else 6, dtype=torch.float64, device=self.device)
        was_training = getattr(model, "module", model).training  # a DeepSpeed engine: its module's mode
        model.eval()
        for indices in val_batches(self.blocks, self.micro_batch, self.dp_rank, self.dp_size, self.batches):
            inputs, labels = self.blocks.batch(indices)
            inputs = inputs.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            total[0] += model(inputs, labels=labels).double()
            total[1] += 1
            if answer_counts is not None:
                total[2:] += answer_counts(model(inputs), labels)
        model.train(was_training)
        if dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(total, group=self.group)
        val_loss = (total[0] * self.context / total[1]).item() if total[1] > 0 else float("nan")
        out = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
        if answer_counts is not None:
            out.update(val_exact_match=(total[2] / total[3]).item(), val_answer_acc=(total[4] / total[5]).item())
        return out
