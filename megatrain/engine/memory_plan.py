"""Per-rank memory plan of a run's layout (`megatrain plan`), and what a real build measures.

`plan_memory(cfg, world_size)` works from the config alone, on the meta device: the model's
parameters are split with the same `shard_specs` that `parallelize` cuts them by, so the parameter
bytes per rank are exact for every TP size and ZeRO stage (ZeRO-3 partitions each tensor over the
data-parallel ranks, rounded up as DeepSpeed pads them). The rest is the usual accounting:

| part | bytes per rank |
|---|---|
| weights | local parameters x (2 bf16 / 4 fp32); ZeRO-3: / DP |
| gradients | local trainable parameters x (2 / 4); ZeRO 2 and 3: / DP. GaLore/Fira weights keep whole gradients (they stay out of ZeRO) |
| master weights | bf16 runs: 4 per trainable parameter, / DP with ZeRO 1-3 (DeepSpeed's fp32 copy) |
| optimizer | AdamW: 8 per trainable parameter (two fp32 moments), / DP with ZeRO 1-3. GaLore/Fira weights: fp32 moments of the projected gradient (r x n or m x r) plus the projection, whole on every DP rank (their own fp32 master in bf16) |
| activations | per micro-batch (micro_batch x seq_len tokens), saved for backward, see `activation_elements` |
| transient | model.linear=sltrain: the dense W = scale a b + S [D_in, D_out] (/ TP) of the largest projection, built per call in the activations' dtype (2 / 4) and freed after its matmul; in backward W (for dx) and then dW = x^T dy, never both at once (kernels/sparse_lowrank.py) |

The optimizer figures count the tensors an optimizer holds (moments, projections, masters), not
its 0-dim scalars (step counters, Fira's limiter norm). ReLoRA/LoRA's frozen W has no gradient and no
optimizer state (unless train.relora.warm_start_steps > 0, when it trains first). Not counted: DeepSpeed's
communication buckets (`reduce_bucket_size`, `allgather_bucket_size`), the CUDA context and allocator
slack, the data pipeline.
"""  # noqa: E501  (the table's rows)

from __future__ import annotations

import math
import os
import resource
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from megatrain.errors import ConfigError

__all__ = [
    "RankMemory",
    "plan_memory",
    "plan_model_config",
    "measure_build",
    "format_plan",
    "check_fits",
    "device_memory_bytes",
]

GIB = 1024**3


@dataclass
class RankMemory:
    """Bytes held by one rank of a layout (every rank of a TP x DP layout holds the same amounts)."""

    world_size: int
    tensor: int
    dp: int  # data-parallel ranks (world / (tensor x context))
    zero_stage: int
    dtype: str
    context: int = 1  # parallel.context: ZeRO partitions over dp x context ranks
    params: int = 0  # parameters on this rank (weights)
    param_bytes: int = 0
    grad_bytes: int = 0
    master_bytes: int = 0
    optimizer_bytes: int = 0
    activation_bytes: int = 0  # per micro-batch, nothing recomputed
    activation_bytes_checkpointed: int = 0  # per micro-batch, train.activation_checkpointing=true
    activation_checkpointing: bool = False
    transient_bytes: int = 0  # SLTrain: one projection's dense W (or dW), alive during its matmuls

    @property
    def model_state_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.master_bytes + self.optimizer_bytes

    @property
    def total_bytes(self) -> int:
        """Model states plus the activations of the configured activation checkpointing, plus the
        largest per-call transient (SLTrain's W)."""
        act = self.activation_bytes_checkpointed if self.activation_checkpointing else self.activation_bytes
        return self.model_state_bytes + act + self.transient_bytes

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(model_state_bytes=self.model_state_bytes, total_bytes=self.total_bytes)
        return out


def plan_model_config(cfg):
    """The run's resolved ModelConfig with a vocabulary size: model.vocab_size, else the generated
    task's vocabulary, else data.vocab_size (what the tokenizer is trained to)."""
    from megatrain.data.sources import source_kind

    m = cfg.model.resolved()
    if m.vocab_size is None:
        kind = source_kind(cfg.data.source)
        m.vocab_size = kind.vocab_size(cfg.data) if kind is not None else cfg.data.vocab_size
    return m


