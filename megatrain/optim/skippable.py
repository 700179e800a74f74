"""The optimizers megatrain hands to DeepSpeed: each Adam class with a `skip_next_step` flag.

A non-finite loss on any data-parallel rank must drop that step's update on every rank. The
trainer all-reduces a non-finite count before the (collective) engine.step() and sets
`skip_next_step` on the client optimizer; DeepSpeed ends every stage in the client's `step()`
(stage 0 once, ZeRO 1/2 once per parameter group on its flat fp32 partitions, ZeRO 3 once per
sub-group), so a no-op there drops the update everywhere alike while DeepSpeed's own bookkeeping
(step counters, gradient zeroing) runs as usual.

These are subclasses, not wrappers, because DeepSpeed reads and rebinds the client's
`param_groups` and `state` directly and checks its type (fused Adam variants).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from megatrain.optim.fira import FiraAdamW
from megatrain.optim.galore import GaLoreAdamW

__all__ = ["SkipStepMixin", "SkippableAdamW", "SkippableGaLoreAdamW", "SkippableFiraAdamW", "skippable_apex_fused_adam"]


class SkipStepMixin:
    """Put first in the bases of a torch optimizer: `step()` does nothing while `skip_next_step`
    is set, and calls `after_step()` (when set) after every update it applies."""

    skip_next_step: bool = False
    # GaLore / Fira at ZeRO stage 0 in fp32 step their projected weights right after the client
    # (megatrain.optim.zero_bridge.attach_projected sets it); None otherwise.
    after_step: Optional[Callable[[], None]] = None

    def step(self, closure=None):
        if self.skip_next_step:
            return None
        out = super().step(closure)
        if self.after_step is not None:
            self.after_step()
        return out


class SkippableAdamW(SkipStepMixin, torch.optim.AdamW):
    """torch.optim.AdamW (plain or fused) with SkipStepMixin."""


class SkippableGaLoreAdamW(SkipStepMixin, GaLoreAdamW):
    """GaLoreAdamW with SkipStepMixin: the client of optim.name=galore (megatrain.optim.zero_bridge)."""


class SkippableFiraAdamW(SkipStepMixin, FiraAdamW):
    """FiraAdamW with SkipStepMixin: the client of optim.name=fira (megatrain.optim.zero_bridge)."""


@functools.lru_cache(maxsize=None)
def skippable_apex_fused_adam() -> Optional[type]:
    """NVIDIA apex's FusedAdam with SkipStepMixin, or None when apex is not importable. Defined on
    first use because apex is optional (built from source) and slow to import."""
    try:
        from apex.optimizers import FusedAdam
    except ImportError:
        return None

    class SkippableFusedAdam(SkipStepMixin, FusedAdam):
        """apex.optimizers.FusedAdam with SkipStepMixin."""

    return SkippableFusedAdam
