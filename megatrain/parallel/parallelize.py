"""Apply Megatron-style tensor parallelism (and optionally sequence parallelism) to a built model.

The model in models/ is written once, for one process. `parallelize` swaps its layers in place for
the tensor-parallel ones in tensor_parallel.py, keeping module and parameter names, so checkpoints,
the consolidated safetensors and the Hugging Face export use the same names at every TP size:

- embedding, output head: vocab-parallel (rows split); the loss never gathers the logits;
- attention: q, k, v column-parallel (heads split), o row-parallel; each rank runs its own heads.
  With fewer KV heads than TP ranks each KV head is replicated on TP/kv_heads consecutive ranks
  (the query heads of one group sit on those ranks) and its weight gradient is summed over them;
- MLP: gate and up column-parallel, down row-parallel;
- norms: replicated; with sequence parallelism they run on a sequence shard [B, N/T, D] and the
  residual stream stays split along the sequence between the TP regions, which all-gather on entry
  and reduce-scatter on exit.

Every rank first builds the full model from the run's seed and keeps its slices, so a TP run starts
from exactly the single-process weights (splits differ across ranks, replicated weights agree).
"""

from __future__ import annotations

import re
from typing import Callable

import torch.distributed as dist
from torch import Tensor, nn

from megatrain.parallel.checks import check_tensor_split
from megatrain.parallel.groups import ParallelGroups
from megatrain.parallel.reshard import kv_replicas
from megatrain.parallel.tensor_parallel import (
    ColumnParallelLinear, RowParallelLinear, SequenceParallelRMSNorm, VocabParallelEmbedding, VocabParallelLMHead,
    copy_to_tp, gather_sequence, mark_split,
)

__all__ = ["parallelize", "shard_specs", "ShardSpec", "universal_checkpoint_info", "tp_comm_volume"]

# (regex on the parameter name, partition dim). Anything else is replicated.
_COLUMN = (r"\.attn\.(q|k|v)_proj\.(weight|bias)$", r"\.mlp\.(gate|up)_proj\.(weight|bias)$")
_ROW = (r"\.attn\.o_proj\.weight$", r"\.mlp\.down_proj\.weight$")
_VOCAB = (r"^embed\.weight$", r"^head\.weight$")


class ShardSpec(tuple):
    """(partition_dim, replicas): how a parameter's full tensor is split over the TP group.

    partition_dim None = replicated on every TP rank. replicas > 1 = consecutive groups of that many
    ranks hold the same slice (key/value heads when kv_heads < TP)."""

    __slots__ = ()

    def __new__(cls, partition_dim, replicas=1):
        return super().__new__(cls, (partition_dim, replicas))

    @property
    def partition_dim(self):
        return self[0]

    @property
    def replicas(self) -> int:
        return self[1]


def shard_specs(names: list[str], model_cfg, tp: int) -> dict[str, ShardSpec]:
    """ShardSpec for each parameter name of a dense model at tensor-parallel size `tp`."""
    replicas = kv_replicas(model_cfg.kv_heads, tp)
    out = {}
    for name in names:
        spec = ShardSpec(None)
        if tp > 1:
            if any(re.search(p, name) for p in _VOCAB):
                spec = ShardSpec(0)
            elif any(re.search(p, name) for p in _COLUMN):
                kv = re.search(r"\.attn\.(k|v)_proj\.", name) is not None
                spec = ShardSpec(0, replicas if kv else 1)
            elif any(re.search(p, name) for p in _ROW):
                spec = ShardSpec(1)
        out[name] = spec
    return out


def _region_entry(fn: Callable[[Tensor], Tensor]):
    """Forward pre-hook that passes the module's first input through `fn` (the TP entry comm)."""

    def hook(module, args, kwargs):
        return (fn(args[0]), *args[1:]), kwargs

    return hook


