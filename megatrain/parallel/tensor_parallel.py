"""Megatron-style tensor-parallel layers and the autograd communication functions they use.

Every function here is an autograd.Function whose backward is the transpose of its forward's
communication, so a tensor-parallel model differentiates exactly like the single-process one:

| function | forward | backward |
|---|---|---|
| `copy_to_tp` | identity | all-reduce over the TP group |
| `reduce_from_tp` | all-reduce | identity |
| `gather_from_tp` | all-gather along the last dim | keep this rank's slice |
| `gather_sequence` | all-gather along dim 1 (the sequence) | reduce-scatter along dim 1 |
| `gather_sequence_for_replicated_grad` | all-gather along dim 1 | keep this rank's slice (the incoming gradient is already complete on every rank) |
| `reduce_scatter_sequence` | reduce-scatter along dim 1 | all-gather along dim 1 |

Layers (each built from a full-size layer with `from_full`, keeping this rank's slice, so a TP run
starts from exactly the weights a single process would have):

- `ColumnParallelLinear`: weight rows (outputs) split; input replicated, output split.
- `RowParallelLinear`: weight columns (inputs) split; input split, output all-reduced (or
  reduce-scattered along the sequence with sequence parallelism), bias added after the reduction.
- `VocabParallelEmbedding`: vocabulary rows split; out-of-range ids look up zeros, then all-reduce
  (or reduce-scatter along the sequence).
- `VocabParallelLMHead`: head rows split; the loss is the vocab-parallel fused cross-entropy
  (`megatrain.kernels.fused_linear_cross_entropy(..., process_group=tp)`), which never gathers the
  [T, V] logits: it all-reduces the max, the sum of exponentials and the target logit.
- `SequenceParallelRMSNorm`: the norm of a sequence shard; its weight's gradient is all-reduced
  over the TP group (each rank saw only its part of the sequence).

Split parameters carry Megatron's attributes (`tensor_model_parallel=True`, `partition_dim`), which
DeepSpeed reads to count them once per TP group in the gradient norm. gloo has no reduce-scatter, so
it is an all-reduce followed by a slice there.
"""  # noqa: E501  (the table's rows)

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from megatrain import kernels
from megatrain.constants import IGNORE_INDEX

__all__ = [
    "copy_to_tp",
    "reduce_from_tp",
    "gather_from_tp",
    "gather_sequence",
    "gather_sequence_for_replicated_grad",
    "reduce_scatter_sequence",
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "VocabParallelLMHead",
    "SequenceParallelRMSNorm",
    "mark_split",
]


# --------------------------------------------------------------------------- collectives on tensors
# Bytes each rank sends over the wire in the TP collectives (ring algorithms: an all-reduce of S bytes
# sends 2 (T-1)/T S, an all-gather or reduce-scatter (T-1)/T of the full tensor). Benchmarks read and
# reset it to check `parallelize.tp_comm_volume` against what a run really moved.
COMM_BYTES = {"all_reduce": 0.0, "all_gather": 0.0, "reduce_scatter": 0.0}


def _world(group) -> int:
    return dist.get_world_size(group)


def _count(kind: str, full_bytes: int, world: int) -> None:
    if torch.compiler.is_compiling():  # a host counter: traced into a compiled graph it breaks the trace
        return
    COMM_BYTES[kind] += (2.0 if kind == "all_reduce" else 1.0) * (world - 1) / world * full_bytes


def _all_reduce(x: Tensor, group) -> Tensor:
    if _world(group) == 1:
        return x
    x = x.contiguous()
    _count("all_reduce", x.numel() * x.element_size(), _world(group))
    dist.all_reduce(x, group=group)
    return x


def _all_gather(x: Tensor, dim: int, group) -> Tensor:
    world = _world(group)
    if world == 1:
        return x
    x = x.contiguous()
    _count("all_gather", world * x.numel() * x.element_size(), world)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def _local_slice(x: Tensor, dim: int, group) -> Tensor:
    world = _world(group)
    if world == 1:
        return x
    if x.shape[dim] % world:
        raise ValueError(f"tensor parallel: dim {dim} of size {x.shape[dim]} does not split into {world} parts")
    return x.chunk(world, dim=dim)[dist.get_rank(group)].contiguous()


