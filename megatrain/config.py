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

LINEAR_KINDS = ["dense", "cola", "sltrain", "relora", "lora"]  # built by models/layers.py (docs/lowrank.md)
ATTENTION_KINDS = ["mha", "iha"]  # iha: interleaved head attention (docs/iha.md)
OPTIMIZERS = ["adamw", "galore", "fira"]  # galore / fira: docs/galore-fira.md


@dataclass
class RunConfig:
    dir: str = _f("runs/default", "Run directory: resolved config, metrics.jsonl, tb/, checkpoints/. "
                  "Nothing is written outside it (except the shared token/tokenizer cache).")


@dataclass
class LowRankConfig:
    """`model.lowrank.*`: settings of the low-rank projection kinds (docs/lowrank.md). None = the
    method's default; a key that the chosen `model.linear` does not use is refused."""
    rank: Optional[int] = _f(None, "Rank r of every low-rank projection (cola, sltrain, relora, lora); "
                             "default model.dim/4 (CoLA and SLTrain pretraining scripts).")
    alpha: Optional[float] = _f(None, "Scale numerator: the low-rank term is multiplied by alpha/r "
                                "(sltrain, relora, lora); default 32 (ReLoRA and SLTrain scripts).")
    density: Optional[float] = _f(None, "SLTrain: fraction delta of each matrix held by the sparse part "
                                  "S, in (0, 1]; default 0.03.")
    recompute: Optional[bool] = _f(None, "CoLA-M: recompute the [.., r] intermediate in backward instead "
                                   "of storing it (cola); default false.")
    dropout: Optional[float] = _f(None, "Dropout on the adapter input (relora, lora), in [0, 1); default 0.1 "
                                  "(ReLoRA).")


@dataclass
class IHAConfig:
    """`model.iha.*`: interleaved head attention (model.attention=iha; docs/iha.md)."""
    pseudo_heads: int = _f(2, "P: pseudo-tokens per token, each a learned mix of all heads (P = heads allowed).")
    mask: str = _f("causal", "Causal order over the N*P virtual tokens, or token_causal: the P pseudo-tokens "
                   "of one position also see each other.", choices=["causal", "token_causal"])
    collapse: str = _f("per_head", "How the P outputs of a head become one: per_head (weights [H, P]) or "
                       "global (weights R [H, H*P] over every head's outputs).", choices=["per_head", "global"])
    rope: str = _f("virtual", "RoPE position of pseudo-token (n, p): virtual = n*P + p, original = n.",
                   choices=["virtual", "original"])
    window: Optional[int] = _f(None, "Sliding window in virtual tokens (a positive multiple of pseudo_heads) "
                               "for every layer (schedule=uniform) or the short layers (flop_matched); null = full.")
    schedule: str = _f("uniform", "Layer schedule: uniform (every layer uses window) or flop_matched (window on "
                       "all layers but every full_every-th, which attends fully; window N/(2P) matches MHA's "
                       "attention FLOPs at sequence length N).", choices=["uniform", "flop_matched"])
    full_every: int = _f(2, "flop_matched: layers full_every-1, 2*full_every-1, ... attend fully.")
    head_groups: int = _f(1, "Mix heads only within this many contiguous groups of heads (block-diagonal "
                          "mixing; 1 = all heads mix).")
    tp_mode: str = _f("exact", "Tensor parallelism: exact (all-gather q/k/v heads in the TP group for the "
                      "mixing) or local (no extra communication; needs head_groups a multiple of "
                      "parallel.tensor, so each rank mixes only its own heads).", choices=["exact", "local"])


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
    attention: str = _f("mha", "Attention kind: mha (multi-head / grouped-query through torch SDPA) or iha "
                        "(interleaved head attention, settings in model.iha.*).", choices=ATTENTION_KINDS)
    lowrank: LowRankConfig = field(default_factory=LowRankConfig)
    iha: IHAConfig = field(default_factory=IHAConfig)

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
class TaskConfig:
    """`data.task.*`: sizes of the synthetic tasks (data.source=task:multikey or task:multihop;
    megatrain/data/tasks.py)."""
    pairs: int = _f(8, "Key-value pairs written in each context.")
    queries: int = _f(4, "multikey: keys queried after the context (a subset of the pairs, each answered).")
    hops: int = _f(2, "multihop: lookups chained from the query to the answer.")
    symbols: int = _f(60, "Distinct key/value symbols; the vocabulary is symbols + 4 special tokens.")
    train_size: int = _f(100000, "Training sequences (generated on the fly from data.task.seed).")
    val_size: int = _f(256, "Validation sequences (a different random stream); exact-match accuracy is "
                       "reported on them.")
    seed: int = _f(0, "Seed of the task's generator (train and validation streams derive from it).")


