"""Run configuration: the schema, YAML loading, `a.b=c` overrides and the reference table.

One YAML file describes a run. Keys are grouped in sections (`run`, `model`, `data`, `train`,
`optim`, `parallel`, `checkpoint`, `log`), the sections the jobs own (`rl`, `ttt`: see below), and a
free-form `deepspeed` section that is merged over the DeepSpeed config megatrain generates. Every field
carries a help string in its metadata; the README's config reference is generated from it
(`megatrain config --reference`). The loader checks every value against its field's type, list
elements included (`rl.eval.k: list[int]` refuses `[1, x]` naming `rl.eval.k[1]`).

A job owns its section, schema and checks together: megatrain/rl/config.py defines and registers
`rl.*`, megatrain/ttt/config.py `ttt.*` (`register_section`). This module never imports them; the
package root declares their modules (`megatrain.fields.declare_section_module`) and this module
imports the declared ones before it first builds a Config, so every process knows every section.

`load_config` validates: each domain checks its own section (`ModelConfig.validate` in
megatrain/models/config.py, the tensor-parallel splits in megatrain/parallel/checks.py, the
synthetic tasks in megatrain/data/tasks.py), and this module checks the rest and the rules that join
sections. The jobs' sections are validated by their jobs' preflights (`validate_rl`, `validate_ttt`).
Validation reads no environment and changes nothing. What depends on where the run happens (world
size, CUDA, the kernel backend) is resolved in one explicit step, `Config.resolve`, which the
trainer's preflight calls before any process group starts.

Errors are raised as ConfigError with one line naming the key and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from megatrain.errors import ConfigError
from megatrain.fields import config_field, parse_number, section_modules
from megatrain.models.config import FROZEN_BASE_KINDS, ModelConfig
from megatrain.models.layers import lowrank_options, projection_shapes
from megatrain.parallel.checks import check_context_split, check_tensor_split, check_vocab_split
from megatrain.parallel.pipeline import check_pipeline

__all__ = [
    "Config",
    "ConfigError",
    "load_config",
    "parse_overrides",
    "validate",
    "config_reference",
    "save_config",
    "register_section",
    "registered_sections",
]


_f = config_field  # every key below is declared with it

OPTIMIZERS = ["adamw", "galore", "fira"]  # galore / fira: docs/galore-fira.md


@dataclass
class RunConfig:
    dir: str = _f(
        "runs/default",
        "Run directory: resolved config, metrics.jsonl, tb/, checkpoints/. "
        "Nothing is written outside it (except the shared token/tokenizer cache).",
    )

    def path(self, *parts: str) -> str:
        """run.dir joined with `parts`, for writing. ConfigError when a part taken from a config (a sub-run
        name, a pipeline) would lead outside run.dir: an absolute path, `..`, or a link that leaves it."""
        root = os.path.realpath(self.dir)
        out = os.path.realpath(os.path.join(root, *[str(p) for p in parts]))
        if os.path.commonpath([root, out]) != root or out == root and parts:
            raise ConfigError(
                f"'{os.path.join(*[str(p) for p in parts])}' leads outside run.dir '{self.dir}'; "
                f"every output of a run is written inside run.dir"
            )
        return os.path.join(self.dir, *[str(p) for p in parts])


@dataclass
class TaskConfig:
    """`data.task.*`: sizes of the synthetic tasks (data.source=task:multikey or task:multihop;
    megatrain/data/tasks.py)."""

    pairs: int = _f(8, "Key-value pairs written in each context.")
    queries: int = _f(4, "multikey: keys queried after the context (a subset of the pairs, each answered).")
    hops: int = _f(2, "multihop: lookups chained from the query to the answer.")
    symbols: int = _f(60, "Distinct key/value symbols; the vocabulary is symbols + 4 special tokens.")
    length: int = _f(
        0,
        "Tokens per sequence: a gap of <pad> tokens between the context and the queries "
        "stretches each sequence to this length (the context-length axis of the retrieval studies); "
        "0 = no gap.",
    )
    train_size: int = _f(100000, "Training sequences (generated on the fly from data.task.seed).")
    val_size: int = _f(
        256, "Validation sequences (a different random stream); exact-match accuracy is reported on them."
    )
    seed: int = _f(0, "Seed of the task's generator (train and validation streams derive from it).")


@dataclass
class DataConfig:
    source: str | list[str] = _f(
        "embedded",
        "Training text: 'embedded' (the shipped Austen corpus), a file, a "
        "glob, a directory, a list of these (.txt/.txt.gz/.jsonl/.json/.parquet), "
        "'hf:NAME[:SPLIT]', or a synthetic task: 'task:multikey' or 'task:multihop' (sizes "
        "in data.task.*).",
    )
    val_source: Optional[str | list[str]] = _f(
        None,
        "Validation text, same forms as source. Default: the held-out "
        "novel for 'embedded'; otherwise the last val_fraction of the "
        "training blocks.",
    )
    val_fraction: float = _f(0.01, "Fraction of training blocks held out when val_source is not given.")
    text_field: str = _f("text", "Field holding the text in jsonl/parquet/hub records.")
    seq_len: int = _f(256, "Tokens per training sequence (blocks are packed, EOS between documents).")
    tokenizer: str = _f(
        "auto", "A sentencepiece .model file, or 'auto': train one on the training source once and cache it."
    )
    vocab_size: int = _f(4096, "Vocabulary size when data.tokenizer is 'auto'.")
    tokenizer_type: str = _f("bpe", "Sentencepiece model type when training.", choices=["bpe", "unigram"])
    cache_dir: Optional[str] = _f(
        None, "Cache for trained tokenizers and token arrays (default: $MEGATRAIN_CACHE or ~/.cache/megatrain)."
    )
    task: TaskConfig = field(default_factory=TaskConfig)


@dataclass
class ReLoRATrainConfig:
    """`train.relora.*`: ReLoRA's restarts (model.linear=relora only; docs/lowrank.md)."""

    every: Optional[int] = _f(
        None,
        "Merge the adapters into W and restart every N optimizer steps "
        "(default: train.steps/10, ReLoRA's 2000 of 20000).",
    )
    prune: str = _f(
        "magnitude",
        "At a restart, the adapters' Adam state is magnitude-pruned or reset to zero.",
        choices=["magnitude", "reset"],
    )
    prune_ratio: float = _f(0.9, "Fraction of each adapter's Adam state zeroed by magnitude pruning, in [0, 1).")
    restart_warmup: Optional[int] = _f(
        None, "Linear learning-rate re-warm-up steps after each restart (default: every/20, ReLoRA's 100 of 2000)."
    )
    warm_start_steps: int = _f(0, "Train full-rank (W trainable, adapters off) for this many steps first.")


