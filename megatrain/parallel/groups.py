"""Tensor-parallel x data-parallel process groups, and the DeepSpeed `mpu` protocol over them.

Ranks are laid out TP-major: tensor-parallel groups are runs of `tensor` consecutive ranks (so a TP
group stays inside a node when `tensor` divides the GPUs per node), and data-parallel groups take one
rank from each TP group:

    world 8, tensor 2:  TP groups [0,1] [2,3] [4,5] [6,7];  DP groups [0,2,4,6] [1,3,5,7]

ZeRO shards and all-reduces over the DP group only (DeepSpeed asks `mpu` for it).
"""

from __future__ import annotations

from dataclasses import dataclass
import torch.distributed as dist

from megatrain.errors import ConfigError


def layout(world_size: int, tensor: int) -> tuple[list[list[int]], list[list[int]]]:
    """(TP groups, DP groups) as rank lists for `world_size` processes and TP size `tensor`."""
    if tensor < 1 or world_size % tensor:
        raise ConfigError(f"parallel.tensor={tensor} does not divide the world size {world_size}")
    tp_groups = [list(range(start, start + tensor)) for start in range(0, world_size, tensor)]
    dp_groups = [list(range(offset, world_size, tensor)) for offset in range(tensor)]
    return tp_groups, dp_groups


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

    # ---- the DeepSpeed mpu protocol (DeepSpeed calls these by name) --------------------------------
    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp_size

    def get_model_parallel_group(self):
        return self.tp_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp_size

    def get_data_parallel_group(self):
        return self.dp_group

    # Megatron-style names that parts of DeepSpeed use.
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1


def build_groups(tensor: int) -> ParallelGroups:
    """Create the TP and DP groups for the running world (collective: every rank calls it)."""
    rank, world = dist.get_rank(), dist.get_world_size()
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
    return ParallelGroups(rank=rank, world_size=world, tp_rank=rank % tensor, tp_size=tensor,
                          dp_rank=rank // tensor, dp_size=world // tensor, tp_group=tp_group, dp_group=dp_group)
