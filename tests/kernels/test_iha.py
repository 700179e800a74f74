"""Interleaved head attention: the fused Triton kernels (kernels/iha.py) against the reference.

Without a GPU the kernels run through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
with small tiles (8 tokens), so odd N = 13 spans two query and two key tiles and the skipping of
fully masked tiles is exercised. Every case draws fresh inputs (the seed is in the failure message),
checks the output and all seven gradients (q, k, v, mix_q, mix_k, mix_v, collapse), with outputs
NaN-poisoned before each launch.

bf16 gradients get 2e-2: the kernels round the pseudo-heads, the probabilities and dS to bf16 as dot
operands (as flash attention does), and each gradient goes through two such products.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatrain import kernels
from megatrain.kernels import reference

from .kernel_testing import assert_matches, fresh_generator, fresh_seed, randn, triton_backend  # noqa: F401

GRAD_NAMES = ("q", "k", "v", "mix_q", "mix_k", "mix_v", "collapse")
MASKS = {  # id -> (mask, window in units of P)
    "causal": ("causal", None),
    "token_causal": ("token_causal", None),
    "causal_window": ("causal", 2),
    "token_causal_window": ("token_causal", 2),
}


def _inputs(gen, *, batch, heads_in, heads_out, seq_len, head_dim, pseudo, dtype, rope, global_collapse,
            transposed=False):
    """q, k, v, mixes, collapse (+ cos, sin or None). Mixes near the identity-ish scale of a trained layer."""
    if transposed:  # [B, N, H, d] projections viewed as [B, H, N, d], as the attention module passes them
        q, k, v = (randn(gen, (batch, seq_len, heads_in, head_dim), dtype).transpose(1, 2) for _ in range(3))
    else:
        q, k, v = (randn(gen, (batch, heads_in, seq_len, head_dim), dtype) for _ in range(3))
    mixes = [randn(gen, (heads_in, heads_out, pseudo), scale=heads_in ** -0.5) for _ in range(3)]
    collapse_shape = (heads_out, heads_out * pseudo) if global_collapse else (heads_out, pseudo)
    collapse = randn(gen, collapse_shape, scale=pseudo ** -0.5)
    cos = sin = None
    if rope:
        angles = torch.rand((seq_len * pseudo, head_dim // 2), generator=gen) * 6.0
        cos, sin = angles.cos(), angles.sin()
    return [q, k, v, *mixes, collapse], cos, sin


def _run(fn, tensors, cos, sin, mask, window, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves, cos, sin, mask, window)
    out.backward(grad_out)
    return out, [leaf.grad for leaf in leaves]


def _check(seed, gen, tensors, cos, sin, mask, window, dtype):
    upcast = [t.float() if t.dtype == torch.bfloat16 else t for t in tensors]
    # The reference sees the kernel's own inputs: the bf16-rounded grad_out too (the mixing grads are
    # sums over every position, where the rounding of an unrounded grad_out alone could exceed 2e-2).
    grad_out = randn(torch.Generator().manual_seed(seed + 1),
                     (tensors[0].shape[0], tensors[3].shape[1], *tensors[0].shape[2:])).to(dtype)
    expected, expected_grads = _run(reference.iha_attention, upcast, cos, sin, mask, window, grad_out.float())
    actual, actual_grads = _run(kernels.iha_attention, tensors, cos, sin, mask, window, grad_out)
    assert actual.dtype == dtype and actual.shape == expected.shape
    assert_matches(actual, expected, dtype, "output", seed)
    grad_dtype = torch.bfloat16 if dtype == torch.bfloat16 else dtype
    for name, got, want in zip(GRAD_NAMES, actual_grads, expected_grads):
        assert got is not None and got.shape == want.shape, name
        if dtype == torch.bfloat16:
            torch.testing.assert_close(got.float(), want.float(), rtol=2e-2,
                                       atol=2e-2 * want.abs().max().item(),
                                       msg=lambda m, name=name: f"grad {name} (seed {seed}): {m}")
        else:
            assert_matches(got, want, grad_dtype, f"grad {name}", seed)


@pytest.mark.parametrize("mask_id", list(MASKS))
@pytest.mark.parametrize("heads", [2, 4])
@pytest.mark.parametrize("pseudo", [1, 2, 3])
def test_fp32_matches_reference(triton_backend, pseudo, heads, mask_id):  # noqa: F811
    """Every P x H x mask; rotary on for H = 4, rectangular mixing (H_out = 3) unless P = 2."""
    seed, gen = fresh_generator()
    mask, window_units = MASKS[mask_id]
    window = None if window_units is None else window_units * pseudo
    tensors, cos, sin = _inputs(gen, batch=1 + (heads == 2), heads_in=heads,
                                heads_out=heads if pseudo == 2 else 3, seq_len=13,
                                head_dim=16, pseudo=pseudo, dtype=torch.float32, rope=heads == 4,
                                global_collapse=False)
    _check(seed, gen, tensors, cos, sin, mask, window, torch.float32)


@pytest.mark.parametrize("mask_id", ["causal", "token_causal_window"])
@pytest.mark.parametrize("pseudo", [1, 2, 3])
def test_bf16_matches_reference(triton_backend, pseudo, mask_id):  # noqa: F811
    seed, gen = fresh_generator()
    mask, window_units = MASKS[mask_id]
    window = None if window_units is None else window_units * pseudo
    tensors, cos, sin = _inputs(gen, batch=1, heads_in=2 + 2 * (pseudo == 2), heads_out=3, seq_len=13,
                                head_dim=32, pseudo=pseudo, dtype=torch.bfloat16, rope=True, global_collapse=False)
    _check(seed, gen, tensors, cos, sin, mask, window, torch.bfloat16)


@pytest.mark.parametrize("dtype,pseudo,mask_id", [(torch.float32, 2, "causal"), (torch.float32, 3, "causal_window"),
                                                  (torch.bfloat16, 2, "token_causal")])
def test_global_collapse_matches_reference(triton_backend, dtype, pseudo, mask_id):  # noqa: F811
    seed, gen = fresh_generator()
    mask, window_units = MASKS[mask_id]
    window = None if window_units is None else window_units * pseudo
    tensors, cos, sin = _inputs(gen, batch=1, heads_in=2, heads_out=3, seq_len=13, head_dim=16, pseudo=pseudo,
                                dtype=dtype, rope=True, global_collapse=True)
    _check(seed, gen, tensors, cos, sin, mask, window, dtype)


@pytest.mark.parametrize("mask", ["causal", "token_causal"])
def test_window_smaller_than_a_tile(triton_backend, mask):  # noqa: F811
    """A one-token window and N = 21 (three 8-token tiles): the last query tile skips the first two key
    tiles and the first key tile skips the last query tile, so wrong skip bounds drop real keys."""
    seed, gen = fresh_generator()
    tensors, cos, sin = _inputs(gen, batch=1, heads_in=2, heads_out=2, seq_len=21, head_dim=16, pseudo=2,
                                dtype=torch.float32, rope=True, global_collapse=False)
    _check(seed, gen, tensors, cos, sin, mask, 2, torch.float32)


def test_strided_inputs_and_odd_head_dim(triton_backend):  # noqa: F811
    """Transposed q/k/v views (no copies) and an odd d = 33 without rotary."""
    seed, gen = fresh_generator()
    tensors, cos, sin = _inputs(gen, batch=1, heads_in=2, heads_out=2, seq_len=7, head_dim=33, pseudo=2,
                                dtype=torch.float32, rope=False, global_collapse=False, transposed=True)
    assert not tensors[0].is_contiguous()
    _check(seed, gen, tensors, cos, sin, "causal", None, torch.float32)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_p1_identity_mixing_is_mha(monkeypatch, backend):
    """P = 1, mix = identity, collapse = 1: plain causal multi-head attention, values and gradients."""
    monkeypatch.setenv("MEGATRAIN_KERNELS", backend)
    seed, gen = fresh_generator()
    heads, n, d = 3, 13, 16
    q, k, v = (randn(gen, (2, heads, n, d)).requires_grad_() for _ in range(3))
    eye = torch.eye(heads)[:, :, None]
    out = kernels.iha_attention(q, k, v, eye, eye, eye, torch.ones(heads, 1))
    grad = randn(gen, out.shape)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    mha = F.scaled_dot_product_attention(q2, k2, v2, is_causal=True)
    mha_grads = torch.autograd.grad(mha, (q2, k2, v2), grad)
    assert_matches(out, mha, torch.float32, "output", seed)
    for name, got, want in zip("qkv", grads, mha_grads):
        assert_matches(got, want, torch.float32, f"grad {name}", seed)


def test_mask_rule():
    """The visibility rule the kernels and the reference share, on a small case written out by hand."""
    causal = reference.iha_allowed(3, 2, "causal", window=4)
    token = reference.iha_allowed(3, 2, "token_causal", window=4)
    assert causal.tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                               [1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert token.tolist() == [[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0],
                              [1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]]
    # Without a window the causal rule is lower-triangular and token_causal is block lower-triangular.
    assert torch.equal(reference.iha_allowed(4, 3), torch.ones(12, 12, dtype=torch.bool).tril())
    assert reference.iha_allowed(4, 3, "token_causal").sum().item() == 9 * (1 + 2 + 3 + 4)


def _valid_args():
    q = torch.randn(1, 2, 5, 8)
    mix = torch.randn(2, 3, 2)
    return dict(q=q, k=q, v=q, mix_q=mix, mix_k=mix, mix_v=mix, collapse=torch.randn(3, 2))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("change,needle", [
    (dict(q=torch.randn(2, 5, 8)), "'q'"),
    (dict(k=torch.randn(1, 2, 6, 8)), "'k'"),
    (dict(v=torch.randn(1, 2, 5, 8, dtype=torch.float64)), "'v'"),
    (dict(mix_q=torch.randn(3, 3, 2)), "'mix_q'"),
    (dict(mix_v=torch.randn(2, 3, 3)), "'mix_v'"),
    (dict(mix_q=torch.randn(2, 3, 0), mix_k=torch.randn(2, 3, 0), mix_v=torch.randn(2, 3, 0)), "P >= 1"),
    (dict(collapse=torch.randn(3, 3)), "'collapse'"),
    (dict(mask="bidirectional"), "'mask'"),
    (dict(window=3), "'window'"),
    (dict(window=0), "'window'"),
    (dict(cos=torch.randn(10, 4)), "'cos' and 'sin'"),
    (dict(cos=torch.randn(5, 4), sin=torch.randn(5, 4)), "'cos'"),
])
def test_invalid_inputs_raise(monkeypatch, backend, change, needle):
    monkeypatch.setenv("MEGATRAIN_KERNELS", backend)
    args = {**_valid_args(), **change}
    with pytest.raises(ValueError, match="iha_attention") as info:
        kernels.iha_attention(**args)
    assert needle in str(info.value)


def test_benchmark_case_runs_on_cpu(triton_backend):  # noqa: F811
    """benchmarks/kernels.py's IHA case at a tiny size on CPU: every row runs, the kernel passes the
    benchmark's own correctness check, and the targets judge synthetic timings as intended."""
    import importlib.util
    import sys
    from pathlib import Path

    name = "megatrain_bench_kernels"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[2] / "benchmarks"
                                                      / "kernels.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    bench = sys.modules[name]
    shape = dict(batch=1, seq=9, heads=2, head_dim=32, pseudo=2)
    torch.manual_seed(fresh_seed())  # the benchmark draws its inputs from the global RNG
    case = bench.iha_case(shape, "cpu")
    rows = bench.check_case(case, rtol=2e-2)
    assert [r["tensor"] for r in rows] == ["o", "dq", "dk", "dv", "dmix_q", "dmix_k", "dmix_v", "dcollapse"]
    assert all(r["ok"] for r in rows), rows
    for impl in case.impls.values():
        torch.autograd.backward(impl(*case.inputs), case.grad_outputs)
    assert bench.op_cost("iha", shape, "fwd+bwd") == bench.op_cost("iha", shape, "fwd") * 7 // 2
    label = bench.shape_label("iha", shape)
    verdicts = [t.verdict for t in bench.judge_iha(label, "fwd+bwd", 2, 10.0, 25.0, 2.0, 100, 400)]
    assert verdicts == ["PASS", "FAIL", "PASS"]  # 2.5x eager; 5x SDPA's time; 25% of eager's memory
    assert [t.verdict for t in bench.judge_iha(label, "fwd", 4, None, 25.0, 2.0)] == ["FAIL"]
