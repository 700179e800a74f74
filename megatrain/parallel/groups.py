"""Tensor-parallel x data-parallel process groups, and the DeepSpeed `mpu` protocol over them.

Ranks are laid out TP-major: tensor-parallel groups are runs of `tensor` consecutive ranks (so a TP
group stays inside a node when `tensor` divides the GPUs per node), and data-parallel groups take one
rank from each TP group:

    world 8, tensor 2:  TP groups [0,1] [2,3] [4,5] [6,7];  DP groups [0,2,4,6] [1,3,5,7]

ZeRO shards and all-reduces over the DP group only (DeepSpeed asks `mpu` for it).

Context parallelism (`parallel.context` = C, Ulysses: megatrain/parallel/context_parallel.py) sits between
TP and DP: rank = (data * C + context) * T + tp. The C ranks of a context group (stride T) read the same
sequences and each holds one contiguous slice of them; they hold the same parameters, so the group ZeRO
shards and all-reduces over (`dp_group`) is data x context, the same stride-T group as without context
parallelism. DeepSpeed learns this through its Ulysses `mpu` methods: `get_data_parallel_*` is the data
group (the batch arithmetic), `get_sequence_parallel_*` the context group and `get_sequence_data_parallel_*`
the data x context group, which ZeRO partitions and reduces over (summing over the context ranks,
averaging over the data ranks):

    world 8, tensor 2, context 2:  TP [0,1] [2,3] [4,5] [6,7];  context [0,2] [1,3] [4,6] [5,7];
                                   data x context (dp_group) [0,2,4,6] [1,3,5,7];  data [0,4] [1,5] [2,6] [3,7]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from megatrain.errors import ConfigError


def layout(world_size: int, tensor: int) -> tuple[list[list[int]], list[list[int]]]:
    """(TP groups, DP groups) as rank lists for `world_size` processes and TP size `tensor`."""
    if tensor < 1 or world_size % tensor:
        raise ConfigError(f"parallel.tensor={tensor} does not divide the world size {world_size}")
    tp_groups = [list(range(start, start + tensor)) for start in range(0, world_size, tensor)]
    dp_groups = [list(range(offset, world_size, tensor)) for offset in range(tensor)]
    return tp_groups, dp_groups


def context_layout(world_size: int, tensor: int, context: int) -> list[list[int]]:
    """The context-parallel groups as rank lists: C ranks of stride `tensor` inside each block of C x T."""
    block = tensor * context
    if context < 1 or world_size % block:
        raise ConfigError(
            f"parallel.tensor x parallel.context = {tensor} x {context} does not divide the world size {world_size}"
        )
    return [
        list(range(start + tp, start + block, tensor)) for start in range(0, world_size, block) for tp in range(tensor)
    ]


def kv_replicas(kv_heads: int, tensor: int) -> int:
    """How many TP ranks hold each KV head (1 unless kv_heads < tensor)."""
    return tensor // kv_heads if kv_heads < tensor else 1


@dataclass
class ParallelGroups:
    """This rank's place in the TP x DP grid, with the torch.distributed groups to talk over.

    Both groups always exist, single-rank ones included, so callers and DeepSpeed never special-case
    a dimension of size 1.
    """

    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    dp_rank: int
    dp_size: int
    tp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    # Context parallelism (parallel.context): this rank's slice of each sequence and its group. dp_rank /
    # dp_size / dp_group above count data x context ranks (ZeRO's replicas); the sampler reads data_rank.
    cp_rank: int = 0
    cp_size: int = 1
    cp_group: Optional[dist.ProcessGroup] = None
    data_group: Optional[dist.ProcessGroup] = None  # ranks with the same tp and context rank (dp_group if C=1)
    # Pipeline parallelism (parallel.pipeline): this rank's stage (megatrain.parallel.pipeline.build_pipeline_groups).
    pp_rank: int = 0
    pp_size: int = 1

    @property
    def data_rank(self) -> int:
        """Which share of the global batch this rank reads (the ranks of a context group read the same)."""
        return self.dp_rank // self.cp_size

    @property
    def data_size(self) -> int:
        """How many shares the global batch is split into: world / (tensor x context)."""
        return self.dp_size // self.cp_size

    # ---- the DeepSpeed mpu protocol (DeepSpeed calls these by name) --------------------------------
    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp_size

    def get_model_parallel_group(self):
        return self.tp_group

    def get_data_parallel_rank(self) -> int:
        return self.data_rank

    def get_data_parallel_world_size(self) -> int:
        return self.data_size

    def get_data_parallel_group(self):
        return self.data_group if self.cp_size > 1 else self.dp_group

    # DeepSpeed-Ulysses: the context group, and data x context, the group ZeRO partitions and reduces over.
    def get_sequence_parallel_rank(self) -> int:
        return self.cp_rank

    def get_sequence_parallel_world_size(self) -> int:
        return self.cp_size

    def get_sequence_parallel_group(self):
        return self.cp_group

    def get_sequence_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.dp_size

    def get_sequence_data_parallel_group(self):
        return self.dp_group

    # Megatron-style names that parts of DeepSpeed use.
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.pp_size


def build_groups(tensor: int, context: int = 1) -> ParallelGroups:
    """Create the TP, DP (data x context) and context groups for the running world (collective: every rank
    calls it)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    cp_groups = context_layout(world, tensor, context)
    tp_groups, dp_groups = layout(world, tensor)
    tp_group = dp_group = None
    # new_group is collective: every rank creates every group, in the same order.
    for ranks in tp_groups:
        group = dist.new_group(ranks)
        if rank in ranks:
            tp_group = group
    for ranks in dp_groups:
        group = dist.new_group(ranks)
        if rank in ranks:
            dp_group = group
    cp_group = data_group = None
    block = tensor * context
    data_groups = [list(range(offset, world, block)) for offset in range(block)]
    for ranks in (cp_groups + data_groups) if context > 1 else []:
        group = dist.new_group(ranks)
        if rank in ranks:
            cp_group, data_group = (group, data_group) if ranks in cp_groups else (cp_group, group)
    return ParallelGroups(
        rank=rank,
        world_size=world,
        tp_rank=rank % tensor,
        tp_size=tensor,
        dp_rank=rank // tensor,
        dp_size=world // tensor,
        tp_group=tp_group,
        dp_group=dp_group,
        cp_rank=(rank // tensor) % context,
        cp_size=context,
        cp_group=cp_group,
        data_group=data_group,
    )