@dataclass
class TrainConfig:
    steps: int = _f(1000, "Optimizer steps in the schedule.")
    micro_batch: int = _f(8, "Sequences per process per micro-step.")
    grad_accum: Optional[int] = _f(None, "Micro-steps per optimizer step (default: derived from global_batch, else 1).")
    global_batch: Optional[int] = _f(
        None, "Sequences per optimizer step = micro_batch x grad_accum x DP (default: derived)."
    )
    seed: int = _f(1234, "Seed for init, data order and RNG streams.")
    lr: float = _f(3e-4, "Peak learning rate.")
    min_lr_ratio: float = _f(0.1, "Final learning rate as a fraction of lr.")
    warmup_steps: int = _f(100, "Linear warm-up steps.")
    schedule: str = _f("cosine", "Decay after warm-up.", choices=["cosine", "linear", "constant"])
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this (0 disables).")
    dtype: str = _f("auto", "Training precision: auto = bf16 on GPU, fp32 on CPU.", choices=["auto", "fp32", "bf16"])
    activation_checkpointing: bool = _f(False, "Recompute each block's activations in backward.")
    compile: bool = _f(
        False,
        "Compile the model with torch.compile (through DeepSpeed's engine.compile); the "
        "first steps pay for the compilation. megatrain's Triton kernels are torch custom ops, so "
        "the model compiles without graph breaks; the first step's log line counts them.",
    )
    compile_backend: str = _f(
        "inductor",
        "torch.compile backend for train.compile: inductor (generated kernels), "
        "aot_eager (AOT autograd traced, eager kernels: tracing without code generation) or "
        "eager (dynamo's graphs run as they are).",
        choices=["inductor", "aot_eager", "eager"],
    )
    stop_after: Optional[int] = _f(None, "Checkpoint and stop at this step without changing the schedule.")
    max_nonfinite: int = _f(5, "Abort after this many non-finite losses in a row (each such step is skipped).")
    auto_resume: Optional[bool] = _f(
        None,
        "Resume from run.dir's latest checkpoint without --resume (a fresh start "
        "when it has none). null = on under an elastic launch (torchrun --max-restarts "
        "N > 0), so a restarted worker continues on its own; off otherwise.",
    )
    spike_window: int = _f(
        100,
        "Loss-spike detection: a step's loss is compared with the mean and standard "
        "deviation of the last N accepted losses (0 disables).",
    )
    spike_zscore: float = _f(
        6.0,
        "A loss more than this many standard deviations above the window's mean is a "
        "spike: logged (metrics.jsonl `spike_z`).",
    )
    spike_skip: bool = _f(
        False,
        "Also skip a spike's update on every rank (the batch is consumed, the weights "
        "and optimizer state do not change).",
    )
    init_from: Optional[str] = _f(
        None,
        "Start from these weights, with a fresh optimizer at step 0: a run, checkpoint "
        "or export directory, or a Hugging Face Llama folder (docs/huggingface.md). model.* "
        "must describe the same model and data.tokenizer name its tokenizer. Not used when "
        "--resume finds a checkpoint.",
    )
    relora: ReLoRATrainConfig = field(default_factory=ReLoRATrainConfig)


