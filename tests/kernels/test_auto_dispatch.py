"""MEGATRAIN_KERNELS=auto: a Triton kernel only where kernels/measured.py's table has it measured not
slower than the torch path, for the device's architecture, the op's shape class and the mode.

No GPU here: the architecture lookup (`measured.device_arch`) is faked, so CPU tensors look like
they sit on an sm_90 or sm_80 device, and the Triton kernels the rule picks run through Triton's
interpreter (TRITON_INTERPRET=1, set by tests/conftest.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatrain import kernels
from megatrain.kernels import measured
from tests.kernels.kernel_testing import ran_kernel

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.cpu_tensors  # fakes the architecture of CPU tensors


@pytest.fixture(autouse=True)
def _fresh_decisions(monkeypatch):
    measured.clear_cache()
    kernels.reset_kernel_paths()
    yield
    measured.clear_cache()
    kernels.reset_kernel_paths()


def _fake_arch(monkeypatch, arch):
    calls = []

    def device_arch(index):
        calls.append(index)
        return arch

    monkeypatch.setattr(measured, "device_arch", device_arch)
    measured.clear_cache()
    return calls


def _row(op, cls, mode, choice, arch="sm_90"):
    return measured.Row(op, arch, cls, mode, choice, 1.0, 2.0 if choice == "triton" else 0.5, "s", "test")


def _norm_is_triton(x, w) -> bool:
    return ran_kernel(kernels.rms_norm(x, w), "rms_norm")


def test_measured_faster_takes_triton_unmeasured_arch_and_cpu_take_torch(monkeypatch):
    monkeypatch.setenv("MEGATRAIN_KERNELS", "auto")
    x, w = torch.randn(5, 24, requires_grad=True), torch.ones(24, requires_grad=True)
    assert not _norm_is_triton(x, w)  # a real CPU tensor: no architecture, the reference
    _fake_arch(monkeypatch, "sm_90")  # H100 / H200: the table has rms_norm faster in Triton
    assert _norm_is_triton(x, w)
    assert kernels.kernel_paths() == {"rms_norm": "triton+torch"}
    _fake_arch(monkeypatch, "sm_80")  # A100: no row
    kernels.reset_kernel_paths()
    assert not _norm_is_triton(x, w)
    assert kernels.kernel_paths() == {"rms_norm": "torch"}


def test_unmeasured_op_and_shape_class_take_torch(monkeypatch):
    monkeypatch.setenv("MEGATRAIN_KERNELS", "auto")
    _fake_arch(monkeypatch, "sm_90")
    table = (
        _row("fused_linear_cross_entropy", "V33-64", "fwd+bwd", "triton"),
        _row("rms_norm", "any", "fwd+bwd", "triton"),
    )
    monkeypatch.setattr(measured, "TABLE", table)
    h = torch.randn(6, 16, requires_grad=True)
    target = torch.randint(0, 64, (6,))
    kernels.fused_linear_cross_entropy(h, torch.randn(64, 16, requires_grad=True), target)  # V64: measured
    assert kernels.kernel_paths() == {"fused_linear_cross_entropy": "triton"}
    kernels.reset_kernel_paths()
    kernels.fused_linear_cross_entropy(h, torch.randn(100, 16, requires_grad=True), target)  # V100: V65-128
    kernels.swiglu(torch.randn(4, 8), torch.randn(4, 8))  # no row at all
    assert kernels.kernel_paths() == {"fused_linear_cross_entropy": "torch", "swiglu": "torch"}


def test_the_mode_picks_the_rows_fwd_under_no_grad(monkeypatch):
    monkeypatch.setenv("MEGATRAIN_KERNELS", "auto")
    _fake_arch(monkeypatch, "sm_90")
    monkeypatch.setattr(
        measured, "TABLE", (_row("rms_norm", "any", "fwd+bwd", "triton"), _row("rms_norm", "any", "fwd", "torch"))
    )
    x, w = torch.randn(3, 16, requires_grad=True), torch.ones(16)
    assert _norm_is_triton(x, w)
    with torch.no_grad():
        kernels.rms_norm(x, w)
    assert kernels.kernel_paths() == {"rms_norm": "triton+torch"}
    assert measured.grad_mode("projected_adam_update") == "step"


def test_lookup_rules():
    rows = (
        _row("lowrank_linear", "any", "fwd+bwd", "triton"),
        _row("lowrank_linear", "r513-1024", "fwd+bwd", "torch"),
        _row("rope", "any", "fwd", "triton"),
        _row("rope", "any", "fwd", "torch"),  # two files disagree
        _row("swiglu", "any", "fwd", "triton", arch="sm_80"),
    )
    assert measured.lookup("lowrank_linear", "sm_90", "r513-1024", "fwd+bwd", rows) == "torch"  # own class wins
    assert measured.lookup("lowrank_linear", "sm_90", "r129-256", "fwd+bwd", rows) == "triton"  # "any" row
    assert measured.lookup("lowrank_linear", "sm_90", "r129-256", "fwd", rows) is None
    assert measured.lookup("rope", "sm_90", "any", "fwd", rows) == "torch"
    assert measured.lookup("swiglu", "sm_90", "any", "fwd", rows) is None
    assert measured.lookup("swiglu", "sm_80", "any", "fwd", rows) == "triton"


def test_shape_classes():
    assert measured.shape_class("rms_norm", ()) == "any"
    assert measured.shape_class("fused_linear_cross_entropy", (128256,)) == "V65537-131072"
    assert measured.shape_class("fused_linear_cross_entropy", (65536,)) == "V32769-65536"
    assert measured.shape_class("lowrank_linear", (1024,)) == "r513-1024"
    assert measured.shape_class("iha_attention", (128, 2)) == "d65-128 P2"
    assert measured.shape_class("projected_adam_update", (1,)) == "r1"
    with pytest.raises(ValueError, match="vocab"):
        measured.shape_class("fused_linear_cross_entropy", ())


def test_decision_is_cached_per_op_arch_shape_and_mode(monkeypatch):
    monkeypatch.setenv("MEGATRAIN_KERNELS", "auto")
    calls = _fake_arch(monkeypatch, "sm_90")
    looked = []
    real_lookup = measured.lookup
    monkeypatch.setattr(measured, "lookup", lambda *a, **k: looked.append(a) or real_lookup(*a, **k))
    x, w = torch.randn(2, 8), torch.ones(8)
    with torch.no_grad():
        for _ in range(3):
            kernels.rms_norm(x, w)
    assert len(looked) == 1  # one decision, then the cache
    assert calls == [-1]  # the architecture of the tensor's device index, read once


def test_torch_and_triton_modes_ignore_the_table(monkeypatch):
    _fake_arch(monkeypatch, "sm_90")
    x, w = torch.randn(3, 16, requires_grad=True), torch.ones(16)
    monkeypatch.setenv("MEGATRAIN_KERNELS", "torch")
    assert not _norm_is_triton(x, w)  # measured faster on sm_90, but torch means the reference
    monkeypatch.setenv("MEGATRAIN_KERNELS", "triton")
    monkeypatch.setattr(measured, "TABLE", ())
    assert _norm_is_triton(x, w)  # nothing measured, but triton means Triton
    _fake_arch(monkeypatch, None)
    assert _norm_is_triton(x, w)  # a CPU tensor runs through the interpreter, as before
    assert kernels.kernel_paths() == {"rms_norm": "triton+torch"}


def test_malformed_inputs_reach_the_torch_path_error(monkeypatch):
    monkeypatch.setenv("MEGATRAIN_KERNELS", "auto")
    _fake_arch(monkeypatch, "sm_90")
    with pytest.raises(ValueError, match="fused_linear_cross_entropy"):
        kernels.fused_linear_cross_entropy(torch.randn(4, 8), torch.randn(8), torch.zeros(4, dtype=torch.long))


def test_table_rows_are_consistent_and_name_their_source():
    assert measured.TABLE
    for row in measured.TABLE:
        assert row.op in measured.CLASS_DIMS and row.mode in measured.MODES
        assert row.choice == ("triton" if row.triton_ms <= row.torch_ms else "torch"), row
        assert row.arch.startswith("sm_") and (REPO / row.source).is_file(), row
        spec = measured.CLASS_DIMS[row.op]
        assert row.shape_class == "any" or len(row.shape_class.split()) == len(spec), row
    by_op = {(r.op, r.mode): r.choice for r in measured.TABLE if r.arch == "sm_90"}
    assert by_op[("rms_norm", "fwd+bwd")] == by_op[("rope", "fwd+bwd")] == by_op[("swiglu", "fwd+bwd")] == "triton"
    for op in ("fused_linear_cross_entropy", "lowrank_linear", "sparse_lowrank_linear", "iha_attention"):
        assert by_op[(op, "fwd+bwd")] == "torch"


def test_torch_path_of_matmul_ops_computes_in_the_input_dtype(monkeypatch):
    """What auto takes where Triton is not measured faster is the unfused PyTorch the kernels replace, in
    the inputs' dtype (the kernel benchmark's torch-eager rows): not the fp32 oracle math, which on a GPU
    costs several times as much. fp32 inputs get the oracle unchanged."""
    import torch.nn.functional as F

    from megatrain.kernels import reference

    monkeypatch.setenv("MEGATRAIN_KERNELS", "torch")
    gen = torch.Generator().manual_seed(0)
    x, a, b = (torch.randn(*s, generator=gen).bfloat16() for s in ((12, 16), (16, 4), (4, 8)))
    assert torch.equal(kernels.lowrank_linear(x, a, b), F.silu(x @ a) @ b)
    assert torch.equal(
        kernels.lowrank_linear(x.float(), a.float(), b.float()),
        reference.lowrank_linear(x.float(), a.float(), b.float()),
    )
    index = torch.tensor([1, 5, 40, 77], dtype=torch.int64)
    values = torch.randn(4, generator=gen).bfloat16()
    dense = torch.zeros(16 * 8, dtype=torch.bfloat16).index_put((index,), values).view(16, 8)
    assert torch.equal(kernels.sparse_lowrank_linear(x, a, b, values, index, 0.5), x @ (0.5 * (a @ b) + dense))
    h, w = torch.randn(12, 16, generator=gen).bfloat16(), torch.randn(32, 16, generator=gen).bfloat16()
    target = torch.randint(0, 32, (12,), generator=gen)
    bf16_math = reference.fused_linear_cross_entropy(h, w, target, compute_dtype=torch.bfloat16)
    fp32_math = reference.fused_linear_cross_entropy(h, w, target)
    assert torch.equal(kernels.fused_linear_cross_entropy(h, w, target), bf16_math)
    assert not torch.equal(bf16_math, fp32_math)
    assert torch.allclose(bf16_math, F.cross_entropy((h @ w.T).float(), target), rtol=1e-5)
