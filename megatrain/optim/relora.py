"""ReLoRA restarts: merge the adapters into W, re-initialise them, prune their Adam state.

`model.linear=relora` builds every projection as `LoRALinear` (y = x W^T + alpha/r * x a b, W
frozen). The trainer makes one `ReLoRA` object before it builds the optimizer (`relora_controller`)
and calls `before_step(engine, step)` before every optimizer step. At the restart points of
`megatrain.optim.schedules.last_restart` it then:

1. merges: W <- W + alpha/r * (a b)^T, which leaves the model's function unchanged;
2. re-initialises a (Kaiming-uniform) and b (zero), so the adapter term restarts at exactly zero;
3. prunes the Adam moments (exp_avg, exp_avg_sq) of a and b: magnitude pruning keeps the largest
   (1 - prune_ratio) of each tensor's entries and zeroes the rest, `reset` zeroes them all.

The learning rate re-warms after each restart through `lr_for_config` (`lr_with_restarts`); with a
warm start (train.relora.warm_start_steps > 0) W trains full-rank with the adapters off until that
step, then the adapters switch on (fresh a, b and zeroed state) and W's parameter group gets lr 0.

Under DeepSpeed ZeRO 1/2 (and bf16 at stage 0) the optimizer works on flat fp32 master partitions,
which it copies back into the module after every step: the merge and the re-initialisation are
therefore written to both the module parameter and its fp32 master (`safe_set_full_fp32_param`),
and the Adam moments are read and written whole through DeepSpeed's fragment API
(`safe_get_full_optimizer_state` / `safe_set_full_optimizer_state`, collectives over the DP group:
every rank runs the same calls in the same order); whether a parameter has a master and moments
yet, and relinking the moments after a resume, are DeepSpeed internals confined to
megatrain.optim.deepspeed_adapter. At ZeRO stage 0 in fp32 the client optimizer
updates the module parameters directly and its state is keyed by them. Re-initialisation draws from
a generator seeded by (train.seed, step), so every rank and a resumed run draw the same values.

Under tensor parallelism the layers are megatrain.parallel.lowrank_parallel's LoRA forms (b split
along D_out in column roles, a along D_in in row roles). The merge is then local to each rank's W
shard; the re-draw draws the whole factor on every rank and keeps the rank's slice
(`reset_adapters`), and magnitude pruning thresholds each moment over the whole layer
(`full_factor` / `local_factor`, an all-gather over the TP group), so a restart at TP=T equals
one process's.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from megatrain.errors import ConfigError
from megatrain.models.layers import LoRALinear
from megatrain.optim.deepspeed_adapter import (
    client_optimizer,
    keeps_fp32_master,
    optimizer_state_linked,
    relink_optimizer_state,
)
from megatrain.optim.schedules import last_restart

log = logging.getLogger(__name__)

__all__ = ["ReLoRA", "relora_controller", "magnitude_prune", "merge_and_reinit"]

ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")


def magnitude_prune(t: torch.Tensor, ratio: float) -> torch.Tensor:
    """A copy of `t` with its floor(ratio * numel) smallest-magnitude entries set to zero."""
    k = int(ratio * t.numel())
    if k <= 0:
        return t.clone()
    flat = t.detach().abs().flatten().float()
    threshold = flat.kthvalue(k).values
    return torch.where(t.abs().float() > threshold, t, torch.zeros_like(t))


def _full_fp32(p: torch.nn.Parameter) -> torch.Tensor:
    """The full fp32 value of `p`: DeepSpeed's master copy when it keeps one, else the parameter."""
    from deepspeed.utils import safe_get_full_fp32_param

    value = safe_get_full_fp32_param(p) if keeps_fp32_master(p) else None
    return p.detach().float() if value is None else value.to(p.device).reshape(p.shape)


