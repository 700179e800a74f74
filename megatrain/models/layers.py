"""Projection layers: the one factory every model uses to build its linear maps.

Models never construct nn.Linear directly; they call `make_linear(..., kind=cfg.linear, role=...)`.
Other projection kinds (low-rank, sparse + low-rank, adapters) register a builder in
`LINEAR_KINDS` and every model picks them up without changes. The `role` names which projection
is being built ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"), so a
kind can treat, say, output projections differently.
"""

from __future__ import annotations

from typing import Protocol

from torch import nn

from megatrain.errors import ConfigError

__all__ = ["LINEAR_KINDS", "LinearBuilder", "make_linear", "register_linear", "init_linear"]


class LinearBuilder(Protocol):
    def __call__(self, in_features: int, out_features: int, *, bias: bool, role: str) -> nn.Module:
        """Return a module mapping [..., in_features] -> [..., out_features]."""


def _dense(in_features: int, out_features: int, *, bias: bool, role: str) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=bias)


# kind -> builder. Add kinds with `register_linear`.
LINEAR_KINDS: dict[str, LinearBuilder] = {"dense": _dense}


def register_linear(kind: str, builder: LinearBuilder) -> None:
    """Make `make_linear(..., kind=kind)` call `builder(in_features, out_features, bias=, role=)`."""
    LINEAR_KINDS[kind] = builder


def make_linear(in_features: int, out_features: int, *, bias: bool = False, kind: str = "dense",
                role: str = "") -> nn.Module:
    """Build a projection [..., in_features] -> [..., out_features] of the given kind.

    Args:
        in_features, out_features: input and output sizes.
        bias: add a bias vector.
        kind: a key of LINEAR_KINDS (the config's `model.linear`).
        role: which projection this is, e.g. "attn.q" or "mlp.down".

    Raises:
        ConfigError: `kind` is not registered.
    """
    builder = LINEAR_KINDS.get(kind)
    if builder is None:
        raise ConfigError(f"model.linear={kind!r} is not a known projection kind (allowed: {', '.join(LINEAR_KINDS)})")
    return builder(in_features, out_features, bias=bias, role=role)


def init_linear(module: nn.Module, std: float) -> None:
    """Initialise a projection from `make_linear`: weight ~ N(0, std), bias = 0.

    A kind whose parameters are not a single weight matrix defines `init_weights(std)` and decides
    itself how to reach an equivalent scale.
    """
    if hasattr(module, "init_weights"):
        module.init_weights(std)
        return
    if not isinstance(module, nn.Linear):
        raise TypeError(f"init_linear: {type(module).__name__} has no init_weights(std) method")
    nn.init.normal_(module.weight, mean=0.0, std=std)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