def _bf16(cfg) -> bool:
    from megatrain.engine.deepspeed import use_bf16

    return use_bf16(cfg)


def plan_memory(cfg, world_size: int, model_cfg=None) -> RankMemory:
    """The per-rank memory of `cfg` run on `world_size` processes (validated like a launch would be)."""
    from megatrain.models.transformer import Transformer
    from megatrain.optim.zero_bridge import PROJECTED_MODULES
    from megatrain.parallel.plan import shard_specs

    p = cfg.parallel
    context = getattr(p, "context", 1)
    if world_size < 1 or world_size % (p.tensor * context):
        raise ConfigError(
            f"--world {world_size} is not a multiple of parallel.tensor x parallel.context = {p.tensor} x {context}"
        )
    m = model_cfg if model_cfg is not None else plan_model_config(cfg)
    # ZeRO shards over the data x context ranks (they hold the same parameters; megatrain.parallel.groups)
    tp, dp, stage = p.tensor, world_size // p.tensor, p.zero_stage
    bf16 = _bf16(cfg)
    width = 2 if bf16 else 4
    model = Transformer(m, seed=0, device="meta")
    named = list(model.named_parameters())  # each shared (tied) parameter once
    specs = shard_specs([n for n, _ in named], m, tp)
    warm = m.linear == "relora" and cfg.train.relora.warm_start_steps > 0
    projected_kind = cfg.optim.name in ("galore", "fira")
    out = RankMemory(
        world_size=world_size,
        tensor=tp,
        dp=dp // context,
        zero_stage=stage,
        context=context,
        dtype="bf16" if bf16 else "fp32",
        activation_checkpointing=cfg.train.activation_checkpointing,
    )
    zero_partitioned, projected_grads, projected_state = 0, 0, 0
    for name, param in named:
        dim, replicas = specs[name]
        shape = list(param.shape)
        if dim is not None:
            shape[dim] //= tp // replicas
        numel = math.prod(shape)
        out.params += math.ceil(numel / dp) if stage == 3 else numel
        trainable = param.requires_grad or (warm and getattr(param, "relora_base", False))
        if not trainable:
            continue
        projected = projected_kind and len(shape) == 2 and any(part in PROJECTED_MODULES for part in name.split("."))
        if projected:
            projected_state += _projected_state_bytes(cfg.optim, shape, bf16)
            projected_grads += numel
        else:
            zero_partitioned += numel
    out.param_bytes = out.params * width
    sharded = (lambda n: math.ceil(n / dp)) if stage >= 1 else (lambda n: n)
    out.grad_bytes = width * ((math.ceil(zero_partitioned / dp) if stage >= 2 else zero_partitioned) + projected_grads)
    out.master_bytes = 4 * sharded(zero_partitioned) if bf16 else 0
    out.optimizer_bytes = 8 * sharded(zero_partitioned) + projected_state
    _count_activations(out, cfg, m, width)
    return out


def _count_activations(out: RankMemory, cfg, m, width: int) -> None:
    """The activation and transient bytes of one micro-batch on a rank of `out`'s layout."""
    # Context parallelism: a rank holds N/C tokens of each sequence outside attention, and inside it the whole
    # sequence for H/C heads, the same number of elements: every activation is 1/C.
    tokens = cfg.train.micro_batch * cfg.data.seq_len / out.context
    full, checkpointed = activation_elements(m, out.tensor, cfg.parallel.sequence, cfg)
    out.activation_bytes = round(tokens * full * width)
    out.activation_bytes_checkpointed = round(tokens * checkpointed * width)
    out.transient_bytes = transient_elements(m, out.tensor) * width


def _projected_state_bytes(optim, shape: list[int], bf16: bool) -> int:
    """GaLore/Fira's state of one [rows, cols] weight: fp32 moments of the projected gradient, the
    projection, and with bf16 its own fp32 master (they stay out of ZeRO)."""
    from megatrain.optim.galore import projection_side

    rows, cols = shape
    r = optim.rank
    low, proj = {"right": (rows * r, r * cols), "left": (r * cols, rows * r), "full": (r * r, rows * r + r * cols)}[
        projection_side(optim.proj_type, shape)
    ]
    return 4 * (2 * low + proj + (rows * cols if bf16 else 0))


