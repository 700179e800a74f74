"""Learning-rate schedules as pure functions of the step.

The trainer sets the learning rate itself before every optimizer step instead of handing a stateful
scheduler to DeepSpeed: a skipped (non-finite) step then advances the schedule exactly like a
normal one on every ZeRO stage, and a resumed run needs nothing but the step to continue exactly.
"""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, steps: int, warmup_steps: int, min_lr_ratio: float,
          schedule: str = "cosine") -> float:
    """Learning rate for optimizer step `step` (0-based).

    Linear warm-up from lr/warmup to lr over `warmup_steps`, then `schedule` decay to
    lr * min_lr_ratio at `steps`: cosine (half period), linear, or constant.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    min_lr = lr * min_lr_ratio
    if schedule == "constant" or steps <= warmup_steps:
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
    if schedule == "linear":
        return lr - (lr - min_lr) * progress
    if schedule == "cosine":
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r} (allowed: cosine, linear, constant)")


def lr_for_config(train_cfg, step: int) -> float:
    """`lr_at` with the values of a `TrainConfig`."""
    return lr_at(step, lr=train_cfg.lr, steps=train_cfg.steps, warmup_steps=train_cfg.warmup_steps,
                 min_lr_ratio=train_cfg.min_lr_ratio, schedule=train_cfg.schedule)
