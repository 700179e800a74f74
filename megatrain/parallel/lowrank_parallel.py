"""Tensor-parallel forms of the low-rank projection kinds (CoLA, SLTrain, LoRA and ReLoRA), for the plan's column
and row roles (docs/lowrank.md, docs/tensor-parallel.md).

Factors are stored as the kernels take them: a [D_in, r], b [r, D_out] (y = f(x a) b).

Column roles (q, k, v, gate, up; input replicated, output split along D_out):
    a (r-wide) is replicated; b, the bias and LoRA's W rows are split along D_out. Each rank
    computes its own output columns; a's gradient is then a partial sum over the ranks' columns,
    so it is all-reduced (`copy_to_tp` on the weight). SLTrain's sparse part keeps the entries of
    this rank's columns.
Row roles (o, down; input split along D_in):
    a and LoRA's W columns are split along D_in. CoLA all-reduces its r-wide x a (with sequence
    parallelism: reduce-scatters it along the sequence) and applies the replicated b after the
    activation: one r-wide collective instead of the dense layer's D-wide one. SLTrain and LoRA
    are linear in x, so their low-rank term joins the dense-like partial output and one D-wide
    all-reduce (as the dense row layer) completes both; their replicated b then has a partial
    gradient, summed over the group. SLTrain keeps the entries of this rank's rows.

Replicated tensors stay equal on every TP rank because their gradients are complete (summed) before
the optimizer sees them; DeepSpeed counts them once in the gradient norm (no `tensor_model_parallel`).
SLTrain's values and support stay whole on every rank (their split would be uneven): each rank
gathers its entries with non-persistent local positions, and the values' gradient is summed.
Every layer is built from the full-size module with `from_full`, keeping the parameter names.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from megatrain import kernels
from megatrain.models.layers import CoLALinear, LoRALinear, SLTrainLinear, _kaiming_uniform_
from megatrain.parallel.tensor_parallel import (
    copy_to_tp,
    mark_split,
    reduce_from_tp,
    reduce_scatter_sequence,
)

__all__ = [
    "parallel_lowrank",
    "ColumnParallelCoLA",
    "RowParallelCoLA",
    "ColumnParallelSLTrain",
    "RowParallelSLTrain",
    "ColumnParallelLoRA",
    "RowParallelLoRA",
    "LOWRANK_TYPES",
]

LOWRANK_TYPES = (CoLALinear, SLTrainLinear, LoRALinear)


def _part(t: Tensor, dim: int, rank: int, parts: int) -> nn.Parameter:
    size = t.shape[dim] // parts
    return nn.Parameter(t.detach().narrow(dim, rank * size, size).clone(), requires_grad=t.requires_grad)


def _whole(t: Optional[Tensor]) -> Optional[nn.Parameter]:
    return None if t is None else nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad)


def _sparse_positions(index: Tensor, d_out: int, *, dim: int, start: int, size: int) -> tuple[Tensor, Tensor]:
    """(positions into the full support, their flat positions in the local [D_in_local, D_out_local] block)
    of the support entries whose column (dim 1) or row (dim 0) lies in [start, start + size)."""
    rows, cols = index // d_out, index % d_out
    if dim == 1:
        keep = (cols >= start) & (cols < start + size)
        local = rows[keep] * size + (cols[keep] - start)
    else:
        keep = (rows >= start) & (rows < start + size)
        local = (rows[keep] - start) * d_out + cols[keep]
    return keep.nonzero().flatten(), local  # row-major order is kept: local stays sorted


class _ColumnBase(nn.Module):
    """Shared by the column forms: the TP group and, for key/value heads replicated over ranks, the
    group whose copies' gradients are summed (`grad_group`)."""

    def _split_grads(self, *tensors):
        if self.grad_group is None:
            return tensors
        return tuple(None if t is None else copy_to_tp(t, self.grad_group) for t in tensors)


