"""Parallel averaging of an RL update and an SFT update, as ONE optimizer DeepSpeed can wrap.

`PairAdamW` keeps two AdamW states per parameter (moments and step count A for the RL loss, B
for the SFT loss) and a phase. One iteration is two DeepSpeed steps at the same weights θ:

    opt.phase = "a"; backward(L_RL);  engine.step()   # Δ_A = AdamW_A update, kept, θ unchanged
    opt.phase = "b"; backward(L_SFT); engine.step()   # Δ_B = AdamW_B update; θ <- θ + (Δ_A + Δ_B) / 2

so θ_new = (θ_A + θ_B) / 2 with θ_A = θ + Δ_A and θ_B = θ + Δ_B, each optimizer seeing its own
gradient history. Because it is the client optimizer, DeepSpeed treats it like AdamW: under
ZeRO 1/2 it runs on each rank's flat fp32 partition (so both moment sets and Δ_A are
partitioned), gradient clipping and the bf16 master copy happen in DeepSpeed's step wrapper
before each phase, and its state_dict (both moment sets) goes into DeepSpeed's optimizer
checkpoint. Between iterations Δ_A is spent, so a checkpoint needs nothing else. The caller sets
the phase: DeepSpeed's ZeRO 1/2 step calls `step()` once per parameter group, so the optimizer
cannot count calls to find it. Each phase's learning rate is the param group's `lr` at that phase (the recipe sets it).
"""

from __future__ import annotations

import torch


class PairAdamW(torch.optim.Optimizer):
    """Two decoupled-weight-decay Adam optimizers over the same parameters, averaged every step.

    Per phase s in {a, b}, with g the gradient: m_s = b1 m_s + (1 - b1) g; v_s = b2 v_s + (1 - b2) g^2;
    Δ_s = -lr (wd θ + m_s / (1 - b1^t_s) / (sqrt(v_s / (1 - b2^t_s)) + eps)) — torch.optim.AdamW's update.
    """

    PHASES = ("a", "b")

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.phase = "a"
        self.skip_next_step = False  # the trainer's non-finite-loss flag (megatrain.optim)

    @torch.no_grad()
    def step(self, closure=None):
        if self.skip_next_step:
            return None
        phase = self.phase
        if phase not in self.PHASES:
            raise ValueError(f"PairAdamW.phase must be 'a' or 'b', got {phase!r}")
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if f"exp_avg_{phase}" not in state:
                    for s in self.PHASES:
                        state[f"step_{s}"] = torch.zeros((), dtype=torch.float64)
                        state[f"exp_avg_{s}"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        state[f"exp_avg_sq_{s}"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["delta_a"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                grad = p.grad.to(p.dtype)
                m, v = state[f"exp_avg_{phase}"], state[f"exp_avg_sq_{phase}"]
                state[f"step_{phase}"] += 1
                t = float(state[f"step_{phase}"])
                m.lerp_(grad, 1.0 - b1)
                v.mul_(b2).addcmul_(grad, grad, value=1.0 - b2)
                denom = (v / (1.0 - b2**t)).sqrt_().add_(group["eps"])
                delta = torch.addcdiv(p * group["weight_decay"], m, denom, value=1.0 / (1.0 - b1**t))
                delta.mul_(-group["lr"])
                if phase == "a":
                    state["delta_a"].copy_(delta)
                else:
                    p.add_(state["delta_a"].add_(delta), alpha=0.5)
                    state["delta_a"].zero_()
        return None