def _write(p: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Set `p` (module copy and, under ZeRO 1/2 or bf16, DeepSpeed's fp32 master) to `value`."""
    from deepspeed.utils import safe_set_full_fp32_param

    with torch.no_grad():
        p.data.copy_(value.to(dtype=p.dtype, device=p.device))
    if keeps_fp32_master(p):
        safe_set_full_fp32_param(p, value.float())


def _prune_state(optimizer, module, name: str, mode: str, ratio: float) -> None:
    """Magnitude-prune (or zero, mode "reset") the Adam moments of factor `name` of `module` wherever the
    optimizer keeps them; for a tensor-parallel shard the threshold is the whole layer's."""
    from deepspeed.utils import safe_get_full_optimizer_state, safe_set_full_optimizer_state

    p = getattr(module, name)

    def reduce(t: torch.Tensor) -> torch.Tensor:
        if mode == "reset":
            return torch.zeros_like(t)
        if not hasattr(module, "full_factor"):
            return magnitude_prune(t, ratio)
        return module.local_factor(name, magnitude_prune(module.full_factor(name, t), ratio))

    if keeps_fp32_master(p):  # ZeRO 1/2, bf16: flat fp32 partitions (collective calls)
        if not optimizer_state_linked(p):  # no optimizer step yet: no state to prune
            return
        for key in ADAM_STATE_KEYS:
            full = safe_get_full_optimizer_state(p, key)
            safe_set_full_optimizer_state(p, reduce(full.reshape(p.shape)), key)
        return
    state = client_optimizer(optimizer).state.get(p)
    if not state:
        return
    for key in ADAM_STATE_KEYS:
        if key in state:
            state[key].copy_(reduce(state[key]))


@torch.no_grad()
def merge_and_reinit(module: torch.nn.Module, generator: Optional[torch.Generator] = None) -> None:
    """W <- W + alpha/r * (a b)^T, then a Kaiming-uniform and b = 0 (module tensors and, under
    DeepSpeed ZeRO 1/2 or bf16, the fp32 masters). The module's function is unchanged.

    `module` is a LoRALinear or one of its tensor-parallel forms, whose W shard gets exactly its part
    of the product from its local factors (b's columns, or a's rows)."""
    a, b = _full_fp32(module.lora_a), _full_fp32(module.lora_b)
    merged = _full_fp32(module.weight) + module.scale * (a @ b).T
    _write(module.weight, merged)
    module.reset_adapters(generator)
    _write(module.lora_a, module.lora_a.detach().float())
    _write(module.lora_b, module.lora_b.detach().float())


class ReLoRA:
    """Drives the restarts of a model built with model.linear=relora (see the module docstring)."""

    def __init__(self, cfg, model: torch.nn.Module):
        rl = cfg.train.relora
        if rl.every is None or rl.restart_warmup is None:
            raise ConfigError(
                "train.relora.every / train.relora.restart_warmup are not resolved: call "
                "Config.resolve (the trainer's preflight does) before building the model's ReLoRA"
            )
        self.every, self.warm_start = rl.every, rl.warm_start_steps
        self.prune, self.prune_ratio, self.seed = rl.prune, rl.prune_ratio, cfg.train.seed
        # LoRALinear, or its tensor-parallel forms (which carry `restarts` and `reset_adapters` too)
        self.layers = [
            m
            for m in model.modules()
            if isinstance(m, LoRALinear) or (getattr(m, "restarts", False) and hasattr(m, "reset_adapters"))
        ]
        if not self.layers:
            raise ConfigError("model.linear=relora but the model holds no ReLoRA projections")
        if self.warm_start > 0:
            # W trains during the warm start; it stays in the optimizer (own group, lr 0 afterwards).
            for m in self.layers:
                m.weight.requires_grad_(True)
        self.restarts_done = 0

    def _generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + step) % (2**63 - 1))

    def before_step(self, engine, step: int) -> None:
        """Call before optimizer step `step` (0-based), after the learning rate was set."""
        restart = last_restart(step, every=self.every, warm_start_steps=self.warm_start)
        optimizer = engine.optimizer
        if restart == step:
            relink_optimizer_state(optimizer)
            generator = self._generator(step)
            switch_on = self.warm_start > 0 and step == self.warm_start
            for m in self.layers:
                if switch_on:  # end of the warm start: fresh adapters, W is kept as trained
                    m.reset_adapters(generator)
                    _write(m.lora_a, m.lora_a.detach().float())
                    _write(m.lora_b, m.lora_b.detach().float())
                else:
                    merge_and_reinit(m, generator)
                for name in ("lora_a", "lora_b"):
                    _prune_state(optimizer, m, name, "reset" if switch_on else self.prune, self.prune_ratio)
            self.restarts_done += 1
            log.info("ReLoRA %s at step %d", "adapters on" if switch_on else "merge and restart", step)
        enabled = step >= self.warm_start
        for m in self.layers:
            m.adapters_enabled = enabled
        if enabled and self.warm_start > 0:
            for group in optimizer.param_groups:
                if group.get("relora_base"):
                    group["lr"] = 0.0


def relora_controller(cfg, model: torch.nn.Module) -> Optional[ReLoRA]:
    """A ReLoRA driver for model.linear=relora (None otherwise). Build it before the optimizer."""
    if cfg.model.linear != "relora":
        return None
    return ReLoRA(cfg, model)
