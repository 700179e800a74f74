"""Helpers shared by the kernel parity tests: fresh seeds, random inputs, dtype-aware comparison."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

# (rtol, atol relative to the largest |element| of the expected tensor), by the dtype that limits the
# kernel's accuracy. The atol is scaled by the tensor's magnitude because an element that is a sum of
# cancelling terms (dw, dx) carries the rounding error of those terms, not of its own small value.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 1e-2)}


@pytest.fixture
def triton_backend(monkeypatch):
    """Route megatrain.kernels to the Triton kernels, with NaN-poisoned outputs."""
    monkeypatch.setenv("MEGATRAIN_KERNELS", "triton")
    monkeypatch.setenv("MEGATRAIN_KERNELS_POISON", "1")


def fresh_seed() -> int:
    """A non-negative int64 seed (with room for seed + 1). By default the seed is derived from the test's id,
    so a run (CI's included) is reproducible; KERNEL_TEST_SEED=random draws fresh seeds (explore more inputs), and
    KERNEL_TEST_SEED=N reproduces a failure's printed seed."""
    chosen = os.environ.get("KERNEL_TEST_SEED", "")
    if chosen == "random":
        seed = int.from_bytes(os.urandom(8), "little") >> 2
    elif chosen:
        seed = int(chosen)
    else:
        test_id = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
        seed = int.from_bytes(hashlib.sha256(test_id.encode()).digest()[:8], "little") >> 2
    return seed


def fresh_generator() -> tuple[int, torch.Generator]:
    """fresh_seed() and a generator seeded with it."""
    seed = fresh_seed()
    return seed, torch.Generator().manual_seed(seed)


def randn(gen: torch.Generator, shape, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(tuple(shape), generator=gen)).to(dtype)


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str, seed: int):
    """actual (computed in `dtype`) against the fp32 reference, atol scaled by the reference's max."""
    rtol, atol = TOLERANCE[dtype]
    scale = expected.float().abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.float(),
        expected.float(),
        rtol=rtol,
        atol=atol * max(scale, 1e-6),
        msg=lambda m: f"{what} (seed {seed}): {m}",
    )


def autograd_node_names(root) -> set[str]:
    """Class names of every node of the autograd graph below `root` (a loss's grad_fn): which autograd
    Functions, and so which kernels, a forward really went through."""
    names, seen, stack = set(), set(), [root]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        names.add(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return names


def kernel_node_names(op: str) -> set[str]:
    """The class names of the autograd node that the Triton kernel's op megatrain::`op` records: the
    custom op's (torch's register_autograd names it after the op; torch.ops calls, autocast,
    torch.compile) and the eager fast path's autograd.Function (kernels/library.py), e.g. for `rms_norm`."""
    return {f"GeneratedBackwardFor_megatrain_{op}_defaultBackward", f"{op}_eagerBackward"}


def ran_kernel(t: torch.Tensor, op: str) -> bool:
    """Whether tensor `t` came straight out of the Triton kernel's op megatrain::`op` (either path)."""
    return t.grad_fn is not None and type(t.grad_fn).__name__ in kernel_node_names(op)
