"""The fused Triton SwiGLU (kernels/activation.py) against kernels.reference, forward and backward.

Without a GPU the kernels run through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before anything imports them). Every test draws a fresh seed and prints it on failure. Kernel outputs
are allocated NaN-filled (MEGATRAIN_KERNELS_POISON=1), so an element a kernel forgets to write fails.
"""

from __future__ import annotations


import pytest
import torch

from megatrain import kernels
from megatrain.kernels import reference

# Imported at collection time, while TRITON_INTERPRET=1, so the kernels are built for the interpreter
# even though one test below switches the variable off.
from megatrain.kernels import activation as triton_activation

from tests.kernels.kernel_testing import assert_matches, fresh_generator, randn, ran_kernel

pytestmark = pytest.mark.usefixtures("triton_backend")
from tests.kernels.kernel_testing import triton_backend  # noqa: E402,F401  (the fixture)


def check_against_reference(seed: int, gate: torch.Tensor, up: torch.Tensor, dy: torch.Tensor, view=None):
    """kernels.swiglu on (gate, up) against reference.swiglu on fp32 copies: output, dgate, dup.

    `view`, when given, maps each leaf to the (non-contiguous) tensor actually passed to the op.
    """
    view = view or (lambda t: t)
    dtype = gate.dtype
    ours_in = [gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()]
    ref_in = [gate.detach().float().requires_grad_(), up.detach().float().requires_grad_()]
    ours = kernels.swiglu(view(ours_in[0]), view(ours_in[1]))
    ref = reference.swiglu(view(ref_in[0]), view(ref_in[1]))

    # The dispatch must really have run the Triton kernels, not fallen back to the reference.
    assert ran_kernel(ours, "swiglu"), ours.grad_fn
    assert ours.dtype == dtype and ours.shape == ref.shape, f"{ours.dtype} {tuple(ours.shape)} (seed {seed})"
    assert_matches(ours, ref, dtype, "output", seed)

    grads_ours = torch.autograd.grad(ours, ours_in, dy)
    grads_ref = torch.autograd.grad(ref, ref_in, dy.float())
    for name, t, g, g_ref in zip(("gate", "up"), ours_in, grads_ours, grads_ref):
        assert g.dtype == t.dtype and g.shape == t.shape, f"d{name}: {g.dtype} {tuple(g.shape)} (seed {seed})"
        assert_matches(g, g_ref, dtype, f"d{name}", seed)


# 7x33 and 3x5x33 fit one 1024-element block with a ragged tail; 4x256 is exactly one block;
# 3x1000 spans three blocks, the last one partial.
SHAPES = [(7, 33), (3, 5, 33), (4, 256), (3, 1000)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_swiglu_matches_reference(shape, dtype):
    seed, gen = fresh_generator()
    # gate spread wider than N(0, 1) so both tails of the sigmoid are exercised.
    gate, up, dy = randn(gen, shape, dtype, 3.0), randn(gen, shape, dtype), randn(gen, shape, dtype)
    check_against_reference(seed, gate, up, dy)


def test_swiglu_mixed_dtypes_promote():
    """gate and up of different float dtypes: each loaded in its own, y in the promoted dtype (as
    silu(gate) * up), each gradient in its input's dtype."""
    seed, gen = fresh_generator()
    gate, up, dy = randn(gen, (6, 40), torch.bfloat16, 3.0), randn(gen, (6, 40)), randn(gen, (6, 40))
    ours_in = [gate.clone().requires_grad_(), up.clone().requires_grad_()]
    ref_in = [gate.float().requires_grad_(), up.clone().requires_grad_()]
    ours, ref = kernels.swiglu(*ours_in), reference.swiglu(*ref_in)
    assert ran_kernel(ours, "swiglu"), ours.grad_fn
    assert ours.dtype == reference.swiglu(gate, up).dtype == torch.float32
    assert_matches(ours, ref, torch.float32, "output", seed)
    for name, t, g, g_ref in zip(
        ("gate", "up"), ours_in, torch.autograd.grad(ours, ours_in, dy), torch.autograd.grad(ref, ref_in, dy)
    ):
        assert g.dtype == t.dtype, f"d{name}: {g.dtype} (seed {seed})"
        assert_matches(g, g_ref, t.dtype, f"d{name}", seed)


# numpy, under the interpreter, warns when exp(-g) overflows to inf; that overflow is the case tested.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_swiglu_saturated_gate_is_finite():
    """Very negative gates overflow exp(-g) to inf: s must become 0, not NaN."""
    seed, gen = fresh_generator()
    gate = torch.tensor([-1e4, -100.0, -88.0, -30.0, -5.0, -1e-3, 0.0, 1e-3, 5.0, 30.0, 88.0, 100.0, 1e4])
    gate = gate.repeat(3, 1)
    up, dy = randn(gen, gate.shape), randn(gen, gate.shape)
    check_against_reference(seed, gate, up, dy)


def test_swiglu_non_contiguous_inputs():
    seed, gen = fresh_generator()
    # Leaves [2, 40, 9], used as [2, 9, 33]: transposed, then sliced along the last dim.
    gate, up, dy = randn(gen, (2, 40, 9), scale=2.0), randn(gen, (2, 40, 9)), randn(gen, (2, 9, 33))
    check_against_reference(seed, gate, up, dy, view=lambda t: t.transpose(1, 2)[..., 3:36])


def test_swiglu_sum_backward_and_no_grad():
    """An expanded upstream gradient (from .sum()) and a forward under no_grad."""
    seed, gen = fresh_generator()
    gate, up = randn(gen, (5, 33)), randn(gen, (5, 33))
    ours_g, ref_g = gate.clone().requires_grad_(), gate.clone().requires_grad_()
    kernels.swiglu(ours_g, up).sum().backward()
    reference.swiglu(ref_g, up).sum().backward()
    assert_matches(ours_g.grad, ref_g.grad, torch.float32, "dgate from .sum()", seed)
    with torch.no_grad():
        y = kernels.swiglu(gate, up)
    assert y.grad_fn is None
    assert_matches(y, reference.swiglu(gate, up), torch.float32, "no_grad output", seed)


def _bad(name):
    gate = torch.randn(7, 33)
    cases = {
        "up_shape": ((gate, torch.randn(7, 34)), "up"),
        "up_broadcastable": ((gate, torch.randn(1, 33)), "up"),
        "up_float64": ((gate, gate.double()), "up"),
        "gate_int": ((torch.ones(7, 33, dtype=torch.int64), torch.ones(7, 33, dtype=torch.int64)), "gate"),
        "gate_float64": ((gate.double(), gate.double()), "gate"),
        "up_other_device": ((gate, torch.empty(7, 33, device="meta")), "up"),
    }
    return cases[name]


@pytest.mark.parametrize(
    "case", ["up_shape", "up_broadcastable", "up_float64", "gate_int", "gate_float64", "up_other_device"]
)
def test_swiglu_bad_inputs_raise(case):
    args, argument = _bad(case)
    with pytest.raises(ValueError, match=rf"^swiglu: .*'{argument}'"):
        kernels.swiglu(*args)


@pytest.mark.cpu_tensors
def test_swiglu_cpu_tensor_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    gate, up = torch.randn(7, 33), torch.randn(7, 33)
    with pytest.raises(ValueError, match=r"^swiglu: .*cpu.*TRITON_INTERPRET=1"):
        kernels.swiglu(gate, up)
    # The kernel module's own entry point checks too (for callers that bypass the dispatch).
    with pytest.raises(ValueError, match=r"^swiglu: .*cpu.*TRITON_INTERPRET=1"):
        triton_activation.swiglu(gate, up)