def parallelize(model: nn.Module, groups: ParallelGroups, *, sequence_parallel: bool = False) -> nn.Module:
    """Split `model` (a megatrain.models.transformer.Transformer) over `groups.tp_group`, in place.

    Collective when KV heads are replicated (builds the replica groups): every rank must call it.
    Returns the model.
    """
    from megatrain.models.attention import InterleavedHeadAttention
    from megatrain.models.transformer import Transformer

    if not isinstance(model, Transformer):
        raise TypeError(f"parallelize: expected a megatrain Transformer, got {type(model).__name__}")
    cfg = model.config
    tp, rank, group = groups.tp_size, groups.tp_rank, groups.tp_group
    check_tensor_split(cfg, tp)
    if tp == 1:
        # Recorded at TP=1 too, so a single-process checkpoint can be resharded to TP > 1 later.
        model.universal_checkpoint_info = universal_checkpoint_info(model)
        return model

    # Replica groups for KV heads: TP ranks r with the same r // replicas hold the same KV head.
    replicas = kv_replicas(cfg.kv_heads, tp)
    kv_grad_group = None
    if replicas > 1:
        tp_ranks = [groups.rank - groups.tp_rank + r for r in range(tp)]
        for start in range(0, tp, replicas):
            members = tp_ranks[start:start + replicas]
            created = dist.new_group(members)
            if groups.rank in members:
                kv_grad_group = created
    kv_parts, kv_rank = (tp // replicas, rank // replicas)

    tied = model.head.weight is model.embed.weight
    model.embed = VocabParallelEmbedding.from_full(model.embed, group, rank=rank, parts=tp,
                                                   sequence_parallel=sequence_parallel)
    if tied:
        head_weight = model.embed.weight
    else:
        size = cfg.vocab_size // tp
        head_weight = nn.Parameter(model.head.weight.detach().narrow(0, rank * size, size).clone())
        mark_split(head_weight, 0)
    model.head = VocabParallelLMHead(head_weight, group, sequence_parallel=sequence_parallel)

    enter = (lambda x: gather_sequence(x, group)) if sequence_parallel else (lambda x: copy_to_tp(x, group))
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        attn.q_proj = ColumnParallelLinear.from_full(attn.q_proj, group, rank=rank, parts=tp)
        for name in ("k_proj", "v_proj"):
            full = getattr(attn, name)
            setattr(attn, name, ColumnParallelLinear.from_full(
                full, group, rank=kv_rank, parts=kv_parts, grad_group=kv_grad_group,
                counted=(rank % replicas == 0)))
        attn.o_proj = RowParallelLinear.from_full(attn.o_proj, group, rank=rank, parts=tp,
                                                  sequence_parallel=sequence_parallel)
        attn.heads = cfg.heads // tp
        attn.kv_heads = max(cfg.kv_heads // tp, 1)
        if isinstance(attn, InterleavedHeadAttention):
            _parallelize_iha(attn, cfg.iha.tp_mode, rank, group)
        mlp.gate_proj = ColumnParallelLinear.from_full(mlp.gate_proj, group, rank=rank, parts=tp)
        mlp.up_proj = ColumnParallelLinear.from_full(mlp.up_proj, group, rank=rank, parts=tp)
        mlp.down_proj = RowParallelLinear.from_full(mlp.down_proj, group, rank=rank, parts=tp,
                                                    sequence_parallel=sequence_parallel)
        attn.register_forward_pre_hook(_region_entry(enter), with_kwargs=True)
        mlp.register_forward_pre_hook(_region_entry(enter), with_kwargs=True)
        if sequence_parallel:
            block.attn_norm = SequenceParallelRMSNorm(block.attn_norm.weight, block.attn_norm.eps, group)
            block.mlp_norm = SequenceParallelRMSNorm(block.mlp_norm.weight, block.mlp_norm.eps, group)
    if sequence_parallel:
        model.norm = SequenceParallelRMSNorm(model.norm.weight, model.norm.eps, group)
    model.tensor_parallel = (tp, rank)
    model.universal_checkpoint_info = universal_checkpoint_info(model)
    return model


def _parallelize_iha(attn, tp_mode: str, rank: int, group) -> None:
    """Interleaved head attention over TP ranks, each computing its own H/T output heads.

    exact: q, k, v heads are all-gathered inside the TP group (backward: reduce-scatter), so each
    rank mixes all H heads as the single-process layer does. local: each rank mixes only its own
    heads (the config then requires model.iha.head_groups to be a multiple of T, which makes that
    the same model). The mixing and collapse tensors stay whole and replicated, but each rank
    differentiates only its output heads' part, so their gradients are summed over the group.
    """
    attn.head_offset = rank * attn.heads
    if tp_mode == "exact":
        attn.gather_heads = lambda q, k, v: tuple(gather_sequence(t, group) for t in (q, k, v))  # dim 1 = heads
    for param in (attn.mix_q, attn.mix_k, attn.mix_v, attn.collapse):
        param.register_hook(lambda grad: _all_reduce_grad(grad, group))


def _all_reduce_grad(grad: Tensor, group) -> Tensor:
    grad = grad.clone()
    dist.all_reduce(grad, group=group)
    return grad


def universal_checkpoint_info(model: nn.Module) -> dict:
    """What DeepSpeed's universal-checkpoint converter needs to merge our TP slices: row-parallel
    weights are concatenated along dim 1, replicated parameters taken from one rank, everything else
    (column- and vocab-parallel) along dim 0. Exact names, because the converter refuses patterns
    that match nothing."""
    from deepspeed.checkpoint.constants import (
        PARAMETER_WITH_ROW_PARALLELISM_PATTERNS, TP_REPLICATED_PARAMETER_PATTERNS, UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    # By name, not by the live TP size: a TP=1 checkpoint must say how to split for TP > 1.
    names = [name for name, _ in model.named_parameters()]
    specs = shard_specs(names, model.config, tp=2)
    row = [re.escape(n) + "$" for n in names if specs[n].partition_dim == 1]
    replicated = [re.escape(n) + "$" for n in names if specs[n].partition_dim is None]
    info = {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
    if row:
        info[PARAMETER_WITH_ROW_PARALLELISM_PATTERNS] = row
    if replicated:
        info[TP_REPLICATED_PARAMETER_PATTERNS] = replicated
    return info


def tp_comm_volume(model_cfg, tokens: int, tp: int, *, sequence_parallel: bool = False,
                   bytes_per_element: int = 2) -> dict:
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

    Returns bytes: {"per_layer", "embedding_and_head", "loss", "per_step"}.
    """
    m = model_cfg.resolved()
    zero = {"per_layer": 0.0, "embedding_and_head": 0.0, "loss": 0.0, "per_step": 0.0}
    if tp == 1:
        return zero
    act = tokens * m.dim * bytes_per_element
    ring = (tp - 1) / tp
    per_layer = 2 * 2 * (2 * ring * act)  # 2 regions x (forward + backward) x one all-reduce-equivalent
    if m.attention == "iha" and m.iha.tp_mode == "exact":
        per_layer += 2 * 3 * ring * tokens * m.heads * m.head_dim * bytes_per_element
    if sequence_parallel:
        # embedding: reduce-scatter forward, all-gather backward; head input: all-gather forward;
        # the 2L+1 norm weights' gradients: all-reduced (each rank saw part of the sequence).
        embedding_and_head = 3 * ring * act + (2 * m.layers + 1) * 2 * ring * m.dim * bytes_per_element
    else:
        embedding_and_head = 2 * ring * act
    loss = 2 * ring * act + 2 * ring * 4 * tokens * 4
    return {"per_layer": per_layer, "embedding_and_head": embedding_and_head, "loss": loss,
            "per_step": m.layers * per_layer + embedding_and_head + loss}
