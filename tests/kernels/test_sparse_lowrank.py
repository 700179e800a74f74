"""The sparse plus low-rank projection (kernels/sparse_lowrank.py) against kernels.reference.

Forward and every gradient (x, a, b, values) under Triton's interpreter, fresh seeds, NaN-poisoned
outputs; plus the support validation cache, input validation, and a check that no dense [D_in, D_out]
tensor is kept for backward (W is a per-call transient).
"""

from __future__ import annotations

import pytest
import torch

from megatrain import kernels
from megatrain.kernels import reference

# Imported at collection time, while TRITON_INTERPRET=1, so the kernels are built for the interpreter.
from megatrain.kernels import sparse_lowrank as triton_sparse

from tests.kernels.kernel_testing import assert_matches, fresh_generator, randn, ran_kernel

pytestmark = pytest.mark.usefixtures("triton_backend")
from tests.kernels.kernel_testing import triton_backend  # noqa: E402,F401  (the fixture)

D_IN, RANK, D_OUT = 13, 5, 19


def random_support(gen, d_in, d_out, density):
    nnz = int(round(density * d_in * d_out))
    return torch.randperm(d_in * d_out, generator=gen)[:nnz].sort().values


def make_inputs(gen, lead, d_in, rank, d_out, density, dtype):
    x = randn(gen, (*lead, d_in), dtype)
    a = randn(gen, (d_in, rank), dtype, scale=1.0 / d_in**0.5)
    b = randn(gen, (rank, d_out), dtype, scale=1.0 / rank**0.5)
    index = random_support(gen, d_in, d_out, density)
    values = randn(gen, (index.numel(),), dtype)
    dy = randn(gen, (*lead, d_out), dtype)
    return x, a, b, values, index, dy


def check_against_reference(seed, x, a, b, values, index, scale, dy):
    dtype = x.dtype
    ours_in = [t.detach().clone().requires_grad_() for t in (x, a, b, values)]
    ref_in = [t.detach().float().requires_grad_() for t in (x, a, b, values)]
    ours = kernels.sparse_lowrank_linear(*ours_in, index, scale)
    ref = reference.sparse_lowrank_linear(*ref_in, index, scale)
    assert ran_kernel(ours, "sparse_lowrank_linear"), ours.grad_fn
    assert ours.dtype == dtype and ours.shape == ref.shape, f"{ours.dtype} {tuple(ours.shape)} (seed {seed})"
    assert_matches(ours, ref, dtype, "output", seed)
    grads_ours = torch.autograd.grad(ours, ours_in, dy)
    grads_ref = torch.autograd.grad(ref, ref_in, dy.float())
    for name, t, g, g_ref in zip(("x", "a", "b", "values"), ours_in, grads_ours, grads_ref):
        assert g.dtype == t.dtype and g.shape == t.shape, f"d{name}: {g.dtype} {tuple(g.shape)} (seed {seed})"
        assert_matches(g, g_ref, dtype, f"d{name}", seed)