def transient_elements(m, tp: int) -> int:
    """Elements of the largest tensor one projection builds and frees inside its own call, on one
    rank: for SLTrain the dense W [D_in, D_out] of its largest projection (split over TP like the
    layer: D_out in column roles, D_in in row roles), 0 for every other kind. kernels/sparse_lowrank.py
    builds W per call and, in backward, frees the rebuilt W before dW (the same size) exists."""
    if m.linear != "sltrain":
        return 0
    from megatrain.models.layers import projection_shapes

    return max(math.ceil(d_in * d_out / tp) for _, d_in, d_out in projection_shapes(m))


def iha_extra_elements(m, tp: int, width: int) -> float:
    """What an IHA layer saves per token beyond MHA's q, k, v and attention output, in elements of the
    activation width (kernels/iha.py): the mixing GEMMs keep their inputs q, k, v with k, v repeated
    to all H heads (all-gathered from every TP rank with tp_mode=exact), the attention keeps the P
    pseudo-heads q~, k~ (rotated), v~ and its output o~ (P x MHA's q, k, v, o) and the logsumexp
    [B, H, N*P] in fp32; the collapse's output is the attention output MHA counts too."""
    d, kv, heads, pseudo = m.dim, m.kv_heads * m.head_dim, m.heads, m.iha.pseudo_heads
    mixing_in = 3 * d if (m.iha.tp_mode == "exact" and tp > 1) else 3 * d / tp
    pseudo_heads = 4 * pseudo * d / tp
    logsumexp = heads * pseudo / tp * 4 / width
    return mixing_in + pseudo_heads + logsumexp - (d + 2 * kv) / tp


def activation_elements(m, tp: int, sequence_parallel: bool, cfg) -> tuple[float, float]:
    """Elements saved for backward per token on one rank: (without, with activation checkpointing).

    Per decoder layer: the two norms' inputs and outputs (4 D, split over the sequence with SP);
    q, k, v, the attention output, gate, up and the SwiGLU output ((2 D + 2 KV d + 3 F) / TP, the
    fused attention keeps only its row statistics; IHA adds its pseudo-heads, `iha_extra_elements`);
    low-rank kinds add their r-wide intermediates (CoLA: x a and silu(x a) per projection unless CoLA-M
    recomputes them; LoRA/ReLoRA: x a, and the dropout's input copy). Outside the layers: the
    embedding output and the final norm's output. With activation checkpointing a layer keeps only its
    input (D, / TP with SP) and one layer is live again during its recomputation.
    """
    d, f, kv = m.dim, m.ffn_dim, m.kv_heads * m.head_dim
    seq_split = tp if sequence_parallel else 1
    per_layer = 4 * d / seq_split + (2 * d + 2 * kv + 3 * f) / tp
    if m.attention == "iha":
        per_layer += iha_extra_elements(m, tp, 2 if _bf16(cfg) else 4)
    if m.linear != "dense":
        from megatrain.models.config import FROZEN_BASE_KINDS
        from megatrain.models.layers import lowrank_options

        opts = lowrank_options(m)
        if m.linear == "cola" and not opts.recompute:
            per_layer += 7 * 2 * opts.rank
        elif m.linear in FROZEN_BASE_KINDS:
            per_layer += 7 * opts.rank + (7 * d if opts.dropout > 0 else 0)
    outside = 2 * d / seq_split
    full = m.layers * per_layer + outside
    checkpointed = m.layers * d / seq_split + per_layer + outside
    return full, checkpointed


