"""Run configuration: dataclasses, YAML loading, `a.b=c` overrides and validation.

One YAML file describes a run. Keys are grouped in sections (`run`, `model`, `data`, `train`,
`optim`, `parallel`, `checkpoint`, `log`) plus a free-form `deepspeed` section that is merged over
the DeepSpeed config megatrain generates. Every field carries a help string in its metadata; the
README's config reference is generated from it (`megatrain config --reference`).

Errors are raised as ConfigError with one line naming the key and what is allowed, before any
process group starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from megatrain.errors import ConfigError

__all__ = ["Config", "ConfigError", "load_config", "parse_overrides", "PRESETS", "config_reference"]


def _f(default, help: str, choices=None, **kw):
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = list(choices)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


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

LINEAR_KINDS = ["dense"]  # later issues add cola, sltrain, relora, lora through models/layers.py
ATTENTION_KINDS = ["mha"]
OPTIMIZERS = ["adamw"]


@dataclass
class RunConfig:
    dir: str = _f("runs/default", "Run directory: resolved config, metrics.jsonl, tb/, checkpoints/. "
                  "Nothing is written outside it (except the shared token/tokenizer cache).")


@dataclass
class ModelConfig:
    preset: Optional[str] = _f("tiny", "Size preset; explicit dims below override it.", choices=list(PRESETS))
    dim: Optional[int] = _f(None, "Hidden size (default: from preset).")
    layers: Optional[int] = _f(None, "Number of decoder blocks (default: from preset).")
    heads: Optional[int] = _f(None, "Attention heads (default: from preset).")
    kv_heads: Optional[int] = _f(None, "Key/value heads for grouped-query attention; must divide heads.")
    vocab_size: Optional[int] = _f(None, "Vocabulary size (default: the tokenizer's).")
    ffn_dim: Optional[int] = _f(None, "SwiGLU hidden size (default: from preset, or 8/3*dim rounded up to multiple_of).")
    multiple_of: int = _f(64, "Rounding for a derived ffn_dim.")
    norm_eps: float = _f(1e-5, "RMSNorm epsilon.")
    rope_theta: float = _f(10000.0, "RoPE base.")
    max_seq_len: int = _f(4096, "Longest position the RoPE tables cover.")
    tie_embeddings: bool = _f(False, "Share the input embedding with the output head.")
    init_std: float = _f(0.02, "Init std; output projections (o, down) use init_std/sqrt(2*layers).")
    linear: str = _f("dense", "Projection kind built by models/layers.py.", choices=LINEAR_KINDS)
    attention: str = _f("mha", "Attention kind (multi-head / grouped-query through torch SDPA).", choices=ATTENTION_KINDS)

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


@dataclass
class DataConfig:
    source: Any = _f("embedded", "Training text: 'embedded' (the shipped Austen corpus), a file, a glob, "
                     "a directory, a list of these (.txt/.txt.gz/.jsonl/.json/.parquet), or 'hf:NAME[:SPLIT]'.")
    val_source: Any = _f(None, "Validation text, same forms as source. Default: the held-out novel for "
                         "'embedded'; otherwise the last val_fraction of the training blocks.")
    val_fraction: float = _f(0.01, "Fraction of training blocks held out when val_source is not given.")
    text_field: str = _f("text", "Field holding the text in jsonl/parquet/hub records.")
    seq_len: int = _f(256, "Tokens per training sequence (blocks are packed, EOS between documents).")
    tokenizer: str = _f("auto", "A sentencepiece .model file, or 'auto': train one on the training "
                        "source once and cache it.")
    vocab_size: int = _f(4096, "Vocabulary size when data.tokenizer is 'auto'.")
    tokenizer_type: str = _f("bpe", "Sentencepiece model type when training.", choices=["bpe", "unigram"])
    cache_dir: Optional[str] = _f(None, "Cache for trained tokenizers and token arrays "
                                  "(default: $MEGATRAIN_CACHE or ~/.cache/megatrain).")


@dataclass
class TrainConfig:
    steps: int = _f(1000, "Optimizer steps in the schedule.")
    micro_batch: int = _f(8, "Sequences per process per micro-step.")
    grad_accum: Optional[int] = _f(None, "Micro-steps per optimizer step (default: derived from global_batch, else 1).")
    global_batch: Optional[int] = _f(None, "Sequences per optimizer step = micro_batch x grad_accum x DP "
                                     "(default: derived).")
    seed: int = _f(1234, "Seed for init, data order and RNG streams.")
    lr: float = _f(3e-4, "Peak learning rate.")
    min_lr_ratio: float = _f(0.1, "Final learning rate as a fraction of lr.")
    warmup_steps: int = _f(100, "Linear warm-up steps.")
    schedule: str = _f("cosine", "Decay after warm-up.", choices=["cosine", "linear", "constant"])
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this (0 disables).")
    dtype: str = _f("auto", "Training precision: auto = bf16 on GPU, fp32 on CPU.", choices=["auto", "fp32", "bf16"])
    activation_checkpointing: bool = _f(False, "Recompute each block's activations in backward.")
    stop_after: Optional[int] = _f(None, "Checkpoint and stop at this step without changing the schedule.")
    max_nonfinite: int = _f(5, "Abort after this many non-finite losses in a row (each such step is skipped).")


@dataclass
class OptimConfig:
    name: str = _f("adamw", "Optimizer.", choices=OPTIMIZERS)
    weight_decay: float = _f(0.1, "Decoupled weight decay (not applied to norms and biases).")
    beta1: float = _f(0.9, "Adam beta1.")
    beta2: float = _f(0.95, "Adam beta2.")
    eps: float = _f(1e-8, "Adam epsilon.")
    fused: str = _f("auto", "Fused Adam: auto = apex FusedAdam if importable on GPU, else torch's fused AdamW "
                    "on GPU, plain AdamW on CPU.", choices=["auto", "apex", "torch", "none"])


@dataclass
class ParallelConfig:
    tensor: int = _f(1, "Tensor-parallel size (DP = world / tensor).", choices=[1])
    sequence: bool = _f(False, "Megatron-style sequence parallelism (needs tensor > 1).", choices=[False])
    zero_stage: int = _f(2, "DeepSpeed ZeRO stage.", choices=[0, 1, 2, 3])
    backend: str = _f("auto", "torch.distributed backend: auto = nccl on GPU, gloo on CPU.", choices=["auto", "nccl", "gloo"])


@dataclass
class CheckpointConfig:
    every: int = _f(0, "Save every N steps (0: only at the end and at stop_after).")
    keep: int = _f(3, "Keep the last K checkpoints (0 keeps all).")


@dataclass
class LogConfig:
    every: int = _f(1, "Log metrics every N steps.")
    eval_every: int = _f(100, "Validation loss/perplexity every N steps (0 disables; always at the end).")
    eval_batches: int = _f(8, "Micro-batches per process per validation.")
    tensorboard: bool = _f(True, "Write tensorboard events under run.dir/tb.")
    progress: bool = _f(True, "Progress bar on rank 0.")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    deepspeed: dict = field(default_factory=dict, metadata={
        "help": "Raw DeepSpeed config merged over the generated one (or pass --deepspeed ds.json)."})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def resolve_batch(self, world_size: int) -> None:
        """Check TP/DP layout and the batch arithmetic for `world_size` processes; fill derived values."""
        p, t = self.parallel, self.train
        if world_size % p.tensor:
            raise ConfigError(f"parallel.tensor={p.tensor} does not divide the world size {world_size}")
        dp = world_size // p.tensor
        mb = t.micro_batch
        if t.global_batch is None:
            t.grad_accum = t.grad_accum or 1
            t.global_batch = mb * t.grad_accum * dp
        elif t.grad_accum is None:
            if t.global_batch % (mb * dp):
                raise ConfigError(
                    f"train.global_batch={t.global_batch} is not a multiple of train.micro_batch x DP = "
                    f"{mb} x {dp} = {mb * dp}")
            t.grad_accum = t.global_batch // (mb * dp)
        elif t.global_batch != mb * t.grad_accum * dp:
            raise ConfigError(
                f"train.global_batch={t.global_batch} != train.micro_batch x train.grad_accum x DP = "
                f"{mb} x {t.grad_accum} x {dp} = {mb * t.grad_accum * dp} (world size {world_size}, "
                f"parallel.tensor={p.tensor})")


# ----------------------------------------------------------------------------------------------
# type checking / coercion


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp, choices):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0], choices)
    if tp is Any or tp is dict:
        if tp is dict and not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {type(value).__name__} {value!r}")
        return value
    out = value
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            out = value.lower() == "true"
        elif not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        try:
            out = int(value)
        except ValueError:
            raise ConfigError(f"{key} must be an integer, got {value!r}") from None
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        try:
            out = float(value)
        except ValueError:
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
    if choices is not None and out not in choices:
        allowed = ", ".join(str(c).lower() if isinstance(c, bool) else str(c) for c in choices)
        raise ConfigError(f"{key}={value!r} is not allowed (allowed: {allowed})")
    return out


def _apply(obj, data: dict, prefix: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key '{full}' (allowed under '{prefix.rstrip('.') or 'top level'}': "
                              f"{', '.join(fields)})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if value is None:
                continue
            _apply(getattr(obj, key), value, full + ".")
        elif key == "deepspeed" and prefix == "":
            if not isinstance(value, dict):
                raise ConfigError(f"deepspeed must be a mapping, got {value!r}")
            _deep_merge(obj.deepspeed, value)
        else:
            setattr(obj, key, _coerce(full, value, tp, fields[key].metadata.get("choices")))


def _deep_merge(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_merge(dst[k], v)
        else:
            dst[k] = v
    return dst


def parse_overrides(items: list[str]) -> dict:
    """`["train.lr=1e-3", "model.dim=128"]` -> nested dict. Values are parsed as YAML scalars."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override of '{part}'")
        node[parts[-1]] = value
    return out


