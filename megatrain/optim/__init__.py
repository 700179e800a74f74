"""Optimizers. `build_optimizer` is the one place the trainer gets its optimizer from.

The optimizer handed to DeepSpeed is one of the named Skippable classes of
megatrain.optim.skippable: the chosen Adam class with a `skip_next_step` flag, set by the trainer
when a loss was non-finite on any data-parallel rank, which drops the update on every ZeRO stage
alike.
"""

from __future__ import annotations

import logging

import torch

from megatrain.errors import ConfigError
from megatrain.optim.fira import FiraAdamW
from megatrain.optim.galore import GaLoreAdamW
from megatrain.optim.skippable import (
    SkippableAdamW,
    SkippableFiraAdamW,
    SkippableGaLoreAdamW,
    skippable_apex_fused_adam,
)

log = logging.getLogger(__name__)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (dim >= 2); none on norms and biases. Trainable ReLoRA base weights
    (attribute `relora_base`) form a third group flagged "relora_base"."""
    decay, no_decay, relora_base = [], [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if getattr(p, "relora_base", False):  # ReLoRA's W while trainable (warm start): its own group
            relora_base.append(p)
            continue
        # ZeRO-3 partitions at construction leave p a flat shard; ds_shape is the full shape.
        (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if relora_base:
        # megatrain.optim.relora sets this group's lr to 0 once the warm start ends (W frozen).
        groups.append({"params": relora_base, "weight_decay": weight_decay, "relora_base": True})
    return groups


def build_optimizer(optim_cfg, model: torch.nn.Module, lr: float, on_cuda: bool) -> torch.optim.Optimizer:
    """AdamW over `model`'s parameters. `optim_cfg.fused` picks apex FusedAdam / torch fused / plain."""
    if optim_cfg.name in ("galore", "fira"):
        return _build_projected(optim_cfg, model, lr)
    if optim_cfg.name != "adamw":
        raise ConfigError(f"optim.name={optim_cfg.name!r} is not available (allowed: adamw, galore, fira)")
    groups = param_groups(model, optim_cfg.weight_decay)
    betas = (optim_cfg.beta1, optim_cfg.beta2)
    choice = optim_cfg.fused
    if choice in ("auto", "apex") and on_cuda:
        fused_adam = skippable_apex_fused_adam()  # NVIDIA apex, built from source; optional
        if fused_adam is not None:
            return fused_adam(groups, lr=lr, betas=betas, eps=optim_cfg.eps, adam_w_mode=True)
        if choice == "apex":
            raise ConfigError("optim.fused=apex but NVIDIA apex is not importable (build it from source, or use auto)")
    if choice == "apex" and not on_cuda:
        raise ConfigError("optim.fused=apex needs a GPU (allowed on CPU: auto, none)")
    if choice == "torch" and not on_cuda:
        raise ConfigError("optim.fused=torch needs a GPU (allowed on CPU: auto, none)")
    fused = on_cuda and choice in ("auto", "torch")
    return SkippableAdamW(groups, lr=lr, betas=betas, eps=optim_cfg.eps, fused=fused or None)


def _build_projected(optim_cfg, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """GaLore / Fira: a skippable client optimizer (reference AdamW rule) over everything DeepSpeed may
    flatten, with `.projected` holding the attention / MLP weights (megatrain.optim.zero_bridge)."""
    from megatrain.optim.zero_bridge import projection_targets

    cls = GaLoreAdamW if optim_cfg.name == "galore" else FiraAdamW
    targets = projection_targets(model)
    if not targets:
        raise ConfigError(
            f"optim.name={optim_cfg.name}: the model has no trainable attention/MLP projection "
            f"weights to project (use optim.name=adamw)"
        )
    for name, p in targets:  # local shapes: a tensor-parallel shard is projected on its own
        if optim_cfg.rank > min(p.shape):
            raise ConfigError(
                f"optim.rank={optim_cfg.rank} exceeds min(d_in, d_out)={min(p.shape)} of {name} "
                f"(local shape {list(p.shape)}); allowed: 1..{min(p.shape)}"
            )
    target_ids = {id(p) for _, p in targets}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad and id(p) not in target_ids:
            (decay if p.dim() >= 2 else no_decay).append(p)
    common = dict(lr=lr, betas=(optim_cfg.beta1, optim_cfg.beta2), eps=optim_cfg.eps)
    extra = {"limiter": optim_cfg.fira_limiter} if cls is FiraAdamW else {}
    client_cls = SkippableGaLoreAdamW if cls is GaLoreAdamW else SkippableFiraAdamW
    client = client_cls(
        [{"params": decay, "weight_decay": optim_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], **common
    )
    client.projected = cls(
        [
            {
                "params": [p for _, p in targets],
                "weight_decay": optim_cfg.weight_decay,
                "rank": optim_cfg.rank,
                "update_proj_gap": optim_cfg.update_proj_gap,
                "scale": optim_cfg.scale,
                "proj_type": optim_cfg.proj_type,
                **extra,
            }
        ],
        **common,
    )
    return client
