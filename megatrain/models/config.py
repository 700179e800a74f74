"""The model's configuration: `model.*` keys, size presets, and the checks a model config must pass.

Kept beside the model (as torchtitan keeps its model args) so models/ depends on nothing above it:
megatrain/config.py composes `ModelConfig` into the run's schema and calls `ModelConfig.validate`;
rules that involve other sections (tensor-parallel splits, optimizers, training) live with those
domains. Errors are ConfigError with one line naming the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from megatrain.errors import ConfigError
from megatrain.fields import config_field
from megatrain.models.layers import LINEAR_KINDS, LOWRANK_KINDS, lowrank_options, projection_shapes

__all__ = [
    "ModelConfig",
    "LowRankConfig",
    "IHAConfig",
    "PRESETS",
    "ATTENTION_KINDS",
    "FROZEN_BASE_KINDS",
    "check_head_layout",
]

# name -> (dim, layers, heads, kv_heads, ffn_dim). ffn_dim None = 8/3*dim rounded to multiple_of.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(dim=64, layers=2, heads=4, kv_heads=2, ffn_dim=176),
    "small-cpu": dict(dim=128, layers=4, heads=4, kv_heads=2, ffn_dim=352),
    "125m": dict(dim=768, layers=12, heads=12, kv_heads=12, ffn_dim=2048),
    "350m": dict(dim=1024, layers=24, heads=16, kv_heads=16, ffn_dim=2816),
    "760m": dict(dim=1536, layers=24, heads=16, kv_heads=16, ffn_dim=4096),
    "1.3b": dict(dim=2048, layers=24, heads=32, kv_heads=32, ffn_dim=5632),
    "7b": dict(dim=4096, layers=32, heads=32, kv_heads=32, ffn_dim=11008),
}

ATTENTION_KINDS = ("mha", "iha")  # iha: interleaved head attention (docs/iha.md)


@dataclass
class LowRankConfig:
    """`model.lowrank.*`: settings of the low-rank projection kinds (docs/lowrank.md). None = the
    method's default; a key that the chosen `model.linear` does not use is refused."""

    rank: Optional[int] = config_field(
        None,
        "Rank r of every low-rank projection (cola, sltrain, relora, lora); "
        "default model.dim/4 (CoLA and SLTrain pretraining scripts).",
    )
    alpha: Optional[float] = config_field(
        None,
        "Scale numerator: the low-rank term is multiplied by alpha/r "
        "(sltrain, relora, lora); default 32 (ReLoRA and SLTrain scripts).",
    )
    density: Optional[float] = config_field(
        None, "SLTrain: fraction delta of each matrix held by the sparse part S, in (0, 1]; default 0.03."
    )
    recompute: Optional[bool] = config_field(
        None, "CoLA-M: recompute the [.., r] intermediate in backward instead of storing it (cola); default false."
    )
    dropout: Optional[float] = config_field(
        None, "Dropout on the adapter input (relora, lora), in [0, 1); default 0.1 (ReLoRA)."
    )


# model.linear kinds whose base weight W is frozen (no gradient, no optimizer state): adapters on W
FROZEN_BASE_KINDS = ("relora", "lora")

# model.lowrank.* key -> the model.linear kinds that use it
_LOWRANK_KEY_KINDS = {
    "rank": LOWRANK_KINDS,
    "alpha": ("sltrain", "relora", "lora"),
    "density": ("sltrain",),
    "recompute": ("cola",),
    "dropout": FROZEN_BASE_KINDS,
}


@dataclass
class IHAConfig:
    """`model.iha.*`: interleaved head attention (model.attention=iha; docs/iha.md)."""

    pseudo_heads: int = config_field(
        2, "P: pseudo-tokens per token, each a learned mix of all heads (P = heads allowed)."
    )
    mask: str = config_field(
        "causal",
        "Causal order over the N*P virtual tokens, or token_causal: the P "
        "pseudo-tokens of one position also see each other.",
        choices=["causal", "token_causal"],
    )
    collapse: str = config_field(
        "per_head",
        "How the P outputs of a head become one: per_head (weights [H, P]) or "
        "global (weights R [H, H*P] over every head's outputs).",
        choices=["per_head", "global"],
    )
    rope: str = config_field(
        "virtual",
        "RoPE position of pseudo-token (n, p): virtual = n*P + p, original = n.",
        choices=["virtual", "original"],
    )
    window: Optional[int] = config_field(
        None,
        "Sliding window in virtual tokens (a positive multiple of "
        "pseudo_heads) for every layer (schedule=uniform; null = full) or the "
        "short layers (flop_matched; null = N/(2P) for N = model.max_seq_len, "
        "rounded down to a multiple of P).",
    )
    schedule: str = config_field(
        "uniform",
        "Layer schedule: uniform (every layer uses window) or flop_matched "
        "(window on all layers but every full_every-th, which attends fully; window N/(2P) "
        "matches MHA's attention FLOPs at sequence length N, the default).",
        choices=["uniform", "flop_matched"],
    )
    full_every: int = config_field(2, "flop_matched: layers full_every-1, 2*full_every-1, ... attend fully.")
    head_groups: int = config_field(
        1, "Mix heads only within this many contiguous groups of heads (block-diagonal mixing; 1 = all heads mix)."
    )
    tp_mode: str = config_field(
        "exact",
        "Tensor parallelism: exact (all-gather q/k/v heads in the TP group for the "
        "mixing) or local (no extra communication; needs head_groups a multiple of "
        "parallel.tensor, so each rank mixes only its own heads).",
        choices=["exact", "local"],
    )


