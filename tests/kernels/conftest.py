"""Kernel tests on a GPU: `MEGATRAIN_TEST_DEVICE=cuda` (set by benchmarks/gpu_suite.sh) runs the same
tests with every tensor they create on the GPU, so the launchers pick their CUDA tile configurations
and the real compiled kernels are checked against the reference, not the interpreter.

The tests draw their inputs from seeded CPU generators (the seed printed on failure reproduces the
case on either device). A factory call given such a generator is therefore run on the CPU and its
result moved to the GPU; every other factory call without an explicit device gets device="cuda".
Unset (CPU machines, CI), nothing changes.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.overrides import TorchFunctionMode

TEST_DEVICE = os.environ.get("MEGATRAIN_TEST_DEVICE", "cpu")

_FACTORIES = {
    torch.randn,
    torch.rand,
    torch.randint,
    torch.randperm,
    torch.empty,
    torch.zeros,
    torch.ones,
    torch.full,
    torch.arange,
    torch.tensor,
    torch.eye,
    torch.linspace,
    torch.as_tensor,
}


class _FactoriesOn(TorchFunctionMode):
    def __init__(self, device: str):
        super().__init__()
        self.device = torch.device(device)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func not in _FACTORIES or kwargs.get("device") is not None:
            return func(*args, **kwargs)
        if kwargs.get("generator") is not None:  # a CPU generator draws on the CPU
            requires_grad = kwargs.pop("requires_grad", False)
            return func(*args, **kwargs).to(self.device).requires_grad_(requires_grad)
        if func is torch.as_tensor and isinstance(args[0] if args else None, torch.Tensor):
            return func(*args, **kwargs)  # keeps the given tensor's device, as on the CPU
        kwargs["device"] = self.device
        return func(*args, **kwargs)


@pytest.fixture(autouse=True)
def _kernel_test_device(request):
    if TEST_DEVICE == "cpu":
        yield
        return
    if request.node.get_closest_marker("cpu_tensors"):
        pytest.skip(f"checks CPU-tensor behaviour; MEGATRAIN_TEST_DEVICE={TEST_DEVICE}")
    if not torch.cuda.is_available():
        pytest.fail(f"MEGATRAIN_TEST_DEVICE={TEST_DEVICE} but torch sees no GPU")
    with _FactoriesOn(TEST_DEVICE):
        yield