class ColumnParallelCoLA(_ColumnBase):
    """CoLA, column role: y_local = silu(x a) b[:, cols] + bias[cols]; x [..., D_in] -> [..., D_out/T]."""

    def __init__(self, full: CoLALinear, group, *, rank: int, parts: int, grad_group=None, counted: bool = True):
        super().__init__()
        self.group, self.grad_group, self.recompute = group, grad_group, full.recompute
        self.in_features, self.out_features, self.rank = full.in_features, full.out_features // parts, full.rank
        self.cola_a = _whole(full.cola_a)
        self.cola_b = _part(full.cola_b, 1, rank, parts)
        self.bias = _part(full.bias, 0, rank, parts)
        mark_split(self.cola_b, 1, counted)
        mark_split(self.bias, 0, counted)

    def forward(self, x: Tensor) -> Tensor:
        b, bias = self._split_grads(self.cola_b, self.bias)
        return kernels.lowrank_linear(
            x, copy_to_tp(self.cola_a, self.group), b, bias, activation="silu", recompute=self.recompute
        )


class RowParallelCoLA(nn.Module):
    """CoLA, row role: h = all-reduce(x_local a[rows]) [..., r]; y = silu(h) b + bias.

    With sequence parallelism h is reduce-scattered along the sequence instead, so y is
    [B, N/T, D_out] and b's (and the bias's) gradient, from this rank's tokens only, is summed."""

    def __init__(self, full: CoLALinear, group, *, rank: int, parts: int, sequence_parallel: bool = False):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.in_features, self.out_features, self.rank = full.in_features // parts, full.out_features, full.rank
        self.cola_a = _part(full.cola_a, 0, rank, parts)
        self.cola_b = _whole(full.cola_b)
        self.bias = _whole(full.bias)
        mark_split(self.cola_a, 0)

    def forward(self, x: Tensor) -> Tensor:
        partial = x @ self.cola_a.to(x.dtype)
        if self.sequence_parallel:
            h = reduce_scatter_sequence(partial, self.group)
            b, bias = copy_to_tp(self.cola_b, self.group), copy_to_tp(self.bias, self.group)
        else:
            h = reduce_from_tp(partial, self.group)
            b, bias = self.cola_b, self.bias
        return F.silu(h) @ b.to(h.dtype) + bias.to(h.dtype)


class ColumnParallelSLTrain(_ColumnBase):
    """SLTrain, column role: y_local = x (scale a b[:, cols] + S[:, cols]); S's values and support stay
    whole, this rank reads the entries of its columns."""

    def __init__(self, full: SLTrainLinear, group, *, rank: int, parts: int, grad_group=None, counted: bool = True):
        super().__init__()
        self.group, self.grad_group, self.scale = group, grad_group, full.scale
        self.alpha, self.density, self.rank = full.alpha, full.density, full.rank
        self.in_features, self.out_features = full.in_features, full.out_features // parts
        self.lora_a = _whole(full.lora_a)
        self.lora_b = _part(full.lora_b, 1, rank, parts)
        self.sparse_values = _whole(full.sparse_values)
        self.register_buffer("sparse_index", full.sparse_index.clone(), persistent=True)
        positions, local = _sparse_positions(
            full.sparse_index, full.out_features, dim=1, start=rank * self.out_features, size=self.out_features
        )
        self.register_buffer("local_positions", positions, persistent=False)
        self.register_buffer("local_index", local, persistent=False)
        self.bias = None if full.bias is None else _part(full.bias, 0, rank, parts)
        mark_split(self.lora_b, 1, counted)
        if self.bias is not None:
            mark_split(self.bias, 0, counted)

    def forward(self, x: Tensor) -> Tensor:
        b, bias = self._split_grads(self.lora_b, self.bias)
        values = copy_to_tp(self.sparse_values, self.group)[self.local_positions]
        y = kernels.sparse_lowrank_linear(
            x, copy_to_tp(self.lora_a, self.group), b, values, self.local_index, self.scale
        )
        return y if bias is None else y + bias.to(y.dtype)