@dataclass
class OptimConfig:
    name: str = _f("adamw", "Optimizer.", choices=OPTIMIZERS)
    weight_decay: float = _f(0.1, "Decoupled weight decay (not applied to norms and biases).")
    beta1: float = _f(0.9, "Adam beta1.")
    beta2: float = _f(0.95, "Adam beta2.")
    eps: float = _f(1e-8, "Adam epsilon.")
    fused: str = _f(
        "auto",
        "Fused Adam: auto = apex FusedAdam if importable on GPU, else torch's fused AdamW on GPU, plain AdamW on CPU.",
        choices=["auto", "apex", "torch", "none"],
    )
    rank: int = _f(
        128,
        "galore/fira: rank r of the gradient projection of every attention and MLP weight "
        "(at most min(d_in, d_out) of each, of its local shard under tensor parallelism).",
    )
    update_proj_gap: int = _f(200, "galore/fira: steps between SVD refreshes of the projection (T).")
    scale: float = _f(0.25, "galore/fira: scale alpha of the back-projected update.")
    proj_type: str = _f(
        "std",
        "galore/fira: which side is projected: std = the smaller side, reverse_std = the "
        "larger, left, right, full = both (galore only).",
        choices=["std", "reverse_std", "left", "right", "full"],
    )
    fira_limiter: float = _f(
        1.01, "fira: norm-growth limiter gamma: the residual's norm may grow at most by this factor per step (>= 1)."
    )


@dataclass
class ParallelConfig:
    tensor: int = _f(1, "Tensor-parallel size: consecutive ranks split each layer (DP = world / tensor).")
    sequence: bool = _f(
        False,
        "Megatron-style sequence parallelism inside the TP group (needs tensor > 1): "
        "norms and the residual stream hold N/tensor tokens per rank.",
    )
    zero_stage: int = _f(2, "DeepSpeed ZeRO stage.", choices=[0, 1, 2, 3])
    context: int = _f(
        1,
        "Context-parallel size C (Ulysses, docs/parallelism.md): each sequence is split over C "
        "ranks everywhere but attention, where an all-to-all gives each rank the whole sequence for "
        "heads/C heads. DP = world / (tensor x context).",
    )
    pipeline: int = _f(
        1,
        "Pipeline-parallel stages S (DeepSpeed's pipeline engine, 1F1B schedule; "
        "docs/parallelism.md): stage s holds ranks [s world/S, (s+1) world/S). DP = world / (tensor x "
        "pipeline).",
    )
    microbatches: Optional[int] = _f(
        None,
        "Micro-batches per pipeline step (= train.grad_accum; default: from the "
        "batch arithmetic, global_batch / (micro_batch x DP)).",
    )
    pipeline_partition: Optional[list[int]] = _f(
        None,
        "Decoder blocks per pipeline stage (the embedding goes with the "
        "first, the final norm and head with the last); default: balanced by "
        "parameters.",
    )
    backend: str = _f(
        "auto", "torch.distributed backend: auto = nccl on GPU, gloo on CPU.", choices=["auto", "nccl", "gloo"]
    )
    timeout_s: float = _f(
        1800.0,
        "Seconds one phase of a step (forward, backward, optimizer step, checkpoint, "
        "evaluation, with their collectives) may take before the watchdog ends the job with a line "
        "naming the stalled rank and the operation; must exceed the longest checkpoint save.",
    )


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
    analyze_every: int = _f(
        0,
        "Spectra of the learned updates W_t - W_0 (effective and stable rank per projection "
        "kind, megatrain.analysis) every N steps into metrics.jsonl and tensorboard (0 disables).",
    )
    heartbeat_every: int = _f(
        100,
        "Every N steps the step's metrics record gets `heartbeat`: [{rank, "
        "since_last_step_s}] for every rank (0 disables).",
    )


