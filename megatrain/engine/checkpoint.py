"""Checkpoints: DeepSpeed state plus megatrain's own files, committed through an atomic `latest`.

Layout of `run.dir/checkpoints/step_N/`:
  DeepSpeed's files      model / optimizer / ZeRO shards (engine.save_checkpoint)
  rng_rank{R}.pt         each rank's RNG states (tensors only: loads with weights_only=True)
  model.safetensors      consolidated full model weights (ZeRO-3 shards gathered, TP slices joined), for
                         `megatrain.load` and `megatrain export` without unpickling anything
  megatrain.json         step, data position, model config, layout, and the manifest: every file's size
                         and the sha256 of megatrain's own files (rng, weights, tokenizer)

  universal/             written on demand when a run resumes at another PP x TP x DP layout (or by
                         `megatrain reshard`): DeepSpeed's universal form of the ZeRO state

The protocol that makes a crash of any rank at any moment harmless (docs/architecture.md):
1. every rank writes into `step_N.partial/` (a stale one from a crash is removed first);
2. the ranks agree that every write succeeded (an all-gather of their errors, also the barrier);
3. rank 0 fsyncs the files, writes megatrain.json, renames `step_N.partial` to `step_N`, and then
   replaces `latest` (write to a temporary file, fsync, os.replace, fsync of the folder);
4. a final agreement, then older checkpoints are pruned to `checkpoint.keep`.
So `latest` only ever names a complete, renamed checkpoint; megatrain writes it in DeepSpeed's own
format (a tag name) and DeepSpeed's own `latest` is never written (save_latest=False). A write error
(disk full, permissions) on any rank removes the partial folder and raises one line on every rank,
and the previous checkpoint stays `latest`.
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

from megatrain.distributed import barrier, is_distributed
from megatrain.engine.resilience import fault_point
from megatrain.errors import CheckpointError, ConfigError
from megatrain.files import fsync_path, sha256_file, write_atomic

META_FILE = "megatrain.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
PARTIAL_SUFFIX = ".partial"  # a checkpoint being written; never named by `latest`

# Model-config keys that must match for a checkpoint to load into a model.
# The model keys a checkpoint must share with the run that loads it (the rest may differ).
MODEL_KEYS = ("dim", "layers", "heads", "kv_heads", "vocab_size", "ffn_dim", "tie_embeddings", "linear", "attention")


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


def newest_checkpoint(run_dir: str) -> Optional[tuple[int, str]]:
    """(step, directory) of the checkpoint written last under `run_dir`: its own `latest`, or that of a
    sub-run one or two levels down (an RL job's RUN/pretrain, RUN/from_step_N/PIPELINE); None when no
    `latest` names a committed checkpoint. What a launcher reports after its workers stopped on a signal."""
    import glob

    found = []
    for pattern in ("checkpoints", os.path.join("*", "checkpoints"), os.path.join("*", "*", "checkpoints")):
        for root in glob.glob(os.path.join(glob.escape(run_dir), pattern)):
            tag = read_latest(root)
            path = os.path.join(root, tag) if tag is not None else None
            if path is None or not os.path.isfile(os.path.join(path, META_FILE)):
                continue
            try:
                with open(os.path.join(path, META_FILE), encoding="utf-8") as fh:
                    step = int(json.load(fh)["step"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            found.append((os.path.getmtime(os.path.join(root, "latest")), step, path))
    if not found:
        return None
    _, step, path = max(found)
    return step, path


def _is_own_file(rel: str) -> bool:
    """megatrain's own files of a checkpoint (checksummed); DeepSpeed's are checked by size only."""
    name = os.path.basename(rel)
    return (
        rel == WEIGHTS_FILE
        or rel == "tokenizer.model"
        or (name.startswith("rng_rank") and name.endswith(".pt") and os.path.dirname(rel) == "")
    )


def _manifest(path: str) -> tuple[dict, dict]:
    """(sizes, sha256 of megatrain's own files) of every file under `path`, each fsynced on the way."""
    sizes, checksums = {}, {}
    for dirpath, _, names in os.walk(path):
        for name in sorted(names):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, path)
            if rel == META_FILE or ".tmp" in name:
                continue
            fd = os.open(full, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            sizes[rel] = os.path.getsize(full)
            if _is_own_file(rel):
                checksums[rel] = sha256_file(full)
        fsync_path(dirpath)
    return sizes, checksums


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
                f"it or choose another run.dir"
            )
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


def read_meta(path: str, checksums: bool = False) -> dict:
    """megatrain.json of checkpoint `path`, with its manifest checked against the files on disk: every
    file's size, and with `checksums` the sha256 of megatrain's own files too (reads them whole)."""
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"checkpoint '{path}' is incomplete or not a megatrain checkpoint: no {META_FILE}")
    try:
        with open(meta_path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"checkpoint '{path}' is corrupt: {META_FILE} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint '{path}' has an unknown format (expected megatrain format {FORMAT_VERSION})")
    for rel, size in meta.get("files", {}).items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            raise CheckpointError(f"checkpoint '{path}' is incomplete: file '{rel}' is missing{_fallback_hint(path)}")
        if os.path.getsize(full) != size:
            raise CheckpointError(
                f"checkpoint '{path}' is corrupt: file '{rel}' has {os.path.getsize(full)} bytes, "
                f"expected {size}{_fallback_hint(path)}"
            )
    if checksums:
        for rel, digest in meta.get("checksums", {}).items():
            if sha256_file(os.path.join(path, rel)) != digest:
                raise CheckpointError(
                    f"checkpoint '{path}' is corrupt: file '{rel}' fails its sha256 check{_fallback_hint(path)}"
                )
    return meta