class RowParallelSLTrain(nn.Module):
    """SLTrain, row role: y = all-reduce(x_local (scale a[rows] b + S[rows])) (+ bias); b and S's values
    are whole, their gradients summed over the group."""

    def __init__(self, full: SLTrainLinear, group, *, rank: int, parts: int, sequence_parallel: bool = False):
        super().__init__()
        self.group, self.sequence_parallel, self.scale = group, sequence_parallel, full.scale
        self.alpha, self.density, self.rank = full.alpha, full.density, full.rank
        self.in_features, self.out_features = full.in_features // parts, full.out_features
        self.lora_a = _part(full.lora_a, 0, rank, parts)
        self.lora_b = _whole(full.lora_b)
        self.sparse_values = _whole(full.sparse_values)
        self.register_buffer("sparse_index", full.sparse_index.clone(), persistent=True)
        positions, local = _sparse_positions(
            full.sparse_index, full.out_features, dim=0, start=rank * self.in_features, size=self.in_features
        )
        self.register_buffer("local_positions", positions, persistent=False)
        self.register_buffer("local_index", local, persistent=False)
        self.bias = _whole(full.bias)
        mark_split(self.lora_a, 0)

    def forward(self, x: Tensor) -> Tensor:
        values = copy_to_tp(self.sparse_values, self.group)[self.local_positions]
        partial = kernels.sparse_lowrank_linear(
            x, self.lora_a, copy_to_tp(self.lora_b, self.group), values, self.local_index, self.scale
        )
        return _row_output(partial, self.bias, self.group, self.sequence_parallel)


class _ReLoRAShard:
    """What ReLoRA's restarts (megatrain.optim.relora) need from a split LoRA layer: the re-draw of the
    factors and the whole-layer view of a factor-shaped tensor (its Adam moments), so that a restart
    at TP=T does exactly what it does in one process.

    The merge W += scale (a b)^T needs nothing more: with b split along D_out (column) or a along
    D_in (row), this rank's W shard receives exactly its part of the product."""

    @torch.no_grad()
    def reset_adapters(self, generator: Optional[torch.Generator] = None) -> None:
        """a <- Kaiming-uniform (fan_in = the whole layer's D_in), b <- 0. The whole [D_in, r] factor
        is drawn on every rank from the same generator as one process draws it, and this rank keeps
        its rows: the values (and the generator's position after the draw) are layout-independent."""
        split = self.lora_a.shape[0] != self.full_in_features
        whole = torch.empty(self.full_in_features, self.rank) if split else self.lora_a
        _kaiming_uniform_(whole, self.full_in_features, generator)
        if split:
            self.lora_a.copy_(whole.narrow(0, self.shard * self.lora_a.shape[0], self.lora_a.shape[0]))
        nn.init.zeros_(self.lora_b)

    def full_factor(self, name: str, t: Tensor) -> Tensor:
        """The whole-layer tensor of `t`, shaped like this rank's factor `name` ("lora_a" or "lora_b"):
        `t` itself for the replicated factor, else all-gathered over the TP group along the split
        dimension (copies of replicated key/value heads taken once). A collective for split factors:
        every rank of the group calls it for the same tensors in the same order."""
        dim = getattr(getattr(self, name), "partition_dim", None)
        if dim is None:
            return t
        world = dist.get_world_size(self.group)
        pieces = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(pieces, t.contiguous(), group=self.group)
        counted = [torch.zeros(1) for _ in range(world)]
        dist.all_gather(counted, torch.tensor([float(self.counted)]), group=self.group)
        return torch.cat([p for p, c in zip(pieces, counted) if c.item()], dim=dim)

    def local_factor(self, name: str, full: Tensor) -> Tensor:
        """This rank's part of a whole-layer tensor shaped like factor `name` (inverse of `full_factor`)."""
        local = getattr(self, name)
        dim = getattr(local, "partition_dim", None)
        if dim is None:
            return full
        size = local.shape[dim]
        return full.narrow(dim, self.shard * size, size)