def _read_structured(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"{what} file '{path}' does not exist")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{what} file '{path}' is not valid {'JSON' if path.endswith('.json') else 'YAML'}: {first}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} file '{path}' must hold a mapping at the top level")
    return data


# DeepSpeed JSON keys that have a megatrain home; a `--deepspeed` file sets them there (not "auto").
_DS_TO_CONFIG = {"train_micro_batch_size_per_gpu": ("train", "micro_batch"),
                 "gradient_accumulation_steps": ("train", "grad_accum"),
                 "train_batch_size": ("train", "global_batch"),
                 "gradient_clipping": ("train", "grad_clip")}


def _settings_from_deepspeed(ds: dict) -> dict:
    """What a DeepSpeed users' ds.json says about batch, clipping and ZeRO stage, as megatrain keys."""
    out: dict = {}
    for ds_key, (section, key) in _DS_TO_CONFIG.items():
        if ds_key in ds and ds[ds_key] != "auto":
            out.setdefault(section, {})[key] = ds[ds_key]
    stage = ds.get("zero_optimization", {}).get("stage") if isinstance(ds.get("zero_optimization"), dict) else None
    if stage is not None and stage != "auto":
        out.setdefault("parallel", {})["zero_stage"] = stage
    return out


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None,
                deepspeed_json: Optional[str] = None) -> Config:
    """Defaults <- YAML file <- `--deepspeed` JSON <- `a.b=c` overrides; validated."""
    cfg = Config()
    if path is not None:
        _apply(cfg, _read_structured(path, "config"), "")
    if deepspeed_json is not None:
        ds = _read_structured(deepspeed_json, "deepspeed")
        _apply(cfg, {"deepspeed": ds}, "")
        _apply(cfg, _settings_from_deepspeed(ds), "")
    if overrides:
        _apply(cfg, parse_overrides(overrides), "")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Checks that need no process group. Batch/world arithmetic is `Config.resolve_batch`."""
    m = cfg.model.resolved()
    for k in ("dim", "layers", "heads", "kv_heads", "ffn_dim", "max_seq_len"):
        if getattr(m, k) < 1:
            raise ConfigError(f"model.{k} must be >= 1, got {getattr(m, k)}")
    if m.dim % m.heads:
        raise ConfigError(f"model.heads={m.heads} does not divide model.dim={m.dim}")
    if m.heads % m.kv_heads:
        raise ConfigError(f"model.kv_heads={m.kv_heads} does not divide model.heads={m.heads}")
    if (m.dim // m.heads) % 2:
        raise ConfigError(f"head dim model.dim/model.heads={m.dim // m.heads} must be even for RoPE")
    if m.vocab_size is not None and m.vocab_size < 8:
        raise ConfigError(f"model.vocab_size must be >= 8, got {m.vocab_size}")
    d, t = cfg.data, cfg.train
    if d.seq_len < 2:
        raise ConfigError(f"data.seq_len must be >= 2, got {d.seq_len}")
    if d.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if not 0.0 <= d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {d.val_fraction}")
    if d.vocab_size < 64:
        raise ConfigError(f"data.vocab_size must be >= 64, got {d.vocab_size}")
    for k in ("steps", "micro_batch"):
        if getattr(t, k) < 1:
            raise ConfigError(f"train.{k} must be >= 1, got {getattr(t, k)}")
    for k in ("grad_accum", "global_batch"):
        if getattr(t, k) is not None and getattr(t, k) < 1:
            raise ConfigError(f"train.{k} must be >= 1, got {getattr(t, k)}")
    if t.lr <= 0:
        raise ConfigError(f"train.lr must be > 0, got {t.lr}")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    if t.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    if t.stop_after is not None and not 1 <= t.stop_after <= t.steps:
        raise ConfigError(f"train.stop_after must be in [1, train.steps={t.steps}], got {t.stop_after}")
    if t.grad_clip < 0:
        raise ConfigError(f"train.grad_clip must be >= 0, got {t.grad_clip}")
    if t.max_nonfinite < 1:
        raise ConfigError(f"train.max_nonfinite must be >= 1, got {t.max_nonfinite}")
    if cfg.checkpoint.every < 0 or cfg.checkpoint.keep < 0:
        raise ConfigError("checkpoint.every and checkpoint.keep must be >= 0")
    if cfg.log.every < 1:
        raise ConfigError(f"log.every must be >= 1, got {cfg.log.every}")
    if cfg.log.eval_every < 0 or cfg.log.eval_batches < 1:
        raise ConfigError("log.eval_every must be >= 0 and log.eval_batches >= 1")
    ws = os.environ.get("WORLD_SIZE")
    if ws is not None and ws.isdigit():
        probe = dataclasses.replace(cfg.train)
        copy = dataclasses.replace(cfg, train=probe)
        copy.resolve_batch(int(ws))


def save_config(cfg: Config, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)
    os.replace(tmp, path)


def config_reference() -> str:
    """Markdown table of every key, its default and its help (the README's config reference)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    cfg = Config()
    for sec in dataclasses.fields(cfg):
        obj = getattr(cfg, sec.name)
        if not dataclasses.is_dataclass(obj):
            rows.append(f"| `{sec.name}` | `{{}}` | {sec.metadata.get('help', '')} |")
            continue
        for f in dataclasses.fields(obj):
            default = getattr(obj, f.name)
            text = f.metadata.get("help", "")
            if "choices" in f.metadata:
                text += " One of: " + ", ".join(f"`{str(c).lower() if isinstance(c, bool) else c}`"
                                                for c in f.metadata["choices"]) + "."
            shown = "null" if default is None else (str(default).lower() if isinstance(default, bool) else default)
            rows.append(f"| `{sec.name}.{f.name}` | `{shown}` | {text} |")
    return "\n".join(rows)
