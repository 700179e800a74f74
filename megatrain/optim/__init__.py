"""Optimizers. `build_optimizer` is the one place the trainer gets its optimizer from.

The optimizer handed to DeepSpeed is a subclass of the chosen Adam class with a `skip_next_step`
flag: when the trainer sees a non-finite loss on any data-parallel rank it sets the flag, and the
update is dropped on every ZeRO stage alike (DeepSpeed's ZeRO 1-3 optimizers and stage 0 all end
in the client optimizer's `step`).
"""

from __future__ import annotations

import logging

import torch

from megatrain.errors import ConfigError

log = logging.getLogger(__name__)

_SKIPPABLE: dict[type, type] = {}


def _skippable(cls: type) -> type:
    """A subclass of optimizer class `cls` whose step() is a no-op while `skip_next_step` is set."""
    if cls not in _SKIPPABLE:
        def step(self, closure=None):
            if self.skip_next_step:
                return None
            return cls.step(self, closure)

        _SKIPPABLE[cls] = type(f"Skippable{cls.__name__}", (cls,), {"skip_next_step": False, "step": step})
    return _SKIPPABLE[cls]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (dim >= 2); none on norms and biases."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _apex_fused_adam():
    try:
        from apex.optimizers import FusedAdam  # NVIDIA apex, built from source; optional
    except ImportError:
        return None
    return FusedAdam


def build_optimizer(optim_cfg, model: torch.nn.Module, lr: float, on_cuda: bool) -> torch.optim.Optimizer:
    """AdamW over `model`'s parameters. `optim_cfg.fused` picks apex FusedAdam / torch fused / plain."""
    if optim_cfg.name != "adamw":
        raise ConfigError(f"optim.name={optim_cfg.name!r} is not available (allowed: adamw)")
    groups = param_groups(model, optim_cfg.weight_decay)
    betas = (optim_cfg.beta1, optim_cfg.beta2)
    choice = optim_cfg.fused
    if choice in ("auto", "apex") and on_cuda:
        fused_adam = _apex_fused_adam()
        if fused_adam is not None:
            cls = _skippable(fused_adam)
            return cls(groups, lr=lr, betas=betas, eps=optim_cfg.eps, adam_w_mode=True)
        if choice == "apex":
            raise ConfigError("optim.fused=apex but NVIDIA apex is not importable (build it from source, or use auto)")
    if choice == "apex" and not on_cuda:
        raise ConfigError("optim.fused=apex needs a GPU (allowed on CPU: auto, none)")
    if choice == "torch" and not on_cuda:
        raise ConfigError("optim.fused=torch needs a GPU (allowed on CPU: auto, none)")
    fused = on_cuda and choice in ("auto", "torch")
    cls = _skippable(torch.optim.AdamW)
    return cls(groups, lr=lr, betas=betas, eps=optim_cfg.eps, fused=fused or None)
