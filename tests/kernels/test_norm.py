"""The fused Triton RMSNorm (kernels/norm.py) against kernels.reference, forward and backward.

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
from megatrain.kernels import norm as triton_norm

from tests.kernels.kernel_testing import assert_matches, fresh_generator, randn, ran_kernel

pytestmark = pytest.mark.usefixtures("triton_backend")
from tests.kernels.kernel_testing import triton_backend  # noqa: E402,F401  (the fixture)


def check_against_reference(seed: int, inputs: dict, call, upstream: dict, dtype: torch.dtype):
    """Run `call(fn, tensors)` with fn = the dispatched kernels.rms_norm on `inputs`, and with
    fn = reference.rms_norm on fp32 copies; compare every output and the gradient of every input.

    `upstream` maps output index -> upstream gradient; outputs not in it receive no gradient.
    Returns the outputs of the kernel call.
    """
    ours_in = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    ref_in = {k: v.detach().float().requires_grad_() for k, v in inputs.items()}
    ours = call(kernels.rms_norm, ours_in)
    ref = call(reference.rms_norm, ref_in)
    ours, ref = (ours if isinstance(ours, tuple) else (ours,)), (ref if isinstance(ref, tuple) else (ref,))
    assert len(ours) == len(ref)

    # The dispatch must really have run the Triton kernels, not fallen back to the reference.
    for out in ours:
        assert ran_kernel(out, "rms_norm"), out.grad_fn
    for i, (o, r) in enumerate(zip(ours, ref)):
        assert o.shape == r.shape, f"output {i} (seed {seed})"
        assert_matches(o, r, dtype, f"output {i}", seed)

    used = sorted(upstream)
    grads_ours = torch.autograd.grad(
        [ours[i] for i in used], list(ours_in.values()), [upstream[i] for i in used], allow_unused=True
    )
    grads_ref = torch.autograd.grad(
        [ref[i] for i in used], list(ref_in.values()), [upstream[i].float() for i in used], allow_unused=True
    )
    for (name, t), g, g_ref in zip(ours_in.items(), grads_ours, grads_ref):
        assert g is not None, f"no gradient for {name} (seed {seed})"
        assert g.dtype == t.dtype and g.shape == t.shape, f"d{name}: {g.dtype} {tuple(g.shape)} (seed {seed})"
        if g_ref is None:  # the reference graph does not reach this input: its gradient is zero
            g_ref = torch.zeros_like(t, dtype=torch.float32)
        tol_dtype = dtype
        if name == "weight":
            # dw is summed in fp32 and rounded to weight.dtype at the end; but with a residual it is
            # built from the saved h, which is rounded to x.dtype, so it is only that accurate.
            tol_dtype = dtype if "residual" in inputs and dtype != torch.float32 else t.dtype
        assert_matches(g, g_ref, tol_dtype, f"d{name}", seed)
    return ours


def make_inputs(gen, shape, dtype, weight_dtype, residual: bool, scale: float = 1.0):
    d = shape[-1]
    inputs = {
        "x": randn(gen, shape, dtype, scale),
        # Weights spread around 1 (as trained norms are), so every column's dw is distinct.
        "weight": (1.0 + 0.5 * torch.randn(d, generator=gen)).to(weight_dtype),
    }
    if residual:
        inputs["residual"] = randn(gen, shape, dtype, scale)
    return inputs


SHAPES = [(7, 33), (3, 5, 33), (6, 64), (5, 1000)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_rms_norm_matches_reference(shape, dtype, residual):
    seed, gen = fresh_generator()
    inputs = make_inputs(gen, shape, dtype, dtype, residual)
    # With a residual, gradients flow into both returned tensors (y feeds the block, h the stream).
    upstream = {0: randn(gen, shape, dtype)}
    if residual:
        upstream[1] = randn(gen, shape, dtype)
    ours = check_against_reference(seed, inputs, lambda fn, t: fn(eps=1e-6, **t), upstream, dtype)
    assert all(o.dtype == dtype for o in ours)


def test_rms_norm_fp16():
    seed, gen = fresh_generator()
    shape = (4, 3, 40)
    inputs = make_inputs(gen, shape, torch.float16, torch.float16, residual=True)
    upstream = {0: randn(gen, shape, torch.float16), 1: randn(gen, shape, torch.float16)}
    check_against_reference(seed, inputs, lambda fn, t: fn(**t), upstream, torch.float16)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_rms_norm_fp32_weight_with_bf16_x(residual):
    seed, gen = fresh_generator()
    shape = (2, 7, 48)
    inputs = make_inputs(gen, shape, torch.bfloat16, torch.float32, residual)
    upstream = {0: randn(gen, shape, torch.bfloat16)}
    if residual:
        upstream[1] = randn(gen, shape, torch.bfloat16)
    ours = check_against_reference(seed, inputs, lambda fn, t: fn(**t), upstream, torch.bfloat16)
    assert all(o.dtype == torch.bfloat16 for o in ours)


@pytest.mark.parametrize(
    "x_dtype,residual_dtype",
    [(torch.bfloat16, torch.float32), (torch.float32, torch.float16)],
    ids=["bf16_x_fp32_residual", "fp32_x_fp16_residual"],
)
def test_rms_norm_mixed_x_and_residual_dtypes_promote(x_dtype, residual_dtype):
    """A bf16 branch output added to an fp32 stream (what autocast hands the fused add + norm): each
    input is loaded in its own dtype, y and h come back in the promoted dtype (fp32), each input's
    gradient in its own dtype."""
    seed, gen = fresh_generator()
    shape = (3, 5, 40)
    inputs = {
        "x": randn(gen, shape, x_dtype),
        "weight": 1.0 + 0.5 * torch.randn(shape[-1], generator=gen),
        "residual": randn(gen, shape, residual_dtype),
    }
    upstream = [randn(gen, shape), randn(gen, shape)]
    ours_in = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    ref_in = {k: v.float().requires_grad_() for k, v in inputs.items()}
    ours, ref = kernels.rms_norm(**ours_in), reference.rms_norm(**ref_in)
    assert ran_kernel(ours[0], "rms_norm"), ours[0].grad_fn
    assert [o.dtype for o in ours] == [torch.float32] * 2 == [o.dtype for o in reference.rms_norm(**inputs)]
    for what, o, r in zip(("y", "h"), ours, ref):
        assert_matches(o, r, torch.float32, what, seed)
    grads = torch.autograd.grad(ours, list(ours_in.values()), upstream)
    grads_ref = torch.autograd.grad(ref, list(ref_in.values()), upstream)
    for (name, t), g, g_ref in zip(ours_in.items(), grads, grads_ref):
        assert g.dtype == t.dtype, f"d{name}: {g.dtype} (seed {seed})"
        assert_matches(g, g_ref, t.dtype, f"d{name}", seed)


def test_rms_norm_non_contiguous_inputs():
    seed, gen = fresh_generator()
    rows, d = 9, 33
    inputs = {
        "x_t": randn(gen, (d, rows)),  # used transposed: strides (1, rows)
        "weight_wide": randn(gen, (2 * d,)),  # used as weight[::2]: stride 2
        "residual_wide": randn(gen, (rows, d + 5)),
    }  # used sliced: row stride d + 5

    def call(fn, t):
        return fn(t["x_t"].transpose(0, 1), t["weight_wide"][::2], residual=t["residual_wide"][:, :d])

    upstream = {0: randn(gen, (rows, d)), 1: randn(gen, (rows, d))}
    check_against_reference(seed, inputs, call, upstream, torch.float32)


def test_rms_norm_eps_matters():
    """Inputs as small as sqrt(eps), so getting eps wrong (or dropping it) shows."""
    seed, gen = fresh_generator()
    inputs = make_inputs(gen, (5, 3, 33), torch.float32, torch.float32, residual=False, scale=1e-2)
    upstream = {0: randn(gen, (5, 3, 33))}
    check_against_reference(seed, inputs, lambda fn, t: fn(eps=1e-4, **t), upstream, torch.float32)


@pytest.mark.parametrize("used", [(0,), (1,)], ids=["only_y", "only_h"])
def test_rms_norm_residual_one_output_used(used):
    seed, gen = fresh_generator()
    shape = (7, 33)
    inputs = make_inputs(gen, shape, torch.float32, torch.float32, residual=True)
    upstream = {i: randn(gen, shape) for i in used}
    check_against_reference(seed, inputs, lambda fn, t: fn(**t), upstream, torch.float32)


def test_rms_norm_sum_backward_and_no_grad():
    """An expanded upstream gradient (from .sum()) and a forward under no_grad."""
    seed, gen = fresh_generator()
    x, w = randn(gen, (3, 5, 33)), randn(gen, (33,))
    ours_x, ref_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    kernels.rms_norm(ours_x, w).sum().backward()
    reference.rms_norm(ref_x, w).sum().backward()
    assert_matches(ours_x.grad, ref_x.grad, torch.float32, "dx from .sum()", seed)
    with torch.no_grad():
        y = kernels.rms_norm(x, w)
    assert y.grad_fn is None
    assert_matches(y, reference.rms_norm(x, w), torch.float32, "no_grad output", seed)


def test_rms_norm_frozen_weight_1d_and_empty_inputs():
    """A weight that needs no gradient (the kernel skips dw), a 1-D x, and zero rows."""
    seed, gen = fresh_generator()
    x, w, dy = randn(gen, (33,)), randn(gen, (33,)), randn(gen, (33,))
    ours_x, ref_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = kernels.rms_norm(ours_x, w)
    assert ran_kernel(y, "rms_norm")
    y.backward(dy)
    reference.rms_norm(ref_x, w).backward(dy)
    assert_matches(ours_x.grad, ref_x.grad, torch.float32, "dx with frozen weight", seed)

    empty = torch.randn(0, 4, 33, requires_grad=True)
    w = torch.randn(33, requires_grad=True)
    y, h = kernels.rms_norm(empty, w, residual=torch.randn(0, 4, 33))
    assert y.shape == h.shape == (0, 4, 33)
    (y.sum() + h.sum()).backward()
    assert empty.grad.shape == (0, 4, 33) and torch.equal(w.grad, torch.zeros(33))


def _bad(name):
    d = 33
    x, w = torch.randn(7, d), torch.randn(d)
    cases = {
        "weight_wrong_size": ((x, torch.randn(d + 1)), {}, "weight"),
        "weight_2d": ((x, w[None]), {}, "weight"),
        "weight_int": ((x, torch.ones(d, dtype=torch.int64)), {}, "weight"),
        "x_int": ((torch.ones(7, d, dtype=torch.int32), w), {}, "x"),
        "residual_shape": ((x, w), {"residual": torch.randn(7, d + 1)}, "residual"),
        "residual_dtype": ((x, w), {"residual": torch.randn(7, d, dtype=torch.float64)}, "residual"),
        "weight_other_device": ((x, torch.empty(d, device="meta")), {}, "weight"),
    }
    return cases[name]


@pytest.mark.parametrize(
    "case",
    [
        "weight_wrong_size",
        "weight_2d",
        "weight_int",
        "x_int",
        "residual_shape",
        "residual_dtype",
        "weight_other_device",
    ],
)
def test_rms_norm_bad_inputs_raise(case):
    args, kwargs, argument = _bad(case)
    with pytest.raises(ValueError, match=rf"^rms_norm: .*'{argument}'"):
        kernels.rms_norm(*args, **kwargs)


@pytest.mark.cpu_tensors
def test_rms_norm_cpu_tensor_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w = torch.randn(7, 33), torch.randn(33)
    with pytest.raises(ValueError, match=r"^rms_norm: .*cpu.*TRITON_INTERPRET=1"):
        kernels.rms_norm(x, w)
    # The kernel module's own entry point checks too (for callers that bypass the dispatch).
    with pytest.raises(ValueError, match=r"^rms_norm: .*cpu.*TRITON_INTERPRET=1"):
        triton_norm.rms_norm(x, w)


@pytest.mark.parametrize("rows, d", [(19, 24), (37, 100), (5, 1000)])
def test_rms_norm_forward_tiles_of_several_rows(rows, d, monkeypatch):
    """Narrow rows are packed several per program (forward_config), with a last tile partly empty;
    wide rows take one program each; with a residual, forward and backward. Under no_grad the
    forward stores no rstd."""
    config = dict(triton_norm.forward_config(d).constexprs)
    assert config["BLOCK_ROWS"] == max(1, 256 // config["BLOCK_D"])
    seed, gen = fresh_generator()
    inputs = {"x": randn(gen, (rows, d)), "weight": randn(gen, (d,)), "residual": randn(gen, (rows, d))}
    check_against_reference(
        seed,
        inputs,
        lambda fn, t: fn(t["x"], t["weight"], 1e-6, t["residual"]),
        {0: randn(gen, (rows, d)), 1: randn(gen, (rows, d))},
        torch.float32,
    )
    stored = []
    real = triton_norm.rms_norm_fwd
    monkeypatch.setattr(triton_norm, "rms_norm_fwd", lambda *a, **k: stored.append(k["store_rstd"]) or real(*a, **k))
    with torch.no_grad():
        y = kernels.rms_norm(inputs["x"], inputs["weight"])
    kernels.rms_norm(inputs["x"].clone().requires_grad_(), inputs["weight"])
    assert stored == [False, True]
    assert_matches(y, reference.rms_norm(inputs["x"], inputs["weight"]), torch.float32, "no_grad output", seed)