# ----------------------------------------------------------------------------------------------
# sections owned by the jobs


_SECTIONS: dict[str, type] = {}


def register_section(name: str, schema: type) -> None:
    """Add the config dataclass `schema` as the run's section `name` (keys `name.*`, `cfg.name`).

    A job owns its section: the schema and its checks live in the job's package (megatrain/rl/config.py
    registers `rl`, megatrain/ttt/config.py `ttt`), which calls this when imported; its module is
    declared with `megatrain.fields.declare_section_module` so every process imports it before the
    first Config is built. Loading, overrides, type checks, the saved config and the reference table
    treat a registered section like a built-in one; the job validates its values itself.
    """
    if not dataclasses.is_dataclass(schema) or not isinstance(schema, type):
        raise TypeError(f"config section '{name}': the schema must be a dataclass, got {schema!r}")
    if name in _CORE_SECTIONS:
        raise ValueError(f"config section '{name}' is built in and cannot be registered")
    if _SECTIONS.get(name, schema) is not schema:
        raise ValueError(
            f"config section '{name}' is registered twice ({_SECTIONS[name].__qualname__} and {schema.__qualname__})"
        )
    _SECTIONS[name] = schema


def registered_sections() -> dict[str, type]:
    """name -> schema of every registered section, in the order their modules were declared.

    Imports the declared section modules first (megatrain.fields.section_modules), so the answer is the
    same whichever modules a process happened to import before.
    """
    declared = section_modules()
    for module in declared:
        importlib.import_module(module)
    rank = {module: i for i, module in enumerate(declared)}
    return dict(sorted(_SECTIONS.items(), key=lambda item: rank.get(item[1].__module__, len(rank))))