def _fallback_hint(path: str) -> str:
    """'; the previous complete checkpoint is ...' for an error about checkpoint `path`, or ''."""
    root, tag = os.path.split(os.path.normpath(path))
    step = _tag_step(tag)
    if step is None:
        return ""
    for older_step, older in reversed(_step_dirs(root)):
        if older_step >= step:
            continue
        try:
            read_meta(os.path.join(root, older))
        except CheckpointError:
            continue
        return f"; the previous complete checkpoint is '{os.path.join(root, older)}' (resume with --resume-from it)"
    return ""


def _tag_step(tag: str) -> Optional[int]:
    return int(tag[5:]) if tag.startswith("step_") and tag[5:].isdigit() else None


def _step_dirs(root: str) -> list:
    """[(step, 'step_N')] of the committed checkpoint folders under `root`, by step."""
    if not os.path.isdir(root):
        return []
    found = [(_tag_step(name), name) for name in os.listdir(root)]
    return sorted((step, name) for step, name in found if step is not None and os.path.isdir(os.path.join(root, name)))


def needs_reshard(
    meta: dict, path: str, model_cfg, zero_stage: int, dp_size: int, tensor: int, pipeline: int = 1
) -> bool:
    """Whether checkpoint `path` (its megatrain.json `meta`) must be resharded to load into this run.

    True when its layout (parallel.pipeline, parallel.tensor, or the data-parallel size under ZeRO) differs
    from this run's, so it loads through a DeepSpeed universal checkpoint (megatrain.engine.reshard). Raises
    CheckpointError (one line) when its model or its ZeRO state cannot load into this run at all.
    """
    check_model(meta, path, model_cfg)
    layout = meta["layout"]
    if layout["zero_stage"] != zero_stage:
        raise CheckpointError(
            f"checkpoint '{path}' was written with parallel.zero_stage={layout['zero_stage']}, this "
            f"run has {zero_stage}; resume with the same ZeRO stage"
        )
    stages = layout.get("pipeline", 1)
    reshard = stages != pipeline or layout["tensor"] != tensor or (zero_stage > 0 and layout["dp"] != dp_size)
    if reshard and zero_stage not in (1, 2):
        change = (
            f"parallel.pipeline={stages} to {pipeline}"
            if stages != pipeline
            else f"parallel.tensor={layout['tensor']} to {tensor}"
            if layout["tensor"] != tensor
            else f"{layout['dp']} to {dp_size} data-parallel ranks"
        )
        raise CheckpointError(
            f"checkpoint '{path}' was written at ZeRO stage {zero_stage}; changing the layout "
            f"({change}) needs parallel.zero_stage=1 or 2 (DeepSpeed universal checkpoints)"
        )
    return reshard


