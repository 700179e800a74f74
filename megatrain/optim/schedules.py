"""Learning-rate schedules as pure functions of the step.

The trainer sets the learning rate itself before every optimizer step instead of handing a stateful
scheduler to DeepSpeed: a skipped (non-finite) step then advances the schedule exactly like a
normal one on every ZeRO stage, and a resumed run needs nothing but the step to continue exactly.
"""

from __future__ import annotations

import math
from typing import Optional


def lr_at(
    step: int, *, lr: float, steps: int, warmup_steps: int, min_lr_ratio: float, schedule: str = "cosine"
) -> float:
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
    """`lr_at` with the values of a `TrainConfig`; ReLoRA's `lr_with_restarts` when
    train.relora.every is set (`Config.resolve` sets it for model.linear=relora only)."""
    relora = getattr(train_cfg, "relora", None)
    if relora is not None and relora.every:
        return lr_with_restarts(
            step,
            lr=train_cfg.lr,
            steps=train_cfg.steps,
            warmup_steps=train_cfg.warmup_steps,
            min_lr_ratio=train_cfg.min_lr_ratio,
            schedule=train_cfg.schedule,
            every=relora.every,
            restart_warmup=relora.restart_warmup or 0,
            warm_start_steps=relora.warm_start_steps,
        )
    return lr_at(
        step,
        lr=train_cfg.lr,
        steps=train_cfg.steps,
        warmup_steps=train_cfg.warmup_steps,
        min_lr_ratio=train_cfg.min_lr_ratio,
        schedule=train_cfg.schedule,
    )


def last_restart(step: int, *, every: int, warm_start_steps: int = 0) -> Optional[int]:
    """The latest ReLoRA restart point <= `step` (0-based optimizer step), or None.

    Restarts happen before steps warm_start_steps + k * every for k >= 1, and before step
    warm_start_steps itself when there is a warm start (the adapters switch on there).
    """
    if step < warm_start_steps or every < 1:
        return None
    if warm_start_steps > 0:
        return warm_start_steps + (step - warm_start_steps) // every * every
    k = step // every
    return k * every if k >= 1 else None


def lr_with_restarts(
    step: int,
    *,
    lr: float,
    steps: int,
    warmup_steps: int,
    min_lr_ratio: float,
    schedule: str = "cosine",
    every: int,
    restart_warmup: int,
    warm_start_steps: int = 0,
) -> float:
    """ReLoRA's jagged schedule: `lr_at`, except that after every restart point p (`last_restart`) the
    rate re-warms linearly over `restart_warmup` steps, reaching the underlying schedule's value at
    p + restart_warmup: lr(p + i) = lr_at(p + restart_warmup) * (i + 1) / restart_warmup.

    Restarts inside the first warm-up follow the first warm-up.
    """
    kwargs = dict(lr=lr, steps=steps, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio, schedule=schedule)
    start = last_restart(step, every=every, warm_start_steps=warm_start_steps)
    if start is None or restart_warmup <= 0 or start < warmup_steps or step - start >= restart_warmup:
        return lr_at(step, **kwargs)
    target = lr_at(min(start + restart_warmup, steps), **kwargs)
    return target * (step - start + 1) / restart_warmup