def device_memory_bytes(local_world: int = 1) -> tuple[str, Optional[int]]:
    """(what, bytes) of the memory one rank may use here: the GPU's total memory, or on CPU the
    host's physical memory shared by `local_world` processes."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return f"{props.name} ({props.total_memory / GIB:.1f} GiB)", props.total_memory
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return "host memory (unknown)", None
    return f"host memory ({total / GIB:.1f} GiB shared by {local_world} process(es))", total // max(1, local_world)


def check_fits(cfg, world_size: int, local_world: Optional[int] = None) -> Optional[str]:
    """A one-line warning when the planned per-rank memory exceeds this machine's memory per rank
    (None when it fits, or when the memory is unknown). Never raises for a valid config."""
    try:
        plan = plan_memory(cfg, world_size)
    except ConfigError:
        return None  # the launch's own checks report it
    what, available = device_memory_bytes(local_world or world_size if not torch.cuda.is_available() else 1)
    if available is None or plan.total_bytes <= available:
        return None
    return (
        f"megatrain: warning: the plan for this layout (parallel.tensor={plan.tensor} x {plan.dp} data-parallel, "
        f"ZeRO-{plan.zero_stage}, {plan.dtype}) needs about {plan.total_bytes / GIB:.1f} GiB per rank but "
        f"{what} allows {available / GIB:.1f} GiB; see `megatrain plan` (more TP/ZeRO, "
        f"train.activation_checkpointing, a smaller train.micro_batch)"
    )


# ---------------------------------------------------------------------------------------------- measured


def _status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux: writing 5 to clear_refs); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def measure_build(cfg, model_cfg, groups) -> dict:
    """Build this rank's model through the engine (`build_model`) and measure it: the bytes of the
    parameters it holds (ZeRO-3: its partitions), the host RSS before and the peak during the
    build, and on GPUs the peak allocated device memory. Collective (every rank builds)."""
    from megatrain.engine.build import build_model

    import gc

    gc.collect()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    reset = _reset_peak_rss()
    before = _status_kib("VmRSS")
    model = build_model(cfg, model_cfg, groups)
    peak = _status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    params, param_bytes = 0, 0
    for param in model.parameters():  # each shared (tied) parameter once
        held = getattr(param, "ds_tensor", param)
        params += held.numel()
        param_bytes += held.numel() * held.element_size()
    return {
        "params": params,
        "param_bytes": param_bytes,
        "host_rss_before_bytes": (before or 0) * 1024,
        "host_peak_bytes": (peak or 0) * 1024,
        "gpu_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
    }


def format_plan(plan: RankMemory, measured: Optional[list[dict]] = None) -> str:
    """A plain-text table of the plan (and, after `--build`, each rank's measurements)."""

    def gib(b: float) -> str:
        return f"{b / GIB:10.3f} GiB" if b >= GIB else f"{b / 2**20:10.3f} MiB"

    context = f"x {plan.context} context " if plan.context > 1 else ""
    lines = [
        f"layout: world {plan.world_size} = parallel.tensor {plan.tensor} {context}x {plan.dp} data-parallel, "
        f"ZeRO-{plan.zero_stage}, {plan.dtype}",
        f"parameters per rank: {plan.params:,}",
        "per rank:",
        f"  weights                                      {gib(plan.param_bytes)}",
        f"  gradients                                    {gib(plan.grad_bytes)}",
        f"  fp32 master weights                          {gib(plan.master_bytes)}",
        f"  optimizer state                              {gib(plan.optimizer_bytes)}",
        f"  model states                                 {gib(plan.model_state_bytes)}",
        f"  activations per micro-batch, no checkpointing{gib(plan.activation_bytes)}",
        f"  activations per micro-batch, checkpointing   {gib(plan.activation_bytes_checkpointed)}",
        f"  transient per call (SLTrain's dense W)       {gib(plan.transient_bytes)}",
        f"  total (activation_checkpointing={str(plan.activation_checkpointing).lower():5})     "
        f"{gib(plan.total_bytes)}",
    ]
    if measured:
        lines.append("measured while building (megatrain plan --build):")
        lines.append(
            "  (weights as built: fp32 on the host, or ZeRO-3 partitions in the run's dtype; DeepSpeed casts "
            "the rest at start-up)"
        )
        lines.append(
            "  rank | parameters planned | parameters held | weights held | host RSS before | "
            "host peak while building | GPU peak"
        )
        for rank, m in enumerate(measured):
            gpu = "-" if m["gpu_peak_bytes"] is None else gib(m["gpu_peak_bytes"])
            lines.append(
                f"  {rank:4d} | {plan.params:18,} | {m['params']:15,} | {gib(m['param_bytes'])} | "
                f"{gib(m['host_rss_before_bytes'])} | {gib(m['host_peak_bytes'])} | {gpu}"
            )
    return "\n".join(lines)
