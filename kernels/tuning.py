"""Autotuning for the matmul-shaped kernels, without touching the interpreter path.

A launcher asks its config function for the candidate `LaunchConfig`s of a problem (one small fixed
config for CPU tensors, a short list for CUDA) and calls `autotuned(kernel, configs, key)`: one
candidate launches the plain kernel with that config; several launch a `triton.autotune` wrapper
that times every candidate on the first call for each value of `key` (arguments whose values pick
the best tile, e.g. the rank) and reuses the winner afterwards. The grid must then be a function of
the chosen meta-parameters. Wrappers are built once per (kernel, candidates, key) and cached.

Kernels that write into an input they also read are tuned with `restore` (those arguments are saved
before timing and put back after, so tuning has no side effect); kernels that accumulate with
atomics name their outputs in `reset` (zeroed before each timed run).
"""

from __future__ import annotations

import functools
from typing import Sequence

import triton

from .aot import LaunchConfig

__all__ = ["autotuned"]


def autotuned(
    kernel, configs: Sequence[LaunchConfig], key: Sequence[str], restore: Sequence[str] = (), reset: Sequence[str] = ()
):
    """(launchable, extra kwargs): the kernel and configs[0].kwargs() when there is one candidate,
    else a cached `triton.autotune` wrapper of `kernel` over `configs` and no extra kwargs."""
    configs = tuple(configs)
    if not configs:
        raise ValueError(f"autotuned: no launch config for {kernel}")
    if len(configs) == 1:
        return kernel, configs[0].kwargs()
    return _wrapper(kernel, configs, tuple(key), tuple(restore), tuple(reset)), {}


@functools.lru_cache(maxsize=None)
def _wrapper(kernel, configs: tuple, key: tuple, restore: tuple, reset: tuple):
    candidates = [
        triton.Config(
            c.constexpr_dict(), num_warps=c.num_warps, **({} if c.num_stages is None else {"num_stages": c.num_stages})
        )
        for c in configs
    ]
    return triton.autotune(
        configs=candidates, key=list(key), restore_value=list(restore) or None, reset_to_zero=list(reset) or None
    )(kernel)