@dataclass
class DataConfig:
    source: Any = _f("embedded", "Training text: 'embedded' (the shipped Austen corpus), a file, a glob, "
                     "a directory, a list of these (.txt/.txt.gz/.jsonl/.json/.parquet), 'hf:NAME[:SPLIT]', "
                     "or a synthetic task: 'task:multikey' or 'task:multihop' (sizes in data.task.*).")
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
    task: TaskConfig = field(default_factory=TaskConfig)


@dataclass
class ReLoRATrainConfig:
    """`train.relora.*`: ReLoRA's restarts (model.linear=relora only; docs/lowrank.md)."""
    every: Optional[int] = _f(None, "Merge the adapters into W and restart every N optimizer steps "
                              "(default: train.steps/10, ReLoRA's 2000 of 20000).")
    prune: str = _f("magnitude", "At a restart, the adapters' Adam state is magnitude-pruned or reset to zero.",
                    choices=["magnitude", "reset"])
    prune_ratio: float = _f(0.9, "Fraction of each adapter's Adam state zeroed by magnitude pruning, in [0, 1).")
    restart_warmup: Optional[int] = _f(None, "Linear learning-rate re-warm-up steps after each restart "
                                       "(default: every/20, ReLoRA's 100 of 2000).")
    warm_start_steps: int = _f(0, "Train full-rank (W trainable, adapters off) for this many steps first.")


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
    relora: ReLoRATrainConfig = field(default_factory=ReLoRATrainConfig)


@dataclass
class OptimConfig:
    name: str = _f("adamw", "Optimizer.", choices=OPTIMIZERS)
    weight_decay: float = _f(0.1, "Decoupled weight decay (not applied to norms and biases).")
    beta1: float = _f(0.9, "Adam beta1.")
    beta2: float = _f(0.95, "Adam beta2.")
    eps: float = _f(1e-8, "Adam epsilon.")
    fused: str = _f("auto", "Fused Adam: auto = apex FusedAdam if importable on GPU, else torch's fused AdamW "
                    "on GPU, plain AdamW on CPU.", choices=["auto", "apex", "torch", "none"])
    rank: int = _f(128, "galore/fira: rank r of the gradient projection of every attention and MLP weight "
                   "(at most min(d_in, d_out) of each, of its local shard under tensor parallelism).")
    update_proj_gap: int = _f(200, "galore/fira: steps between SVD refreshes of the projection (T).")
    scale: float = _f(0.25, "galore/fira: scale alpha of the back-projected update.")
    proj_type: str = _f("std", "galore/fira: which side is projected: std = the smaller side, reverse_std = the "
                        "larger, left, right, full = both (galore only).",
                        choices=["std", "reverse_std", "left", "right", "full"])
    fira_limiter: float = _f(1.01, "fira: norm-growth limiter gamma: the residual's norm may grow at most by this "
                             "factor per step (>= 1).")


@dataclass
class ParallelConfig:
    tensor: int = _f(1, "Tensor-parallel size: consecutive ranks split each layer (DP = world / tensor).")
    sequence: bool = _f(False, "Megatron-style sequence parallelism inside the TP group (needs tensor > 1): "
                        "norms and the residual stream hold N/tensor tokens per rank.")
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


