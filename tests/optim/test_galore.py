"""GaLoreAdamW against a slow transcription of its equations (which are the reference code's rule),
left and right projections across projection refreshes; SVD failures; state round trips; checks."""

from __future__ import annotations

import io
import logging

import pytest
import torch

from megatrain.optim import GaLoreAdamW
from megatrain.optim import galore as galore_module
from tests.optim._slow_reference import SlowAdamW, SlowProjected

LR, BETAS, EPS, WD = 0.05, (0.9, 0.99), 1e-6, 0.1


def _grads(shapes, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_matches_slow_reference_across_refreshes(proj_type):
    torch.manual_seed(0)
    tall, wide, bias = (
        torch.nn.Parameter(torch.randn(20, 9)),
        torch.nn.Parameter(torch.randn(7, 15)),
        torch.nn.Parameter(torch.randn(9)),
    )
    opt = GaLoreAdamW(
        [
            {"params": [bias]},
            {"params": [tall, wide], "rank": 4, "update_proj_gap": 3, "scale": 0.25, "proj_type": proj_type},
        ],
        lr=LR,
        betas=BETAS,
        eps=EPS,
        weight_decay=WD,
    )
    slow = [
        SlowProjected(w, rank=4, gap=3, scale=0.25, proj_type=proj_type, lr=LR, betas=BETAS, eps=EPS, wd=WD)
        for w in (tall, wide)
    ] + [SlowAdamW(bias, lr=LR, betas=BETAS, eps=EPS, wd=WD)]
    params = (tall, wide, bias)
    for grads in _grads([p.shape for p in params], steps=8, seed=1):  # refreshes before steps 1, 4, 7
        for p, ref, g in zip(params, slow, grads):
            p.grad = g.clone()
            ref.step(g)
        opt.step()
        for p, ref in zip(params, slow):
            torch.testing.assert_close(p.detach().double(), ref.w, rtol=1e-5, atol=1e-5)
    assert opt.state[tall]["exp_avg"].shape == ((20, 4) if slow[0].side == "right" else (4, 9))
    assert opt.state[wide]["exp_avg"].shape == ((7, 4) if slow[1].side == "right" else (4, 15))
    assert opt.state[tall]["step"] == 8 and opt.svd_failures == 0


def test_full_projection_keeps_r_by_r_moments():
    w = torch.nn.Parameter(torch.randn(12, 10))
    before = w.detach().clone()
    opt = GaLoreAdamW([{"params": [w], "rank": 3, "proj_type": "full"}], lr=0.1)
    for g in _grads([w.shape], steps=2, seed=2):
        w.grad = g[0]
        opt.step()
    st = opt.state[w]
    assert st["exp_avg"].shape == (3, 3) and st["proj"].shape == (12, 3) and st["proj_right"].shape == (3, 10)
    # The update lies in span(U_r) x span(V_r): projecting it out leaves nothing.
    delta = w.detach() - before
    u, vh = st["proj"], st["proj_right"]
    torch.testing.assert_close(u @ (u.T @ delta @ vh.T) @ vh, delta, rtol=1e-4, atol=1e-6)


def test_bf16_parameter_steps_an_fp32_master():
    torch.manual_seed(3)
    w32 = torch.nn.Parameter(torch.randn(16, 8))
    w16 = torch.nn.Parameter(w32.detach().to(torch.bfloat16))
    o32 = GaLoreAdamW([{"params": [w32], "rank": 4}], lr=1e-2)
    o16 = GaLoreAdamW([{"params": [w16], "rank": 4}], lr=1e-2)
    o16.step()  # no grad: nothing happens
    assert not o16.state
    w32.data.copy_(w16.detach().float())
    for g in _grads([w32.shape], steps=4, seed=4):
        w32.grad, w16.grad = g[0].clone(), g[0].to(torch.bfloat16)
        o32.step()
        o16.step()
    master = o16.state[w16]["master"]
    assert master.dtype == torch.float32 and o16.state[w16]["exp_avg"].dtype == torch.float32
    assert torch.equal(w16.detach(), master.to(torch.bfloat16))
    # Only the gradient's bf16 rounding separates the two runs, not bf16 accumulation of updates.
    torch.testing.assert_close(master, w32.detach(), rtol=0, atol=2e-3)


def test_svd_failure_keeps_previous_projection(monkeypatch, caplog):
    w = torch.nn.Parameter(torch.randn(10, 6))
    opt = GaLoreAdamW([{"params": [w], "rank": 2, "update_proj_gap": 2}], lr=0.1)
    grads = _grads([w.shape], steps=4, seed=5)
    w.grad = grads[0][0]
    opt.step()
    proj = opt.state[w]["proj"].clone()

    def broken(matrix):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr(galore_module, "_svd", broken)
    w.grad = grads[1][0]
    opt.step()  # step 2: no refresh due
    w.grad = grads[2][0]
    before = w.detach().clone()
    with caplog.at_level(logging.WARNING, logger="megatrain.optim.galore"):
        opt.step()  # step 3: refresh due, SVD fails
    assert opt.svd_failures == 1 and "keeping the previous projection" in caplog.text
    assert torch.equal(opt.state[w]["proj"], proj) and opt.state[w]["step"] == 3
    assert not torch.equal(w.detach(), before) and torch.isfinite(w).all()

    # Non-finite singular vectors count as a failure too.
    monkeypatch.setattr(
        galore_module,
        "_svd",
        lambda m: tuple(torch.full_like(x, float("nan")) for x in torch.linalg.svd(m, full_matrices=False)),
    )
    fresh = torch.nn.Parameter(torch.randn(10, 6))
    start = fresh.detach().clone()
    opt2 = GaLoreAdamW([{"params": [fresh], "rank": 2}], lr=0.1)
    fresh.grad = grads[3][0]
    with caplog.at_level(logging.WARNING, logger="megatrain.optim.galore"):
        opt2.step()  # first step, no projection to fall back on: parameter left alone
    assert opt2.svd_failures == 1 and "not updated this step" in caplog.text
    assert torch.equal(fresh.detach(), start) and opt2.state[fresh]["step"] == 0
    monkeypatch.setattr(galore_module, "_svd", lambda m: torch.linalg.svd(m, full_matrices=False))
    opt2.step()  # retried
    assert opt2.state[fresh]["step"] == 1 and not torch.equal(fresh.detach(), start)


def _run(opt_factory, params, grads):
    opt = opt_factory(params)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.to(p.dtype, copy=True)
        opt.step()
    return opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_is_exact(dtype):
    torch.manual_seed(6)
    init = [torch.randn(14, 9), torch.randn(5, 11), torch.randn(9)]
    grads = _grads([t.shape for t in init], steps=7, seed=7)

    def factory(ps):
        return GaLoreAdamW(
            [{"params": ps[2:]}, {"params": ps[:2], "rank": 3, "update_proj_gap": 2}], lr=0.05, weight_decay=0.1
        )

    straight = [torch.nn.Parameter(t.to(dtype, copy=True)) for t in init]
    _run(factory, straight, grads)

    first = [torch.nn.Parameter(t.to(dtype, copy=True)) for t in init]
    opt = _run(factory, first, grads[:4])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt2 = factory(resumed)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for p in resumed[:2]:
        st = opt2.state[p]
        assert st["proj"].device == p.device and st["proj"].dtype == torch.float32
        assert st["exp_avg"].dtype == torch.float32 and st["step"] == 4
        if dtype != torch.float32:
            assert st["master"].dtype == torch.float32
    for gs in grads[4:]:
        for p, g in zip(resumed, gs):
            p.grad = g.to(p.dtype, copy=True)
        opt2.step()
    for a, b in zip(straight, resumed):
        assert torch.equal(a.detach(), b.detach())


def test_bad_groups_are_refused_with_the_key():
    w = torch.nn.Parameter(torch.randn(6, 4))
    with pytest.raises(ValueError, match=r"rank=5 exceeds min\(d_in, d_out\)=4"):
        GaLoreAdamW([{"params": [w], "rank": 5}])
    with pytest.raises(ValueError, match="2-D weights only"):
        GaLoreAdamW([{"params": [torch.nn.Parameter(torch.randn(4))], "rank": 2}])
    with pytest.raises(ValueError, match="proj_type='diag'"):
        GaLoreAdamW([{"params": [w], "rank": 2, "proj_type": "diag"}])
    with pytest.raises(ValueError, match="proj_quant"):
        GaLoreAdamW([{"params": [w], "rank": 2, "proj_quant": True}])
    with pytest.raises(ValueError, match="update_proj_gap"):
        GaLoreAdamW([{"params": [w], "rank": 2, "update_proj_gap": 0}])
    # Fira's key name for the scale is accepted.
    assert GaLoreAdamW([{"params": [w], "rank": 2, "alpha": 0.5}]).param_groups[0]["scale"] == 0.5