@dataclass
class Config:
    """The run's config: the built-in sections below, the registered ones (`register_section`: `rl`,
    `ttt`) after `log`, and the free-form `deepspeed` last, in that order everywhere (a saved
    config.yaml, `megatrain config --reference`)."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    deepspeed: dict = field(
        default_factory=dict,
        metadata={"help": "Raw DeepSpeed config merged over the generated one (or pass --deepspeed ds.json)."},
    )

    def __post_init__(self) -> None:
        for name, schema in registered_sections().items():
            setattr(self, name, schema())

    def sections(self) -> list[tuple[str, Any]]:
        """(name, value) of every section, built-in and registered, in the config file's order."""
        names = [n for n in _CORE_SECTIONS if n != "deepspeed"] + list(registered_sections()) + ["deepspeed"]
        return [(name, getattr(self, name)) for name in names]

    def to_dict(self) -> dict:
        return {
            name: dataclasses.asdict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
            for name, value in self.sections()
        }

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self.to_dict() == other.to_dict()

    def resolve(self, world_size: int, *, cuda: bool = False, triton_needs_cuda: bool = False) -> "Config":
        """Fill the values that depend on where the run happens, in place; returns self.

        The one step that turns a validated config into the run's: train.grad_accum and
        train.global_batch from the batch arithmetic over DP = world_size / parallel.tensor, the
        ReLoRA periods (model.linear=relora), and the rules that depend on the machine.

        Args:
            world_size: processes of the run.
            cuda: whether they run on GPUs (train.dtype=auto then means bf16).
            triton_needs_cuda: MEGATRAIN_KERNELS=triton without Triton's CPU interpreter
                (`megatrain.kernels.triton_needs_cuda()`).

        The trainer's preflight calls it with what the process detects
        (`megatrain.engine.trainer.resolve_config`). Raises ConfigError (one line).
        """
        self._resolve_batch(world_size)
        if self.model.linear == "relora":
            self.train.relora.every, self.train.relora.restart_warmup = relora_periods(self.train)
        _check_projection_precision(self, bf16=self.train.dtype == "bf16" or (self.train.dtype == "auto" and cuda))
        if self.model.attention == "iha" and triton_needs_cuda and not cuda:
            raise ConfigError(
                "model.attention=iha with MEGATRAIN_KERNELS=triton needs a CUDA GPU (or "
                "TRITON_INTERPRET=1 to run the Triton kernel on CPU); unset MEGATRAIN_KERNELS "
                "to use the PyTorch reference"
            )
        return self

    def _resolve_batch(self, world_size: int) -> None:
        """Check the TP/DP layout and the batch arithmetic for `world_size` processes; fill derived values."""
        p, t = self.parallel, self.train
        if world_size % p.tensor:
            raise ConfigError(f"parallel.tensor={p.tensor} does not divide the world size {world_size}")
        if world_size % (p.tensor * p.context):
            raise ConfigError(
                f"parallel.tensor x parallel.context = {p.tensor} x {p.context} does not divide the "
                f"world size {world_size}"
            )
        dp = world_size // (p.tensor * p.context)
        if p.pipeline > 1:  # megatrain.parallel.pipeline: stages split the world before TP x DP does
            dp = _pipeline_dp(world_size, p, t)
        mb = t.micro_batch
        if t.global_batch is None:
            t.grad_accum = t.grad_accum or 1
            t.global_batch = mb * t.grad_accum * dp
        elif t.grad_accum is None:
            if t.global_batch % (mb * dp):
                raise ConfigError(
                    f"train.global_batch={t.global_batch} is not a multiple of train.micro_batch x DP = "
                    f"{mb} x {dp} = {mb * dp}"
                )
            t.grad_accum = t.global_batch // (mb * dp)
        elif t.global_batch != mb * t.grad_accum * dp:
            raise ConfigError(
                f"train.global_batch={t.global_batch} != train.micro_batch x train.grad_accum x DP = "
                f"{mb} x {t.grad_accum} x {dp} = {mb * t.grad_accum * dp} (world size {world_size}, "
                f"parallel.tensor={p.tensor}" + (f", parallel.context={p.context})" if p.context > 1 else ")")
            )


def _pipeline_dp(world_size: int, p, t) -> int:
    """DP size with parallel.pipeline stages; parallel.microbatches is train.grad_accum under another name."""
    if p.context > 1:
        raise ConfigError("parallel.pipeline > 1 with parallel.context > 1 is not supported yet")
    if world_size % (p.tensor * p.pipeline):
        raise ConfigError(
            f"parallel.tensor x parallel.pipeline = {p.tensor} x {p.pipeline} does not divide the world "
            f"size {world_size}"
        )
    if p.microbatches is not None:
        if t.grad_accum is not None and t.grad_accum != p.microbatches:
            raise ConfigError(
                f"parallel.microbatches={p.microbatches} disagrees with train.grad_accum={t.grad_accum}; "
                f"set one of them"
            )
        t.grad_accum = p.microbatches
    return world_size // (p.tensor * p.pipeline)


_CORE_SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


