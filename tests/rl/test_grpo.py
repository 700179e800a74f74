"""GRPO math against hand-computed values: advantages, clipped/dual-clipped loss and its gradient,
the aggregation modes, and the KL estimators."""

import math

import pytest
import torch

from megatrain.errors import ConfigError
from megatrain.rl import group_advantages
from megatrain.rl.grpo import (
    aggregate,
    clipped_objective,
    kl_estimate,
    loss_normalizer,
    sequence_weights,
    token_logprobs,
)


def test_group_advantages_by_hand():
    rewards = torch.tensor([[0.0, 1.0], [1.0, 1.0], [0.1, 0.1]], dtype=torch.float64)
    adv = group_advantages(rewards)
    s = 1 / math.sqrt(2)  # unbiased std of (0, 1)
    assert torch.allclose(adv[0], torch.tensor([-0.5 / (s + 1e-6), 0.5 / (s + 1e-6)], dtype=torch.float64))
    assert torch.equal(adv[1:], torch.zeros(2, 2, dtype=torch.float64))  # zero-variance groups: exactly 0
    none = group_advantages(rewards, scale="none")
    assert torch.allclose(none[0], torch.tensor([-0.5, 0.5], dtype=torch.float64))
    batch = group_advantages(rewards, scale="batch")
    assert torch.allclose(batch[0], torch.tensor([-0.5, 0.5], dtype=torch.float64) / (rewards.std() + 1e-6))
    with pytest.raises(ConfigError, match="n >= 2"):
        group_advantages(torch.zeros(3, 1))
    with pytest.raises(ConfigError, match="scale_rewards"):
        group_advantages(rewards, scale="rank")


def _ratios(values):
    old = torch.zeros(1, len(values), dtype=torch.float64)
    logp = torch.log(torch.tensor([values], dtype=torch.float64)).requires_grad_(True)
    return logp, old


@pytest.mark.parametrize(
    "adv, dual, want_loss, want_grad, want_clipped",
    [
        # A = +1: ratio 0.5 unclipped (-0.5); 1.0 inside; 1.5 clipped at 1 + clip_high = 1.2 (no gradient).
        (1.0, None, [-0.5, -1.0, -1.2], [-0.5, -1.0, 0.0], [0, 0, 1]),
        # A = -1: ratio 0.5 clipped at 1 - clip_low = 0.8 (no gradient); 1.5 unclipped (loss 1.5, grad 1.5).
        (-1.0, None, [0.8, 1.0, 1.5], [0.0, 1.0, 1.5], [1, 0, 0]),
        # Dual clip c = 1.4 bounds the A < 0 token at ratio 1.5 to -A c = 1.4, with no gradient.
        (-1.0, 1.4, [0.8, 1.0, 1.4], [0.0, 1.0, 0.0], [1, 0, 1]),
        # Dual clip leaves A > 0 alone.
        (1.0, 1.4, [-0.5, -1.0, -1.2], [-0.5, -1.0, 0.0], [0, 0, 1]),
    ],
)
def test_clipped_objective_by_hand(adv, dual, want_loss, want_grad, want_clipped):
    logp, old = _ratios([0.5, 1.0, 1.5])
    loss, clipped = clipped_objective(
        logp, old, torch.tensor([adv], dtype=torch.float64), clip_low=0.2, clip_high=0.2, dual_clip=dual
    )
    assert torch.allclose(loss, torch.tensor([want_loss], dtype=torch.float64))
    assert clipped.tolist() == [want_clipped]
    loss.sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([want_grad], dtype=torch.float64))


def test_clip_high_separate_from_clip_low():
    logp, old = _ratios([0.7, 1.25])
    loss, _ = clipped_objective(logp, old, torch.tensor([1.0], dtype=torch.float64), clip_low=0.2, clip_high=0.28)
    assert torch.allclose(loss, torch.tensor([[-0.7, -1.25]], dtype=torch.float64))  # 1.25 < 1.28: not clipped
    logp, old = _ratios([0.7, 1.25])
    loss, _ = clipped_objective(logp, old, torch.tensor([-1.0], dtype=torch.float64), clip_low=0.2, clip_high=0.28)
    assert torch.allclose(loss, torch.tensor([[0.8, 1.25]], dtype=torch.float64))