# ---- ttt: test-time context training (qTTT); validated by megatrain.ttt.config.validate_ttt ----
@dataclass
class TTTTaskConfig:
    """`ttt.task.*`: what qTTT is evaluated on (megatrain/data/longcontext.py)."""
    kind: str = _f("passkey", "needle / passkey / multikey retrieval in the held-out novel, or jsonl (a real "
                   "long-context set at ttt.task.path).", choices=["needle", "passkey", "multikey", "jsonl"])
    path: Optional[str] = _f(None, "jsonl: the file, one record per line.")
    context_field: str = _f("context", "jsonl: field of the context text.")
    question_field: str = _f("question", "jsonl: field of the question.")
    answer_field: str = _f("answer", "jsonl: field of the answer (with choices: a letter, an index or the option).")
    choices_field: Optional[str] = _f("choices", "jsonl: field of the options (optional; multiple-choice accuracy).")
    context_lengths: list = _f([256, 512], "Context lengths in tokens (jsonl: contexts are cut to each).")
    depths: list = _f([0.1, 0.5, 0.9], "Needle depths in [0, 1] (retrieval tasks).")
    examples: int = _f(8, "Examples per (length, depth) cell (jsonl: the first N records).")
    keys: int = _f(4, "multikey: needles per context (one is queried).")
    seed: int = _f(0, "Seed of the generated examples.")


@dataclass
class TTTConfig:
    """`ttt.*`: query-only test-time training (megatrain/ttt; docs in megatrain/ttt/adapt.py)."""
    init: Optional[str] = _f(None, "Run, checkpoint or export to evaluate; null = first pretrain a model on the "
                             "retrieval task with this config's model/data/train sections into RUN/pretrain.")
    steps: int = _f(32, "qTTT gradient steps N per example.")
    span: int = _f(128, "Tokens k per sampled span.")
    lr: float = _f(1e-5, "qTTT learning rate.")
    target: str = _f("q", "Trained parameters: q = every layer's W_Q (IHA: and mix_q), q_lora = a rank-r adapter "
                     "on W_Q.", choices=["q", "q_lora"])
    lora_rank: int = _f(8, "Adapter rank for ttt.target=q_lora.")
    optimizer: str = _f("adamw", "qTTT optimizer (AdamW without weight decay, or plain SGD).", choices=["adamw", "sgd"])
    batch: int = _f(8, "Examples adapted at once (each keeps its own queries).")
    max_new_tokens: int = _f(8, "Answer tokens generated (greedy).")
    think: bool = _f(True, "Also run the FLOP-matched thinking baseline (2 * steps * span tokens before answering).")
    pretrain_documents: int = _f(4000, "Without ttt.init: retrieval documents written for pretraining.")
    task: TTTTaskConfig = field(default_factory=TTTTaskConfig)


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
    ttt: TTTConfig = field(default_factory=TTTConfig)
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
    _validate_parallel(cfg, m)
    _validate_lowrank(cfg, m)
    _validate_iha(cfg, m)
    _validate_task(cfg, m)
    _validate_projection(cfg, m)
    ws = os.environ.get("WORLD_SIZE")
    if ws is not None and ws.isdigit():
        probe = dataclasses.replace(cfg.train)
        copy = dataclasses.replace(cfg, train=probe)
        copy.resolve_batch(int(ws))


