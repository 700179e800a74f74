"""Apply Megatron-style tensor parallelism (and optionally sequence parallelism) to a built model.

The model in models/ is written once, for one process. `parallelize` swaps its layers in place for
the tensor-parallel ones in tensor_parallel.py, following the plan in plan.py (module -> role) and
keeping module and parameter names, so checkpoints, the consolidated safetensors and the Hugging
Face export use the same names at every TP size:

- embedding, output head (vocab): vocab-parallel (rows split); the loss never gathers the logits;
- attention (heads): q, k, v column-parallel (heads split), o row-parallel; each rank runs its own
  heads. With fewer KV heads than TP ranks each KV head is replicated on TP/kv_heads consecutive
  ranks (the query heads of one group sit on those ranks) and its weight gradient is summed over them;
- MLP (region): gate and up column-parallel, down row-parallel;
- low-rank kinds (CoLA, SLTrain, LoRA) in those roles: lowrank_parallel.py (first factor replicated and
  second column-split for column roles; first factor row-split for row roles);
- norms (replicated): with sequence parallelism they run on a sequence shard [B, N/T, D] and the
  residual stream stays split along the sequence between the TP regions, which all-gather on entry
  and reduce-scatter on exit.

The model may come from the meta device (`Transformer(cfg, seed=..., device="meta")`): each module
is then materialised full-size and initialised from its name-keyed generator just before its role
cuts this rank's slice out of it, and the full tensors are dropped, so a rank holds its share plus
one full module at a time. The weights are the single-process ones whatever the layout (splits
differ across ranks, replicated weights agree).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch.distributed as dist
from torch import Tensor, nn

from megatrain.models.attention import InterleavedHeadAttention
from megatrain.models.transformer import LMHead, RMSNorm, Transformer
from megatrain.parallel.checks import check_tensor_split
from megatrain.parallel.groups import ParallelGroups, kv_replicas
from megatrain.parallel.lowrank_parallel import LOWRANK_TYPES, parallel_lowrank
from megatrain.parallel.plan import TP_PLAN, Role, TPPlan, shard_specs, universal_checkpoint_info
from megatrain.parallel.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    SequenceParallelRMSNorm,
    VocabParallelEmbedding,
    VocabParallelLMHead,
    copy_to_tp,
    gather_sequence,
    mark_split,
)

__all__ = ["parallelize", "apply_plan", "SplitContext", "tp_comm_volume"]


@dataclass
class SplitContext:
    """What one rank needs to cut its part out of a full model: the resolved ModelConfig, the TP
    size, its rank and group, and for key/value heads (which may be replicated) the group of its
    replicas."""

    model_cfg: Any
    tp: int
    rank: int
    group: Optional[dist.ProcessGroup]
    sequence_parallel: bool = False
    kv_grad_group: Optional[dist.ProcessGroup] = None
    # id(full parameter) -> this rank's slice, so a parameter shared with a module split earlier
    # (the tied head) takes that slice.
    split_params: dict = field(default_factory=dict)

    @property
    def kv_replicas(self) -> int:
        return kv_replicas(self.model_cfg.kv_heads, self.tp)

    def enter_region(self, x: Tensor) -> Tensor:
        """The entry communication of a TP region (attention, MLP)."""
        return gather_sequence(x, self.group) if self.sequence_parallel else copy_to_tp(x, self.group)


def parallelize(model: nn.Module, groups: ParallelGroups, *, sequence_parallel: bool = False) -> nn.Module:
    """Split `model` (a megatrain.models.transformer.Transformer) over `groups.tp_group`, in place.

    Collective when KV heads are replicated (builds the replica groups): every rank must call it.
    A meta-device model is materialised module by module (only this rank's slices are kept).
    Returns the model.
    """
    if not isinstance(model, Transformer):
        raise TypeError(f"parallelize: expected a megatrain Transformer, got {type(model).__name__}")
    cfg = model.config
    tp = groups.tp_size
    check_tensor_split(cfg, tp)
    if tp > 1:
        ctx = SplitContext(
            cfg,
            tp,
            groups.tp_rank,
            groups.tp_group,
            sequence_parallel=sequence_parallel,
            kv_grad_group=_kv_grad_group(groups, kv_replicas(cfg.kv_heads, tp)),
        )
        apply_plan(model, ctx)
        model.tensor_parallel = (tp, groups.tp_rank)
    model.materialize()  # whatever is still on the meta device (everything at TP=1)
    if getattr(groups, "cp_size", 1) > 1:  # Ulysses context parallelism over the TP-split heads
        from megatrain.parallel.context_parallel import apply_context_parallel

        apply_context_parallel(model, groups)
    # Recorded at TP=1 too, so a single-process checkpoint can be resharded to TP > 1 later.
    model.universal_checkpoint_info = universal_checkpoint_info(model)
    return model


def _kv_grad_group(groups: ParallelGroups, replicas: int):
    """This rank's group of KV-head replicas: the TP ranks r with the same r // replicas (None if 1)."""
    if replicas == 1:
        return None
    found = None
    tp_ranks = [groups.rank - groups.tp_rank + r for r in range(groups.tp_size)]
    for start in range(0, groups.tp_size, replicas):
        members = tp_ranks[start : start + replicas]
        created = dist.new_group(members)
        if groups.rank in members:
            found = created
    return found


def apply_plan(model: nn.Module, ctx: SplitContext, plan: TPPlan = TP_PLAN) -> nn.Module:
    """Swap every module the plan names for its role's tensor-parallel form, in the plan's order.

    Local (no communication): every parameter becomes this rank's part as `shard_specs` describes it.
    ValueError when a parameter's module has no entry (or several) in the plan.
    """
    shard_specs([name for name, _ in model.named_parameters()], ctx.model_cfg, ctx.tp, plan)  # the plan covers it
    names = [name for name, _ in model.named_modules()]
    for entry in plan.entries:
        for name in names:
            if not entry.matches(name):
                continue
            apply = _APPLY.get(entry.role.name)
            if apply is None:
                raise ValueError(
                    f"tensor-parallel plan: role '{entry.role.name}' (module '{name}') has no "
                    f"tensor-parallel layer in parallelize yet"
                )
            # Meta-device model: this module full-size now, only this rank's part after the swap.
            module = model.materialize_module(name) if isinstance(model, Transformer) else model.get_submodule(name)
            swapped = apply(module, entry.role, ctx)
            if swapped is not None:
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, swapped)
    return model


