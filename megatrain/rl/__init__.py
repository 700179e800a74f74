"""RL with verifiable rewards from pretraining checkpoints (GRPO, SFT, SFT->RL, parallel averaging).

`pass_at_k` and `group_advantages` are the public names; the recipe is `megatrain.rl.job.rl`.
The submodules are imported on first use, so `import megatrain.rl` stays light.
"""

from __future__ import annotations

__all__ = ["pass_at_k", "group_advantages"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    from megatrain.rl.passk import pass_at_k as _pass_at_k

    return _pass_at_k(n, c, k)


def group_advantages(rewards, scale: str = "group", eps: float = 1e-6):
    """GRPO advantages of rewards [G, n] (G groups of n samples); see `megatrain.rl.grpo`."""
    from megatrain.rl.grpo import group_advantages as _group_advantages

    return _group_advantages(rewards, scale=scale, eps=eps)