def _reduce_scatter(x: Tensor, dim: int, group) -> Tensor:
    world = _world(group)
    if world == 1:
        return x
    if x.shape[dim] % world:
        raise ValueError(
            f"sequence parallel: sequence length {x.shape[dim]} does not split into {world} parts; "
            f"it must be a multiple of parallel.tensor"
        )
    _count("reduce_scatter", x.numel() * x.element_size(), world)
    if dist.get_backend(group) == "nccl":
        moved = x.movedim(dim, 0).contiguous()
        out = torch.empty((moved.shape[0] // world, *moved.shape[1:]), dtype=x.dtype, device=x.device)
        dist.reduce_scatter_tensor(out, moved, group=group)
        return out.movedim(0, dim).contiguous()
    # gloo implements no reduce-scatter (counted as one: that is what NCCL would send).
    reduced = x.clone()
    dist.all_reduce(reduced, group=group)
    return _local_slice(reduced, dim, group)


# --------------------------------------------------------------------------- autograd functions
class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _local_slice(grad, -1, ctx.group), None


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, reduce_grad):
        ctx.group, ctx.reduce_grad = group, reduce_grad
        return _all_gather(x, 1, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduce_grad:
            return _reduce_scatter(grad, 1, ctx.group), None, None
        return _local_slice(grad, 1, ctx.group), None, None


class _ReduceScatterSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, 1, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, 1, ctx.group), None


def copy_to_tp(x: Tensor, group) -> Tensor:
    """Identity forward; all-reduce of the gradient over `group` (entry of a column-parallel region)."""
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: Tensor, group) -> Tensor:
    """All-reduce forward (sum of the partial outputs of a row-parallel layer); identity backward."""
    return _ReduceFromTP.apply(x, group)


def gather_from_tp(x: Tensor, group) -> Tensor:
    """[..., F/T] -> [..., F]: all-gather along the last dim; backward keeps this rank's slice."""
    return _GatherFromTP.apply(x, group)


def gather_sequence(x: Tensor, group) -> Tensor:
    """[B, N/T, ...] -> [B, N, ...]: all-gather along the sequence; backward reduce-scatters
    (each rank's gradient for the full sequence is a partial sum)."""
    return _GatherSequence.apply(x, group, True)


def gather_sequence_for_replicated_grad(x: Tensor, group) -> Tensor:
    """[B, N/T, ...] -> [B, N, ...]: all-gather along the sequence; backward keeps this rank's slice.

    For consumers whose gradient arrives already summed over the TP group on every rank (the
    vocab-parallel cross-entropy all-reduces its input gradient itself)."""
    return _GatherSequence.apply(x, group, False)


def reduce_scatter_sequence(x: Tensor, group) -> Tensor:
    """[B, N, ...] partial sums -> [B, N/T, ...] summed: reduce-scatter along the sequence;
    backward all-gathers."""
    return _ReduceScatterSequence.apply(x, group)


# --------------------------------------------------------------------------- parameter marking
def mark_split(param: nn.Parameter, partition_dim: int, counted: bool = True) -> None:
    """Tag a tensor-parallel parameter the way Megatron and DeepSpeed expect.

    `counted=False` marks a copy that other TP ranks also hold (a key/value head replicated because
    there are fewer KV heads than TP ranks): it is then counted only once in the gradient norm.
    """
    param.tensor_model_parallel = counted
    param.model_parallel = counted
    param.partition_dim = partition_dim
    param.partition_stride = 1


def _slice_rows(t: Tensor, start: int, size: int) -> Tensor:
    return t.detach().narrow(0, start, size).clone()


# --------------------------------------------------------------------------- layers
class ColumnParallelLinear(nn.Module):
    """y_local = x @ W[rows of this rank].T (+ b[rows]); x [..., D_in] replicated, y [..., F_local].

    The entry communication (`copy_to_tp`, or `gather_sequence` with sequence parallelism) is done
    by the caller once per region (q, k and v share one input), so this module only multiplies.
    With `gather_output` the full [..., F] output is all-gathered.

    `grad_group`: when this rank's rows are replicated on other ranks (key/value heads when there
    are fewer KV heads than TP ranks), their weight gradient is summed over that group.
    """

    def __init__(self, weight: Tensor, bias: Optional[Tensor], group, *, gather_output: bool = False, grad_group=None):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.group, self.gather_output, self.grad_group = group, gather_output, grad_group
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @classmethod
    def from_full(
        cls,
        full: nn.Linear,
        group,
        *,
        rank: int,
        parts: int,
        gather_output: bool = False,
        grad_group=None,
        counted: bool = True,
    ) -> "ColumnParallelLinear":
        """Keep rows [rank * F/parts, (rank+1) * F/parts) of `full` (F = full.out_features)."""
        if not isinstance(full, nn.Linear):
            raise TypeError(f"ColumnParallelLinear.from_full needs nn.Linear, got {type(full).__name__}")
        size = full.out_features // parts
        bias = None if full.bias is None else _slice_rows(full.bias, rank * size, size)
        layer = cls(
            _slice_rows(full.weight, rank * size, size), bias, group, gather_output=gather_output, grad_group=grad_group
        )
        mark_split(layer.weight, 0, counted)
        if layer.bias is not None:
            mark_split(layer.bias, 0, counted)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.weight, self.bias
        if self.grad_group is not None:
            weight = copy_to_tp(weight, self.grad_group)
            bias = None if bias is None else copy_to_tp(bias, self.grad_group)
        y = F.linear(x, weight, bias)
        return gather_from_tp(y, self.group) if self.gather_output else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features(local)={self.out_features}, bias={self.bias is not None}"


