"""Checkpoints: DeepSpeed state plus megatrain's own files, committed through an atomic `latest`.

Layout of `run.dir/checkpoints/step_N/`:
  DeepSpeed's files      model / optimizer / ZeRO shards (engine.save_checkpoint, tag step_N)
  rng_rank{R}.pt         each rank's RNG states (tensors only: loads with weights_only=True)
  model.safetensors      consolidated full model weights (ZeRO-3 shards gathered, TP slices joined), for
                         `megatrain.load` and `megatrain export` without unpickling anything
  megatrain.json         step, data position, model config, layout, and a manifest of file sizes

  universal/             written on demand when a run resumes at another TP x DP layout (or by
                         `megatrain reshard`): DeepSpeed's universal form of the ZeRO state

`checkpoints/latest` names the newest complete checkpoint. It is replaced (write + os.replace)
only after every rank finished writing and megatrain.json is on disk, so a crash mid-save leaves
the previous checkpoint as `latest`. Pruning to `checkpoint.keep` happens after that.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatrain.distributed import barrier
from megatrain.errors import CheckpointError

META_FILE = "megatrain.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1

# Model-config keys that must match for a checkpoint to load into a model.
# The model keys a checkpoint must share with the run that loads it (the rest may differ).
MODEL_KEYS = ("dim", "layers", "heads", "kv_heads", "vocab_size", "ffn_dim", "tie_embeddings", "linear",
               "attention")


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def read_latest(root: str) -> Optional[str]:
    """The tag named by `root/latest`, or None when there is none."""
    path = os.path.join(root, "latest")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        tag = fh.read().strip()
    return tag or None


def resolve_checkpoint_dir(path: str) -> str:
    """The checkpoint directory `path` means: a run directory's latest checkpoint (named by its
    `checkpoints/latest`), or `path` itself (a checkpoint or export directory)."""
    root = checkpoint_root(path)
    tag = read_latest(root)
    return os.path.join(root, tag) if tag is not None else path


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def find_resume_checkpoint(run_dir: str, resume) -> Optional[str]:
    """Directory of the checkpoint to resume from.

    resume: False/None -> None, and a run dir that already holds checkpoints is refused so nothing
    is overwritten; True -> `latest` if there is one, else None (a fresh start); a path -> that
    checkpoint directory (or a run directory, meaning its latest).
    """
    root = checkpoint_root(run_dir)
    if not resume:
        tag = read_latest(root)
        if tag is not None:
            raise CheckpointError(
                f"run.dir '{run_dir}' already holds checkpoints (latest: {tag}); pass --resume to continue "
                f"it or choose another run.dir")
        return None
    if resume is True:
        tag = read_latest(root)
        if tag is None:
            return None
        path = os.path.join(root, tag)
        if not os.path.isdir(path):
            raise CheckpointError(f"checkpoint '{path}' named by '{root}/latest' does not exist")
        return path
    path = resolve_checkpoint_dir(str(resume))
    if not os.path.isdir(path):
        raise CheckpointError(f"--resume: checkpoint directory '{path}' does not exist")
    return path


def read_meta(path: str) -> dict:
    """megatrain.json of checkpoint `path`, with its manifest checked against the files on disk."""
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"checkpoint '{path}' is incomplete or not a megatrain checkpoint: no {META_FILE}")
    try:
        with open(meta_path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint '{path}' is corrupt: {META_FILE} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint '{path}' has an unknown format (expected megatrain format {FORMAT_VERSION})")
    for rel, size in meta.get("files", {}).items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            raise CheckpointError(f"checkpoint '{path}' is incomplete: file '{rel}' is missing")
        if os.path.getsize(full) != size:
            raise CheckpointError(f"checkpoint '{path}' is corrupt: file '{rel}' has {os.path.getsize(full)} bytes, "
                                  f"expected {size}")
    return meta


def needs_reshard(meta: dict, path: str, model_cfg, zero_stage: int, dp_size: int, tensor: int) -> bool:
    """Whether checkpoint `path` (its megatrain.json `meta`) must be resharded to load into this run.

    True when its layout (parallel.tensor, or the data-parallel size under ZeRO) differs from this
    run's, so it loads through a DeepSpeed universal checkpoint (megatrain.engine.reshard). Raises
    CheckpointError (one line) when its model or its ZeRO state cannot load into this run at all.
    """
    check_model(meta, path, model_cfg)
    layout = meta["layout"]
    if layout["zero_stage"] != zero_stage:
        raise CheckpointError(f"checkpoint '{path}' was written with parallel.zero_stage={layout['zero_stage']}, this "
                              f"run has {zero_stage}; resume with the same ZeRO stage")
    reshard = layout["tensor"] != tensor or (zero_stage > 0 and layout["dp"] != dp_size)
    if reshard and zero_stage not in (1, 2):
        change = (f"parallel.tensor={layout['tensor']} to {tensor}" if layout["tensor"] != tensor
                  else f"{layout['dp']} to {dp_size} data-parallel ranks")
        raise CheckpointError(f"checkpoint '{path}' was written at ZeRO stage {zero_stage}; changing the layout "
                              f"({change}) needs parallel.zero_stage=1 or 2 (DeepSpeed universal checkpoints)")
    return reshard


def check_model(meta: dict, path: str, model_cfg) -> None:
    """Raise CheckpointError (one line) unless the model of checkpoint `path` (its megatrain.json `meta`)
    loads into `model_cfg`: the MODEL_KEYS, model.lowrank.* and IHA's math keys agree."""
    saved = meta["model"]
    current = dataclasses.asdict(model_cfg)
    for key in MODEL_KEYS:
        if saved.get(key) != current.get(key):
            raise CheckpointError(f"checkpoint '{path}' was written with model.{key}={saved.get(key)!r} but this run "
                                  f"has model.{key}={current.get(key)!r}")
    for key, value in (saved.get("lowrank") or {}).items():  # model.lowrank.* (absent in older checkpoints)
        if value != current.get("lowrank", {}).get(key):
            raise CheckpointError(f"checkpoint '{path}' was written with model.lowrank.{key}={value!r} but this run "
                                  f"has model.lowrank.{key}={current.get('lowrank', {}).get(key)!r}")
    if saved.get("attention") == "iha":  # model.iha.* that change the model's math (tp_mode does not)
        for key, value in (saved.get("iha") or {}).items():
            if key != "tp_mode" and value != current.get("iha", {}).get(key):
                raise CheckpointError(f"checkpoint '{path}' was written with model.iha.{key}={value!r} but this run "
                                      f"has model.iha.{key}={current.get('iha', {}).get(key)!r}")


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(),
             "python": torch.tensor(list(random.getstate()[1]), dtype=torch.int64),
             "python_pos": random.getstate()[2],
             "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
             "numpy_pos": int(np.random.get_state()[2])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(int(x) for x in state["python"].tolist()), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine, *, run_dir: str, step: int, client_state: dict, meta: dict, keep: int,
                    rank: int, tokenizer_path: Optional[str] = None, groups=None, model_cfg=None) -> str:
    """Collective: every rank calls it. Returns the checkpoint directory.

    With tensor parallelism (`groups`, `model_cfg`), model.safetensors holds the joined full weights.

    The tokenizer model is copied in, so a checkpoint directory is self-contained for `megatrain.load`.
    """
    root = checkpoint_root(run_dir)
    tag = f"step_{step}"
    path = os.path.join(root, tag)
    if read_latest(root) == tag:
        return path  # already saved at this step (a resumed run stopping where it started)
    engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)
    torch.save(_rng_state(), os.path.join(path, f"rng_rank{rank}.pt"))
    _save_consolidated_weights(engine, os.path.join(path, WEIGHTS_FILE), rank, groups, model_cfg)
    barrier()
    if rank == 0:
        if tokenizer_path:
            shutil.copyfile(tokenizer_path, os.path.join(path, "tokenizer.model"))
        files = {}
        for dirpath, _, names in os.walk(path):
            for name in names:
                if name == META_FILE or ".tmp" in name:
                    continue
                full = os.path.join(dirpath, name)
                files[os.path.relpath(full, path)] = os.path.getsize(full)
        _write_atomic(os.path.join(path, META_FILE), json.dumps({**meta, "format": FORMAT_VERSION, "step": step,
                                                                  "files": files}, indent=1))
        _write_atomic(os.path.join(root, "latest"), tag)
        _prune(root, keep, current=tag)
    barrier()
    return path


