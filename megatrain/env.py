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
| TORCHELASTIC_RESTART_COUNT, TORCHELASTIC_MAX_RESTARTS | torchrun's agent -> auto-resume, the per-attempt store prefix | integers >= 0 |
| TORCHELASTIC_USE_AGENT_STORE | torchrun's agent -> init_distributed joins its store | True/False (any flag spelling) |
| MEGATRAIN_TEST_CRASH_AT | the test-only fault hook (format checked by engine.resilience.fault_spec in preflight) | POINT:STEP[:RANK[:ACTION]] |
| MEGATRAIN_PEAK_FLOPS | MFU's peak FLOP/s for GPUs not in the table | finite number > 0 |
| MEGATRAIN_CACHE | token / tokenizer cache root (default ~/.cache/megatrain) | a directory path |
| MEGATRAIN_KERNELS | kernel backend (megatrain.kernels.backend) | auto, torch, triton |
| MEGATRAIN_KERNELS_POISON | NaN-filled kernel outputs (tests) | 0, 1 |
| TRITON_INTERPRET | Triton's CPU interpreter (Triton reads it too) | 1/true/yes/on or 0/false/no/off |
| OMP_NUM_THREADS | CPU threads per process (set by `megatrain pretrain` when absent) | integer >= 1 |
"""  # noqa: E501  (the table's rows)

from __future__ import annotations

import math
import os
from typing import Optional

from megatrain.errors import ConfigError

__all__ = [
    "EnvironmentVariableError",
    "check_environment",
    "VARIABLES",
    "rank",
    "world_size",
    "local_rank",
    "local_world_size",
    "master_addr",
    "master_port",
    "restart_count",
    "max_restarts",
    "uses_agent_store",
    "crash_hook",
    "CRASH_POINTS",
    "CRASH_RANK0_POINTS",
    "CRASH_ACTIONS",
    "peak_flops",
    "cache_root",
    "kernel_backend",
    "kernels_poison",
    "triton_interpret",
    "omp_threads",
    "KERNEL_BACKENDS",
]

KERNEL_BACKENDS = ("auto", "torch", "triton")
_TRUE, _FALSE = ("1", "true", "yes", "on", "y"), ("0", "false", "no", "off", "n")


class EnvironmentVariableError(ConfigError, ValueError):
    """An environment variable holds a value megatrain cannot use (also a ValueError, as the kernels
    report bad settings)."""


def _raw(name: str) -> Optional[str]:
    value = os.environ.get(name)
    return None if value is None or value.strip() == "" else value.strip()


def _bad(name: str, allowed: str) -> EnvironmentVariableError:
    return EnvironmentVariableError(
        f"environment variable {name}={os.environ.get(name)!r} is not allowed (allowed: {allowed})"
    )


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


def restart_count() -> int:
    """How often torchrun's agent restarted this worker group (0 outside torchrun)."""
    return _int("TORCHELASTIC_RESTART_COUNT", 0, 0)


def max_restarts() -> int:
    """torchrun --max-restarts (0 outside torchrun)."""
    return _int("TORCHELASTIC_MAX_RESTARTS", 0, 0)


def uses_agent_store() -> bool:
    """torchrun's agent hosts the rendezvous store the workers join (TORCHELASTIC_USE_AGENT_STORE)."""
    return _flag("TORCHELASTIC_USE_AGENT_STORE", False)


# The test-only fault hook (megatrain.engine.resilience.fault_point acts on it). Points, in the order
# they happen: inside step N (after its forward), inside checkpoint step_N's write (DeepSpeed's files
# written, megatrain's not), after step_N.partial was renamed to step_N but before `latest` names it
# (rank 0), and with the new `latest` written to its temporary file but not yet moved over the old
# one (rank 0). Actions: kill (SIGKILL itself), stall (sleep forever: a hung rank), term (SIGTERM
# itself: preemption of one rank), enospc (the next write fails with "No space left on device").
CRASH_POINTS = ("step", "ckpt_write", "ckpt_commit", "latest")
CRASH_RANK0_POINTS = ("ckpt_commit", "latest")
CRASH_ACTIONS = ("kill", "stall", "term", "enospc")


def crash_hook() -> Optional[tuple[str, int, int, str]]:
    """MEGATRAIN_TEST_CRASH_AT=POINT:STEP[:RANK[:ACTION]] as (point, step, rank, action), or None."""
    name, raw = "MEGATRAIN_TEST_CRASH_AT", _raw("MEGATRAIN_TEST_CRASH_AT")
    if raw is None:
        return None
    allowed = (
        f"POINT:STEP[:RANK[:ACTION]] with POINT one of {', '.join(CRASH_POINTS)}, STEP >= 1, RANK >= 0 "
        f"(0 for {', '.join(CRASH_RANK0_POINTS)}), ACTION one of {', '.join(CRASH_ACTIONS)}; a test-only hook"
    )
    parts = raw.split(":")
    if not 2 <= len(parts) <= 4 or parts[0] not in CRASH_POINTS:
        raise _bad(name, allowed)
    try:
        step, rank_ = int(parts[1]), int(parts[2]) if len(parts) > 2 else 0
    except ValueError:
        raise _bad(name, allowed) from None
    action = parts[3] if len(parts) > 3 else "kill"
    if step < 1 or rank_ < 0 or action not in CRASH_ACTIONS or (parts[0] in CRASH_RANK0_POINTS and rank_ != 0):
        raise _bad(name, allowed)
    return parts[0], step, rank_, action


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
    "RANK": rank,
    "WORLD_SIZE": world_size,
    "LOCAL_RANK": local_rank,
    "LOCAL_WORLD_SIZE": local_world_size,
    "MASTER_ADDR": master_addr,
    "MASTER_PORT": master_port,
    "TORCHELASTIC_RESTART_COUNT": restart_count,
    "TORCHELASTIC_MAX_RESTARTS": max_restarts,
    "TORCHELASTIC_USE_AGENT_STORE": uses_agent_store,
    "MEGATRAIN_TEST_CRASH_AT": crash_hook,
    "MEGATRAIN_PEAK_FLOPS": peak_flops,
    "MEGATRAIN_CACHE": cache_root,
    "MEGATRAIN_KERNELS": kernel_backend,
    "MEGATRAIN_KERNELS_POISON": kernels_poison,
    "TRITON_INTERPRET": triton_interpret,
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