def _vocab(module: nn.Module, role: Role, ctx: SplitContext):
    if isinstance(module, nn.Embedding):
        layer = VocabParallelEmbedding.from_full(
            module, ctx.group, rank=ctx.rank, parts=ctx.tp, sequence_parallel=ctx.sequence_parallel
        )
        ctx.split_params[id(module.weight)] = layer.weight
        return layer
    if isinstance(module, LMHead):
        weight = ctx.split_params.get(id(module.weight))  # tied to the embedding: its slice
        if weight is None:
            size = module.weight.shape[0] // ctx.tp
            weight = nn.Parameter(module.weight.detach().narrow(0, ctx.rank * size, size).clone())
            mark_split(weight, 0)
        return VocabParallelLMHead(weight, ctx.group, sequence_parallel=ctx.sequence_parallel)
    raise TypeError(f"tensor-parallel role vocab: no vocab-parallel layer for {type(module).__name__}")


def _column(module: nn.Module, role: Role, ctx: SplitContext):
    if isinstance(module, LOWRANK_TYPES):
        return parallel_lowrank(module, "column", ctx.group, rank=ctx.rank, parts=ctx.tp)
    return ColumnParallelLinear.from_full(module, ctx.group, rank=ctx.rank, parts=ctx.tp)


def _kv_column(module: nn.Module, role: Role, ctx: SplitContext):
    replicas = ctx.kv_replicas
    kwargs = dict(
        rank=ctx.rank // replicas,
        parts=ctx.tp // replicas,
        grad_group=ctx.kv_grad_group,
        counted=(ctx.rank % replicas == 0),
    )
    if isinstance(module, LOWRANK_TYPES):
        return parallel_lowrank(module, "column", ctx.group, **kwargs)
    return ColumnParallelLinear.from_full(module, ctx.group, **kwargs)


