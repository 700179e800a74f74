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
| pipeline (parallel.pipeline = S) | each stage holds only its layers' weights and state (the stage bounds the run uses, `stage_bounds`); ZeRO-1 partitions over the stage's DP ranks; its activations are those of its layers for each micro-batch in flight, min(S - s, micro-batches) on stage s under 1F1B (DeepSpeed's `TrainSchedule.num_pipe_buffers`), plus the residual stream it receives (2 D per token) on stages after the first |
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
    "plan_stages",
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
    pipeline: int = 1  # parallel.pipeline stages; the fields above are then one rank of stage `stage`
    stage: int = 0
    stage_layers: str = ""  # the pipeline layers this stage runs, e.g. "embedding, blocks 0-1"
    in_flight: int = 1  # micro-batches whose activations the stage holds at once (1F1B)

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
    """The per-rank memory of `cfg` run on `world_size` processes (validated like a launch would be). With
    parallel.pipeline > 1: a rank of the stage that needs the most (`plan_stages` gives every stage)."""
    stages = plan_stages(cfg, world_size, model_cfg)
    return max(stages, key=lambda plan: plan.total_bytes)


def plan_stages(cfg, world_size: int, model_cfg=None) -> list[RankMemory]:
    """One RankMemory per pipeline stage (one entry without pipelining): the bytes a rank of that stage holds."""
    from megatrain.models.transformer import Transformer
    from megatrain.parallel.pipeline import layer_weights, stage_bounds

    p = cfg.parallel
    context, stages = getattr(p, "context", 1), getattr(p, "pipeline", 1)
    if world_size < 1 or world_size % (p.tensor * context * stages):
        what = "parallel.tensor x parallel.context" + (" x parallel.pipeline" if stages > 1 else "")
        sizes = f"{p.tensor} x {context}" + (f" x {stages}" if stages > 1 else "")
        raise ConfigError(f"--world {world_size} is not a multiple of {what} = {sizes}")
    m = model_cfg if model_cfg is not None else plan_model_config(cfg)
    model = Transformer(m, seed=0, device="meta")
    if stages == 1:
        return [_plan_rank(cfg, world_size, m, model, None)]
    if stages > m.layers:
        raise ConfigError(f"parallel.pipeline={stages} is more stages than model.layers={m.layers}")
    bounds = stage_bounds(layer_weights(model), stages, p.pipeline_partition)
    micro_batches = max(1, cfg.train.grad_accum or p.microbatches or 1)
    return [
        _plan_rank(cfg, world_size, m, model, (s, stages, bounds[s], bounds[s + 1], micro_batches))
        for s in range(stages)
    ]


def _pipeline_layer(name: str, layers: int) -> int:
    """The pipeline layer (megatrain.parallel.pipeline: 0 embedding, 1..L blocks, L + 1 norm and head) that holds
    Transformer parameter `name`."""
    if name.startswith("embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return layers + 1


def _describe_layers(first: int, end: int, layers: int) -> str:
    parts = ["embedding"] if first == 0 else []
    blocks = [i - 1 for i in range(first, end) if 1 <= i <= layers]
    if blocks:
        parts.append(f"block {blocks[0]}" if len(blocks) == 1 else f"blocks {blocks[0]}-{blocks[-1]}")
    if end == layers + 2:
        parts.append("norm + head")
    return ", ".join(parts)


def _plan_rank(cfg, world_size: int, m, model, stage: Optional[tuple]) -> RankMemory:
    """A rank's RankMemory; `stage` (s, S, first layer, end layer, micro-batches) restricts it to one stage."""
    from megatrain.optim.zero_bridge import PROJECTED_MODULES
    from megatrain.parallel.plan import shard_specs

    p = cfg.parallel
    context = getattr(p, "context", 1)
    stages = 1 if stage is None else stage[1]
    # ZeRO shards over the data x context ranks (they hold the same parameters; megatrain.parallel.groups)
    tp, dp, zero = p.tensor, world_size // (p.tensor * stages), p.zero_stage
    bf16 = _bf16(cfg)
    width = 2 if bf16 else 4
    named = list(model.named_parameters())  # each shared (tied) parameter once
    specs = shard_specs([n for n, _ in named], m, tp)
    if stage is not None:
        first, end = stage[2], stage[3]
        held = lambda name: first <= _pipeline_layer(name, m.layers) < end  # noqa: E731
        if m.tie_embeddings and end == m.layers + 2:  # the last stage's head holds the tied embedding too
            named = [(n, q) for n, q in named if held(n) or n.startswith("embed.")]
        else:
            named = [(n, q) for n, q in named if held(n)]
    warm = m.linear == "relora" and cfg.train.relora.warm_start_steps > 0
    projected_kind = cfg.optim.name in ("galore", "fira")
    out = RankMemory(
        world_size=world_size,
        tensor=tp,
        dp=dp // context,
        zero_stage=zero,
        context=context,
        dtype="bf16" if bf16 else "fp32",
        activation_checkpointing=cfg.train.activation_checkpointing,
    )
    if stage is not None:
        s, stages, first, end, micro_batches = stage
        out.pipeline, out.stage = stages, s
        out.stage_layers = _describe_layers(first, end, m.layers)
        out.in_flight = min(stages - s, micro_batches)
    zero_partitioned, projected_grads, projected_state = 0, 0, 0
    for name, param in named:
        dim, replicas = specs[name]
        shape = list(param.shape)
        if dim is not None:
            shape[dim] //= tp // replicas
        numel = math.prod(shape)
        out.params += math.ceil(numel / dp) if zero == 3 else numel
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
    sharded = (lambda n: math.ceil(n / dp)) if zero >= 1 else (lambda n: n)
    out.grad_bytes = width * ((math.ceil(zero_partitioned / dp) if zero >= 2 else zero_partitioned) + projected_grads)
    out.master_bytes = 4 * sharded(zero_partitioned) if bf16 else 0
    out.optimizer_bytes = 8 * sharded(zero_partitioned) + projected_state
    _count_activations(out, cfg, m, width, None if stage is None else (stage[2], stage[3]))
    return out


def _count_activations(out: RankMemory, cfg, m, width: int, span: Optional[tuple[int, int]] = None) -> None:
    """The activation and transient bytes on a rank of `out`'s layout: one micro-batch, or with a pipeline
    stage's layer span [first, end) its micro-batches in flight."""
    # Context parallelism: a rank holds N/C tokens of each sequence outside attention, and inside it the whole
    # sequence for H/C heads, the same number of elements: every activation is 1/C.
    tokens = cfg.train.micro_batch * cfg.data.seq_len / out.context
    if span is None:
        full, checkpointed = activation_elements(m, out.tensor, cfg.parallel.sequence, cfg)
    else:
        full, checkpointed = stage_activation_elements(m, out.tensor, cfg.parallel.sequence, cfg, *span, out.in_flight)
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
    per_layer, outside, kept = _layer_elements(m, tp, sequence_parallel, cfg)
    full = m.layers * per_layer + outside
    checkpointed = m.layers * kept + per_layer + outside
    return full, checkpointed


def stage_activation_elements(
    m, tp: int, sequence_parallel: bool, cfg, first: int, end: int, in_flight: int
) -> tuple[float, float]:
    """`activation_elements` for the pipeline stage running layers [first, end) (0 the embedding, 1..L the
    blocks, L + 1 the norm and head) with `in_flight` micro-batches' activations held at once (1F1B): its
    blocks' and its share of the embedding / final norm outputs per micro-batch in flight, plus the residual
    stream a later stage receives (the MLP output and the stream before it, 2 D per token, / TP with SP);
    with activation checkpointing a block keeps its input, that same pair (`BlockLayer`), and one block is
    live again during its recomputation."""
    per_layer, outside, _ = _layer_elements(m, tp, sequence_parallel, cfg)
    seq_split = tp if sequence_parallel else 1
    kept = 2 * m.dim / seq_split
    blocks = sum(1 for i in range(first, end) if 1 <= i <= m.layers)
    ends = (outside / 2) * ((first == 0) + (end == m.layers + 2))
    received = 2 * m.dim / seq_split if first > 0 else 0.0
    full = in_flight * (blocks * per_layer + ends + received)
    checkpointed = in_flight * (blocks * kept + ends + received) + (per_layer if blocks else 0.0)
    return full, checkpointed


def _layer_elements(m, tp: int, sequence_parallel: bool, cfg) -> tuple[float, float, float]:
    """(elements per token saved by one decoder layer, by the embedding + final norm outputs, by one
    checkpointed layer) on one rank (`activation_elements` says what is counted)."""
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
    return per_layer, outside, d / seq_split


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
    pipeline = f"stage {plan.stage} of parallel.pipeline={plan.pipeline}, " if plan.pipeline > 1 else ""
    pipeline += f"parallel.context={plan.context}, " if plan.context > 1 else ""
    what, available = device_memory_bytes(local_world or world_size if not torch.cuda.is_available() else 1)
    if available is None or plan.total_bytes <= available:
        return None
    return (
        f"megatrain: warning: the plan for this layout ({pipeline}parallel.tensor={plan.tensor} x {plan.dp} "
        f"data-parallel, "
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

    pipelined = cfg.parallel.pipeline > 1

    gc.collect()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    reset = _reset_peak_rss()
    before = _status_kib("VmRSS")
    if pipelined:  # this stage's layers only (megatrain.engine.pipeline)
        from megatrain.engine.pipeline import build_pipeline_model

        model = build_pipeline_model(cfg, model_cfg, groups)
    else:
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
        "stage": groups.pp_rank if pipelined else 0,
    }


def _gib(b: float) -> str:
    return f"{b / GIB:10.3f} GiB" if b >= GIB else f"{b / 2**20:10.3f} MiB"


def format_plan(plan, measured: Optional[list[dict]] = None) -> str:
    """A plain-text table of the plan (a RankMemory, or `plan_stages`' list: one row per pipeline stage), and
    after `--build` each rank's measurements."""
    if isinstance(plan, list):
        if len(plan) > 1:
            return _format_stages(plan, measured)
        plan = plan[0]
    gib = _gib

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
        lines += _measured_rows(measured, [plan])
    return "\n".join(lines)


def _measured_rows(measured: list[dict], stages: list[RankMemory]) -> list[str]:
    rows = []
    for rank, m in enumerate(measured):
        gpu = "-" if m["gpu_peak_bytes"] is None else _gib(m["gpu_peak_bytes"])
        planned = stages[m.get("stage", 0)].params
        rows.append(
            f"  {rank:4d} | {planned:18,} | {m['params']:15,} | {_gib(m['param_bytes'])} | "
            f"{_gib(m['host_rss_before_bytes'])} | {_gib(m['host_peak_bytes'])} | {gpu}"
        )
    return rows


def _format_stages(stages: list[RankMemory], measured: Optional[list[dict]] = None) -> str:
    """The plan of a pipelined layout: one row per stage (every rank of a stage holds the same)."""
    head = stages[0]
    largest = max(stages, key=lambda plan: plan.total_bytes)
    micro = max(plan.in_flight for plan in stages)
    lines = [
        f"layout: world {head.world_size} = parallel.pipeline {head.pipeline} x parallel.tensor {head.tensor} "
        f"x {head.dp} data-parallel, ZeRO-{head.zero_stage}, {head.dtype}; 1F1B holds up to {micro} "
        f"micro-batch(es) in flight (stage s: min(stages - s, micro-batches))",
        "per rank of each stage:",
        "  stage | layers                          |   parameters |   weights      |   gradients    | "
        "fp32 master    |  optimizer     | in flight | activations    | checkpointed   | total",
    ]
    for plan in stages:
        lines.append(
            f"  {plan.stage:5d} | {plan.stage_layers:31} | {plan.params:12,} | {_gib(plan.param_bytes)} | "
            f"{_gib(plan.grad_bytes)} | {_gib(plan.master_bytes)} | {_gib(plan.optimizer_bytes)} | "
            f"{plan.in_flight:9d} | {_gib(plan.activation_bytes)} | {_gib(plan.activation_bytes_checkpointed)} | "
            f"{_gib(plan.total_bytes)}"
        )
    lines.append(
        f"largest: stage {largest.stage}, {_gib(largest.total_bytes).strip()} per rank "
        f"(activations as train.activation_checkpointing={str(largest.activation_checkpointing).lower()}; "
        f"SLTrain's transient W {_gib(largest.transient_bytes).strip()} included)"
    )
    if measured:
        lines.append("measured while building (megatrain plan --build), each rank against its stage's plan:")
        lines.append(
            "  rank | parameters planned | parameters held | weights held | host RSS before | "
            "host peak while building | GPU peak"
        )
        lines += _measured_rows(measured, stages)
    return "\n".join(lines)
