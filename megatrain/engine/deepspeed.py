"""DeepSpeed glue: the generated config, process-group start-up, and `deepspeed.initialize`.

megatrain hands DeepSpeed its own optimizer (megatrain.optim.build_optimizer) and sets the learning
rate itself each step, so the DeepSpeed config never carries `optimizer` or `scheduler` sections.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatrain.engine.health import process_group_timeout
from megatrain.errors import ConfigError

# Keys megatrain derives from `train.*`; a user DeepSpeed section may repeat them only with equal values.
_BATCH_KEYS = {
    "train_micro_batch_size_per_gpu": "micro_batch",
    "gradient_accumulation_steps": "grad_accum",
    "train_batch_size": "global_batch",
}


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def use_bf16(cfg) -> bool:
    if cfg.train.dtype == "auto":
        return torch.cuda.is_available()
    return cfg.train.dtype == "bf16"


def build_ds_config(cfg) -> dict:
    """DeepSpeed config from `train.*` / `parallel.*`, with the user's `deepspeed` section merged over it."""
    t = cfg.train
    generated = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.global_batch,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": use_bf16(cfg)},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if cfg.parallel.zero_stage == 3 and cfg.parallel.context > 1:
        # ZeRO-3's reduce-scatter path divides gradients by all data x context ranks, ignoring the Ulysses
        # group (DeepSpeed 0.19); its all-reduce path divides by the data ranks only, as the context-parallel
        # loss needs (megatrain.parallel.context_parallel). Measured: with reduce-scatter the norm halves at C=2.
        generated["zero_optimization"]["reduce_scatter"] = False
    user = copy.deepcopy(cfg.deepspeed)
    for key in ("optimizer", "scheduler"):
        if key in user:
            raise ConfigError(
                f"deepspeed.{key} is not used: megatrain builds the optimizer from optim.* and the "
                f"schedule from train.lr/warmup_steps/schedule; remove deepspeed.{key}"
            )
    if user.get("fp16", {}).get("enabled") is True:
        raise ConfigError("deepspeed.fp16.enabled=true is not supported (allowed: train.dtype=bf16 or fp32)")
    for ds_key, train_key in _BATCH_KEYS.items():
        if ds_key in user and user[ds_key] != "auto" and user[ds_key] != getattr(t, train_key):
            raise ConfigError(
                f"deepspeed.{ds_key}={user[ds_key]} disagrees with train.{train_key}="
                f"{getattr(t, train_key)}; set it in one place"
            )
    stage = user.get("zero_optimization", {}).get("stage", cfg.parallel.zero_stage)
    if stage != cfg.parallel.zero_stage:
        raise ConfigError(
            f"deepspeed.zero_optimization.stage={stage} disagrees with parallel.zero_stage="
            f"{cfg.parallel.zero_stage}; set it in one place"
        )
    if cfg.parallel.pipeline > 1:
        # Stages pass (MLP output, stream): DeepSpeed splits only a single grad-carrying tensor over the TP ranks,
        # so each TP rank sends its own copy (with parallel.sequence, its N / T tokens).
        generated["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    merged = _merge_auto(generated, user)
    return merged


def _merge_auto(base: dict, user: dict) -> dict:
    """User values win, except "auto" (the Hugging Face convention), which keeps megatrain's."""
    out = copy.deepcopy(base)
    for key, value in user.items():
        if value == "auto":
            continue
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge_auto(out[key], value)
        else:
            out[key] = value
    return out


def check_deepspeed_for(cfg) -> None:
    """Fail in one line, before any process group, if the installed DeepSpeed lacks an internal this
    run's features need (megatrain.optim.deepspeed_adapter lists them and the tested versions)."""
    from megatrain.optim.deepspeed_adapter import PIPELINE, RELORA, ZERO_STEP, check_deepspeed_internals

    features = []
    if cfg.optim.name in ("galore", "fira") and cfg.parallel.zero_stage in (1, 2):
        features.append(ZERO_STEP)
    if cfg.model.linear == "relora":
        features.append(RELORA)
    if getattr(cfg.parallel, "pipeline", 1) > 1:
        features.append(PIPELINE)
    check_deepspeed_internals(features)


def init_distributed(cfg) -> DistEnv:
    """Start the process group from the launcher's environment (torchrun / deepspeed / one process)."""
    import deepspeed

    from megatrain import env

    env.check_environment()  # a bad launcher variable is one line here, not a traceback from a rank
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    local_rank, local_world = env.local_rank(), env.local_world_size()
    backend = cfg.parallel.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("parallel.backend=nccl needs GPUs (allowed on CPU: auto, gloo)")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        # Processes sharing a node split its cores instead of each spawning one thread per core.
        # OMP_NUM_THREADS, when set (a sweep's concurrent children, a launcher), wins.
        torch.set_num_threads(env.omp_threads() or max(1, (os.cpu_count() or 1) // max(1, local_world)))
    if not dist.is_initialized():
        # The watchdog (megatrain.engine.health, parallel.timeout_s) names a stalled rank first; this is the backstop.
        timeout = process_group_timeout(cfg.parallel.timeout_s)
        if env.uses_agent_store():
            # torchrun's agent keeps one store across restarts, holding every rank's address from the
            # attempt that died; a restarted rank could read its peer's stale one (gloo: "connection
            # refused"). A prefix per attempt keeps each attempt's keys apart.
            agent_store = dist.TCPStore(env.master_addr(), env.master_port(), is_master=False, timeout=timeout)
            dist.init_process_group(
                backend,
                store=dist.PrefixStore(f"megatrain/attempt_{env.restart_count()}", agent_store),
                rank=env.rank(),
                world_size=env.world_size(),
                timeout=timeout,
            )
        deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timeout)
    return DistEnv(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        local_world_size=local_world,
        device=device,
    )


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize(cfg, model: torch.nn.Module, optimizer: torch.optim.Optimizer, mpu=None, load_universal: bool = False):
    """deepspeed.initialize with the generated config; returns the engine.

    `mpu` (megatrain.parallel.groups.ParallelGroups) makes ZeRO shard and all-reduce over the
    data-parallel group only, and count tensor-parallel shards correctly in the gradient norm.
    `load_universal` makes the next load_checkpoint read a DeepSpeed universal checkpoint (a
    checkpoint from another TP x DP layout, see megatrain.engine.reshard).
    """
    import deepspeed

    from megatrain.optim.deepspeed_adapter import lean_bf16_config, lean_stage0_step, lean_zero3_step, lean_zero_step
    from megatrain.optim.zero_bridge import attach_projected

    ds_config = build_ds_config(cfg)
    if load_universal:
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    check_norm = lean_bf16_config(ds_config, cfg.deepspeed)  # the per-gradient bf16 overflow scan off ...
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, mpu=mpu)
    attach_projected(engine, optimizer, mpu)  # GaLore / Fira weights kept out of ZeRO (docs/galore-fira.md)
    # ... and the norm check in its place (after attach_projected). Without ZeRO in bf16: DeepSpeed's unfused
    # step made lean. ZeRO-3: its own skip decision takes the trainer's device flag.
    lean = lean_zero_step(engine.optimizer, check_norm) or lean_stage0_step(engine.optimizer)
    lean or lean_zero3_step(engine.optimizer)
    return engine


def module_grad_norm(module: torch.nn.Module, groups) -> torch.Tensor:
    """L2 norm of the (already DP-averaged) gradients, for ZeRO stage 0 where DeepSpeed reports none, as an
    fp64 scalar on the device (no host read: the logger reads it at a logging step).

    DeepSpeed's rule: a tensor-parallel slice counts on its own rank, anything else (replicated
    weights, the extra copies of replicated KV heads) on TP rank 0 only; then one sum over the TP
    group. One multi-tensor norm in fp64 (no fp64 copies of the gradients).
    """
    grads = [
        p.grad.detach()
        for p in module.parameters()
        if p.grad is not None and (getattr(p, "tensor_model_parallel", False) or groups.tp_rank == 0)
    ]
    device = next(module.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    if grads:
        total = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float64)).pow(2).sum()
    if groups.tp_size > 1:
        dist.all_reduce(total, group=groups.tp_group)
    return total.sqrt()


def step_grad_norm(engine, zero_stage: int, measured=None, *, read: bool = True):
    """The global gradient norm of the optimizer step `engine` just took: DeepSpeed's own under ZeRO 1-3 and
    at stage 0 in bf16; at stage 0 in fp32, where DeepSpeed keeps none, `measured` (`module_grad_norm` taken
    before the step), None when the job did not measure it. A float (one host read), or with `read=False` as
    it is kept (a device scalar, a float or None), which the training loop leaves in its records until the
    logger reads a logged step's."""
    # At stage 0 in bf16 DeepSpeed's optimizer keeps one (the trainer then measures none).
    norm = engine.get_global_grad_norm() if zero_stage != 0 or measured is None else measured
    if not read:
        return norm
    return norm.item() if isinstance(norm, torch.Tensor) else norm