def relora_periods(train: TrainConfig) -> tuple[int, int]:
    """(every, restart_warmup) of ReLoRA's restarts: train.relora.* or their defaults, train.steps/10
    and every/20 (ReLoRA's 2000 of 20000 steps, 100 of 2000)."""
    relora = train.relora
    every = relora.every if relora.every is not None else max(1, train.steps // 10)
    restart_warmup = relora.restart_warmup if relora.restart_warmup is not None else max(1, every // 20)
    return every, restart_warmup


# ----------------------------------------------------------------------------------------------
# type checking / coercion


_TYPE_NAMES = {
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    str: ("a string", "strings"),
    bool: ("true or false", "booleans"),
    dict: ("a mapping", "mappings"),
}


def _type_name(tp, plural: bool = False) -> str:
    """What a key of type `tp` holds, in words: `str | list[str]` -> "a string or a list of strings"."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        words = " or ".join(_type_name(a, plural) for a in args if a is not type(None))
        return words + (", or null" if type(None) in args else "")
    if origin is list:
        return ("lists of " if plural else "a list of ") + _type_name(typing.get_args(tp)[0], plural=True)
    if tp is Any:
        return "any values" if plural else "any value"
    return _TYPE_NAMES[tp][plural] if tp in _TYPE_NAMES else getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp, choices=None):
    """`value` read as a key of type `tp` (a list element's key is `key[i]`); ConfigError, one line naming
    the key and what it may hold, for anything else."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        if len(arms) == 1:
            return _coerce(key, value, arms[0], choices)
        lists = [a for a in arms if typing.get_origin(a) is list]
        if isinstance(value, list) and lists:  # a list is checked element by element
            return _coerce(key, value, lists[0], choices)
        for arm in arms:
            if arm not in lists:
                try:
                    return _coerce(key, value, arm, choices)
                except ConfigError:
                    pass
        raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")
        item = typing.get_args(tp)[0]
        return [_coerce(f"{key}[{i}]", x, item) for i, x in enumerate(value)]
    if tp is Any:
        return value
    out = value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {type(value).__name__} {value!r}")
    elif tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            out = value.lower() == "true"
        elif not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
    elif tp in (int, float):
        out = parse_number(key, value, integer=tp is int)
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
    sections = registered_sections() if isinstance(obj, Config) else {}
    allowed = [name for name, _ in obj.sections()] if isinstance(obj, Config) else list(fields)
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields and key not in sections:
            raise ConfigError(
                f"unknown config key '{full}' (allowed under '{prefix.rstrip('.') or 'top level'}': "
                f"{', '.join(allowed)})"
            )
        tp = sections[key] if key in sections else hints[key]
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
        raise ConfigError(
            f"{what} file '{path}' is not valid {'JSON' if path.endswith('.json') else 'YAML'}: {first}"
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} file '{path}' must hold a mapping at the top level")
    return data


# DeepSpeed JSON keys that have a megatrain home; a `--deepspeed` file sets them there (not "auto").
_DS_TO_CONFIG = {
    "train_micro_batch_size_per_gpu": ("train", "micro_batch"),
    "gradient_accumulation_steps": ("train", "grad_accum"),
    "train_batch_size": ("train", "global_batch"),
    "gradient_clipping": ("train", "grad_clip"),
}


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


def load_config(
    path: Optional[str] = None, overrides: Optional[list[str]] = None, deepspeed_json: Optional[str] = None
) -> Config:
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
    """Every check that needs neither a process group nor the machine; reads only `cfg`, changes nothing.

    What depends on the world size, CUDA or the kernel backend is `Config.resolve`'s.
    """
    m = cfg.model.resolved()
    m.validate(seq_len=cfg.data.seq_len)
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
    if t.init_from is not None and d.tokenizer == "auto":
        raise ConfigError(
            f"train.init_from='{t.init_from}' needs data.tokenizer: the sentencepiece model those "
            f"weights were trained with (a new 'auto' tokenizer would not match their embedding)"
        )
    if cfg.checkpoint.every < 0 or cfg.checkpoint.keep < 0:
        raise ConfigError("checkpoint.every and checkpoint.keep must be >= 0")
    if t.spike_window < 0 or not t.spike_zscore > 0 or not math.isfinite(t.spike_zscore):
        raise ConfigError(
            f"train.spike_window must be >= 0 and train.spike_zscore a finite number > 0, got "
            f"{t.spike_window} and {t.spike_zscore}"
        )
    if not cfg.parallel.timeout_s > 0 or not math.isfinite(cfg.parallel.timeout_s):
        raise ConfigError(f"parallel.timeout_s must be a finite number > 0, got {cfg.parallel.timeout_s}")
    if cfg.log.heartbeat_every < 0:
        raise ConfigError(f"log.heartbeat_every must be >= 0, got {cfg.log.heartbeat_every}")
    if cfg.log.every < 1:
        raise ConfigError(f"log.every must be >= 1, got {cfg.log.every}")
    if cfg.log.eval_every < 0 or cfg.log.eval_batches < 1:
        raise ConfigError("log.eval_every must be >= 0 and log.eval_batches >= 1")
    if cfg.log.analyze_every < 0:
        raise ConfigError(f"log.analyze_every must be >= 0, got {cfg.log.analyze_every}")
    _validate_parallel(cfg, m)
    _validate_lowrank_training(cfg, m)
    _validate_task(cfg, m)
    _validate_projection(cfg, m)
    _check_projection_precision(cfg, bf16=cfg.train.dtype == "bf16")


def _validate_parallel(cfg: Config, m: ModelConfig) -> None:
    """parallel.*: layouts that cannot split this model, refused before any process group starts."""
    p = cfg.parallel
    tp = p.tensor
    if tp < 1:
        raise ConfigError(f"parallel.tensor must be >= 1, got {tp}")
    _validate_context(cfg, m)
    check_pipeline(p, m, cfg.train, cfg.optim.name)
    if p.sequence and tp == 1:
        raise ConfigError("parallel.sequence=true needs parallel.tensor > 1")
    if tp == 1:
        return
    check_tensor_split(m, tp)
    if m.vocab_size is None and cfg.data.tokenizer == "auto":  # the tokenizer will be trained to this size
        check_vocab_split(cfg.data.vocab_size, tp, f"data.vocab_size={cfg.data.vocab_size}")
    if p.sequence and cfg.data.seq_len % tp:
        raise ConfigError(
            f"parallel.sequence=true needs data.seq_len={cfg.data.seq_len} divisible by parallel.tensor={tp}"
        )
    if p.zero_stage == 3:
        raise ConfigError(
            "parallel.zero_stage=3 with parallel.tensor > 1 is not supported: megatrain's TP "
            "checkpoints (consolidated weights, resharding through DeepSpeed universal checkpoints) "
            "handle ZeRO 0-2 state only; use parallel.zero_stage=1 or 2 with tensor parallelism"
        )


def _validate_context(cfg: Config, m: ModelConfig) -> None:
    """parallel.context (Ulysses context parallelism, docs/parallelism.md): what splits, and what it composes with."""
    p = cfg.parallel
    if p.context < 1:
        raise ConfigError(f"parallel.context must be >= 1, got {p.context}")
    if p.context == 1:
        return
    check_context_split(m, p.context, p.tensor, cfg.data.seq_len)
    if p.sequence:
        raise ConfigError(
            "parallel.sequence=true with parallel.context > 1 is not supported (context parallelism "
            "already splits the sequence outside attention); use one of them"
        )
    if m.attention == "iha" and p.tensor > 1:
        raise ConfigError(
            "model.attention=iha with parallel.context > 1 and parallel.tensor > 1 is not supported "
            "(IHA mixes every head on each context rank); use parallel.tensor=1 with context"
        )
    if cfg.optim.name != "adamw":
        raise ConfigError(
            f"optim.name={cfg.optim.name} with parallel.context > 1 is not supported (its projected "
            f"weights are reduced outside ZeRO, over data-parallel ranks only); use optim.name=adamw"
        )


def _validate_task(cfg: Config, m: ModelConfig) -> None:
    """A generated data.source (task:*): the data domain checks its own keys; this checks how its
    vocabulary meets model.vocab_size and tensor parallelism."""
    from megatrain.data.sources import source_kind

    kind = source_kind(cfg.data.source)
    if kind is None:
        return
    kind.validate(cfg.data)  # data.source, data.task.*, data.seq_len: one line naming the key
    vocab, source = kind.vocab_size(cfg.data), cfg.data.source
    if m.vocab_size is not None and m.vocab_size < vocab:
        raise ConfigError(
            f"model.vocab_size={m.vocab_size} is smaller than {source}'s vocabulary {vocab} (data.task.symbols + 4)"
        )
    if m.vocab_size is None:
        check_vocab_split(vocab, cfg.parallel.tensor, f"{source}'s vocabulary {vocab}")


def _validate_lowrank_training(cfg: Config, m: ModelConfig) -> None:
    """The low-rank kinds against the other sections: train.relora.*, optim.*, parallel.*."""
    kind, relora, t = m.linear, cfg.train.relora, cfg.train
    if kind != "relora":
        changed = [f.name for f in dataclasses.fields(relora) if getattr(relora, f.name) != f.default]
        if changed:
            raise ConfigError(
                f"train.relora.{changed[0]} applies to model.linear=relora only (this run has model.linear={kind})"
            )
    if kind == "dense":
        return
    rank = lowrank_options(m).rank
    if cfg.optim.name != "adamw":
        # GaLore/Fira project each 2-D factor of CoLA and SLTrain ([d_in, r] and [r, d_out]) like any weight;
        # ReLoRA's restarts re-initialise the adapters and prune their Adam moments, which GaLore keeps in
        # its projected space, so those two do not combine.
        if kind in FROZEN_BASE_KINDS:
            raise ConfigError(
                f"optim.name={cfg.optim.name} with model.linear={kind} is not supported: the adapters' "
                f"optimizer state is reset at restarts (allowed with galore/fira: model.linear=dense, "
                f"cola, sltrain)"
            )
        if cfg.optim.rank > rank:
            raise ConfigError(
                f"optim.rank={cfg.optim.rank} exceeds model.lowrank.rank={rank}: galore/fira project "
                f"the {kind} factors, whose smaller side is the low rank (allowed: 1..{rank})"
            )
    if kind != "relora":
        return
    if cfg.parallel.zero_stage == 3:
        raise ConfigError(
            "model.linear=relora with parallel.zero_stage=3 is not supported: the restarts merge "
            "whole matrices (allowed: parallel.zero_stage 0, 1 or 2)"
        )
    every, restart_warmup = relora_periods(t)
    if every < 1:
        raise ConfigError(f"train.relora.every must be >= 1, got {every}")
    if not 0 <= restart_warmup < every:
        raise ConfigError(
            f"train.relora.restart_warmup must be in [0, train.relora.every={every}), got {restart_warmup}"
        )
    if not 0.0 <= relora.prune_ratio < 1.0:
        raise ConfigError(f"train.relora.prune_ratio must be in [0, 1), got {relora.prune_ratio}")
    if not 0 <= relora.warm_start_steps < t.steps:
        raise ConfigError(
            f"train.relora.warm_start_steps must be in [0, train.steps={t.steps}), got {relora.warm_start_steps}"
        )


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
        raise ConfigError(
            "optim.proj_type=full is not supported by optim.name=fira (allowed: std, reverse_std, left, right)"
        )
    if p.zero_stage == 3:
        raise ConfigError(
            f"optim.name={o.name} needs whole weight matrices, which ZeRO-3 partitions; use "
            f"parallel.zero_stage 0, 1 or 2"
        )
    tp, head_dim = p.tensor, m.head_dim
    for role, d_in, d_out in projection_shapes(m):
        if tp > 1 and role in ("attn.o", "mlp.down"):
            d_in //= tp  # row-parallel: each rank holds a slice of the input dim
        elif tp > 1:
            d_out = max(d_out // tp, head_dim) if role in ("attn.k", "attn.v") else d_out // tp
        if o.rank > min(d_in, d_out):
            where = f" (its local shard under parallel.tensor={tp})" if tp > 1 else ""
            raise ConfigError(
                f"optim.rank={o.rank} exceeds min(d_in, d_out)={min(d_in, d_out)} of projection {role} "
                f"({d_in} -> {d_out}){where}; allowed: 1..{min(d_in, d_out)}"
            )


def _check_projection_precision(cfg: Config, bf16: bool) -> None:
    """galore / fira at ZeRO stage 0 in bf16 (explicit here, train.dtype=auto on GPUs in `Config.resolve`)."""
    if cfg.optim.name != "adamw" and cfg.parallel.zero_stage == 0 and bf16:
        raise ConfigError(
            f"optim.name={cfg.optim.name} with parallel.zero_stage=0 and bf16 is not supported "
            f"(DeepSpeed's stage-0 bf16 optimizer flattens the weights); use parallel.zero_stage=1 or 2"
        )


def save_config(cfg: Config, path: str) -> None:
    from megatrain.files import write_atomic

    write_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_reference() -> str:
    """Markdown table of every key, its default and its help (the README's config reference)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    helps = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(Config)}
    for name, obj in Config().sections():
        if not dataclasses.is_dataclass(obj):
            rows.append(f"| `{name}` | `{{}}` | {helps[name]} |")
            continue
        _reference_rows(obj, name, rows)
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
            text += (
                " One of: "
                + ", ".join(f"`{str(c).lower() if isinstance(c, bool) else c}`" for c in f.metadata["choices"])
                + "."
            )
        shown = "null" if default is None else (str(default).lower() if isinstance(default, bool) else default)
        rows.append(f"| `{prefix}.{f.name}` | `{shown}` | {text} |")
