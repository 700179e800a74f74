"""RL pipelines as registered strategies: what a sub-run updates, when, and with which loss.

An excursion (`megatrain.rl.excursion.Excursion`, one start checkpoint x one pipeline) runs its iterations
in order: first `sft_iterations(rl)` SFT updates (one each), then `rl_iterations(rl)` RL iterations, each a
`Rollout` (samples, rewards, advantages) followed by `rl.ppo_epochs` passes of optimizer updates over its
mini-batches; `Pipeline.update` takes each of those updates, and `Pipeline.loss` gives the loss of every
micro-batch of an RL update. The excursion does everything else (engine, data order, learning-rate
schedule, checkpoints, logs, evaluation), the same way for every pipeline.

A new pipeline is one class and one registry entry:

    @register_pipeline("my_rl")
    class MyRL(Pipeline):
        def loss(self, job, rl_loss, update, m):
            return rl_loss + 0.1 * job.sft_micro_loss(update, m)

`rl.pipeline` names registered pipelines, or a user's class by dotted path (`my_pkg.my_module.MyRL`, as
`rl.reward` names a reward function), imported when the config is checked. docs/rl.md has the details.
"""

from __future__ import annotations

import importlib
import re
from typing import Callable, TypeVar

import torch

from megatrain.errors import ConfigError

_REGISTRY: dict[str, type["Pipeline"]] = {}
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")

P = TypeVar("P", bound=type["Pipeline"])


class Pipeline:
    """The base strategy: RL (GRPO) iterations only, AdamW from optim.*, the RL loss as it is.

    Subclasses override what differs. `job` is the `Excursion`; what a strategy may call on it:
    `rl_step(roll, micro, update, stats)` (the RL backward + optimizer step over micro-batches `micro`),
    `sft_batch(update)`, `sft_micro_loss(update, m)`, `sft_step(update)` (one SFT optimizer update), and
    `optimizer`, `rl` (the rl.* config), `gas` (micro-batches per update).
    """

    name: str = ""  # the name in rl.pipeline (the sub-run folder RUN/from_step_N/NAME)
    rollouts: bool = True  # takes RL iterations (and a frozen KL reference model when rl.kl_coef > 0)

    def check(self, cfg, world_size: int) -> None:
        """Refuse a config this pipeline cannot run: ConfigError, one line naming the key."""

    def sft_iterations(self, rl) -> int:
        """Iterations of one SFT update each, before the RL iterations."""
        return 0

    def rl_iterations(self, rl) -> int:
        return rl.steps if self.rollouts else 0

    def build_optimizer(self, cfg, model: torch.nn.Module, on_cuda: bool) -> torch.optim.Optimizer:
        from megatrain.optim import build_optimizer

        return build_optimizer(cfg.optim, model, cfg.train.lr, on_cuda=on_cuda)

    def update(self, job, roll, micro: list[int], update: int, stats: torch.Tensor) -> dict:
        """One optimizer update on this rank's micro-batches `micro` of rollout `roll` (update number `update`
        of the learning-rate schedule); returns metrics, averaged over the iteration's updates into its record."""
        job.rl_step(roll, micro, update, stats)
        return {}

    def loss(self, job, rl_loss: torch.Tensor, update: int, m: int) -> torch.Tensor:
        """The loss whose gradient micro-batch `m` (0 .. job.gas - 1, its place in the update) of an RL update
        contributes, given its RL loss; both are normalised over the whole mini-batch, so the micro-batches'
        gradients sum to the update's. `job.sft_micro_loss(update, m)` is the SFT micro-batch paired with it."""
        return rl_loss


def register_pipeline(name: str) -> Callable[[P], P]:
    """Class decorator: make `cls` (a Pipeline subclass) the pipeline `name` of rl.pipeline."""

    def register(cls: P) -> P:
        if not (isinstance(cls, type) and issubclass(cls, Pipeline)):
            raise TypeError(f"register_pipeline({name!r}) decorates a Pipeline subclass, got {cls!r}")
        held = _REGISTRY.get(name)
        if held is not None and held is not cls:
            raise ConfigError(f"rl.pipeline {name!r} is registered twice: {_qualname(held)} and {_qualname(cls)}")
        _REGISTRY[name] = cls
        return cls

    return register


def registered_pipelines() -> list[str]:
    return list(_REGISTRY)