def test_zero_advantage_group_gives_zero_loss_and_gradient():
    logp, old = _ratios([0.9, 1.1])
    adv = group_advantages(torch.tensor([[1.0, 1.0]]))[0, :1].double()
    loss, _ = clipped_objective(logp, old, adv)
    aggregate(loss, torch.ones_like(loss), "token-mean").backward()
    assert torch.equal(logp.grad, torch.zeros_like(logp.grad))


def test_aggregation_modes_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])  # lengths 3, 1, 0 (the empty one counts for nothing)
    assert aggregate(values, mask, "token-mean").item() == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert aggregate(values, mask, "seq-mean-token-mean").item() == pytest.approx((2.0 + 4.0) / 2)
    assert aggregate(values, mask, "seq-mean-token-sum").item() == pytest.approx((6.0 + 4.0) / 2)
    # A batch split in two with the whole batch's normalizer sums to the whole batch's value.
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        whole = aggregate(values, mask, mode)
        norm = loss_normalizer(mask, mode)
        parts = aggregate(values[:1], mask[:1], mode, norm) + aggregate(values[1:], mask[1:], mode, norm)
        assert parts.item() == pytest.approx(whole.item())
    with pytest.raises(ConfigError, match="loss_agg"):
        aggregate(values, mask, "sum")


def test_sequence_weights_drop_truncated_completions_and_flat_groups():
    flat = torch.tensor([False, True])  # group 1 (sequences 2, 3) has all-equal rewards
    truncated = torch.tensor([False, True, False, True])
    weights = lambda **kw: sequence_weights(flat, truncated, 2, **kw).tolist()
    assert weights(dynamic_filter=False, mask_truncated=False) == [1, 1, 1, 1]
    assert weights(dynamic_filter=False, mask_truncated=True) == [1, 0, 1, 0]
    assert weights(dynamic_filter=True, mask_truncated=False) == [1, 1, 0, 0]
    assert weights(dynamic_filter=True, mask_truncated=True) == [1, 0, 0, 0]


def test_masked_truncated_completion_gets_no_loss_and_no_gradient():
    """The recipe multiplies each sequence's token mask by its weight before the loss: a truncated
    completion then adds nothing to the loss, its gradient, or the token-mean denominator."""
    logp = torch.log(torch.tensor([[0.5, 0.9, 0.2], [0.4, 0.7, 0.6]], dtype=torch.float64)).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.float64)
    weights = sequence_weights(
        torch.tensor([False]), torch.tensor([False, True]), 2, dynamic_filter=False, mask_truncated=True
    )
    masked = mask * weights[:, None]
    loss, _ = clipped_objective(logp, logp.detach(), adv)
    total = aggregate(loss, masked, "token-mean", loss_normalizer(masked, "token-mean"))
    total.backward()
    assert total.item() == pytest.approx(-1.0)  # row 0 alone: mean of -A * ratio (= 1)
    assert torch.equal(logp.grad[1], torch.zeros(3, dtype=torch.float64))
    assert torch.allclose(logp.grad[0], torch.full((3,), -1 / 3, dtype=torch.float64))  # 3 tokens, not 6


def test_kl_estimators_match_formulas():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -1.0, -0.5])
    log_r = ref - logp
    assert torch.allclose(kl_estimate(logp, ref, "k1"), -log_r)
    assert torch.allclose(kl_estimate(logp, ref, "k2"), 0.5 * log_r**2)
    assert torch.allclose(kl_estimate(logp, ref, "k3"), torch.exp(log_r) - 1 - log_r)
    with pytest.raises(ConfigError, match="kl_estimator"):
        kl_estimate(logp, ref, "k4")


def test_k1_and_k3_are_unbiased_for_the_true_kl():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(6, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(6, dtype=torch.float64), 0)
    true_kl = (p * (p.log() - q.log())).sum()
    samples = torch.multinomial(p, 200_000, replacement=True)
    logp, ref = p.log()[samples], q.log()[samples]
    for est in ("k1", "k3"):
        assert kl_estimate(logp, ref, est).mean().item() == pytest.approx(true_kl.item(), abs=0.01)
    assert (kl_estimate(logp, ref, "k3") >= 0).all()


def test_token_logprobs_and_entropy():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])
    logp, ent = token_logprobs(logits, torch.tensor([[1, 0]]))
    assert torch.allclose(logp, torch.tensor([[math.log(0.5), math.log(0.75)]]))
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert torch.allclose(ent, torch.tensor([[math.log(2.0), h]]))
