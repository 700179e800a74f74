"""The low-rank projection (kernels/lowrank.py: cuBLAS matmuls, Triton SiLU passes) against kernels.reference,
forward and backward.

Without a GPU the kernels run through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before anything imports them). Every test draws a fresh seed and prints it on failure; kernel outputs
are NaN-poisoned (MEGATRAIN_KERNELS_POISON=1), so an element a kernel forgets to write fails.
"""

from __future__ import annotations

import pytest
import torch

from megatrain import kernels
from megatrain.kernels import reference

# Imported at collection time, while TRITON_INTERPRET=1, so the kernels are built for the interpreter.

from tests.kernels.kernel_testing import assert_matches, fresh_generator, randn, ran_kernel

pytestmark = pytest.mark.usefixtures("triton_backend")
from tests.kernels.kernel_testing import triton_backend  # noqa: E402,F401  (the fixture)

D_IN, RANK, D_OUT = 13, 5, 19


def assert_grad_matches(actual, expected, dtype, what, seed):
    """Gradients in bf16 go through two bf16-rounded [T, r] intermediates (z and dz, as any bf16
    implementation's would): 2e-2 instead of 1e-2. fp32 keeps the ~1e-5 bound."""
    if dtype == torch.bfloat16:
        scale = expected.float().abs().max().item() if expected.numel() else 1.0
        torch.testing.assert_close(
            actual.float(),
            expected.float(),
            rtol=2e-2,
            atol=2e-2 * max(scale, 1e-6),
            msg=lambda m: f"{what} (seed {seed}): {m}",
        )
    else:
        assert_matches(actual, expected, dtype, what, seed)


def make_inputs(gen, lead, d_in, rank, d_out, dtype, bias):
    # a scaled so z = x @ a is O(1): both the linear and the saturated parts of SiLU are exercised.
    x = randn(gen, (*lead, d_in), dtype)
    a = randn(gen, (d_in, rank), dtype, scale=2.0 / d_in**0.5)
    b = randn(gen, (rank, d_out), dtype, scale=1.0 / rank**0.5)
    bias_t = randn(gen, (d_out,), dtype) if bias else None
    dy = randn(gen, (*lead, d_out), dtype)
    return x, a, b, bias_t, dy


def check_against_reference(seed, x, a, b, bias, dy, activation, recompute, view=None):
    """kernels.lowrank_linear against reference.lowrank_linear on fp32 copies: output and every gradient."""
    view = view or (lambda t: t)
    dtype = x.dtype
    leaves = [t for t in (x, a, b, bias) if t is not None]
    ours_in = [t.detach().clone().requires_grad_() for t in leaves]
    ref_in = [t.detach().float().requires_grad_() for t in leaves]

    def call(fn, ins):
        xi, ai, bi = ins[:3]
        return fn(view(xi), ai, bi, ins[3] if bias is not None else None, activation, recompute)

    ours = call(kernels.lowrank_linear, ours_in)
    ref = call(reference.lowrank_linear, ref_in)
    # The dispatch must really have run the Triton kernels, not fallen back to the reference.
    assert ran_kernel(ours, "lowrank_linear"), ours.grad_fn
    assert ours.dtype == dtype and ours.shape == ref.shape, f"{ours.dtype} {tuple(ours.shape)} (seed {seed})"
    assert_matches(ours, ref, dtype, "output", seed)

    grads_ours = torch.autograd.grad(ours, ours_in, dy)
    grads_ref = torch.autograd.grad(ref, ref_in, dy.float())
    for name, t, g, g_ref in zip(("x", "a", "b", "bias"), ours_in, grads_ours, grads_ref):
        assert g.dtype == t.dtype and g.shape == t.shape, f"d{name}: {g.dtype} {tuple(g.shape)} (seed {seed})"
        assert_grad_matches(g, g_ref, dtype, f"d{name}", seed)
    return ours


