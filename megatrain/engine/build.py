"""Building the run's model on each rank without ever holding more than that rank's share.

- ZeRO 0-2 (any TP size): the Transformer is built on the meta device (shapes only), then
  `parallelize` materialises it one module at a time: the module is allocated full-size on the host,
  initialised from its name-keyed generator, and cut to this rank's tensor-parallel slice. Peak host
  memory: the rank's share plus one full module.
- ZeRO-3: built under `deepspeed.zero.Init`, which partitions each module's parameters over the
  data-parallel group as soon as the module is constructed; then, one module at a time, every rank
  initialises a full-size fp32 host stand-in of it (all ranks compute the same keyed values) and
  copies its own partition into the parameter's ZeRO-3 shard. No collective; peak host memory: the
  rank's partition plus one full module.

Either way the weights are bit-identical to `Transformer(model_cfg, seed=train.seed)` in one process:
every module draws from a generator keyed by (train.seed, its name), never from a shared stream.
The trainer and `megatrain plan --build` both build through `build_model`.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import sys
from typing import Iterator, Optional

import torch

from megatrain.errors import CheckpointError
from megatrain.models.transformer import Transformer

__all__ = ["build_model", "model_counts"]


def model_counts(model_cfg, seq_len: int) -> tuple[int, int]:
    """(parameters, training FLOPs per token) of the full model, computed on the meta device."""
    model = Transformer(model_cfg, seed=0, device="meta")
    return model.num_params(non_embedding=False), model.flops_per_token(seq_len)


def build_model(
    cfg, model_cfg, groups, initial_state: Optional[dict] = None, source: Optional[str] = None
) -> Transformer:
    """This rank's part of the run's model (`cfg`: the run Config; `model_cfg`: its resolved ModelConfig
    with vocab_size set; `groups`: megatrain.parallel.groups.ParallelGroups). Collective.

    initial_state: full tensors by state-dict name (an imported run, train.init_from; read from
    `source`) copied in module by module instead of the keyed initialisation; each rank keeps its share."""
    from megatrain.parallel.parallelize import parallelize

    if initial_state is not None:
        _check_initial_state(Transformer(model_cfg, seed=0, device="meta"), initial_state, source)
    if cfg.parallel.pipeline > 1:  # this stage's layers only, as DeepSpeed's PipelineModule
        from megatrain.engine.pipeline import build_pipeline_model

        with _large_allocations_unmapped():
            return build_pipeline_model(cfg, model_cfg, groups, initial_state)
    with _large_allocations_unmapped():
        if cfg.parallel.zero_stage == 3:
            model = _build_zero3(cfg, model_cfg, initial_state, groups)
        else:
            model = Transformer(model_cfg, seed=cfg.train.seed, device="meta")
            model.initial_state = initial_state
        model.gradient_checkpointing = cfg.train.activation_checkpointing
        parallelize(model, groups, sequence_parallel=cfg.parallel.sequence)  # TP=1: materialises; checkpoint info
    model.initial_state = None
    return model


def _check_initial_state(meta_model: Transformer, state: dict, source: Optional[str]) -> None:
    """Every tensor of the model, with its shape, and nothing else; else one line naming `source`."""
    expected = {k: tuple(v.shape) for k, v in meta_model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k} {tuple(state[k].shape)} != {expected[k]}"
        for k in expected
        if k in state and tuple(state[k].shape) != expected[k]
    ]
    if missing or unexpected or wrong:
        parts = [
            f"{what}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
            for what, items in (("missing", missing), ("unexpected", unexpected), ("shape", wrong))
            if items
        ]
        raise CheckpointError(f"'{source}' does not match the model config ({'; '.join(parts)})")


@contextlib.contextmanager
def _large_allocations_unmapped() -> Iterator[None]:
    """glibc: every allocation over 128 KiB gets its own mapping while building, returned on free.

    Materialising one full module, keeping a slice and freeing the rest would otherwise raise glibc's
    dynamic mmap threshold to the module's size, after which the slices land on the heap between
    freed full tensors and the heap fragments (measured: ~15% more peak host memory for a 700M model
    at TP=4). Afterwards the threshold is left at glibc's dynamic maximum (32 MiB), where a long run's
    own allocations would have driven it anyway. Elsewhere (no glibc) nothing changes."""
    mallopt = None
    if sys.platform.startswith("linux"):
        try:
            mallopt = ctypes.CDLL("libc.so.6").mallopt
        except (OSError, AttributeError):
            mallopt = None
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    try:
        yield
    finally:
        if mallopt is not None:
            mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)


_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def _build_zero3(cfg, model_cfg, initial_state: Optional[dict] = None, groups=None) -> Transformer:
    """The model with its parameters partitioned over the data-parallel group from the start.

    TP together with ZeRO-3 is refused by the config (docs/tensor-parallel.md), so the data-parallel
    group is the whole world here."""
    import deepspeed

    from megatrain.engine.deepspeed import build_ds_config

    # Context parallelism: DeepSpeed's batch arithmetic counts data ranks (the mpu), the partition spans
    # data x context (the whole world here, as the engine's sequence-data-parallel group).
    context = {"mpu": groups, "data_parallel_group": groups.dp_group} if getattr(groups, "cp_size", 1) > 1 else {}
    with deepspeed.zero.Init(config_dict_or_path=build_ds_config(cfg), **context):
        model = Transformer(model_cfg, seed=cfg.train.seed, initialize=False)
    model.initial_state = initial_state
    model.refresh_rope_tables()  # zero.Init builds float tensors in the model dtype: the fp64 angles were rounded
    for name in model.init_module_names():
        module = model.get_submodule(name)
        stand_in = _full_size_stand_in(module)
        # Every rank initialises the whole module from its keyed generator (equal values everywhere;
        # buffers such as SLTrain's support are not partitioned and are set on the module itself) and
        # keeps its own partition: no all-gather, and the peak is the share plus this one module.
        model.init_module(name, stand_in)
        for key, full in stand_in._parameters.items():
            if full is not None:
                _keep_partition(module._parameters[key], full)
        del stand_in
    return model


def _full_size_stand_in(module: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy of a ZeRO-3 module whose own parameters are full-size fp32 host tensors.

    It shares the module's buffers and children; only `_parameters` is its own."""
    stand_in = copy.copy(module)
    stand_in.__dict__["_parameters"] = {
        key: None
        if p is None
        else torch.nn.Parameter(torch.empty(p.ds_shape, dtype=torch.float32), requires_grad=False)
        for key, p in module._parameters.items()
    }
    return stand_in


def _keep_partition(param: torch.nn.Parameter, full: torch.Tensor) -> None:
    """Copy this rank's ZeRO-3 partition of `full` into `param.ds_tensor`.

    DeepSpeed's layout (`Init._partition_param`): the flattened tensor is padded to a multiple of the
    partition group's size and rank i holds elements [i * n, (i + 1) * n), n = ds_tensor's numel; the
    tail past the tensor's end is padding (zero)."""
    import torch.distributed as dist

    part = param.ds_tensor
    if (
        getattr(param, "ds_secondary_tensor", None) is not None
        or part.numel() * dist.get_world_size(group=param.ds_process_group) < param.ds_numel
    ):
        raise RuntimeError(
            "ZeRO-3 build: unexpected partition layout (hierarchical partitioning or offload "
            "to NVMe is not configured by megatrain)"
        )
    flat = full.reshape(-1)
    start = part.numel() * dist.get_rank(group=param.ds_process_group)
    count = max(0, min(part.numel(), param.ds_numel - start))
    with torch.no_grad():
        part.zero_()
        if count:
            part.narrow(0, 0, count).copy_(flat.narrow(0, start, count))