@pytest.mark.parametrize("density", [0.0, 0.03, 0.3, 1.0], ids=lambda d: f"density{d}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sparse_lowrank_matches_reference(dtype, density):
    """Odd sizes: D_in = 13, r = 5, D_out = 19, 2x7 rows. density 0 is an empty support (S = 0,
    values [0], no scatter launched); 1.0 is a full one (247 entries, one partial scatter block)."""
    seed, gen = fresh_generator()
    x, a, b, values, index, dy = make_inputs(gen, (2, 7), D_IN, RANK, D_OUT, density, dtype)
    check_against_reference(seed, x, a, b, values, index, 0.75, dy)


def test_sparse_lowrank_many_tiles():
    """37 rows, D_in = 41, D_out = 50, r = 3, scale 2, density 0.6: 1230 entries, two scatter blocks
    (the second partial)."""
    seed, gen = fresh_generator()
    x, a, b, values, index, dy = make_inputs(gen, (37,), 41, 3, 50, 0.6, torch.float32)
    check_against_reference(seed, x, a, b, values, index, 2.0, dy)


def test_sparse_lowrank_clustered_support():
    """All entries in one row and one column (maximally unbalanced groups), fp32."""
    seed, gen = fresh_generator()
    x, a, b, _, _, dy = make_inputs(gen, (11,), D_IN, RANK, D_OUT, 0.0, torch.float32)
    flat = sorted(set([4 * D_OUT + j for j in range(D_OUT)] + [i * D_OUT + 7 for i in range(D_IN)]))
    index = torch.tensor(flat, dtype=torch.int64)
    values = randn(gen, (index.numel(),))
    check_against_reference(seed, x, a, b, values, index, 0.5, dy)


def test_sparse_lowrank_saves_no_dense_matrix():
    """W = scale * a @ b + S is a transient: the autograd node keeps x, a, b, values and index, nothing
    of D_in * D_out elements (backward rebuilds W)."""
    gen = fresh_generator()[1]
    x, a, b, values, index, _ = make_inputs(gen, (3,), 29, 2, 31, 0.3, torch.float32)
    y = kernels.sparse_lowrank_linear(*(t.requires_grad_() for t in (x, a, b, values)), index, 1.0)
    saved = [t.numel() for t in y.grad_fn.saved_tensors]
    assert len(saved) == 5 and max(saved) < 29 * 31, saved


@pytest.mark.parametrize("wanted", ["x", "a", "b", "values"])
def test_sparse_lowrank_partial_grads(wanted):
    """Only one input needs a gradient: backward builds only what that gradient needs (W for dx,
    dW for the others) and matches the reference."""
    seed, gen = fresh_generator()
    x, a, b, values, index, dy = make_inputs(gen, (2, 5), D_IN, RANK, D_OUT, 0.3, torch.float32)
    names = ("x", "a", "b", "values")
    ours_in = [t.clone().requires_grad_(n == wanted) for n, t in zip(names, (x, a, b, values))]
    ref_in = [t.clone().requires_grad_(n == wanted) for n, t in zip(names, (x, a, b, values))]
    (g,) = torch.autograd.grad(kernels.sparse_lowrank_linear(*ours_in, index, 0.5), ours_in[names.index(wanted)], dy)
    (g_ref,) = torch.autograd.grad(
        reference.sparse_lowrank_linear(*ref_in, index, 0.5), ref_in[names.index(wanted)], dy
    )
    assert_matches(g, g_ref, torch.float32, f"d{wanted} only", seed)


def test_sparse_support_is_validated_once_and_cached():
    gen = fresh_generator()[1]
    index = random_support(gen, D_IN, D_OUT, 0.3)
    support = triton_sparse.sparse_support(index, D_IN, D_OUT)
    assert (support.d_in, support.d_out, support.nnz) == (D_IN, D_OUT, index.numel())
    assert triton_sparse.sparse_support(index, D_IN, D_OUT) is support
    # Written in place: validated again, not served stale (an unsorted index now fails).
    index.copy_(index.flip(0))
    with pytest.raises(ValueError, match=r"^sparse_lowrank_linear: .*sorted"):
        triton_sparse.sparse_support(index, D_IN, D_OUT)


def _bad(name):
    x, a, b = torch.randn(7, D_IN), torch.randn(D_IN, RANK), torch.randn(RANK, D_OUT)
    index = torch.tensor([3, 20, 41], dtype=torch.int64)
    values = torch.randn(3)
    cases = {
        "unsorted": ((x, a, b, values, torch.tensor([20, 3, 41])), "sorted"),
        "repeated": ((x, a, b, values, torch.tensor([3, 3, 41])), "sorted"),
        "out_of_range": ((x, a, b, values, torch.tensor([3, 20, D_IN * D_OUT])), r"\[0, D_in\*D_out\)"),
        "negative": ((x, a, b, values, torch.tensor([-1, 20, 41])), r"\[0, D_in\*D_out\)"),
        "index_int32": ((x, a, b, values, index.int()), "'index'"),
        "lengths": ((x, a, b, torch.randn(4), index), "'index'"),
        "a_shape": ((x, torch.randn(D_IN + 1, RANK), b, values, index), "'a'"),
        "values_2d": ((x, a, b, values[None], index), "'values'"),
    }
    return cases[name]


@pytest.mark.parametrize(
    "case", ["unsorted", "repeated", "out_of_range", "negative", "index_int32", "lengths", "a_shape", "values_2d"]
)
def test_sparse_lowrank_bad_inputs_raise(case):
    args, what = _bad(case)
    with pytest.raises(ValueError, match=rf"^sparse_lowrank_linear: .*{what}"):
        kernels.sparse_lowrank_linear(*args, 1.0)
    with pytest.raises(ValueError, match=r"^sparse_lowrank_linear: "):
        reference.sparse_lowrank_linear(*args, 1.0)


def test_reference_reads_a_support_once():
    """The torch path reads the index on the host (a sync on a GPU) on its first use only, and again after an
    in-place write; a new tensor is read again."""
    from megatrain.bench.measure import HostReads

    x, a, b = torch.randn(4, D_IN), torch.randn(D_IN, RANK), torch.randn(RANK, D_OUT)
    values, index = torch.randn(3), torch.tensor([3, 20, 41])

    def reads(idx) -> int:
        with HostReads(torch.device("cpu")) as counter:
            reference.sparse_lowrank_linear(x, a, b, values, idx, 1.0)
        return counter.count

    assert reads(index) > 0 and reads(index) == 0
    index[0] = 2  # written in place: read (and checked) again
    assert reads(index) > 0 and reads(index) == 0
    assert reads(index.clone()) > 0
    index[1] = 1  # now unsorted: the next call must see it
    with pytest.raises(ValueError, match="sorted"):
        reference.sparse_lowrank_linear(x, a, b, values, index, 1.0)


@pytest.mark.cpu_tensors
def test_sparse_lowrank_auto_backend_on_cpu_is_reference(monkeypatch):
    monkeypatch.setenv("MEGATRAIN_KERNELS", "auto")
    x = torch.randn(4, D_IN, requires_grad=True)
    y = kernels.sparse_lowrank_linear(
        x, torch.randn(D_IN, RANK), torch.randn(RANK, D_OUT), torch.randn(2), torch.tensor([0, 5]), 1.0
    )
    assert not ran_kernel(y, "sparse_lowrank_linear")