def check_model(meta: dict, path: str, model_cfg) -> None:
    """Raise CheckpointError (one line) unless the model of checkpoint `path` (its megatrain.json `meta`)
    loads into `model_cfg`: the MODEL_KEYS, model.lowrank.* and IHA's math keys agree."""
    saved = meta["model"]
    current = dataclasses.asdict(model_cfg)
    for key in MODEL_KEYS:
        if saved.get(key) != current.get(key):
            raise CheckpointError(
                f"checkpoint '{path}' was written with model.{key}={saved.get(key)!r} but this run "
                f"has model.{key}={current.get(key)!r}"
            )
    for key, value in (saved.get("lowrank") or {}).items():  # model.lowrank.* (absent in older checkpoints)
        if value != current.get("lowrank", {}).get(key):
            raise CheckpointError(
                f"checkpoint '{path}' was written with model.lowrank.{key}={value!r} but this run "
                f"has model.lowrank.{key}={current.get('lowrank', {}).get(key)!r}"
            )
    if saved.get("attention") == "iha":  # model.iha.* that change the model's math (tp_mode does not)
        for key, value in (saved.get("iha") or {}).items():
            if key != "tp_mode" and value != current.get("iha", {}).get(key):
                raise CheckpointError(
                    f"checkpoint '{path}' was written with model.iha.{key}={value!r} but this run "
                    f"has model.iha.{key}={current.get('iha', {}).get(key)!r}"
                )


def check_tokenizer(data_tokenizer: str, tokenizer_file: Optional[str], source: str) -> None:
    """`data.tokenizer` names an existing file (ConfigError) with the same bytes as `tokenizer_file`, the
    tokenizer the weights of `source` (a phrase naming them) were trained with (CheckpointError); a None
    `tokenizer_file` (weights without a tokenizer) checks the existence only."""
    if not os.path.isfile(data_tokenizer):
        raise ConfigError(f"data.tokenizer: file '{data_tokenizer}' does not exist")
    if tokenizer_file is not None and sha256_file(tokenizer_file) != sha256_file(data_tokenizer):
        raise CheckpointError(f"{source} was trained with another tokenizer than data.tokenizer='{data_tokenizer}'")


def checkpoint_meta(model_cfg, layout: dict, *, seq_len: int, seed: int, tokenizer: Optional[str], **extra) -> dict:
    """megatrain.json's description of a checkpoint (save_checkpoint adds step, format and the manifest):
    the model config, the parallel `layout` ({world_size, dp, tensor, zero_stage}), the sequence length,
    the seed, the tokenizer's path, and what the job adds (`extra`: the data position, the RL start)."""
    return {
        "model": dataclasses.asdict(model_cfg),
        "layout": dict(layout),
        "seq_len": seq_len,
        "seed": seed,
        "tokenizer": tokenizer,
        **extra,
    }


def _rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(list(random.getstate()[1]), dtype=torch.int64),
        "python_pos": random.getstate()[2],
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(int(x) for x in state["python"].tolist()), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    engine,
    *,
    run_dir: str,
    step: int,
    client_state: dict,
    meta: dict,
    keep: int,
    rank: int,
    tokenizer_path: Optional[str] = None,
    groups=None,
    model_cfg=None,
) -> str:
    """Collective: every rank calls it. Returns the checkpoint directory.

    With tensor parallelism (`groups`, `model_cfg`), model.safetensors holds the joined full weights.
    The tokenizer model is copied in, so a checkpoint directory is self-contained for `megatrain.load`.
    Raises CheckpointError on every rank when any rank's write failed (the previous `latest` stays).
    """
    root = checkpoint_root(run_dir)
    tag = f"step_{step}"
    path = os.path.join(root, tag)
    if read_latest(root) == tag:
        return path  # already saved at this step (a resumed run stopping where it started)
    partial_tag = tag + PARTIAL_SUFFIX
    partial = os.path.join(root, partial_tag)
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # left by a crash mid-write
    barrier()
    error = _write_partial(engine, root, partial_tag, client_state, step, rank, tokenizer_path, groups, model_cfg)
    _raise_if_any_failed(error, rank, tag, root, partial)
    error = _commit(root, tag, meta, step) if rank == 0 else None
    _raise_if_any_failed(error, rank, tag, root, partial)
    if rank == 0:
        _prune(root, keep, current=tag)
    return path


