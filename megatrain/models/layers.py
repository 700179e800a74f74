"""Projection layers: the one factory every model uses to build its linear maps.

Models never construct nn.Linear directly; they call `make_linear(..., kind=cfg.linear, role=...)`.
Other projection kinds (low-rank, sparse + low-rank, adapters) register a builder in
`LINEAR_KINDS` and every model picks them up without changes. The `role` names which projection
is being built ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"), so a
kind can treat, say, output projections differently.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatrain import kernels
from megatrain.errors import ConfigError

__all__ = [
    "LINEAR_KINDS",
    "LinearBuilder",
    "make_linear",
    "register_linear",
    "init_linear",
    "LOWRANK_KINDS",
    "LowRankOptions",
    "lowrank_options",
    "linear_options",
    "projection_shapes",
    "CoLALinear",
    "SLTrainLinear",
    "LoRALinear",
    "sample_sparse_support",
    "dense_state_dict",
]


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


def make_linear(
    in_features: int, out_features: int, *, bias: bool = False, kind: str = "dense", role: str = ""
) -> nn.Module:
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


# ----------------------------------------------------------------------------------------------
# Low-rank projection kinds: cola, sltrain, relora, lora (docs/lowrank.md).
#
# All of them store their factors in the [D_in, D_out] orientation the kernels take (x @ a @ b),
# while dense-style weights (ReLoRA's W) keep nn.Linear's [D_out, D_in]. The settings come from
# `model.lowrank.*`: the Transformer builds its blocks inside `linear_options(...)`, so builders keep
# the `make_linear` signature every model uses.

LOWRANK_KINDS = ("cola", "sltrain", "relora", "lora")
DEFAULT_ALPHA = 32.0  # ReLoRA's pretraining script (hard-coded) and SLTrain's 60M script
DEFAULT_DENSITY = 0.03  # SLTrain's scripts (--sp_ratio 0.03)
DEFAULT_DROPOUT = 0.1  # ReLoRA's pretraining script (hard-coded lora_dropout)


@dataclass
class LowRankOptions:
    """Resolved `model.lowrank.*` values. rank None (outside a model) = min(d_in, d_out) // 4."""

    rank: Optional[int] = None
    alpha: float = DEFAULT_ALPHA
    density: float = DEFAULT_DENSITY
    recompute: bool = False
    dropout: float = DEFAULT_DROPOUT

    def rank_for(self, in_features: int, out_features: int) -> int:
        return self.rank if self.rank is not None else max(1, min(in_features, out_features) // 4)


_OPTIONS: list[LowRankOptions] = []


def lowrank_options(model_cfg) -> LowRankOptions:
    """The LowRankOptions a (resolved) ModelConfig asks for; rank defaults to model.dim / 4."""
    lr = model_cfg.lowrank
    return LowRankOptions(
        rank=lr.rank if lr.rank is not None else max(1, model_cfg.dim // 4),
        alpha=DEFAULT_ALPHA if lr.alpha is None else float(lr.alpha),
        density=DEFAULT_DENSITY if lr.density is None else float(lr.density),
        recompute=bool(lr.recompute),
        dropout=DEFAULT_DROPOUT if lr.dropout is None else float(lr.dropout),
    )


@contextlib.contextmanager
def linear_options(options: LowRankOptions) -> Iterator[None]:
    """Low-rank builders called inside this block use `options` (the Transformer wraps its blocks)."""
    _OPTIONS.append(options)
    try:
        yield
    finally:
        _OPTIONS.pop()


def _options() -> LowRankOptions:
    return _OPTIONS[-1] if _OPTIONS else LowRankOptions()


def projection_shapes(model_cfg) -> list[tuple[str, int, int]]:
    """(role, d_in, d_out) of every projection in a Llama block of a resolved ModelConfig."""
    d, hd = model_cfg.dim, model_cfg.dim // model_cfg.heads
    q, kv, f = model_cfg.heads * hd, model_cfg.kv_heads * hd, model_cfg.ffn_dim
    return [
        ("attn.q", d, q),
        ("attn.k", d, kv),
        ("attn.v", d, kv),
        ("attn.o", q, d),
        ("mlp.gate", d, f),
        ("mlp.up", d, f),
        ("mlp.down", f, d),
    ]


def _check_rank(kind: str, rank: int, in_features: int, out_features: int, role: str) -> None:
    if not 1 <= rank <= min(in_features, out_features):
        raise ConfigError(
            f"model.lowrank.rank={rank} is outside 1..min(d_in, d_out)={min(in_features, out_features)} "
            f"for the {kind} projection {role or '?'} ({in_features} -> {out_features})"
        )


def _kaiming_uniform_(t: Tensor, fan_in: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """nn.Linear's default (kaiming_uniform_ with a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        values = torch.empty(t.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        t.copy_(values.to(device=t.device, dtype=t.dtype))
    return t


class CoLALinear(nn.Module):
    """CoLA: y = silu(x @ a) @ b + bias; a [D_in, r], b [r, D_out], bias [D_out].

    Init (CoLA): a, b ~ N(0, 1) * r^(-1/4) * (d_in + d_out)^(-1/4), so the product's scale
    matches a dense Xavier-style init; the `std` handed to `init_weights` is not used (it belongs
    to a dense matrix, which CoLA has none of). The bias (the paper's "+ b") starts at zero.
    `recompute` (CoLA-M) recomputes the [..., r] intermediate in backward instead of storing it.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, *, recompute: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.rank, self.recompute = in_features, out_features, rank, recompute
        self.cola_a = nn.Parameter(torch.empty(in_features, rank))
        self.cola_b = nn.Parameter(torch.empty(rank, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.init_weights(0.0)

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        scale = self.rank**-0.25 * (self.in_features + self.out_features) ** -0.25
        nn.init.normal_(self.cola_a, mean=0.0, std=scale)
        nn.init.normal_(self.cola_b, mean=0.0, std=scale)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., D_in] -> [..., D_out]."""
        return kernels.lowrank_linear(
            x, self.cola_a, self.cola_b, self.bias, activation="silu", recompute=self.recompute
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"recompute={self.recompute}"
        )


def sample_sparse_support(
    in_features: int, out_features: int, density: float, generator: Optional[torch.Generator] = None
) -> Tensor:
    """Sorted unique flat row-major positions (int64) of int(density * d_in * d_out) entries (>= 1)."""
    total = in_features * out_features
    nnz = sparse_support_size(in_features, out_features, density)
    return torch.sort(torch.randperm(total, generator=generator)[:nnz]).values


def sparse_support_size(in_features: int, out_features: int, density: float) -> int:
    """nnz of an SLTrain support: int(density * d_in * d_out), at least 1."""
    total = in_features * out_features
    return min(total, max(1, int(density * total)))


class SLTrainLinear(nn.Module):
    """SLTrain: y = x @ (alpha/r * a @ b + S) (+ bias); a [D_in, r], b [r, D_out], S [D_in, D_out].

    S holds trainable `sparse_values` [nnz] at the fixed positions `sparse_index` [nnz] (a
    persistent int64 buffer, so checkpoints and model.safetensors carry it), drawn from the torch
    RNG by `init_weights` (in a Transformer, from the module's keyed generator, so every rank and
    layout agrees) and never changed by training. nnz = int(density * d_in * d_out).

    Init (SLTrain): a Kaiming-uniform (nn.Linear's default, U(+-1/sqrt(d_in))), b = 0, the values
    of S ~ U(+-1/sqrt(d_in)); `init_weights(std)` follows the paper and does not use std.
    """

    def __init__(
        self, in_features: int, out_features: int, rank: int, *, alpha: float, density: float, bias: bool = False
    ):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.alpha, self.density = alpha, density
        self.scale = alpha / rank
        nnz = sparse_support_size(in_features, out_features, density)
        self.register_buffer("sparse_index", torch.empty(nnz, dtype=torch.long), persistent=True)  # init_weights
        self.lora_a = nn.Parameter(torch.empty(in_features, rank))
        self.lora_b = nn.Parameter(torch.empty(rank, out_features))
        self.sparse_values = nn.Parameter(torch.empty(nnz))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.init_weights(0.0)

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        # The support is part of the init: drawn here, from the same (keyed) generator as the values.
        self.sparse_index.copy_(sample_sparse_support(self.in_features, self.out_features, self.density))
        _kaiming_uniform_(self.lora_a, self.in_features)
        nn.init.zeros_(self.lora_b)
        _kaiming_uniform_(self.sparse_values, self.in_features)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., D_in] -> [..., D_out]."""
        y = kernels.sparse_lowrank_linear(
            x, self.lora_a, self.lora_b, self.sparse_values, self.sparse_index, self.scale
        )
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dense_weight(self) -> Tensor:
        """The equivalent nn.Linear weight [D_out, D_in] (fp32)."""
        return sltrain_dense_weight(self.lora_a, self.lora_b, self.sparse_values, self.sparse_index, self.scale)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"alpha={self.alpha}, density={self.density}, nnz={self.sparse_index.numel()}"
        )


def sltrain_dense_weight(a: Tensor, b: Tensor, values: Tensor, index: Tensor, scale: float) -> Tensor:
    """nn.Linear weight [D_out, D_in] (fp32) of an SLTrain layer: (scale * a @ b + S).T."""
    w = scale * (a.detach().float() @ b.detach().float())
    w.view(-1).index_add_(0, index.to(w.device), values.detach().float())
    return w.T.contiguous()


class LoRALinear(nn.Module):
    """LoRA / ReLoRA: y = x @ W.T (+ bias) + alpha/r * dropout(x) @ a @ b.

    W [D_out, D_in] (named `weight`, as in nn.Linear) is frozen (requires_grad False) while the
    adapters a [D_in, r] and b [r, D_out] train. ReLoRA (`restarts=True`) merges the adapters into W
    every train.relora.every steps (`merge_and_reinit`, driven by megatrain.optim.relora); plain LoRA
    never merges. Init: W ~ N(0, std) like a dense layer, a Kaiming-uniform, b = 0 (LoRA/ReLoRA).

    `adapters_enabled` False (ReLoRA's full-rank warm start) computes x @ W.T only.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        alpha: float,
        dropout: float,
        bias: bool = False,
        restarts: bool = False,
    ):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.alpha, self.scale, self.restarts = alpha, alpha / rank, restarts
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.relora_base = True  # megatrain.optim.param_groups keys on this (warm start)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.lora_a = nn.Parameter(torch.empty(in_features, rank))
        self.lora_b = nn.Parameter(torch.empty(rank, out_features))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.adapters_enabled = True
        self.init_weights(0.02)

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.reset_adapters()

    @torch.no_grad()
    def reset_adapters(self, generator: Optional[torch.Generator] = None) -> None:
        """a <- Kaiming-uniform, b <- 0: the adapter term becomes exactly zero."""
        _kaiming_uniform_(self.lora_a, self.in_features, generator)
        nn.init.zeros_(self.lora_b)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., D_in] -> [..., D_out]."""
        y = F.linear(x, self.weight, self.bias)
        if not self.adapters_enabled:
            return y
        return y + self.scale * kernels.lowrank_linear(self.dropout(x), self.lora_a, self.lora_b, activation=None)

    def dense_weight(self) -> Tensor:
        """The equivalent nn.Linear weight [D_out, D_in] (fp32): W + alpha/r * (a @ b).T."""
        return lora_dense_weight(self.weight, self.lora_a, self.lora_b, self.scale)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"alpha={self.alpha}, restarts={self.restarts}"
        )


def lora_dense_weight(weight: Tensor, a: Tensor, b: Tensor, scale: float) -> Tensor:
    """W + scale * (a @ b).T in fp32, [D_out, D_in]."""
    return weight.detach().float() + scale * (a.detach().float() @ b.detach().float()).T


def _cola(in_features: int, out_features: int, *, bias: bool, role: str) -> nn.Module:
    opts = _options()
    rank = opts.rank_for(in_features, out_features)
    _check_rank("cola", rank, in_features, out_features, role)
    return CoLALinear(in_features, out_features, rank, recompute=opts.recompute)


def _sltrain(in_features: int, out_features: int, *, bias: bool, role: str) -> nn.Module:
    opts = _options()
    rank = opts.rank_for(in_features, out_features)
    _check_rank("sltrain", rank, in_features, out_features, role)
    if not 0.0 < opts.density <= 1.0:
        raise ConfigError(f"model.lowrank.density must be in (0, 1], got {opts.density}")
    return SLTrainLinear(in_features, out_features, rank, alpha=opts.alpha, density=opts.density, bias=bias)


def _lora_builder(restarts: bool):
    kind = "relora" if restarts else "lora"

    def build(in_features: int, out_features: int, *, bias: bool, role: str) -> nn.Module:
        opts = _options()
        rank = opts.rank_for(in_features, out_features)
        _check_rank(kind, rank, in_features, out_features, role)
        return LoRALinear(
            in_features, out_features, rank, alpha=opts.alpha, dropout=opts.dropout, bias=bias, restarts=restarts
        )

    return build


register_linear("cola", _cola)
register_linear("sltrain", _sltrain)
register_linear("relora", _lora_builder(restarts=True))
register_linear("lora", _lora_builder(restarts=False))


def dense_state_dict(state: dict[str, Tensor], linear: str, options: LowRankOptions) -> dict[str, Tensor]:
    """A megatrain state dict of `linear` kind rewritten with dense `<proj>.weight` [D_out, D_in] tensors.

    Exact for sltrain (W = alpha/r * a @ b + S) and relora/lora (W + alpha/r * a @ b); CoLA has a
    nonlinearity between its factors and no dense equivalent (ValueError).
    """
    if linear == "dense":
        return dict(state)
    if linear == "cola":
        raise ValueError(
            "model.linear=cola has a SiLU between its factors (silu(x @ a) @ b), so it has no dense "
            "equivalent to export; only dense, sltrain, relora and lora models export to Llama"
        )
    out: dict[str, Tensor] = {}
    prefixes = sorted({k[: -len(".lora_a")] for k in state if k.endswith(".lora_a")})
    consumed = set()
    for prefix in prefixes:
        a, b = state[f"{prefix}.lora_a"], state[f"{prefix}.lora_b"]
        scale = options.alpha / a.shape[1]
        if linear == "sltrain":
            w = sltrain_dense_weight(a, b, state[f"{prefix}.sparse_values"], state[f"{prefix}.sparse_index"], scale)
            consumed.update({f"{prefix}.sparse_values", f"{prefix}.sparse_index"})
        else:
            w = lora_dense_weight(state[f"{prefix}.weight"], a, b, scale)
            consumed.add(f"{prefix}.weight")
        consumed.update({f"{prefix}.lora_a", f"{prefix}.lora_b"})
        out[f"{prefix}.weight"] = w.to(a.dtype)
    for k, v in state.items():
        if k not in consumed:
            out[k] = v
    return out
