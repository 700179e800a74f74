"""The fused Triton RoPE kernel (kernels/rotary.py) against the reference, forward and backward.

Without a GPU the kernel runs through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before any kernel import). Every test draws its inputs from kernel_testing.fresh_seed (derived from the test id, or
KERNEL_TEST_SEED); the seed is in each assertion message so a failure can be replayed with `_generator(seed)`.
Outputs are allocated NaN-filled (MEGATRAIN_KERNELS_POISON=1), so an element the kernel forgets to
write fails the comparison.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatrain import kernels
from megatrain.kernels import reference, rotary

from .kernel_testing import fresh_seed, ran_kernel

# Tolerances relative to the fp32 reference. bf16: the kernel rounds its fp32 result once, so the
# error is at most half a bf16 ulp (2^-9 relative).
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=1e-2, atol=1e-3)}


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("MEGATRAIN_KERNELS", "triton")
    monkeypatch.setenv("MEGATRAIN_KERNELS_POISON", "1")


def _generator(seed: int | None = None) -> tuple[torch.Generator, int]:
    if seed is None:
        seed = fresh_seed()
    return torch.Generator().manual_seed(seed), seed


def _heads_tensor(batch, heads, n, d, layout, dtype, gen):
    """A [B, H, N, d] tensor laid out as the model or a caller might hand it over.

    contiguous: plain. transposed: a [B, N, H, d] projection viewed as [B, H, N, d] (what
    Attention does). strided: every other element of a wider, offset buffer, so no stride is the
    contiguous one, d's stride is 2 and the storage offset is non-zero.
    """
    if layout == "contiguous":
        return torch.randn(batch, heads, n, d, generator=gen).to(dtype)
    if layout == "transposed":
        return torch.randn(batch, n, heads, d, generator=gen).to(dtype).transpose(1, 2)
    if layout == "strided":
        wide = torch.randn(batch, heads + 1, n + 2, 2 * d + 4, generator=gen).to(dtype)
        return wide[:, 1:, 1 : n + 1, 3 : 3 + 2 * d : 2]
    raise AssertionError(layout)


def _rope_angles(n, half, *, start=0, base=10000.0):
    """Standard RoPE angles theta[n, i] = (start + n) * base^(-i / half), fp64 -> fp32: [N, d/2]."""
    inv_freq = base ** (-torch.arange(half, dtype=torch.float64) / half)
    positions = torch.arange(start, start + n, dtype=torch.float64)
    return (positions[:, None] * inv_freq).float()


def _tables(kind, shape, batch, n, half, gen):
    """cos, sin of shape [N, d/2] ('shared'), [B, N, d/2] ('per_row') or a stride-0 [B, N, d/2]
    ('expanded'). kind 'angles': real RoPE tables, a different start position per batch row.
    kind 'random': unrelated random values, so no cos^2 + sin^2 = 1 identity can hide a bug."""
    rows = 1 if shape in ("shared", "expanded") else batch
    if kind == "angles":
        starts = torch.randint(0, 1000, (rows,), generator=gen).tolist()
        theta = torch.stack([_rope_angles(n, half, start=s) for s in starts])
        cos, sin = theta.cos(), theta.sin()
    else:
        cos, sin = torch.randn(rows, n, half, generator=gen), torch.randn(rows, n, half, generator=gen)
    if shape == "shared":
        return cos[0], sin[0]
    if shape == "expanded":
        return cos.expand(batch, n, half), sin.expand(batch, n, half)
    return cos, sin


def _check_against_reference(q, k, cos, sin, seed):
    """Forward outputs and q/k gradients (random upstream gradients) of kernels.rope vs the reference
    run on fp32 copies."""
    tol = TOLERANCES[q.dtype]
    gen, _ = _generator(seed + 1)
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    q_rot, k_rot = kernels.rope(q, k, cos, sin)
    assert ran_kernel(q_rot, "rope"), (
        f"kernels.rope did not route to the Triton kernel (grad_fn {q_rot.grad_fn}); seed={seed}"
    )
    for name, out, x in (("q_rot", q_rot, q), ("k_rot", k_rot, k)):
        assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous(), (
            f"{name}: shape {tuple(out.shape)} dtype {out.dtype}; seed={seed}"
        )

    q32, k32 = q.detach().float().requires_grad_(), k.detach().float().requires_grad_()
    q_ref, k_ref = reference.rope(q32, k32, cos.float(), sin.float())
    torch.testing.assert_close(q_rot.float(), q_ref, **tol, msg=lambda m: f"q_rot, seed={seed}: {m}")
    torch.testing.assert_close(k_rot.float(), k_ref, **tol, msg=lambda m: f"k_rot, seed={seed}: {m}")

    # Upstream gradients as transposed views: SDPA's backward hands over non-contiguous ones too.
    grad_q_rot = _heads_tensor(*q.shape, "transposed", q.dtype, gen)
    grad_k_rot = _heads_tensor(*k.shape, "transposed", k.dtype, gen)
    grad_q, grad_k = torch.autograd.grad((q_rot, k_rot), (q, k), (grad_q_rot, grad_k_rot))
    ref_q, ref_k = torch.autograd.grad((q_ref, k_ref), (q32, k32), (grad_q_rot.float(), grad_k_rot.float()))
    assert grad_q.dtype == q.dtype and grad_k.dtype == k.dtype, f"gradient dtypes; seed={seed}"
    torch.testing.assert_close(grad_q.float(), ref_q, **tol, msg=lambda m: f"grad q, seed={seed}: {m}")
    torch.testing.assert_close(grad_k.float(), ref_k, **tol, msg=lambda m: f"grad k, seed={seed}: {m}")


# (B, Hq, Hk, N, d, table shape, table kind, q/k layout). d=34 has an odd d/2 (masked pairs); d=256
# with 20 query heads makes the kernel loop over two head blocks, the second one partly masked.
CASES = [
    (2, 4, 2, 7, 8, "shared", "angles", "contiguous"),
    (2, 3, 1, 7, 34, "per_row", "random", "transposed"),
    (3, 4, 4, 5, 64, "shared", "angles", "transposed"),
    (2, 4, 2, 7, 34, "expanded", "angles", "strided"),
    (1, 5, 7, 3, 64, "per_row", "angles", "strided"),
    (1, 20, 4, 3, 256, "shared", "random", "contiguous"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "batch,hq,hk,n,d,table_shape,table_kind,layout",
    CASES,
    ids=[f"B{c[0]}-Hq{c[1]}-Hk{c[2]}-N{c[3]}-d{c[4]}-{c[5]}-{c[6]}-{c[7]}" for c in CASES],
)
def test_matches_reference(batch, hq, hk, n, d, table_shape, table_kind, layout, dtype):
    gen, seed = _generator()
    q = _heads_tensor(batch, hq, n, d, layout, dtype, gen)
    k = _heads_tensor(batch, hk, n, d, layout, dtype, gen)
    cos, sin = _tables(table_kind, table_shape, batch, n, d // 2, gen)
    _check_against_reference(q, k, cos, sin, seed)


def test_bf16_tables_and_mixed_q_k_dtypes():
    """Tables in bf16 are read in fp32; q and k each keep their own dtype."""
    gen, seed = _generator()
    q = _heads_tensor(2, 2, 5, 12, "transposed", torch.float32, gen)
    k = _heads_tensor(2, 1, 5, 12, "transposed", torch.bfloat16, gen)
    cos, sin = _tables("angles", "per_row", 2, 5, 6, gen)
    cos, sin = cos.bfloat16(), sin.bfloat16()
    q_rot, k_rot = kernels.rope(q, k, cos, sin)
    q_ref, k_ref = reference.rope(q, k, cos, sin)
    assert q_rot.dtype == torch.float32 and k_rot.dtype == torch.bfloat16
    torch.testing.assert_close(q_rot, q_ref, **TOLERANCES[torch.float32], msg=lambda m: f"seed={seed}: {m}")
    torch.testing.assert_close(
        k_rot.float(), k_ref.float(), **TOLERANCES[torch.bfloat16], msg=lambda m: f"seed={seed}: {m}"
    )


def test_positions_matter():
    """The same vectors at different positions come out different; the identity table changes nothing."""
    gen, seed = _generator()
    batch, heads, n, d = 2, 2, 6, 16
    # Every (b, n) holds the same head vectors, so any difference comes from the tables alone.
    q = torch.randn(1, heads, 1, d, generator=gen).expand(batch, heads, n, d)
    k = torch.randn(1, 1, 1, d, generator=gen).expand(batch, 1, n, d)

    theta = _rope_angles(n, d // 2)
    q_rot, k_rot = kernels.rope(q, k, theta.cos(), theta.sin())
    for pos in range(1, n):
        assert not torch.allclose(q_rot[:, :, pos], q_rot[:, :, 0]), f"position {pos} ignored; seed={seed}"
        assert not torch.allclose(k_rot[:, :, pos], k_rot[:, :, 0]), f"position {pos} ignored; seed={seed}"

    shifted = _rope_angles(n, d // 2, start=3)
    q_shift, _ = kernels.rope(q, k, shifted.cos(), shifted.sin())
    assert not torch.allclose(q_shift, q_rot), f"a different table gave the same output; seed={seed}"
    torch.testing.assert_close(
        q_shift[:, :, : n - 3],
        q_rot[:, :, 3:],
        rtol=1e-5,
        atol=1e-6,
        msg=lambda m: f"start=3 must equal positions 3.. of start=0; seed={seed}: {m}",
    )

    per_row = torch.stack((_rope_angles(n, d // 2), _rope_angles(n, d // 2, start=5)))
    q_rows, _ = kernels.rope(q, k, per_row.cos(), per_row.sin())
    assert not torch.allclose(q_rows[0], q_rows[1]), f"per-row tables ignored the batch index; seed={seed}"

    ones, zeros = torch.ones(n, d // 2), torch.zeros(n, d // 2)
    q_same, k_same = kernels.rope(q, k, ones, zeros)
    assert torch.equal(q_same, q) and torch.equal(k_same, k), f"identity rotation changed values; seed={seed}"


@pytest.mark.parametrize("used", ["q_rot", "k_rot"])
def test_gradient_when_one_output_is_unused(used):
    """Only one output reaches the loss: its input gets the rotated-back gradient, the other zeros."""
    gen, seed = _generator()
    q = torch.randn(2, 4, 5, 10, generator=gen, requires_grad=True)
    k = torch.randn(2, 2, 5, 10, generator=gen, requires_grad=True)
    theta = _rope_angles(5, 5, start=11)
    outputs = dict(zip(("q_rot", "k_rot"), kernels.rope(q, k, theta.cos(), theta.sin())))
    upstream = torch.randn(outputs[used].shape, generator=gen)
    grad_q, grad_k = torch.autograd.grad(outputs[used], (q, k), upstream)

    q32, k32 = q.detach().requires_grad_(), k.detach().requires_grad_()
    expected = dict(zip(("q_rot", "k_rot"), reference.rope(q32, k32, theta.cos(), theta.sin())))
    ref_q, ref_k = torch.autograd.grad(expected[used], (q32, k32), upstream, allow_unused=True, materialize_grads=True)
    torch.testing.assert_close(grad_q, ref_q, rtol=1e-5, atol=1e-6, msg=lambda m: f"grad q, seed={seed}: {m}")
    torch.testing.assert_close(grad_k, ref_k, rtol=1e-5, atol=1e-6, msg=lambda m: f"grad k, seed={seed}: {m}")


def test_without_grad_and_empty_sequence():
    gen, seed = _generator()
    q, k = torch.randn(1, 2, 4, 6, generator=gen), torch.randn(1, 1, 4, 6, generator=gen)
    theta = _rope_angles(4, 3)
    with torch.no_grad():
        q_rot, k_rot = kernels.rope(q, k, theta.cos(), theta.sin())
    assert not q_rot.requires_grad
    torch.testing.assert_close(
        q_rot, reference.rope(q, k, theta.cos(), theta.sin())[0], msg=lambda m: f"seed={seed}: {m}"
    )
    q_rot, k_rot = kernels.rope(q[:, :, :0], k[:, :, :0], theta[:0].cos(), theta[:0].sin())
    assert q_rot.shape == (1, 2, 0, 6) and k_rot.shape == (1, 1, 0, 6)


def _bad_inputs():
    """(description, q, k, cos, sin, pattern the ValueError must match)."""
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    cos, sin = torch.ones(5, 4), torch.zeros(5, 4)
    return [
        (
            "odd d",
            torch.randn(2, 4, 5, 7),
            torch.randn(2, 2, 5, 7),
            torch.ones(5, 3),
            torch.zeros(5, 3),
            r"rope: argument 'q' .*even.*\(2, 4, 5, 7\)",
        ),
        ("q not 4-D", q[0], k, cos, sin, r"rope: argument 'q' must have 4 dims, got shape \(4, 5, 8\)"),
        (
            "k batch",
            q,
            torch.randn(3, 2, 5, 8),
            cos,
            sin,
            r"rope: argument 'k' must have shape \[2, \*, 5, 8\], got \(3, 2, 5, 8\)",
        ),
        ("k positions", q, torch.randn(2, 2, 6, 8), cos, sin, r"rope: argument 'k' .*\(2, 2, 6, 8\)"),
        ("k head dim", q, torch.randn(2, 2, 5, 6), cos, sin, r"rope: argument 'k' .*\(2, 2, 5, 6\)"),
        (
            "cos pairs",
            q,
            k,
            torch.ones(5, 8),
            torch.zeros(5, 8),
            r"rope: argument 'cos' must be \[N, d/2\] = \[5, 4\].*got \(5, 8\)",
        ),
        ("cos positions", q, k, torch.ones(4, 4), torch.zeros(4, 4), r"rope: argument 'cos' .*got \(4, 4\)"),
        (
            "cos batch",
            q,
            k,
            torch.ones(3, 5, 4),
            torch.zeros(3, 5, 4),
            r"rope: argument 'cos' .*\[2, 5, 4\].*got \(3, 5, 4\)",
        ),
        (
            "sin shape",
            q,
            k,
            cos,
            torch.zeros(2, 5, 4),
            r"rope: argument 'sin' must have shape \[5, 4\], got \(2, 5, 4\)",
        ),
        ("int q", q.long(), k, cos, sin, r"rope: argument 'q' has dtype int64"),
        ("int cos", q, k, cos.int(), sin, r"rope: argument 'cos' has dtype int32"),
        ("cos device", q, k, cos.to("meta"), sin, r"rope: argument 'cos' is on meta but 'q' is on (cpu|cuda)"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_inputs())), ids=[c[0] for c in _bad_inputs()])
def test_bad_inputs_raise_value_error_naming_the_argument(case):
    _, q, k, cos, sin, pattern = _bad_inputs()[case]
    with pytest.raises(ValueError, match=pattern):
        kernels.rope(q, k, cos, sin)


@pytest.mark.cpu_tensors
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match=r"rope: the Triton kernel got a cpu tensor.*TRITON_INTERPRET=1"):
        kernels.rope(q, q, torch.ones(3, 4), torch.zeros(3, 4))
    # The kernel module's own entry point checks too, not only the dispatcher.
    with pytest.raises(ValueError, match=r"rope: the Triton kernel got a cpu tensor"):
        rotary.rope(q, q, torch.ones(3, 4), torch.zeros(3, 4))


def test_rotation_preserves_norms_with_real_tables():
    """A sanity property independent of the reference: RoPE is a rotation of each pair."""
    gen, seed = _generator()
    q = torch.randn(2, 3, 9, 20, generator=gen)
    theta = torch.rand(2, 9, 10, generator=gen) * 2 * math.pi
    q_rot, _ = kernels.rope(q, q[:, :1], theta.cos(), theta.sin())
    torch.testing.assert_close(
        q_rot.norm(dim=-1), q.norm(dim=-1), rtol=1e-5, atol=1e-5, msg=lambda m: f"seed={seed}: {m}"
    )