@dataclass
class ModelConfig:
    """`model.*`. Size keys left None come from the preset (`resolved()`)."""

    preset: Optional[str] = config_field("tiny", "Size preset; explicit dims below override it.", choices=PRESETS)
    dim: Optional[int] = config_field(None, "Hidden size (default: from preset).")
    layers: Optional[int] = config_field(None, "Number of decoder blocks (default: from preset).")
    heads: Optional[int] = config_field(None, "Attention heads (default: from preset).")
    kv_heads: Optional[int] = config_field(None, "Key/value heads for grouped-query attention; must divide heads.")
    vocab_size: Optional[int] = config_field(None, "Vocabulary size (default: the tokenizer's).")
    ffn_dim: Optional[int] = config_field(
        None, "SwiGLU hidden size (default: from preset, or 8/3*dim rounded up to multiple_of)."
    )
    multiple_of: int = config_field(64, "Rounding for a derived ffn_dim.")
    norm_eps: float = config_field(1e-5, "RMSNorm epsilon.")
    rope_theta: float = config_field(10000.0, "RoPE base.")
    max_seq_len: int = config_field(4096, "Longest position the RoPE tables cover.")
    tie_embeddings: bool = config_field(False, "Share the input embedding with the output head.")
    init_std: float = config_field(0.02, "Init std; output projections (o, down) use init_std/sqrt(2*layers).")
    embed_init_std: Optional[float] = config_field(
        None,
        "Init std of the input embedding (default: init_std). "
        "Small synthetic-task models learn associative recall far "
        "sooner with 1.0 (benchmarks/results/study-iha.md).",
    )
    # The projection kinds registered in models/layers.py (docs/lowrank.md), read live from the registry.
    linear: str = config_field("dense", "Projection kind built by models/layers.py.", choices=LINEAR_KINDS)
    attention: str = config_field(
        "mha",
        "Attention kind: mha (multi-head / grouped-query through torch SDPA) or iha "
        "(interleaved head attention, settings in model.iha.*).",
        choices=ATTENTION_KINDS,
    )
    lowrank: LowRankConfig = field(default_factory=LowRankConfig)
    iha: IHAConfig = field(default_factory=IHAConfig)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        """The config from its `dataclasses.asdict` form (checkpoint and export metadata).

        Nested sections (model.lowrank, model.iha) are rebuilt as their dataclasses; keys this version
        does not know (e.g. an export's `exported_from_linear`) are ignored, missing keys keep defaults.
        """
        return _from_dict(cls, data)

    def resolved(self) -> "ModelConfig":
        """A copy with preset values filled in and derived sizes computed (vocab_size may stay None)."""
        out = dataclasses.replace(self)
        base = PRESETS.get(self.preset or "", {}) if self.preset else {}
        for k in ("dim", "layers", "heads", "kv_heads", "ffn_dim"):
            if getattr(out, k) is None and k in base:
                setattr(out, k, base[k])
        for k in ("dim", "layers", "heads"):
            if getattr(out, k) is None:
                raise ConfigError(f"model.{k} is not set: give model.preset (one of {', '.join(PRESETS)}) or model.{k}")
        if out.kv_heads is None:
            out.kv_heads = out.heads
        if out.ffn_dim is None:
            hidden = int(8 * out.dim / 3)
            out.ffn_dim = out.multiple_of * ((hidden + out.multiple_of - 1) // out.multiple_of)
        return out

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def validate(self, seq_len: Optional[int] = None) -> None:
        """Raise ConfigError (one line naming the key) unless this config describes a buildable model.

        Checks the model's own keys only (sizes, heads, model.linear with model.lowrank.*,
        model.attention with model.iha.*); `self` may be unresolved. `seq_len`, the training
        sequence length when known, only makes the flop_matched hint concrete. Reads and changes nothing else.
        """
        m = self.resolved()
        for k in ("dim", "layers", "heads", "kv_heads", "ffn_dim", "max_seq_len"):
            if getattr(m, k) < 1:
                raise ConfigError(f"model.{k} must be >= 1, got {getattr(m, k)}")
        for k in ("init_std", "embed_init_std"):
            value = getattr(m, k)
            if value is not None and not value > 0:
                raise ConfigError(f"model.{k} must be > 0, got {value}")
        check_head_layout(m.dim, m.heads, m.kv_heads)
        if m.head_dim % 2:
            raise ConfigError(f"head dim model.dim/model.heads={m.head_dim} must be even for RoPE")
        if m.vocab_size is not None and m.vocab_size < 8:
            raise ConfigError(f"model.vocab_size must be >= 8, got {m.vocab_size}")
        if m.linear not in LINEAR_KINDS:
            raise ConfigError(
                f"model.linear={m.linear!r} is not a known projection kind (allowed: {', '.join(LINEAR_KINDS)})"
            )
        _validate_lowrank(m)
        _validate_iha(m, seq_len)


def check_head_layout(dim: int, heads: int, kv_heads: int) -> None:
    """Raise ConfigError unless `heads` divides `dim` and `kv_heads` divides `heads` (grouped-query attention)."""
    if dim % heads:
        raise ConfigError(f"model.heads={heads} does not divide model.dim={dim}")
    if heads % kv_heads:
        raise ConfigError(f"model.kv_heads={kv_heads} does not divide model.heads={heads}")


def _validate_lowrank(m: ModelConfig) -> None:
    """model.lowrank.* against model.linear and the projection sizes of the resolved model `m`."""
    kind, lr = m.linear, m.lowrank
    for key, kinds in _LOWRANK_KEY_KINDS.items():
        if getattr(lr, key) is not None and kind not in kinds:
            raise ConfigError(
                f"model.lowrank.{key} does not apply to model.linear={kind} (it applies to: {', '.join(kinds)})"
            )
    if kind == "dense":
        return
    if lr.rank is not None and lr.rank < 1:
        raise ConfigError(f"model.lowrank.rank must be >= 1, got {lr.rank}")
    if lr.alpha is not None and not lr.alpha > 0:
        raise ConfigError(f"model.lowrank.alpha must be > 0, got {lr.alpha}")
    if lr.density is not None and not 0.0 < lr.density <= 1.0:
        raise ConfigError(f"model.lowrank.density must be in (0, 1], got {lr.density}")
    if lr.dropout is not None and not 0.0 <= lr.dropout < 1.0:
        raise ConfigError(f"model.lowrank.dropout must be in [0, 1), got {lr.dropout}")
    rank, shapes = lowrank_options(m).rank, projection_shapes(m)
    smallest = min(min(d_in, d_out) for _, d_in, d_out in shapes)
    for role, d_in, d_out in shapes:
        if rank > min(d_in, d_out):
            raise ConfigError(
                f"model.lowrank.rank={rank} exceeds min(d_in, d_out)={min(d_in, d_out)} of projection "
                f"{role} ({d_in} -> {d_out}); allowed: 1..{smallest}"
            )


def _validate_iha(m: ModelConfig, seq_len: Optional[int]) -> None:
    """model.iha.* of the resolved model `m` (docs/iha.md); the TP rules are megatrain.parallel.checks'."""
    iha = m.iha
    if m.attention != "iha":
        changed = [f.name for f in dataclasses.fields(iha) if getattr(iha, f.name) != f.default]
        if changed:
            raise ConfigError(
                f"model.iha.{changed[0]} applies to model.attention=iha only, but model.attention={m.attention}"
            )
        return
    pseudo = iha.pseudo_heads
    if pseudo < 1:
        raise ConfigError(f"model.iha.pseudo_heads must be >= 1, got {pseudo}")
    if iha.window is not None and (iha.window < 1 or iha.window % pseudo):
        raise ConfigError(
            f"model.iha.window={iha.window} must be a positive multiple of model.iha.pseudo_heads="
            f"{pseudo} (it counts virtual tokens), or null"
        )
    if iha.full_every < 1:
        raise ConfigError(f"model.iha.full_every must be >= 1, got {iha.full_every}")
    if iha.head_groups < 1 or m.heads % iha.head_groups:
        raise ConfigError(f"model.iha.head_groups={iha.head_groups} must be >= 1 and divide model.heads={m.heads}")


def _from_dict(cls, data: dict):
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = _from_dict(type(default), value)
        kwargs[f.name] = value
    return cls(**kwargs)