def _write_partial(
    engine, root: str, partial_tag: str, client_state: dict, step: int, rank: int, tokenizer_path, groups, model_cfg
) -> Optional[OSError]:
    """Collective: this rank's part of the checkpoint into root/partial_tag (DeepSpeed's states, this
    rank's RNG, the consolidated weights where this rank writes them, the tokenizer on rank 0). Returns
    the OSError a write raised, or None; the consolidation's collectives run either way."""
    partial = os.path.join(root, partial_tag)
    error = None
    try:
        engine.save_checkpoint(root, tag=partial_tag, client_state=client_state, save_latest=False)
    except OSError as exc:
        error = exc
    tensors = _consolidated_tensors(engine, rank, groups, model_cfg)  # collective
    if error is None:
        try:
            fault_point("ckpt_write", step, rank)
            torch.save(_rng_state(), os.path.join(partial, f"rng_rank{rank}.pt"))
            if tensors is not None:
                _write_weights(tensors, os.path.join(partial, WEIGHTS_FILE))
            if rank == 0 and tokenizer_path:
                shutil.copyfile(tokenizer_path, os.path.join(partial, "tokenizer.model"))
        except OSError as exc:
            error = exc
    return error


def _commit(root: str, tag: str, meta: dict, step: int) -> Optional[OSError]:
    """Rank 0: the manifest into the complete partial folder, the folder renamed to its step, then
    `latest` pointed at it (each step atomic and synced). Returns the OSError that stopped it, or None
    once committed (a failure after `latest` names the step leaves the checkpoint in place)."""
    partial, path = os.path.join(root, tag + PARTIAL_SUFFIX), os.path.join(root, tag)
    try:
        sizes, checksums = _manifest(partial)
        record = {**meta, "format": FORMAT_VERSION, "step": step, "files": sizes, "checksums": checksums}
        write_atomic(os.path.join(partial, META_FILE), json.dumps(record, indent=1), fsync=True)
        if os.path.isdir(path):
            shutil.rmtree(path)  # written by a run that crashed before naming it `latest`
        os.replace(partial, path)
        fsync_path(root)
        fault_point("ckpt_commit", step, 0)
        write_atomic(
            os.path.join(root, "latest"), tag, fsync=True, before_replace=lambda: fault_point("latest", step, 0)
        )
    except OSError as exc:
        if read_latest(root) != tag:  # not committed: the previous checkpoint stays latest
            shutil.rmtree(path, ignore_errors=True)
            return exc
    return None


def _raise_if_any_failed(error: Optional[OSError], rank: int, tag: str, root: str, partial: str) -> None:
    """Collective (also the barrier between the save's phases): when any rank's write failed, every
    rank raises the same one-line CheckpointError, and rank 0 removes the partial folder."""
    message = None
    if error is not None:
        message = f"{error.strerror or error}" + (f": '{error.filename}'" if error.filename else "")
    if is_distributed() and dist.get_world_size() > 1:
        messages = [None] * dist.get_world_size()
        dist.all_gather_object(messages, message)
    else:
        messages = [message]
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if not failed:
        return
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
    previous = read_latest(root)
    kept = f"'{os.path.join(root, previous)}' is kept as latest" if previous else "no earlier checkpoint exists"
    r, m = failed[0]
    exc = CheckpointError(
        f"saving checkpoint {tag} failed on rank {r} ({m}); {kept}; free space or fix "
        f"permissions under '{root}' and resume with --resume"
    )
    exc.same_on_every_rank = True  # the CLI prints it once, on rank 0
    raise exc