def _validate_iha(cfg: Config, m: ModelConfig) -> None:
    """model.iha.*: one line naming the key (docs/iha.md)."""
    iha, tp = m.iha, cfg.parallel.tensor
    if m.attention != "iha":
        changed = [f.name for f in dataclasses.fields(iha) if getattr(iha, f.name) != f.default]
        if changed:
            raise ConfigError(f"model.iha.{changed[0]} applies to model.attention=iha only, but model.attention="
                              f"{m.attention}")
        return
    pseudo = iha.pseudo_heads
    if pseudo < 1:
        raise ConfigError(f"model.iha.pseudo_heads must be >= 1, got {pseudo}")
    if iha.window is not None and (iha.window < 1 or iha.window % pseudo):
        raise ConfigError(f"model.iha.window={iha.window} must be a positive multiple of model.iha.pseudo_heads="
                          f"{pseudo} (it counts virtual tokens), or null")
    if iha.full_every < 1:
        raise ConfigError(f"model.iha.full_every must be >= 1, got {iha.full_every}")
    if iha.schedule == "flop_matched" and iha.window is None:
        short = max(pseudo, cfg.data.seq_len // (2 * pseudo) // pseudo * pseudo)
        raise ConfigError(f"model.iha.schedule=flop_matched needs model.iha.window for the short layers: N/(2P) "
                          f"matches MHA's attention FLOPs, i.e. model.iha.window={short} for data.seq_len="
                          f"{cfg.data.seq_len} and P={pseudo}")
    if iha.head_groups < 1 or m.heads % iha.head_groups:
        raise ConfigError(f"model.iha.head_groups={iha.head_groups} must be >= 1 and divide model.heads={m.heads}")
    if tp > 1 and iha.tp_mode == "local" and iha.head_groups % tp:
        raise ConfigError(f"model.iha.tp_mode=local mixes heads only inside each tensor-parallel rank: set "
                          f"model.iha.head_groups to a multiple of parallel.tensor={tp} (got "
                          f"{iha.head_groups}), or use model.iha.tp_mode=exact")
    if tp > 1 and iha.collapse == "global" and iha.head_groups % tp:
        raise ConfigError(f"model.iha.collapse=global with parallel.tensor={tp} needs model.iha.head_groups a "
                          f"multiple of {tp} (the collapse must not cross ranks), got {iha.head_groups}; or use "
                          f"model.iha.collapse=per_head")
    mode = os.environ.get("MEGATRAIN_KERNELS", "auto").strip().lower() or "auto"
    if mode == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("model.attention=iha with MEGATRAIN_KERNELS=triton needs a CUDA GPU (or "
                              "TRITON_INTERPRET=1 to run the Triton kernel on CPU); unset MEGATRAIN_KERNELS "
                              "to use the PyTorch reference")


def _validate_task(cfg: Config, m: ModelConfig) -> None:
    """data.source=task:* and data.task.*: one line naming the key."""
    d = cfg.data
    source = d.source if isinstance(d.source, str) else ""
    if not source.startswith("task:"):
        return
    from megatrain.data.tasks import TASKS, required_seq_len, task_vocab_size

    name = source[len("task:"):]
    if name not in TASKS:
        raise ConfigError(f"data.source={source!r} is not a synthetic task (allowed: "
                          f"{', '.join('task:' + t for t in TASKS)})")
    t = d.task
    for key in ("pairs", "queries", "hops", "symbols", "train_size", "val_size"):
        if getattr(t, key) < 1:
            raise ConfigError(f"data.task.{key} must be >= 1, got {getattr(t, key)}")
    if name == "multikey":
        if t.queries > t.pairs:
            raise ConfigError(f"data.task.queries={t.queries} exceeds data.task.pairs={t.pairs}")
        if t.symbols < 2 * t.pairs:
            raise ConfigError(f"data.task.symbols={t.symbols} must be >= 2 x data.task.pairs={2 * t.pairs} "
                              f"(keys and values come from separate halves; keys are distinct)")
    else:
        if t.hops > t.pairs:
            raise ConfigError(f"data.task.hops={t.hops} exceeds data.task.pairs={t.pairs}")
        if t.symbols < t.pairs + 1:
            raise ConfigError(f"data.task.symbols={t.symbols} must be > data.task.pairs={t.pairs}")
    need = required_seq_len(name, t)
    if d.seq_len < need:
        raise ConfigError(f"data.seq_len={d.seq_len} is too short for {source} with these data.task sizes: "
                          f"it needs >= {need}")
    vocab = task_vocab_size(t)
    if m.vocab_size is not None and m.vocab_size < vocab:
        raise ConfigError(f"model.vocab_size={m.vocab_size} is smaller than {source}'s vocabulary {vocab} "
                          f"(data.task.symbols + 4)")
    tp = cfg.parallel.tensor
    if m.vocab_size is None and vocab % tp:
        raise ConfigError(f"parallel.tensor={tp} does not divide {source}'s vocabulary {vocab}; set "
                          f"model.vocab_size to a multiple of {tp} (e.g. {-(-vocab // tp) * tp})")


def check_tensor_split(m: ModelConfig, tp: int) -> None:
    """Raise ConfigError unless the resolved model `m` splits over `tp` tensor-parallel ranks."""
    if tp == 1:
        return
    if m.linear != "dense":
        raise ConfigError(f"parallel.tensor={tp} supports model.linear=dense only so far, got model.linear={m.linear!r}")
    if m.heads % tp:
        raise ConfigError(f"parallel.tensor={tp} does not divide model.heads={m.heads}")
    if m.kv_heads % tp and tp % m.kv_heads:
        raise ConfigError(f"parallel.tensor={tp} and model.kv_heads={m.kv_heads}: one must divide the other "
                          f"(fewer KV heads than TP ranks are replicated)")
    if m.ffn_dim % tp:
        raise ConfigError(f"parallel.tensor={tp} does not divide model.ffn_dim={m.ffn_dim}")
    if m.vocab_size is not None and m.vocab_size % tp:
        raise ConfigError(f"parallel.tensor={tp} does not divide model.vocab_size={m.vocab_size}; set "
                          f"model.vocab_size to a multiple of {tp}")


def _validate_parallel(cfg: Config, m: ModelConfig) -> None:
    """Tensor-parallel sizes that cannot split this model, refused before any process group starts."""
    p = cfg.parallel
    tp = p.tensor
    if tp < 1:
        raise ConfigError(f"parallel.tensor must be >= 1, got {tp}")
    if p.sequence and tp == 1:
        raise ConfigError("parallel.sequence=true needs parallel.tensor > 1")
    if tp == 1:
        return
    check_tensor_split(m, tp)
    vocab = m.vocab_size if m.vocab_size is not None else (cfg.data.vocab_size if cfg.data.tokenizer == "auto" else None)
    if vocab is not None and vocab % tp:
        key = "model.vocab_size" if m.vocab_size is not None else "data.vocab_size"
        raise ConfigError(f"parallel.tensor={tp} does not divide {key}={vocab}; set model.vocab_size to a multiple "
                          f"of {tp} (e.g. {-(-vocab // tp) * tp})")
    if p.sequence and cfg.data.seq_len % tp:
        raise ConfigError(f"parallel.sequence=true needs data.seq_len={cfg.data.seq_len} divisible by "
                          f"parallel.tensor={tp}")
    if p.zero_stage == 3:
        raise ConfigError("parallel.zero_stage=3 with parallel.tensor > 1 is not supported: megatrain's TP "
                          "checkpoints (consolidated weights, resharding through DeepSpeed universal checkpoints) "
                          "handle ZeRO 0-2 state only; use parallel.zero_stage=1 or 2 with tensor parallelism")


def _validate_lowrank(cfg: Config, m: ModelConfig) -> None:
    """model.lowrank.* and train.relora.*: one line naming the key; fills ReLoRA's derived periods."""
    from megatrain.models.layers import lowrank_options, projection_shapes

    kind, lr, rl, t = m.linear, m.lowrank, cfg.train.relora, cfg.train
    uses = {"rank": ("cola", "sltrain", "relora", "lora"), "alpha": ("sltrain", "relora", "lora"),
            "density": ("sltrain",), "recompute": ("cola",), "dropout": ("relora", "lora")}
    for key, kinds in uses.items():
        if getattr(lr, key) is not None and kind not in kinds:
            raise ConfigError(f"model.lowrank.{key} does not apply to model.linear={kind} (it applies to: "
                              f"{', '.join(kinds)})")
    if kind != "relora":
        changed = [f.name for f in dataclasses.fields(rl) if getattr(rl, f.name) != f.default]
        if changed:
            raise ConfigError(f"train.relora.{changed[0]} applies to model.linear=relora only (this run has "
                              f"model.linear={kind})")
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
            raise ConfigError(f"model.lowrank.rank={rank} exceeds min(d_in, d_out)={min(d_in, d_out)} of projection "
                              f"{role} ({d_in} -> {d_out}); allowed: 1..{smallest}")
    if cfg.optim.name != "adamw":
        # GaLore/Fira project each 2-D factor of CoLA and SLTrain ([d_in, r] and [r, d_out]) like any weight;
        # ReLoRA's restarts re-initialise the adapters and prune their Adam moments, which GaLore keeps in
        # its projected space, so those two do not combine.
        if kind in ("relora", "lora"):
            raise ConfigError(f"optim.name={cfg.optim.name} with model.linear={kind} is not supported: the adapters' "
                              f"optimizer state is reset at restarts (allowed with galore/fira: model.linear=dense, "
                              f"cola, sltrain)")
        if cfg.optim.rank > rank:
            raise ConfigError(f"optim.rank={cfg.optim.rank} exceeds model.lowrank.rank={rank}: galore/fira project "
                              f"the {kind} factors, whose smaller side is the low rank (allowed: 1..{rank})")
    if cfg.parallel.tensor > 1:
        raise ConfigError(f"model.linear={kind} with parallel.tensor={cfg.parallel.tensor} is not supported yet: "
                          f"tensor parallelism splits dense projections only (allowed: parallel.tensor=1)")
    if kind != "relora":
        return
    if cfg.parallel.zero_stage == 3:
        raise ConfigError("model.linear=relora with parallel.zero_stage=3 is not supported: the restarts merge "
                          "whole matrices (allowed: parallel.zero_stage 0, 1 or 2)")
    if rl.every is None:
        rl.every = max(1, t.steps // 10)
    if rl.every < 1:
        raise ConfigError(f"train.relora.every must be >= 1, got {rl.every}")
    if rl.restart_warmup is None:
        rl.restart_warmup = max(1, rl.every // 20)
    if not 0 <= rl.restart_warmup < rl.every:
        raise ConfigError(f"train.relora.restart_warmup must be in [0, train.relora.every={rl.every}), got "
                          f"{rl.restart_warmup}")
    if not 0.0 <= rl.prune_ratio < 1.0:
        raise ConfigError(f"train.relora.prune_ratio must be in [0, 1), got {rl.prune_ratio}")
    if not 0 <= rl.warm_start_steps < t.steps:
        raise ConfigError(f"train.relora.warm_start_steps must be in [0, train.steps={t.steps}), got "
                          f"{rl.warm_start_steps}")


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
        _reference_rows(obj, sec.name, rows)
    return "\n".join(rows)


def _reference_rows(obj, prefix: str, rows: list) -> None:
    """Append one row per key of the config dataclass `obj`; nested sections (model.iha) recurse."""
    for f in dataclasses.fields(obj):
        default = getattr(obj, f.name)
        if dataclasses.is_dataclass(default):
            _reference_rows(default, f"{prefix}.{f.name}", rows)
            continue
        text = f.metadata.get("help", "")
        if "choices" in f.metadata:
            text += " One of: " + ", ".join(f"`{str(c).lower() if isinstance(c, bool) else c}`"
                                            for c in f.metadata["choices"]) + "."
        shown = "null" if default is None else (str(default).lower() if isinstance(default, bool) else default)
        rows.append(f"| `{prefix}.{f.name}` | `{shown}` | {text} |")


def _validate_projection(cfg: Config, m: ModelConfig) -> None:
    """optim.* of galore / fira (docs/galore-fira.md): one line naming the key."""
    o, p = cfg.optim, cfg.parallel
    if o.name == "adamw":
        return
    if o.rank < 1:
        raise ConfigError(f"optim.rank must be >= 1, got {o.rank}")
    if o.update_proj_gap < 1:
        raise ConfigError(f"optim.update_proj_gap must be >= 1, got {o.update_proj_gap}")
    if not o.scale > 0:
        raise ConfigError(f"optim.scale must be > 0, got {o.scale}")
    if not o.fira_limiter >= 1.0:
        raise ConfigError(f"optim.fira_limiter must be >= 1, got {o.fira_limiter}")
    if o.name == "fira" and o.proj_type == "full":
        raise ConfigError("optim.proj_type=full is not supported by optim.name=fira (allowed: std, reverse_std, "
                          "left, right)")
    if p.zero_stage == 3:
        raise ConfigError(f"optim.name={o.name} needs whole weight matrices, which ZeRO-3 partitions; use "
                          f"parallel.zero_stage 0, 1 or 2")
    bf16 = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and _cuda_available())
    if p.zero_stage == 0 and bf16:
        raise ConfigError(f"optim.name={o.name} with parallel.zero_stage=0 and bf16 is not supported (DeepSpeed's "
                          f"stage-0 bf16 optimizer flattens the weights); use parallel.zero_stage=1 or 2")
    from megatrain.models.layers import projection_shapes

    tp, head_dim = p.tensor, m.dim // m.heads
    for role, d_in, d_out in projection_shapes(m):
        if tp > 1 and role in ("attn.o", "mlp.down"):
            d_in //= tp       # row-parallel: each rank holds a slice of the input dim
        elif tp > 1:
            d_out = max(d_out // tp, head_dim) if role in ("attn.k", "attn.v") else d_out // tp
        if o.rank > min(d_in, d_out):
            where = f" (its local shard under parallel.tensor={tp})" if tp > 1 else ""
            raise ConfigError(f"optim.rank={o.rank} exceeds min(d_in, d_out)={min(d_in, d_out)} of projection {role} "
                              f"({d_in} -> {d_out}){where}; allowed: 1..{min(d_in, d_out)}")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
