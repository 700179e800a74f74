"""Fused GaLore / Fira step (kernels/projected_adam.py) against the reference, through Triton's
interpreter: right and left projections, odd sizes, ranks spanning several chunks, with and without
the moment update and Fira's residual, fp32 and bf16 weights."""

from __future__ import annotations

import pytest
import torch

from megatrain import kernels
from megatrain.kernels import reference
from tests.kernels.kernel_testing import assert_matches, fresh_generator, randn, triton_backend  # noqa: F401

CASES = [  # (M, N, rank, side)
    (37, 21, 5, "right"),
    (13, 40, 6, "left"),
    (45, 33, 19, "right"),  # rank > one 16-wide chunk
    (17, 50, 17, "left"),
]


def _inputs(gen, m, n, rank, side, dtype):
    low = (m, rank) if side == "right" else (rank, n)
    # Orthonormal rows (right: [rank, N]) or columns (left: [M, rank]), as an SVD gives.
    basis, _ = torch.linalg.qr(torch.randn(n if side == "right" else m, rank, generator=gen))
    proj = basis.T.contiguous() if side == "right" else basis.contiguous()
    weight = randn(gen, (m, n), dtype)
    grad = randn(gen, (m, n), dtype)
    low_rank = randn(gen, low)
    exp_avg = randn(gen, low, scale=0.1)
    exp_avg_sq = randn(gen, low, scale=0.1).abs()
    scale_len = m if side == "right" else n
    residual_scale = randn(gen, (scale_len,)).abs()
    return weight, proj, low_rank, exp_avg, exp_avg_sq, grad, residual_scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("fira", [False, True])
def test_matches_reference(triton_backend, case, dtype, fira):  # noqa: F811
    m, n, rank, side = case
    seed, gen = fresh_generator()
    weight, proj, low_rank, exp_avg, exp_avg_sq, grad, residual_scale = _inputs(gen, m, n, rank, side, dtype)
    kwargs = dict(side=side, beta1=0.9, beta2=0.99, eps=1e-6, step_size=0.03, scale=0.25, decay=0.01)
    if fira:  # Fira: moments updated beforehand, residual fused
        kwargs.update(update_moments=False, residual_coef=0.25)
    w_ref, m_ref, v_ref = weight.float().clone(), exp_avg.clone(), exp_avg_sq.clone()
    m_ref, v_ref = reference.projected_adam_update(
        w_ref,
        proj,
        low_rank,
        m_ref,
        v_ref,
        **kwargs,
        **({"grad": grad.float(), "residual_scale": residual_scale} if fira else {}),
    )
    w_tri = weight.clone()
    m_in, v_in = exp_avg.clone(), exp_avg_sq.clone()
    m_tri, v_tri = kernels.projected_adam_update(
        w_tri,
        proj,
        low_rank,
        m_in,
        v_in,
        **kwargs,
        **({"grad": grad, "residual_scale": residual_scale} if fira else {}),
    )
    assert w_tri.dtype == dtype
    assert_matches(w_tri, w_ref, dtype, f"weight {case}", seed)
    assert_matches(m_tri, m_ref, torch.float32, f"exp_avg {case}", seed)
    assert_matches(v_tri, v_ref, torch.float32, f"exp_avg_sq {case}", seed)
    if not fira:
        # The kernel writes new moment buffers and leaves the inputs for programs still reading them.
        assert torch.equal(m_in, exp_avg) and torch.equal(v_in, exp_avg_sq)


def test_transposed_views_and_bad_inputs(triton_backend):  # noqa: F811
    seed, gen = fresh_generator()
    weight, proj, low_rank, exp_avg, exp_avg_sq, _, _ = _inputs(gen, 24, 19, 4, "right", torch.float32)
    kwargs = dict(beta1=0.9, beta2=0.99, eps=1e-6, step_size=0.03, scale=0.25, decay=0.0)
    # A non-contiguous weight (a transposed view) is updated through its strides.
    w_t = weight.T.contiguous().T
    w_ref = weight.clone()
    reference.projected_adam_update(w_ref, proj, low_rank, exp_avg.clone(), exp_avg_sq.clone(), side="right", **kwargs)
    kernels.projected_adam_update(w_t, proj, low_rank, exp_avg.clone(), exp_avg_sq.clone(), side="right", **kwargs)
    assert_matches(w_t, w_ref, torch.float32, "transposed weight", seed)
    with pytest.raises(ValueError, match="low_rank_grad"):
        kernels.projected_adam_update(
            weight, proj, low_rank.T.contiguous(), exp_avg, exp_avg_sq, side="right", **kwargs
        )
    with pytest.raises(ValueError, match="exp_avg"):
        kernels.projected_adam_update(weight, proj, low_rank, exp_avg.double(), exp_avg_sq, side="right", **kwargs)
    with pytest.raises(ValueError, match="side"):
        kernels.projected_adam_update(weight, proj, low_rank, exp_avg, exp_avg_sq, side="up", **kwargs)