def get_pipeline(name: str) -> Pipeline:
    """The pipeline `name`: a registered name, or `package.module.Class` (a Pipeline subclass, imported)."""
    cls = _REGISTRY.get(name)
    if cls is None:
        cls = _import_pipeline(name)
    pipeline = cls()
    pipeline.name = name
    return pipeline


def check_pipelines(cfg, world_size: int, names: list[str]) -> list[Pipeline]:
    """The pipelines of rl.pipeline (`names`), each checked against the config (ConfigError, one line)."""
    pipelines = [get_pipeline(name) for name in names]
    for pipeline in pipelines:
        pipeline.check(cfg, world_size)
    return pipelines


def _import_pipeline(path: str) -> type[Pipeline]:
    allowed = f"(allowed: {', '.join(_REGISTRY)}, or package.module.Class naming a Pipeline subclass)"
    if not _DOTTED.fullmatch(path):  # also what keeps the sub-run folder named after it inside run.dir
        raise ConfigError(f"rl.pipeline={path!r} is not allowed {allowed}")
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"rl.pipeline={path!r}: cannot import module '{module_name}' ({exc}) {allowed}") from None
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Pipeline)):
        raise ConfigError(
            f"rl.pipeline={path!r}: '{attr}' of module '{module_name}' is not a Pipeline subclass "
            f"(megatrain.rl.pipelines.Pipeline)"
        )
    return cls


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# ---------------------------------------------------------------------------------------------
# the built-in pipelines


@register_pipeline("grpo")
class GRPO(Pipeline):
    """GRPO: every iteration a rollout, then its clipped-ratio updates (the base strategy as it is)."""


@register_pipeline("sft")
class SFT(Pipeline):
    """Supervised fine-tuning on the reference solutions: rl.steps SFT updates, no rollouts."""

    rollouts = False

    def sft_iterations(self, rl) -> int:
        return rl.steps


@register_pipeline("sft_rl")
class SFTThenRL(Pipeline):
    """rl.sft_steps SFT updates, then rl.steps GRPO iterations, one optimizer throughout."""

    def check(self, cfg, world_size: int) -> None:
        if cfg.rl.sft_steps < 1:
            raise ConfigError(f"rl.pipeline={self.name} needs rl.sft_steps >= 1")

    def sft_iterations(self, rl) -> int:
        return rl.sft_steps


@register_pipeline("parallel_avg")
class ParallelAverage(Pipeline):
    """From θ, an RL update with its own AdamW moments and an SFT update with a second set; θ <- (θ_A + θ_B)/2
    every update, through one `PairAdamW` (megatrain/rl/averaging.py) that DeepSpeed wraps like AdamW."""

    def check(self, cfg, world_size: int) -> None:
        if cfg.parallel.zero_stage == 3:
            raise ConfigError(
                f"rl.pipeline={self.name} supports parallel.zero_stage 0, 1 or 2 (its pair optimizer "
                f"runs on ZeRO 1/2 partitions)"
            )

    def build_optimizer(self, cfg, model: torch.nn.Module, on_cuda: bool) -> torch.optim.Optimizer:
        from megatrain.optim import param_groups
        from megatrain.rl.averaging import PairAdamW

        o = cfg.optim
        return PairAdamW(param_groups(model, o.weight_decay), lr=cfg.train.lr, betas=(o.beta1, o.beta2), eps=o.eps)

    def update(self, job, roll, micro: list[int], update: int, stats: torch.Tensor) -> dict:
        job.optimizer.phase = "a"  # the RL update is computed and held
        job.rl_step(roll, micro, update, stats)
        job.optimizer.phase = "b"  # the SFT update, then θ <- θ + (Δ_RL + Δ_SFT) / 2
        return {"sft_loss": job.sft_step(update)}


@register_pipeline("loss_mix")
class LossMix(Pipeline):
    """One optimizer on w·L_RL + (1 - w)·L_SFT (w = rl.mix_weight), an SFT batch beside every RL update."""

    def update(self, job, roll, micro: list[int], update: int, stats: torch.Tensor) -> dict:
        job.sft_batch(update)  # its normalizer all-reduce happens before the RL backward
        job.rl_step(roll, micro, update, stats)
        return {}

    def loss(self, job, rl_loss: torch.Tensor, update: int, m: int) -> torch.Tensor:
        w = job.rl.mix_weight
        return w * rl_loss + (1 - w) * job.sft_micro_loss(update, m)
