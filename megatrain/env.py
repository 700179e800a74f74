"""Every environment variable megatrain reads, parsed and checked in one place.

Each reader below returns the variable's value (or its default when unset or empty) and raises
`EnvironmentVariableError` (one line naming the variable, its value and what is allowed) for a value
megatrain cannot use. `check_environment()` reads them all; the CLI calls it before any command and
`init_distributed` before the process group starts, so a bad value ends the job with one line and
exit 2 instead of a traceback from inside a rank.

| variable | read by | allowed |
|---|---|---|
| RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE | launchers (torchrun / deepspeed) -> init_distributed | integers, 0 <= rank < size |
| MASTER_ADDR, MASTER_PORT | init_distributed (set when absent) | a host name without spaces; a port 1..65535 |
| MEGATRAIN_DIST_TIMEOUT_MIN | process-group timeout in minutes (default 30) | integer >= 1 |
| MEGATRAIN_PEAK_FLOPS | MFU's peak FLOP/s for GPUs not in the table | finite number > 0 |
| MEGATRAIN_CACHE | token / tokenizer cache root (default ~/.cache/megatrain) | a directory path |
| MEGATRAIN_KERNELS | kernel backend (megatrain.kernels.backend) | auto, torch, triton |
| MEGATRAIN_KERNELS_POISON | NaN-filled kernel outputs (tests) | 0, 1 |
| TRITON_INTERPRET | Triton's CPU interpreter (Triton reads it too) | 1/true/yes/on or 0/false/no/off |
| OMP_NUM_THREADS | CPU threads per process (set by `megatrain pretrain` when absent) | integer >= 1 |
"""

from __future__ import annotations

import math
import os
from typing import Optional

from megatrain.errors import ConfigError

__all__ = ["EnvironmentVariableError", "check_environment", "VARIABLES", "rank", "world_size", "local_rank",
           "local_world_size", "master_addr", "master_port", "dist_timeout_min", "peak_flops", "cache_root",
           "kernel_backend", "kernels_poison", "triton_interpret", "omp_threads", "KERNEL_BACKENDS"]

KERNEL_BACKENDS = ("auto", "torch", "triton")
_TRUE, _FALSE = ("1", "true", "yes", "on", "y"), ("0", "false", "no", "off", "n")


class EnvironmentVariableError(ConfigError, ValueError):
    """An environment variable holds a value megatrain cannot use (also a ValueError, as the kernels
    report bad settings)."""


def _raw(name: str) -> Optional[str]:
    value = os.environ.get(name)
    return None if value is None or value.strip() == "" else value.strip()


def _bad(name: str, allowed: str) -> EnvironmentVariableError:
    return EnvironmentVariableError(f"environment variable {name}={os.environ.get(name)!r} is not allowed "
                                    f"(allowed: {allowed})")


def _int(name: str, default: Optional[int], minimum: int, maximum: Optional[int] = None) -> Optional[int]:
    raw = _raw(name)
    if raw is None:
        return default
    allowed = f"an integer >= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
    try:
        value = int(raw)
    except ValueError:
        raise _bad(name, allowed) from None
    if value < minimum or (maximum is not None and value > maximum):
        raise _bad(name, allowed)
    return value


def _choice(name: str, default: str, choices) -> str:
    raw = _raw(name)
    if raw is None:
        return default
    if raw.lower() not in choices:
        raise _bad(name, ", ".join(choices))
    return raw.lower()


def _flag(name: str, default: bool) -> bool:
    raw = _raw(name)
    if raw is None:
        return default
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise _bad(name, "1, true, yes, on or 0, false, no, off")


def rank() -> int:
    return _int("RANK", 0, 0)


def world_size() -> int:
    return _int("WORLD_SIZE", 1, 1)


def local_rank() -> int:
    return _int("LOCAL_RANK", 0, 0)


def local_world_size() -> int:
    """LOCAL_WORLD_SIZE, else WORLD_SIZE (one node)."""
    return _int("LOCAL_WORLD_SIZE", world_size(), 1)


def master_addr() -> Optional[str]:
    raw = _raw("MASTER_ADDR")
    if raw is not None and any(c.isspace() for c in raw):
        raise _bad("MASTER_ADDR", "a host name or address without spaces")
    return raw


def master_port() -> Optional[int]:
    return _int("MASTER_PORT", None, 1, 65535)


def dist_timeout_min() -> int:
    return _int("MEGATRAIN_DIST_TIMEOUT_MIN", 30, 1)


def peak_flops() -> Optional[float]:
    raw = _raw("MEGATRAIN_PEAK_FLOPS")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise _bad("MEGATRAIN_PEAK_FLOPS", "a finite number > 0 (FLOP/s, e.g. 989e12)") from None
    if not (math.isfinite(value) and value > 0):
        raise _bad("MEGATRAIN_PEAK_FLOPS", "a finite number > 0 (FLOP/s, e.g. 989e12)")
    return value


def cache_root() -> Optional[str]:
    """MEGATRAIN_CACHE (user-expanded, absolute) or None; an existing non-directory is refused."""
    raw = _raw("MEGATRAIN_CACHE")
    if raw is None:
        return None
    path = os.path.abspath(os.path.expanduser(raw))
    if os.path.exists(path) and not os.path.isdir(path):
        raise _bad("MEGATRAIN_CACHE", "a directory (this path exists and is not one)")
    return path


def kernel_backend() -> str:
    return _choice("MEGATRAIN_KERNELS", "auto", KERNEL_BACKENDS)


def kernels_poison() -> bool:
    return _choice("MEGATRAIN_KERNELS_POISON", "0", ("0", "1")) == "1"


def triton_interpret() -> bool:
    return _flag("TRITON_INTERPRET", False)


def omp_threads() -> Optional[int]:
    return _int("OMP_NUM_THREADS", None, 1)


VARIABLES = {
    "RANK": rank, "WORLD_SIZE": world_size, "LOCAL_RANK": local_rank, "LOCAL_WORLD_SIZE": local_world_size,
    "MASTER_ADDR": master_addr, "MASTER_PORT": master_port, "MEGATRAIN_DIST_TIMEOUT_MIN": dist_timeout_min,
    "MEGATRAIN_PEAK_FLOPS": peak_flops, "MEGATRAIN_CACHE": cache_root, "MEGATRAIN_KERNELS": kernel_backend,
    "MEGATRAIN_KERNELS_POISON": kernels_poison, "TRITON_INTERPRET": triton_interpret,
    "OMP_NUM_THREADS": omp_threads,
}


def check_environment() -> None:
    """Read every variable in VARIABLES, and check the ranks against the sizes; one line on the first
    bad value (EnvironmentVariableError)."""
    for read in VARIABLES.values():
        read()
    if _raw("RANK") is not None and rank() >= world_size():
        raise _bad("RANK", f"0..WORLD_SIZE-1 = 0..{world_size() - 1}")
    if _raw("LOCAL_RANK") is not None and local_rank() >= local_world_size():
        raise _bad("LOCAL_RANK", f"0..LOCAL_WORLD_SIZE-1 = 0..{local_world_size() - 1}")
