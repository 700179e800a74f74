"""A run's checkpoints as weight sources read tensor by tensor, its initial weights, its held-out batch.

A weight source is anything with `names` (the tensor names it holds, a tied head once as
embed.weight) and `get(name) -> fp32 CPU tensor`. `CheckpointWeights` reads a checkpoint's
consolidated `model.safetensors` (ZeRO-3 shards gathered and tensor-parallel slices joined when the
checkpoint was written, megatrain.engine.checkpoint) one tensor at a time through a memory map, so
large checkpoints stream matrix by matrix. `initial_weights` rebuilds W_0 with the model's own init
from the run's seed, exactly as the trainer does (each module from a generator keyed by (train.seed, name)).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from megatrain.engine.checkpoint import WEIGHTS_FILE, checkpoint_root, read_meta, resolve_checkpoint_dir
from megatrain.errors import CheckpointError, ConfigError

__all__ = [
    "CheckpointWeights",
    "ModuleWeights",
    "list_checkpoints",
    "checkpoint_dir",
    "build_model",
    "initial_weights",
    "fill_model",
    "run_config",
    "heldout_batches",
    "mean_loss",
    "same_model",
    "same_tokenizer",
]

_STEP_DIR = re.compile(r"^step_(\d+)$")
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, directory) of every complete checkpoint of a run (megatrain.json present), by step."""
    root = checkpoint_root(run_dir)
    out = []
    if os.path.isdir(root):
        for name in os.listdir(root):
            match = _STEP_DIR.match(name)
            path = os.path.join(root, name)
            if match and os.path.isfile(os.path.join(path, "megatrain.json")):
                out.append((int(match.group(1)), path))
    return sorted(out)


def checkpoint_dir(run: str, checkpoint: Optional[str] = None) -> str:
    """The checkpoint to analyse: `checkpoint` (step_N, a number, or a path), else the run's latest.

    Raises CheckpointError (one line) when there is none."""
    if checkpoint is not None:
        if os.path.isdir(checkpoint):
            return checkpoint
        tag = f"step_{checkpoint}" if str(checkpoint).isdigit() else str(checkpoint)
        path = os.path.join(checkpoint_root(run), tag)
        if not os.path.isdir(path):
            steps = ", ".join(f"step_{s}" for s, _ in list_checkpoints(run)) or "none"
            raise CheckpointError(f"--checkpoint {checkpoint}: '{path}' does not exist (this run has: {steps})")
        return path
    path = resolve_checkpoint_dir(os.path.normpath(run))
    if not os.path.isfile(os.path.join(path, WEIGHTS_FILE)):
        raise CheckpointError(
            f"'{run}' is not a megatrain run or checkpoint directory with {WEIGHTS_FILE} "
            f"(a run needs at least one saved checkpoint)"
        )
    return path


