"""Ulysses-style context parallelism (`parallel.context` = C; docs/parallelism.md).

Each sequence of a micro-batch is split over the C ranks of a context group (megatrain.parallel.groups):
rank c holds tokens [c N/C, (c+1) N/C) everywhere but inside attention, so the embedding, norms, MLPs, the
head and the loss, and their activations, are 1/C per rank. In each attention layer an all-to-all turns
this rank's slice of q, k, v for all heads ([B, N/C, H, d]) into the whole sequence for H/C heads
([B, N, H/C, d]); attention runs there, and the reverse all-to-all brings the output back to the sequence
slice (DeepSpeed-Ulysses, arXiv:2309.14509).

The all-to-all is DeepSpeed's `deepspeed.sequence.layer.DistributedAttention`: it takes any callable as the
local attention, runs its own autograd function (the reverse all-to-all in backward) and supports the
[B, N, H, d] layout (batch_dim_idx=0), which is the layout megatrain's projections produce. What megatrain
adds around it (each attention kind's `context_attention` hook, models/attention.py):

- MHA/GQA: RoPE at the tokens' global positions before the exchange; KV heads fewer than C are repeated
  first, so each rank receives the KV head of its query heads (the repeat's backward sums their gradients).
- IHA: the head mixing is per token, so it runs on the sequence slice, where every head is local; the
  exchange then moves pseudo-heads: [B, N/C * P, H, d] -> [B, N * P, H/C, d] virtual tokens; the P outputs
  of each token come back and are collapsed on the sequence slice.

A forward with a KV cache or explicit positions (decoding, qTTT's span steps) runs whole on every rank of the
group; `context_prefill` splits the one that fills a fresh cache with a long context (qTTT's prefill).

The model (`Transformer.sequence_shard`) places its default positions at the slice; the hooks here cut the
slice out of the full [B, N] ids and labels the sampler gives every rank of the group, weight the loss and
gather logits.

The loss: rank c returns S_c / N_valid, S_c its summed token losses and N_valid the micro-batch's
non-ignored labels over the whole group (one all-reduce of a count), so the group's losses sum to the
one-process mean loss whatever the ignored labels. DeepSpeed, told the context group through the Ulysses
`mpu` methods (megatrain.parallel.groups), sums gradients over the context ranks and averages them over the
data ranks: the gradient is sum_c grad S_c / N_valid, the single-process one. The trainer and the
validator report the sum over the group (`Validator(context=C)`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from megatrain.constants import IGNORE_INDEX

__all__ = ["UlyssesExchange", "apply_context_parallel", "context_comm_volume", "context_size", "context_prefill"]

_FORWARD_ARGS = ("input_ids", "labels", "cache", "positions")


class UlyssesExchange:
    """The attention modules' `context_attention`: `(q, k, v, *, attend) -> out` over a context group.

    q, k, v: this rank's slice [B, N/C, h, d] (h divisible by `size`); `attend` gets [B, N, h/C, d] each
    (the ranks' heads in order: rank c holds heads [c h/C, (c+1) h/C)) and returns [B, N', h/C, e]; the
    result comes back as [B, N'/C, h, e]. Not an nn.Module, so it adds no submodule to the model.
    """

    def __init__(self, group, size: int, rank: int):
        import deepspeed.comm
        from deepspeed.sequence.layer import DistributedAttention

        if not deepspeed.comm.is_initialized():  # a bare torch.distributed start (tests): DeepSpeed wraps it
            import deepspeed

            deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)
        self.group, self.size, self.rank = group, size, rank
        # scatter the heads (dim 2), gather the sequence (dim 1) of [B, N, H, d]
        self._attention = DistributedAttention(_run_attend, group, scatter_idx=2, gather_idx=1)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, attend: Callable[[Tensor, Tensor, Tensor], Tensor]):
        return self._attention(q, k, v, 0, None, attend)

    def __deepcopy__(self, memo):  # a copied model talks over the same group
        return self


def _run_attend(q: Tensor, k: Tensor, v: Tensor, attend: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Tensor:
    return attend(q, k, v)


def apply_context_parallel(model, groups) -> None:
    """Make `model` (a megatrain Transformer, after tensor parallelism) compute its rank's slice of every
    sequence of a full-sequence forward, over `groups.cp_group` (`groups.cp_size` ranks). Local: no collective
    runs here (the group exists already)."""
    from megatrain.models.attention import AttentionProjections
    from megatrain.parallel.checks import check_context_split

    size, rank, group = groups.cp_size, groups.cp_rank, groups.cp_group
    check_context_split(model.config, size, groups.tp_size)
    exchange = UlyssesExchange(group, size, rank)
    for module in model.modules():
        if isinstance(module, AttentionProjections):
            module.context_attention = exchange
    model.sequence_shard = (rank, size)
    model.register_forward_pre_hook(_slice_inputs(size, rank), with_kwargs=True)
    model.register_forward_hook(_combine_outputs(group, size, rank), with_kwargs=True)
    model.context_parallel = (size, rank)


def _bound(args: tuple, kwargs: dict) -> dict:
    bound = dict(zip(_FORWARD_ARGS, args))
    bound.update(kwargs)
    return bound


def _is_split(bound: dict) -> bool:
    """A full-sequence forward (no cache, default positions): the one context parallelism splits. Decoding
    with a cache or at given positions runs whole on every rank of the group."""
    return bound.get("cache") is None and bound.get("positions") is None


def _slice_inputs(size: int, rank: int):
    def hook(module, args, kwargs):
        bound = _bound(args, kwargs)
        if not _is_split(bound):
            return None
        ids = bound["input_ids"]
        n = ids.shape[1]
        if n % size:
            raise ValueError(
                f"context parallelism over {size} ranks: a sequence of {n} tokens does not split "
                f"evenly (data.seq_len must be a multiple of parallel.context)"
            )
        local = n // size
        bound["input_ids"] = ids.narrow(1, rank * local, local)
        if bound.get("labels") is not None:
            bound["labels"] = bound["labels"].narrow(1, rank * local, local)
        return (), bound

    return hook


def _combine_outputs(group, size: int, rank: int):
    def hook(module, args, kwargs, output):
        bound = _bound(args, kwargs)
        if not _is_split(bound):
            return None
        labels = bound.get("labels")
        if labels is None:  # logits [B, N/C, V] -> the whole sequence's [B, N, V] on every rank
            return _GatherSequence.apply(output, group, size, rank)
        valid = (labels != IGNORE_INDEX).sum().to(torch.float64)
        total = valid.clone()
        dist.all_reduce(total, group=group)
        weight = torch.where(total > 0, valid / total.clamp_min(1), torch.zeros_like(total))
        return output * weight.to(output.dtype)

    return hook


def context_size(model) -> int:
    """C of a model `apply_context_parallel` made context-parallel, else 1."""
    return getattr(model, "context_parallel", (1, 0))[0]


@torch.no_grad()
def context_prefill(model, input_ids: Tensor, positions: Tensor, cache) -> Tensor:
    """Fill a fresh KVCache with a whole sequence split over the context group (qTTT's context prefill).

    input_ids, positions: [B, N] (positions may be [1, N]; left padding sits at a position no query
    reaches), the same on every rank of the group, N divisible by C. Rank c runs tokens [c N/C, (c+1) N/C)
    through the model at their given positions; in every layer its keys and values (after RoPE; IHA: its
    rotated pseudo keys and values) are all-gathered over the group before they enter `cache`, so this
    rank's queries attend to the whole sequence under the position mask and every rank's cache ends with
    the full K/V of the sequence, as one process would hold it. The all-gather the cache needs anyway
    replaces the Ulysses all-to-alls here (docs/parallelism.md). No gradient (the gather has none).

    Returns this rank's output of the model (the logits of its slice of the sequence)."""
    size, rank = model.context_parallel
    group = _exchange(model).group
    n = input_ids.shape[1]
    if n % size:
        raise ValueError(f"context_prefill over {size} ranks: {n} tokens do not split evenly (pad to a multiple)")
    if cache.length or cache.frozen or cache.static is not None or cache.capacity is not None:
        raise ValueError("context_prefill fills a fresh, growing KVCache (nothing cached, not frozen or static)")
    local = n // size
    view = _GatheringCache(cache, group, size)
    return model(
        input_ids.narrow(1, rank * local, local), cache=view, positions=positions.narrow(1, rank * local, local)
    )


def _exchange(model) -> UlyssesExchange:
    from megatrain.models.attention import AttentionProjections

    for module in model.modules():
        if isinstance(module, AttentionProjections) and isinstance(module.context_attention, UlyssesExchange):
            return module.context_attention
    raise ValueError("the model is not context-parallel (megatrain.parallel.context_parallel.apply_context_parallel)")


class _GatheringCache:
    """A KVCache as the model sees it during `context_prefill`: what a rank adds (its slice's positions
    [1 or B, N/C], each layer's keys and values [B, h, N/C, e]) is all-gathered along the sequence over the
    context group first, so the cache stores, and attention reads, the whole sequence."""

    frozen = False

    def __init__(self, cache, group, size: int):
        self.cache, self.group, self.size = cache, group, size

    @property
    def length(self) -> int:
        return self.cache.length

    def append_positions(self, positions: Tensor) -> Tensor:
        return self.cache.append_positions(self._gather(positions, 1))

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.cache.update(layer_idx, self._gather(k, 2), self._gather(v, 2))

    def _gather(self, x: Tensor, dim: int) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)


class _GatherSequence(torch.autograd.Function):
    """All-gather [B, n, ...] slices along dim 1 of a context group; backward keeps this rank's slice of
    the gradient (every rank computes the same thing from the gathered tensor)."""

    @staticmethod
    def forward(ctx, x: Tensor, group, size: int, rank: int) -> Tensor:
        ctx.rank, ctx.local = rank, x.shape[1]
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad.narrow(1, ctx.rank * ctx.local, ctx.local), None, None, None


def context_comm_volume(model_cfg, tokens: int, context: int, *, bytes_per_element: int = 2) -> dict:
    """Bytes each rank sends in the Ulysses all-to-alls of one forward + backward over `tokens` tokens of
    the micro-batch (all C slices together), for planning: an all-to-all of S bytes per rank sends
    (C-1)/C S. Per layer, forward: q, k, v in (k, v with the KV heads, repeated up to C when fewer), the
    output back; backward: the same tensors' gradients the other way. IHA moves P pseudo-tokens of every head
    for q, k, v and the output (its P outputs per token come back before the collapse).

    Returns bytes: {"per_layer", "per_step"}."""
    m = model_cfg.resolved()
    if context == 1:
        return {"per_layer": 0.0, "per_step": 0.0}
    local = tokens / context
    ring = (context - 1) / context
    if m.attention == "iha":
        elements = 4 * local * m.iha.pseudo_heads * m.heads * m.head_dim
    else:
        kv = max(m.kv_heads, context)
        elements = local * m.head_dim * (2 * m.heads + 2 * kv)
    per_layer = 2 * ring * elements * bytes_per_element  # forward + backward
    return {"per_layer": per_layer, "per_step": m.layers * per_layer}