class RowParallelLinear(nn.Module):
    """y = reduce_T(x_local @ W[:, columns of this rank].T) + b; x [..., D_in/T], y [..., D_out].

    The reduction is an all-reduce, or with `sequence_parallel` a reduce-scatter along the sequence
    (y is then [B, N/T, D_out]). The bias is added once, after the reduction.
    """

    def __init__(self, weight: Tensor, bias: Optional[Tensor], group, *, sequence_parallel: bool = False):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.group, self.sequence_parallel = group, sequence_parallel
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @classmethod
    def from_full(
        cls, full: nn.Linear, group, *, rank: int, parts: int, sequence_parallel: bool = False
    ) -> "RowParallelLinear":
        """Keep columns [rank * D_in/parts, (rank+1) * D_in/parts) of `full`; the bias stays whole."""
        if not isinstance(full, nn.Linear):
            raise TypeError(f"RowParallelLinear.from_full needs nn.Linear, got {type(full).__name__}")
        size = full.in_features // parts
        weight = full.weight.detach().narrow(1, rank * size, size).clone()
        bias = None if full.bias is None else full.bias.detach().clone()
        layer = cls(weight, bias, group, sequence_parallel=sequence_parallel)
        mark_split(layer.weight, 1)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        partial = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_sequence(partial, self.group)
            # Each rank sees its own part of the sequence: the bias gradient is a partial sum.
            bias = None if self.bias is None else copy_to_tp(self.bias, self.group)
        else:
            y = reduce_from_tp(partial, self.group)
            bias = self.bias
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        return f"in_features(local)={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows [start, start + V/T) live on this rank; ids [B, N] -> [B, N, D]
    (with sequence parallelism [B, N/T, D])."""

    def __init__(self, weight: Tensor, vocab_start: int, group, *, sequence_parallel: bool = False):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.vocab_start, self.vocab_end = vocab_start, vocab_start + weight.shape[0]
        self.group, self.sequence_parallel = group, sequence_parallel
        mark_split(self.weight, 0)

    @classmethod
    def from_full(
        cls, full: nn.Embedding, group, *, rank: int, parts: int, sequence_parallel: bool = False
    ) -> "VocabParallelEmbedding":
        size = full.num_embeddings // parts
        return cls(_slice_rows(full.weight, rank * size, size), rank * size, group, sequence_parallel=sequence_parallel)

    def forward(self, input_ids: Tensor) -> Tensor:
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local_ids = (input_ids - self.vocab_start).masked_fill(outside, 0)
        partial = F.embedding(local_ids, self.weight).masked_fill(outside[..., None], 0.0)
        if self.sequence_parallel:
            return reduce_scatter_sequence(partial, self.group)
        return reduce_from_tp(partial, self.group)


class VocabParallelLMHead(nn.Module):
    """The output head with rows [start, start + V/T) on this rank (same contract as LMHead).

    With labels the loss is the vocab-parallel fused cross-entropy, computed inside this forward;
    without, the full logits [..., V] are all-gathered (generation and evaluation only).
    """

    def __init__(self, weight: nn.Parameter, group, *, sequence_parallel: bool = False):
        super().__init__()
        self.weight = weight  # may be the (already split) embedding's Parameter when tied
        self.group, self.sequence_parallel = group, sequence_parallel

    def forward(self, h: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        if labels is None:
            h = gather_sequence(h, self.group) if self.sequence_parallel else copy_to_tp(h, self.group)
            return gather_from_tp(h @ self.weight.T, self.group)
        if self.sequence_parallel:
            # The cross-entropy all-reduces the gradient of h itself, so the gather's backward must not.
            h = gather_sequence_for_replicated_grad(h, self.group)
        return kernels.fused_linear_cross_entropy(
            h.reshape(-1, h.shape[-1]),
            self.weight,
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            process_group=self.group,
        )


class SequenceParallelRMSNorm(nn.Module):
    """RMSNorm over a sequence shard [B, N/T, D]; same math and parameter as models' RMSNorm."""

    def __init__(self, weight: nn.Parameter, eps: float, group):
        super().__init__()
        self.weight, self.eps, self.group = weight, eps, group

    def forward(self, x: Tensor, residual: Optional[Tensor] = None):
        # Every rank normalises different tokens: the weight's gradient is summed over the group.
        return kernels.rms_norm(x, copy_to_tp(self.weight, self.group), self.eps, residual)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