def _save_consolidated_weights(engine, path: str, rank: int, groups=None, model_cfg=None) -> None:
    """model.safetensors with the full weights: ZeRO-3 shards gathered, tensor-parallel slices joined."""
    import deepspeed

    module = engine.module
    if engine.zero_optimization_partition_weights():
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if rank == 0:
                _write_weights(_full_tensors(module), path)
    elif groups is not None and groups.tp_size > 1:
        if groups.dp_rank == 0:  # one TP group holds every slice; the others need not take part
            tensors = _gather_tensor_parallel(module, groups, model_cfg)
            if rank == 0:
                _write_weights(tensors, path)
    elif rank == 0:
        _write_weights(_full_tensors(module), path)


def _full_tensors(module: torch.nn.Module) -> dict:
    """name -> CPU copy of each parameter, each shared tensor once (a tied head as embed.weight).

    Copies, because ZeRO keeps parameters as views into flat buffers that safetensors will not save.
    """
    tensors, seen = {}, set()
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        tensors[name] = param.detach().to("cpu", copy=True).contiguous()
    for mod_name, mod in module.named_modules():  # persistent buffers too (SLTrain's sparse support)
        for buf_name, buf in mod.named_buffers(recurse=False):
            if buf is not None and buf_name not in mod._non_persistent_buffers_set:
                tensors[f"{mod_name}.{buf_name}" if mod_name else buf_name] = buf.detach().to("cpu", copy=True).contiguous()
    return tensors


