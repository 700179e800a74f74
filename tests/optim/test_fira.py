"""FiraAdamW against a slow transcription of its equations: both residual conventions, left and
right projections, across refreshes, with the norm-growth limiter active; state round trip."""

from __future__ import annotations

import io

import pytest
import torch

from megatrain.optim import FiraAdamW
from tests.optim._slow_reference import SlowProjected

LR, BETAS, EPS, WD = 0.05, (0.9, 0.99), 1e-6, 0.05


def _growing_grads(shapes, steps, seed):
    """Gradients whose norm grows 1.5x per step, so the 1.01 limiter must act."""
    gen = torch.Generator().manual_seed(seed)
    return [[1.5**t * torch.randn(s, generator=gen) for s in shapes] for t in range(steps)]


@pytest.mark.parametrize("residual", ["orthogonal", "reference"])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std"])
def test_matches_slow_reference(residual, proj_type):
    torch.manual_seed(0)
    tall, wide = torch.nn.Parameter(torch.randn(18, 8)), torch.nn.Parameter(torch.randn(6, 13))
    opt = FiraAdamW(
        [
            {
                "params": [tall, wide],
                "rank": 3,
                "update_proj_gap": 3,
                "alpha": 0.25,
                "proj_type": proj_type,
                "residual": residual,
            }
        ],
        lr=LR,
        betas=BETAS,
        eps=EPS,
        weight_decay=WD,
    )
    slow = [
        SlowProjected(
            w,
            rank=3,
            gap=3,
            scale=0.25,
            proj_type=proj_type,
            lr=LR,
            betas=BETAS,
            eps=EPS,
            wd=WD,
            fira=True,
            residual=residual,
        )
        for w in (tall, wide)
    ]
    limited = 0
    for grads in _growing_grads([tall.shape, wide.shape], steps=7, seed=1):
        for p, ref, g in zip((tall, wide), slow, grads):
            p.grad = g.clone()
            prev = ref.prev_norm
            ref.step(g)
            limited += prev is not None and abs(float(ref.prev_norm) - 1.01 * (float(prev) + 1e-8)) < 1e-9 * float(prev)
        opt.step()
        for p, ref in zip((tall, wide), slow):
            torch.testing.assert_close(p.detach().double(), ref.w, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(opt.state[p]["limiter_norm"].double(), ref.prev_norm, rtol=1e-4, atol=1e-6)
    assert limited >= 4  # the limiter was exercised, not just the unlimited path


def test_reference_residual_differs_unless_scale_is_one():
    def run(residual, scale):
        torch.manual_seed(2)
        w = torch.nn.Parameter(torch.randn(10, 6))
        opt = FiraAdamW([{"params": [w], "rank": 2, "scale": scale, "residual": residual}], lr=0.1)
        for g in _growing_grads([w.shape], steps=3, seed=3):
            w.grad = g[0]
            opt.step()
        return w.detach()

    assert not torch.allclose(run("orthogonal", 0.25), run("reference", 0.25))
    torch.testing.assert_close(run("orthogonal", 1.0), run("reference", 1.0))


def test_state_dict_round_trip_keeps_limiter():
    torch.manual_seed(4)
    init = torch.randn(12, 7)
    grads = _growing_grads([init.shape], steps=6, seed=5)

    def run(w, gs, opt):
        for g in gs:
            w.grad = g[0].clone()
            opt.step()

    straight = torch.nn.Parameter(init.clone())
    run(straight, grads, FiraAdamW([{"params": [straight], "rank": 3, "update_proj_gap": 2}], lr=0.05))
    first = torch.nn.Parameter(init.clone())
    opt = FiraAdamW([{"params": [first], "rank": 3, "update_proj_gap": 2}], lr=0.05)
    run(first, grads[:3], opt)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    second = torch.nn.Parameter(first.detach().clone())
    opt2 = FiraAdamW([{"params": [second], "rank": 3, "update_proj_gap": 2}], lr=0.05)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.state[second]["limiter_norm"].device == second.device
    run(second, grads[3:], opt2)
    assert torch.equal(straight.detach(), second.detach())


def test_bad_settings_are_refused():
    w = torch.nn.Parameter(torch.randn(6, 4))
    with pytest.raises(ValueError, match="limiter"):
        FiraAdamW([{"params": [w], "rank": 2, "limiter": 0.9}])
    with pytest.raises(ValueError, match="residual='x'"):
        FiraAdamW([{"params": [w], "rank": 2, "residual": "x"}])
    with pytest.raises(ValueError, match="proj_type='full'"):
        FiraAdamW([{"params": [w], "rank": 2, "proj_type": "full"}])
    with pytest.raises(ValueError, match="both scale"):
        FiraAdamW([{"params": [w], "rank": 2, "alpha": 0.5, "scale": 0.25}])
