"""Parallel averaging: PairAdamW equals the mean of two independently stepped AdamW optimizers."""

import copy

import pytest
import torch

from megatrain.rl.averaging import PairAdamW


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_pair_step_is_mean_of_two_adamw_updates(weight_decay):
    torch.manual_seed(0)
    theta = [torch.randn(5, 3, dtype=torch.float64), torch.randn(7, dtype=torch.float64)]
    pair_params = [t.clone().requires_grad_(True) for t in theta]
    pair = PairAdamW([{"params": pair_params, "weight_decay": weight_decay}], lr=0.05, betas=(0.9, 0.95), eps=1e-8)
    # The reference: two AdamW optimizers with their own moments, each stepped from the same θ.
    ref_a = [t.clone().requires_grad_(True) for t in theta]
    ref_b = [t.clone().requires_grad_(True) for t in theta]
    opt_a = torch.optim.AdamW(ref_a, lr=0.05, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    opt_b = torch.optim.AdamW(ref_b, lr=0.05, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    for step in range(4):
        grads_a = [torch.randn_like(t) for t in theta]
        grads_b = [torch.randn_like(t) * 3 for t in theta]
        before = [p.detach().clone() for p in pair_params]
        for p, g in zip(pair_params, grads_a):
            p.grad = g.clone()
        pair.phase = "a"
        pair.step()
        assert all(torch.equal(p, b) for p, b in zip(pair_params, before)), "phase a must not move θ"
        for p, g in zip(pair_params, grads_b):
            p.grad = g.clone()
        pair.phase = "b"
        pair.step()
        for ra, rb, t, ga, gb in zip(ref_a, ref_b, before, grads_a, grads_b):
            with torch.no_grad():
                ra.copy_(t)
                rb.copy_(t)
            ra.grad, rb.grad = ga.clone(), gb.clone()
        opt_a.step()
        opt_b.step()
        for p, ra, rb in zip(pair_params, ref_a, ref_b):
            assert torch.allclose(p, (ra + rb) / 2, rtol=0, atol=1e-12), step
    # Both moment sets are in the state dict, and a reload continues identically.
    state = pair.state_dict()["state"][0]
    assert {"exp_avg_a", "exp_avg_b", "exp_avg_sq_a", "exp_avg_sq_b", "step_a", "step_b"} <= set(state)
    assert torch.allclose(state["exp_avg_a"], opt_a.state[ref_a[0]]["exp_avg"])
    assert torch.allclose(state["exp_avg_sq_b"], opt_b.state[ref_b[0]]["exp_avg_sq"])
    clone_params = [p.detach().clone().requires_grad_(True) for p in pair_params]
    clone = PairAdamW([{"params": clone_params, "weight_decay": weight_decay}], lr=0.05, betas=(0.9, 0.95))
    clone.load_state_dict(copy.deepcopy(pair.state_dict()))
    for opt, params in ((pair, pair_params), (clone, clone_params)):
        for phase in ("a", "b"):
            for p in params:
                p.grad = torch.ones_like(p)
            opt.phase = phase
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(pair_params, clone_params))
