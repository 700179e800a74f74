"""Collectives that are no-ops in a single process, for code that runs with or without a process group."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a torch.distributed process group is running."""
    return dist.is_available() and dist.is_initialized()


def close_process_group() -> None:
    """Destroy this process's group before the interpreter exits: a gloo group left to the exit handlers
    can abort a rank at exit ("terminate called without an active exception") after a clean run. Best
    effort: a failure here leaves the process's own result standing."""
    if is_distributed():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - at exit, nothing is left to report it to
            pass


def barrier() -> None:
    """Wait for every rank of the default group; nothing to wait for in a single process."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over every rank, in place (unchanged in a single process); returns `t`."""
    if is_distributed() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