class ColumnParallelLoRA(_ColumnBase, _ReLoRAShard):
    """LoRA, column role: y_local = x W[rows].T + scale dropout(x) a b[:, cols]."""

    def __init__(self, full: LoRALinear, group, *, rank: int, parts: int, grad_group=None, counted: bool = True):
        super().__init__()
        self.group, self.grad_group = group, grad_group
        self.alpha, self.scale, self.restarts, self.rank = full.alpha, full.scale, full.restarts, full.rank
        self.in_features, self.out_features = full.in_features, full.out_features // parts
        self.full_in_features = full.in_features
        self.weight = _part(full.weight, 0, rank, parts)
        self.weight.relora_base = True
        self.bias = None if full.bias is None else _part(full.bias, 0, rank, parts)
        self.lora_a = _whole(full.lora_a)
        self.lora_b = _part(full.lora_b, 1, rank, parts)
        self.dropout = full.dropout
        self.adapters_enabled = full.adapters_enabled
        self.shard, self.counted = rank, counted
        mark_split(self.weight, 0, counted)
        mark_split(self.lora_b, 1, counted)
        if self.bias is not None:
            mark_split(self.bias, 0, counted)

    def forward(self, x: Tensor) -> Tensor:
        weight, bias, b = self._split_grads(self.weight, self.bias, self.lora_b)
        y = F.linear(x, weight, bias)
        if not self.adapters_enabled:
            return y
        return y + self.scale * kernels.lowrank_linear(
            self.dropout(x), copy_to_tp(self.lora_a, self.group), b, activation=None
        )


class RowParallelLoRA(nn.Module, _ReLoRAShard):
    """LoRA, row role: y = all-reduce(x_local W[:, cols].T + scale dropout(x_local) a[rows] b) (+ bias)."""

    def __init__(self, full: LoRALinear, group, *, rank: int, parts: int, sequence_parallel: bool = False):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.alpha, self.scale, self.restarts, self.rank = full.alpha, full.scale, full.restarts, full.rank
        self.in_features, self.out_features = full.in_features // parts, full.out_features
        self.weight = _part(full.weight, 1, rank, parts)
        self.weight.relora_base = True
        self.bias = _whole(full.bias)
        self.lora_a = _part(full.lora_a, 0, rank, parts)
        self.lora_b = _whole(full.lora_b)
        self.dropout = full.dropout
        self.adapters_enabled = full.adapters_enabled
        self.full_in_features, self.shard, self.counted = full.in_features, rank, True
        mark_split(self.weight, 1)
        mark_split(self.lora_a, 0)

    def forward(self, x: Tensor) -> Tensor:
        partial = F.linear(x, self.weight)
        if self.adapters_enabled:
            partial = partial + self.scale * kernels.lowrank_linear(
                self.dropout(x), self.lora_a, copy_to_tp(self.lora_b, self.group), activation=None
            )
        return _row_output(partial, self.bias, self.group, self.sequence_parallel)


def _row_output(partial: Tensor, bias: Optional[Tensor], group, sequence_parallel: bool) -> Tensor:
    """The reduction of a row layer's partial output (as RowParallelLinear), bias added once after it."""
    if sequence_parallel:
        y = reduce_scatter_sequence(partial, group)
        bias = None if bias is None else copy_to_tp(bias, group)
    else:
        y = reduce_from_tp(partial, group)
    return y if bias is None else y + bias.to(y.dtype)


_COLUMN = {CoLALinear: ColumnParallelCoLA, SLTrainLinear: ColumnParallelSLTrain, LoRALinear: ColumnParallelLoRA}
_ROW = {CoLALinear: RowParallelCoLA, SLTrainLinear: RowParallelSLTrain, LoRALinear: RowParallelLoRA}


def parallel_lowrank(
    full: nn.Module,
    role: str,
    group,
    *,
    rank: int,
    parts: int,
    grad_group=None,
    counted: bool = True,
    sequence_parallel: bool = False,
) -> nn.Module:
    """The TP form of low-rank module `full` for `role` ("column" or "row"), keeping rank `rank` of `parts`."""
    if role == "column":
        return _COLUMN[type(full)](full, group, rank=rank, parts=parts, grad_group=grad_group, counted=counted)
    return _ROW[type(full)](full, group, rank=rank, parts=parts, sequence_parallel=sequence_parallel)