def _gather_tensor_parallel(module: torch.nn.Module, groups, model_cfg) -> dict:
    """Join the tensor-parallel slices of every parameter over the TP group (collective in it)."""
    from megatrain.parallel.plan import shard_specs

    local = _full_tensors(module)
    params = dict(module.named_parameters())
    specs = shard_specs(list(local), model_cfg, groups.tp_size)
    out = {}
    for name, tensor in local.items():
        dim, replicas = specs[name]
        if dim is None:
            out[name] = tensor
            continue
        param = params[name].detach().contiguous()
        parts = [torch.empty_like(param) for _ in range(groups.tp_size)]
        dist.all_gather(parts, param, group=groups.tp_group)
        out[name] = torch.cat([p.cpu() for p in parts[::replicas]], dim=dim)
    return out


def _write_weights(tensors: dict, path: str) -> None:
    from safetensors.torch import save_file

    save_file(tensors, path, metadata={"format": "pt"})


def _prune(root: str, keep: int, current: str) -> None:
    if keep <= 0:
        return
    tags = []
    for name in os.listdir(root):
        if name.startswith("step_") and name[5:].isdigit() and os.path.isdir(os.path.join(root, name)):
            tags.append((int(name[5:]), name))
    tags.sort()
    for _, name in tags[:-keep]:
        if name != current:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def load_checkpoint(engine, path: str, rank: int) -> dict:
    """Load DeepSpeed state and this rank's RNG from checkpoint dir `path`; returns the client state."""
    root, tag = os.path.split(os.path.normpath(path))
    try:
        load_path, client_state = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                                         load_lr_scheduler_states=False)
    except CheckpointError:
        raise
    except Exception as exc:  # DeepSpeed raises many types for truncated/garbled files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(f"checkpoint '{path}' could not be loaded ({type(exc).__name__}: {first})") from None
    if load_path is None:
        raise CheckpointError(f"checkpoint '{path}' could not be loaded (DeepSpeed found no model states in it)")
    rng_path = os.path.join(path, f"rng_rank{rank}.pt")
    if os.path.isfile(rng_path):
        try:
            _set_rng_state(torch.load(rng_path, weights_only=True))
        except Exception as exc:
            raise CheckpointError(f"checkpoint '{path}': '{os.path.basename(rng_path)}' is corrupt ({type(exc).__name__})") from None
    return client_state or {}