def _consolidated_tensors(engine, rank: int, groups=None, model_cfg=None) -> Optional[dict]:
    """The full weights for model.safetensors on rank 0 (None elsewhere): ZeRO-3 shards gathered,
    tensor-parallel slices joined. Collective where the weights are split."""
    import deepspeed

    module = engine.module
    if getattr(module, "stage_bounds", None) is not None:  # parallel.pipeline > 1 (megatrain.parallel.pipeline)
        return _gather_pipeline(module, rank, groups, model_cfg)
    if engine.zero_optimization_partition_weights():
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return _full_tensors(module) if rank == 0 else None  # CPU copies: valid after the gather
    if groups is not None and groups.tp_size > 1:
        if groups.dp_rank == 0:  # one TP group holds every slice; the others need not take part
            tensors = _gather_tensor_parallel(module, groups, model_cfg)
            return tensors if rank == 0 else None
        return None
    return _full_tensors(module) if rank == 0 else None


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
                tensors[f"{mod_name}.{buf_name}" if mod_name else buf_name] = (
                    buf.detach().to("cpu", copy=True).contiguous()
                )
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
        out[name] = join_tensor_parallel(params[name], dim, replicas, groups)
    return out


def _gather_pipeline(module: torch.nn.Module, rank: int, groups, model_cfg) -> Optional[dict]:
    """The full weights on rank 0 under the Transformer's names: each stage's first TP group joins its slices,
    and its TP rank 0 sends them to rank 0 (collective over the world)."""
    from megatrain.parallel.pipeline import transformer_name

    layers = module.model_config.layers
    stage = None
    if groups.dp_rank == 0:
        local = {transformer_name(k, layers): v for k, v in _full_tensors(module).items()}
        if groups.tp_size > 1:
            from megatrain.parallel.plan import shard_specs

            params = {transformer_name(k, layers): p for k, p in module.named_parameters()}
            specs = shard_specs(list(local), model_cfg, groups.tp_size)
            local = {
                name: t if specs[name][0] is None else join_tensor_parallel(params[name], *specs[name], groups)
                for name, t in local.items()
            }
        stage = local if groups.tp_rank == 0 else None
    parts = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(stage, parts, dst=0)
    if rank != 0:
        return None
    return {name: t for part in parts if part is not None for name, t in part.items()}


def join_tensor_parallel(param: torch.Tensor, dim: int, replicas: int, groups) -> torch.Tensor:
    """The full CPU tensor of one parameter split along `dim` over the TP group (collective in it);
    `replicas` consecutive ranks hold the same slice (KV heads when kv_heads < TP)."""
    param = param.detach().contiguous()
    parts = [torch.empty_like(param) for _ in range(groups.tp_size)]
    dist.all_gather(parts, param, group=groups.tp_group)
    return torch.cat([p.cpu() for p in parts[::replicas]], dim=dim)


def _write_weights(tensors: dict, path: str) -> None:
    from safetensors.torch import save_file

    save_file(tensors, path, metadata={"format": "pt"})


def _prune(root: str, keep: int, current: str) -> None:
    """After `current` became latest: drop partial folders and checkpoints past it (a crashed run's
    leftovers), then all but the newest `keep` (0 keeps all)."""
    current_step = _tag_step(current)
    for name in os.listdir(root):
        if name.endswith(PARTIAL_SUFFIX):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    tags = _step_dirs(root)
    for step, name in tags:
        if step > current_step:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    tags = [(step, name) for step, name in tags if step <= current_step]
    if keep <= 0:
        return
    for _, name in tags[:-keep]:
        if name != current:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def load_checkpoint(engine, path: str, rank: int) -> dict:
    """Load DeepSpeed state and this rank's RNG from checkpoint dir `path`; returns the client state."""
    root, tag = os.path.split(os.path.normpath(path))
    try:
        load_path, client_state = engine.load_checkpoint(
            root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
        )
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
            raise CheckpointError(
                f"checkpoint '{path}': '{os.path.basename(rng_path)}' is corrupt ({type(exc).__name__})"
            ) from None
    return client_state or {}
