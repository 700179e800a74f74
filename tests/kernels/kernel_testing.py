"""Helpers shared by the kernel parity tests: fresh seeds, random inputs, dtype-aware comparison."""

from __future__ import annotations

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


def fresh_generator() -> tuple[int, torch.Generator]:
    seed = int.from_bytes(os.urandom(8), "little") >> 1
    return seed, torch.Generator().manual_seed(seed)


def randn(gen: torch.Generator, shape, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(tuple(shape), generator=gen)).to(dtype)


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str, seed: int):
    """actual (computed in `dtype`) against the fp32 reference, atol scaled by the reference's max."""
    rtol, atol = TOLERANCE[dtype]
    scale = expected.float().abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol * max(scale, 1e-6),
                               msg=lambda m: f"{what} (seed {seed}): {m}")