@pytest.mark.parametrize("recompute", [False, True], ids=["store", "recompute"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("activation", ["silu", None], ids=["silu", "linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lowrank_matches_reference(dtype, activation, bias, recompute):
    """Odd sizes: 11 (or 2x7 = 14) rows, D_in = 13, r = 5, D_out = 19: T*r = 55 or 70 elements, one
    partial block of the SiLU passes."""
    seed, gen = fresh_generator()
    lead = (11,) if recompute else (2, 7)
    x, a, b, bias_t, dy = make_inputs(gen, lead, D_IN, RANK, D_OUT, dtype, bias)
    check_against_reference(seed, x, a, b, bias_t, dy, activation, recompute)


@pytest.mark.parametrize("recompute", [False, True], ids=["store", "recompute"])
def test_lowrank_larger_rank_and_rows(recompute):
    """r = 40, 37 rows, D_in = 50, D_out = 33: T*r = 1480 elements, two blocks of the SiLU passes
    (the second partial)."""
    seed, gen = fresh_generator()
    x, a, b, bias_t, dy = make_inputs(gen, (37,), 50, 40, 33, torch.float32, True)
    check_against_reference(seed, x, a, b, bias_t, dy, "silu", recompute)


def test_lowrank_recompute_saves_no_intermediate():
    """CoLA-M: with recompute the node keeps x, a, b only; without it, z [T, r] is saved too."""
    seed, gen = fresh_generator()
    x, a, b, _, _ = make_inputs(gen, (3, 7), D_IN, RANK, D_OUT, torch.float32, False)
    x.requires_grad_()
    stored = kernels.lowrank_linear(x, a, b, recompute=False)
    recomputed = kernels.lowrank_linear(x, a, b, recompute=True)
    shapes_stored = [tuple(t.shape) for t in stored.grad_fn.saved_tensors if t is not None]
    shapes_recomputed = [tuple(t.shape) for t in recomputed.grad_fn.saved_tensors if t is not None]
    assert (21, RANK) in shapes_stored, shapes_stored
    assert (21, RANK) not in shapes_recomputed, shapes_recomputed
    assert_matches(recomputed, stored, torch.float32, "recompute vs store output", seed)


def test_lowrank_non_contiguous_x_and_mixed_dtypes():
    """A transposed x, fp32 factors and bias with bf16 x (cast inside; gradients come back as fp32)."""
    seed, gen = fresh_generator()
    x = randn(gen, (2, D_IN, 9), torch.bfloat16)
    a = randn(gen, (D_IN, RANK), scale=0.5)
    b = randn(gen, (RANK, D_OUT), scale=0.5)
    bias = randn(gen, (D_OUT,))
    ours_in = [t.clone().requires_grad_() for t in (x, a, b, bias)]
    ref_in = [t.float().requires_grad_() for t in (x, a, b, bias)]
    ours = kernels.lowrank_linear(ours_in[0].transpose(1, 2), *ours_in[1:])
    ref = reference.lowrank_linear(ref_in[0].transpose(1, 2), *ref_in[1:])
    assert ours.dtype == torch.bfloat16
    assert_matches(ours, ref, torch.bfloat16, "output", seed)
    dy = randn(gen, ours.shape)
    for name, t, g, g_ref in zip(
        "x a b bias".split(),
        ours_in,
        torch.autograd.grad(ours, ours_in, dy.bfloat16()),
        torch.autograd.grad(ref, ref_in, dy),
    ):
        assert g.dtype == t.dtype, f"d{name} dtype {g.dtype}"
        assert_grad_matches(g, g_ref, torch.bfloat16, f"d{name}", seed)


def test_lowrank_no_grad_and_partial_grads():
    seed, gen = fresh_generator()
    x, a, b, bias, _ = make_inputs(gen, (11,), D_IN, RANK, D_OUT, torch.float32, True)
    with torch.no_grad():
        y = kernels.lowrank_linear(x, a, b, bias)
    assert y.grad_fn is None
    assert_matches(y, reference.lowrank_linear(x, a, b, bias), torch.float32, "no_grad output", seed)
    # Only b needs a gradient (frozen x, a, bias), through a .sum() (expanded upstream gradient).
    b_ours, b_ref = b.clone().requires_grad_(), b.clone().requires_grad_()
    kernels.lowrank_linear(x, a, b_ours, bias).sum().backward()
    reference.lowrank_linear(x, a, b_ref, bias).sum().backward()
    assert_matches(b_ours.grad, b_ref.grad, torch.float32, "db only", seed)


def test_lowrank_reference_recompute_matches_store():
    seed, gen = fresh_generator()
    x, a, b, bias, dy = make_inputs(gen, (5, 3), D_IN, RANK, D_OUT, torch.float32, True)
    grads = []
    for recompute in (False, True):
        ins = [t.clone().requires_grad_() for t in (x, a, b, bias)]
        y = reference.lowrank_linear(*ins, recompute=recompute)
        grads.append(torch.autograd.grad(y, ins, dy))
    for name, g0, g1 in zip("x a b bias".split(), *grads):
        assert_matches(g1, g0, torch.float32, f"reference recompute d{name}", seed)


@pytest.mark.cpu_tensors
def test_lowrank_auto_backend_on_cpu_is_reference(monkeypatch):
    monkeypatch.setenv("MEGATRAIN_KERNELS", "auto")
    x, a, b = torch.randn(4, D_IN, requires_grad=True), torch.randn(D_IN, RANK), torch.randn(RANK, D_OUT)
    y = kernels.lowrank_linear(x, a, b)
    assert not ran_kernel(y, "lowrank_linear")


def _bad(name):
    x, a, b = torch.randn(7, D_IN), torch.randn(D_IN, RANK), torch.randn(RANK, D_OUT)
    cases = {
        "a_shape": ((x, torch.randn(D_IN + 1, RANK), b), {}, "a"),
        "b_shape": ((x, a, torch.randn(RANK + 1, D_OUT)), {}, "b"),
        "bias_shape": ((x, a, b), {"bias": torch.randn(D_OUT + 1)}, "bias"),
        "x_int": ((torch.ones(7, D_IN, dtype=torch.int64), a, b), {}, "x"),
        "a_float64": ((x, a.double(), b), {}, "a"),
        "b_other_device": ((x, a, torch.empty(RANK, D_OUT, device="meta")), {}, "b"),
        "activation": ((x, a, b), {"activation": "relu"}, "activation"),
        "zero_rank": ((x, torch.randn(D_IN, 0), torch.randn(0, D_OUT)), {}, "x"),
    }
    return cases[name]


@pytest.mark.parametrize(
    "case", ["a_shape", "b_shape", "bias_shape", "x_int", "a_float64", "b_other_device", "activation", "zero_rank"]
)
def test_lowrank_bad_inputs_raise(case):
    args, kwargs, argument = _bad(case)
    pattern = r"^lowrank_linear: D_in, r and D_out" if case == "zero_rank" else rf"^lowrank_linear: .*'{argument}'"
    with pytest.raises(ValueError, match=pattern):
        kernels.lowrank_linear(*args, **kwargs)
    if case in ("a_shape", "b_shape", "bias_shape", "activation"):
        # The reference (the CPU path) rejects the same shapes and options.
        with pytest.raises(ValueError, match=r"^lowrank_linear: "):
            reference.lowrank_linear(*args, **kwargs)


@pytest.mark.cpu_tensors
def test_lowrank_cpu_tensor_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, a, b = torch.randn(7, D_IN), torch.randn(D_IN, RANK), torch.randn(RANK, D_OUT)
    with pytest.raises(ValueError, match=r"^lowrank_linear: .*cpu.*TRITON_INTERPRET=1"):
        kernels.lowrank_linear(x, a, b)