class CheckpointWeights:
    """The weights of checkpoint directory `path`, read one tensor at a time (memory-mapped)."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        self.meta = read_meta(path)
        self.step = int(self.meta["step"])
        self.model_cfg = _model_config(self.meta)
        self._file = safe_open(os.path.join(path, WEIGHTS_FILE), framework="pt")
        stored = set(self._file.keys())
        self._alias = {}
        if self.model_cfg.tie_embeddings and "embed.weight" not in stored and "head.weight" in stored:
            self._alias["embed.weight"] = "head.weight"  # safetensors keeps a shared tensor under one name
        self.names = sorted((stored - {"head.weight"} if self.model_cfg.tie_embeddings else stored) | set(self._alias))
        # the stored precision of each tensor (bf16 runs save bf16 weights), see ModuleWeights
        self.dtypes = {
            n: _SAFETENSORS_DTYPES.get(self._file.get_slice(self._alias.get(n, n)).get_dtype()) for n in self.names
        }

    def get(self, name: str) -> Tensor:
        tensor = self._file.get_tensor(self._alias.get(name, name))
        return tensor if not tensor.is_floating_point() else tensor.float()


class ModuleWeights:
    """A module's parameters and persistent buffers as a weight source (a tied head once).

    Shares storage with the module (no copy): never `fill_model` that same module from it.
    `dtypes` (name -> torch dtype) rounds each tensor to that precision first: W_0 built in fp32 and
    compared with the weights of a bf16 run must carry the same rounding the run started from, or
    W_t - W_0 would hold the full-rank rounding error of the init besides the learned update."""

    def __init__(self, module: nn.Module, dtypes: Optional[dict] = None):
        self._state = {k: v for k, v in module.state_dict(keep_vars=False).items()}
        if getattr(getattr(module, "config", None), "tie_embeddings", False):
            self._state.pop("head.weight", None)
        self.names = sorted(self._state)
        self.dtypes = dtypes or {}

    def get(self, name: str) -> Tensor:
        tensor = self._state[name]
        if not tensor.is_floating_point():
            return tensor
        dtype = self.dtypes.get(name)
        if dtype is not None and dtype != tensor.dtype:
            tensor = tensor.to(dtype)
        return tensor.float()


def _model_config(meta: dict):
    from megatrain.models.config import ModelConfig

    return ModelConfig.from_dict(meta["model"])


def build_model(model_cfg, seed: int):
    """The model of `model_cfg` initialised exactly as the trainer does for train.seed = seed (every
    module from its generator keyed by (seed, name), whatever the layout; the global RNG is untouched)."""
    from megatrain.models.transformer import Transformer

    return Transformer(model_cfg, seed=seed).eval()


def initial_weights(meta: dict, dtypes: Optional[dict] = None) -> ModuleWeights:
    """W_0 of the run a checkpoint's megatrain.json `meta` belongs to, rebuilt from its seed (rounded to
    `dtypes`, the precision the checkpoint stores, see ModuleWeights)."""
    if "seed" not in meta:
        raise CheckpointError(
            "the checkpoint's megatrain.json records no seed: use the first checkpoint as the base (--base first)"
        )
    return ModuleWeights(build_model(_model_config(meta), int(meta["seed"])), dtypes)


@torch.no_grad()
def fill_model(model: nn.Module, value: Callable[[str], Tensor]) -> None:
    """Copy value(name) into every parameter and persistent buffer of `model` (a tied head once)."""
    state = model.state_dict(keep_vars=True)
    seen = set()
    for name, tensor in state.items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        tensor.copy_(value(name).to(tensor.dtype))


def same_model(a, b, what: str) -> None:
    """Raise ConfigError unless model configs a and b have the same tensor shapes (interpolation, CKA)."""
    from megatrain.engine.checkpoint import MODEL_KEYS

    for key in MODEL_KEYS:
        if getattr(a, key) != getattr(b, key):
            raise ConfigError(
                f"{what}: the two models differ in model.{key} ({getattr(a, key)!r} vs {getattr(b, key)!r})"
            )


def run_config(run_dir: str, checkpoint: Optional[str] = None):
    """The resolved config a run saved (run.dir/config.yaml).

    With `checkpoint`, data.tokenizer points at the tokenizer.model that checkpoint carries, so the
    data is read with the run's own tokenizer (same bytes, same token cache) and never retrained."""
    from megatrain.config import load_config
    from megatrain.data.sources import source_kind

    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise ConfigError(f"'{run_dir}' has no config.yaml: give a run directory written by megatrain pretrain")
    cfg = load_config(path)
    tokenizer = os.path.join(checkpoint, "tokenizer.model") if checkpoint else None
    if tokenizer and os.path.isfile(tokenizer) and source_kind(cfg.data.source) is None:
        cfg.data.tokenizer = tokenizer
    return cfg


def same_tokenizer(a: str, b: str, what: str) -> None:
    """Raise ConfigError unless checkpoint dirs a and b carry the same tokenizer.model bytes (when both have one)."""
    paths = [os.path.join(p, "tokenizer.model") for p in (a, b)]
    if all(os.path.isfile(p) for p in paths):
        with open(paths[0], "rb") as fa, open(paths[1], "rb") as fb:
            if fa.read() != fb.read():
                raise ConfigError(
                    f"{what}: '{a}' and '{b}' use different tokenizers, so the same held-out batch "
                    f"means different text to them"
                )


@dataclass
class Batches:
    """A fixed held-out set: micro-batches of (inputs, labels), each int64 [B, seq_len]; `source` says whence."""

    items: list
    source: str


def heldout_batches(cfg, num_batches: int, micro_batch: int) -> Batches:
    """The first `num_batches` x `micro_batch` validation blocks of the run (its training blocks if it has no
    validation set), in order: the same fixed batch for every checkpoint and run compared."""
    from megatrain.data import open_data, prepare_data
    from megatrain.data.sampler import val_batches

    prepare_data(cfg)  # idempotent: reuses the run's token cache when it is there
    data = open_data(cfg)
    blocks, source = (data.val, "validation") if data.val is not None else (data.train, "training")
    items = [blocks.batch(indices) for indices in val_batches(blocks, micro_batch, 0, 1, num_batches)]
    return Batches(items=items, source=f"{source} blocks 0..{num_batches * micro_batch - 1} of {cfg.data.source}")


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Batches) -> float:
    """Mean cross-entropy of `model` over the fixed batches."""
    total = 0.0
    for inputs, labels in batches.items:
        total += float(model(inputs, labels=labels))
    return total / len(batches.items)
