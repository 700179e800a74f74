"""The plain PyTorch kernels (the oracles) against direct formulas, and the backend dispatch."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatrain import kernels
from megatrain.kernels import reference


def _rms_formula(x, w, eps):
    x = x.double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w.double()


def test_rms_norm_matches_formula():
    torch.manual_seed(0)
    x, w = torch.randn(3, 5, 24), torch.randn(24)
    y = reference.rms_norm(x, w, eps=1e-5)
    assert y.dtype == torch.float32 and y.shape == x.shape
    torch.testing.assert_close(y.double(), _rms_formula(x, w, 1e-5), rtol=1e-5, atol=1e-6)


def test_rms_norm_residual_returns_norm_of_sum_and_sum():
    torch.manual_seed(1)
    x, r, w = torch.randn(4, 33), torch.randn(4, 33), torch.randn(33)
    y, h = reference.rms_norm(x, w, eps=1e-6, residual=r)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y.double(), _rms_formula(x + r, w, 1e-6), rtol=1e-5, atol=1e-6)


def test_rms_norm_bf16_in_bf16_out():
    torch.manual_seed(2)
    x, w = torch.randn(6, 40), torch.randn(40)
    y = reference.rms_norm(x.bfloat16(), w, eps=1e-6)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), _rms_formula(x.bfloat16().float(), w, 1e-6).float(), rtol=1e-2, atol=1e-2)
    y, h = reference.rms_norm(x.bfloat16(), w.bfloat16(), residual=x.bfloat16())
    assert y.dtype == h.dtype == torch.bfloat16


def _angles(n, half, start=0, base=10000.0):
    inv_freq = base ** (-torch.arange(half, dtype=torch.float64) / half)
    return (torch.arange(start, start + n, dtype=torch.float64)[:, None] * inv_freq).float()


def test_rope_preserves_norms():
    torch.manual_seed(3)
    q, k = torch.randn(2, 4, 7, 16), torch.randn(2, 2, 7, 16)
    theta = _angles(7, 8)
    q_rot, k_rot = reference.rope(q, k, theta.cos(), theta.sin())
    assert q_rot.shape == q.shape and k_rot.shape == k.shape
    torch.testing.assert_close(q_rot.norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(k_rot.norm(dim=-1), k.norm(dim=-1))
    assert not torch.allclose(q_rot, q)


def test_rope_is_a_complex_rotation_of_half_split_pairs():
    torch.manual_seed(4)
    q, k = torch.randn(2, 4, 5, 12), torch.randn(2, 1, 5, 12)
    theta = torch.rand(2, 5, 6) * 2 * math.pi  # per-row tables [B, N, d/2]
    q_rot, k_rot = reference.rope(q, k, theta.cos(), theta.sin())
    for x, x_rot in ((q, q_rot), (k, k_rot)):
        z = (
            torch.complex(x[..., :6].double(), x[..., 6:].double())
            * torch.polar(torch.ones_like(theta, dtype=torch.float64), theta.double())[:, None]
        )
        torch.testing.assert_close(x_rot.double(), torch.cat((z.real, z.imag), dim=-1), rtol=1e-5, atol=1e-5)


def test_rope_dot_product_depends_only_on_relative_position():
    torch.manual_seed(5)
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)

    def score(q_pos, k_pos):
        tq, tk = _angles(1, 16, start=q_pos), _angles(1, 16, start=k_pos)
        q_rot, _ = reference.rope(q, q, tq.cos(), tq.sin())
        k_rot, _ = reference.rope(k, k, tk.cos(), tk.sin())
        return (q_rot * k_rot).sum().item()

    base = score(9, 4)
    assert score(109, 104) == pytest.approx(base, rel=1e-4, abs=1e-4)
    assert score(5, 0) == pytest.approx(base, rel=1e-4, abs=1e-4)
    assert score(9, 3) != pytest.approx(base, rel=1e-3)


def test_rope_rejects_mismatched_tables():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="cos"):
        reference.rope(q, q, torch.ones(4, 4), torch.zeros(4, 4))


def test_swiglu():
    torch.manual_seed(6)
    gate, up = torch.randn(3, 17), torch.randn(3, 17)
    torch.testing.assert_close(reference.swiglu(gate, up), gate * torch.sigmoid(gate) * up)
    assert reference.swiglu(gate.bfloat16(), up.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("chunk_size", [5, 4096])
def test_fused_linear_cross_entropy_matches_cross_entropy(chunk_size):
    torch.manual_seed(7)
    t, d, v = 37, 16, 23
    h = torch.randn(t, d, requires_grad=True)
    w = torch.randn(v, d, requires_grad=True)
    target = torch.randint(0, v, (t,))
    target[::4] = -100
    loss = reference.fused_linear_cross_entropy(h, w, target, chunk_size=chunk_size)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    gh, gw = torch.autograd.grad(loss * 3.0, (h, w))

    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    expected = F.cross_entropy(h2 @ w2.T, target, ignore_index=-100)
    eh, ew = torch.autograd.grad(expected * 3.0, (h2, w2))
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(gh, eh)
    torch.testing.assert_close(gw, ew)


def test_fused_linear_cross_entropy_without_grad_and_with_only_weight_grad():
    torch.manual_seed(8)
    h, w, target = torch.randn(9, 8), torch.randn(11, 8), torch.randint(0, 11, (9,))
    expected = F.cross_entropy(h @ w.T, target)
    with torch.no_grad():
        torch.testing.assert_close(reference.fused_linear_cross_entropy(h, w, target, chunk_size=4), expected)
    w.requires_grad_()
    loss = reference.fused_linear_cross_entropy(h, w, target, chunk_size=4)
    (gw,) = torch.autograd.grad(loss, w)
    (ew,) = torch.autograd.grad(F.cross_entropy(h @ w.T, target), w)
    torch.testing.assert_close(gw, ew)


def test_fused_linear_cross_entropy_all_ignored_is_zero_not_nan():
    h = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    loss = reference.fused_linear_cross_entropy(h, w, torch.full((6,), -100), chunk_size=4)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(w.grad) == 0


def test_fused_linear_cross_entropy_bf16():
    torch.manual_seed(9)
    h, w = torch.randn(20, 16).bfloat16(), (torch.randn(30, 16) * 0.3).bfloat16()
    target = torch.randint(0, 30, (20,))
    h.requires_grad_()
    loss = reference.fused_linear_cross_entropy(h, w, target, chunk_size=6)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, F.cross_entropy(h.float() @ w.float().T, target), rtol=1e-5, atol=1e-5)
    loss.backward()
    assert h.grad.dtype == torch.bfloat16


# ---- dispatch ------------------------------------------------------------------------------------


@pytest.mark.cpu_tensors
def test_auto_on_cpu_is_the_reference(monkeypatch):
    monkeypatch.delenv("MEGATRAIN_KERNELS", raising=False)
    assert kernels.backend() == "auto"
    torch.manual_seed(10)
    x, w = torch.randn(3, 8), torch.randn(8)
    torch.testing.assert_close(kernels.rms_norm(x, w), reference.rms_norm(x, w), rtol=0, atol=0)


def test_torch_backend_runs_every_op(monkeypatch):
    monkeypatch.setenv("MEGATRAIN_KERNELS", "torch")
    assert kernels.backend() == "torch"
    torch.manual_seed(11)
    x, w = torch.randn(3, 8), torch.randn(8)
    y, h = kernels.rms_norm(x, w, residual=x)
    torch.testing.assert_close(y, reference.rms_norm(2 * x, w))
    q = torch.randn(1, 2, 3, 8)
    q_rot, _ = kernels.rope(q, q, torch.ones(3, 4), torch.zeros(3, 4))
    torch.testing.assert_close(q_rot, q)
    torch.testing.assert_close(kernels.swiglu(x, x), F.silu(x) * x)
    target = torch.tensor([1, 2, 3])
    torch.testing.assert_close(kernels.fused_linear_cross_entropy(x, torch.eye(8), target), F.cross_entropy(x, target))


@pytest.mark.cpu_tensors
def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("MEGATRAIN_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"swiglu: the Triton kernel got a cpu tensor.*TRITON_INTERPRET=1"):
        kernels.swiglu(x, x)


def test_unknown_backend_names_variable_and_choices(monkeypatch):
    monkeypatch.setenv("MEGATRAIN_KERNELS", "bogus")
    with pytest.raises(ValueError, match=r"MEGATRAIN_KERNELS='bogus'.*allowed: auto, torch, triton"):
        kernels.swiglu(torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="MEGATRAIN_KERNELS"):
        kernels.backend()