def _row(module: nn.Module, role: Role, ctx: SplitContext):
    if isinstance(module, LOWRANK_TYPES):
        return parallel_lowrank(
            module, "row", ctx.group, rank=ctx.rank, parts=ctx.tp, sequence_parallel=ctx.sequence_parallel
        )
    return RowParallelLinear.from_full(
        module, ctx.group, rank=ctx.rank, parts=ctx.tp, sequence_parallel=ctx.sequence_parallel
    )


def _replicated(module: nn.Module, role: Role, ctx: SplitContext):
    if not ctx.sequence_parallel:
        return None
    if isinstance(module, RMSNorm):
        return SequenceParallelRMSNorm(module.weight, module.eps, ctx.group)
    raise TypeError(f"tensor-parallel role replicated: no sequence-parallel form of {type(module).__name__}")


def _heads(module: nn.Module, role: Role, ctx: SplitContext):
    cfg = ctx.model_cfg
    module.heads = cfg.heads // ctx.tp
    module.kv_heads = max(cfg.kv_heads // ctx.tp, 1)
    if isinstance(module, InterleavedHeadAttention):
        _parallelize_iha(module, role, cfg.iha.tp_mode, ctx)
    return _region(module, role, ctx)


def _region(module: nn.Module, role: Role, ctx: SplitContext):
    module.register_forward_pre_hook(_region_entry(ctx.enter_region), with_kwargs=True)
    return None


_APPLY: dict[str, Callable[[nn.Module, Role, SplitContext], Optional[nn.Module]]] = {
    "vocab": _vocab,
    "column": _column,
    "kv_column": _kv_column,
    "row": _row,
    "replicated": _replicated,
    "heads": _heads,
    "region": _region,
}


def _region_entry(fn: Callable[[Tensor], Tensor]):
    """Forward pre-hook that passes the module's first input through `fn` (the TP entry comm)."""

    def hook(module, args, kwargs):
        return (fn(args[0]), *args[1:]), kwargs

    return hook


def _parallelize_iha(attn, role: Role, tp_mode: str, ctx: SplitContext) -> None:
    """Interleaved head attention over TP ranks, each computing its own H/T output heads.

    exact: q, k, v heads are all-gathered inside the TP group (backward: reduce-scatter), so each
    rank mixes all H heads as the single-process layer does. local: each rank mixes only its own
    heads (the config then requires model.iha.head_groups to be a multiple of T, which makes that
    the same model). The mixing and collapse tensors (the role's summed_grads) stay whole and
    replicated, but each rank differentiates only its output heads' part, so their gradients are
    summed over the group.
    """
    group = ctx.group
    attn.head_offset = ctx.rank * attn.heads
    if tp_mode == "exact":
        attn.gather_heads = lambda q, k, v: tuple(gather_sequence(t, group) for t in (q, k, v))  # dim 1 = heads
    for name in role.summed_grads:
        getattr(attn, name).register_hook(lambda grad: _all_reduce_grad(grad, group))


def _all_reduce_grad(grad: Tensor, group) -> Tensor:
    grad = grad.clone()
    dist.all_reduce(grad, group=group)
    return grad


def tp_comm_volume(
    model_cfg, tokens: int, tp: int, *, sequence_parallel: bool = False, bytes_per_element: int = 2
) -> dict:
    """Bytes each rank sends in the tensor-parallel collectives of one forward + backward over
    `tokens` tokens (ring algorithms: an all-reduce of S bytes sends 2 (T-1)/T S, an all-gather or a
    reduce-scatter (T-1)/T S of the full tensor), for planning multi-GPU runs.

    Per decoder layer, each of the two TP regions (attention, MLP) moves one [tokens, D] activation
    in and out: without sequence parallelism an all-reduce on exit (forward) and on entry
    (backward); with it an all-gather on entry and a reduce-scatter on exit in both passes: the
    same bytes in half-size collectives. IHA in exact mode adds an all-gather of q, k, v
    ([tokens, H d] each) forward and their reduce-scatter backward.
    Outside the layers: the vocab-parallel embedding's reduction (an all-reduce forward, or with SP a
    reduce-scatter forward and an all-gather backward), with SP the all-gather of the head's input and
    the all-reduce of the norm weights' gradients; inside the vocab-parallel
    cross-entropy, the all-reduce of the head input's gradient and of 4 fp32 row statistics.

    Low-rank kinds (lowrank_parallel.py): CoLA's row layers reduce the r-wide x a instead of the D-wide
    output (forward; the backward entry reduction stays D-wide); every kind all-reduces the gradients
    of its replicated factors once per backward: the column layers' a ([D, r] for q, k, v, gate,
    up), SLTrain's and LoRA's row-layer b ([r, D]) and SLTrain's sparse values, and with sequence
    parallelism CoLA's row-layer b and bias. (The gradient sums of KV heads replicated over ranks,
    kv_heads < T, are not counted, for dense layers either.)

    Returns bytes: {"per_layer", "embedding_and_head", "loss", "per_step"}.
    """
    m = model_cfg.resolved()
    zero = {"per_layer": 0.0, "embedding_and_head": 0.0, "loss": 0.0, "per_step": 0.0}
    if tp == 1:
        return zero
    act = tokens * m.dim * bytes_per_element
    ring = (tp - 1) / tp
    per_layer = 2 * 2 * (2 * ring * act)  # 2 regions x (forward + backward) x one all-reduce-equivalent
    if m.linear != "dense":
        per_layer += _lowrank_comm(m, tokens, ring, bytes_per_element, sequence_parallel) - (
            2 * 2 * ring * act if m.linear == "cola" else 0
        )
    if m.attention == "iha" and m.iha.tp_mode == "exact":
        per_layer += 2 * 3 * ring * tokens * m.heads * m.head_dim * bytes_per_element
    if sequence_parallel:
        # embedding: reduce-scatter forward, all-gather backward; head input: all-gather forward;
        # the 2L+1 norm weights' gradients: all-reduced (each rank saw part of the sequence).
        embedding_and_head = 3 * ring * act + (2 * m.layers + 1) * 2 * ring * m.dim * bytes_per_element
    else:
        embedding_and_head = 2 * ring * act
    loss = 2 * ring * act + 2 * ring * 4 * tokens * 4
    return {
        "per_layer": per_layer,
        "embedding_and_head": embedding_and_head,
        "loss": loss,
        "per_step": m.layers * per_layer + embedding_and_head + loss,
    }


def _lowrank_comm(m, tokens: int, ring: float, bytes_per_element: int, sequence_parallel: bool) -> float:
    """Bytes per layer the low-rank TP layers send besides the dense pattern (see tp_comm_volume); for
    CoLA this includes its r-wide exit collectives, which replace the dense ones (subtracted by the caller)."""
    from megatrain.models.layers import lowrank_options, projection_shapes, sparse_support_size

    opts = lowrank_options(m)
    r, d = opts.rank, m.dim
    grads = 5 * d * r  # column layers' a: q, k, v, gate, up all read the D-wide input
    out = 0.0
    if m.linear == "cola":
        out += 2 * 2 * ring * tokens * r * bytes_per_element  # o and down: r-wide exit, forward + backward
        if sequence_parallel:
            grads += 2 * (r * d + d)  # their b and bias saw this rank's tokens only
    else:
        grads += 2 * r * d  # the row layers' replicated b: partial gradients
    if m.linear == "sltrain":
        grads += sum(sparse_support_size(d_in, d_out, opts.density) for _, d_in, d_out in projection_shapes(m))
    return out + 2 * ring * grads * bytes_per_element
