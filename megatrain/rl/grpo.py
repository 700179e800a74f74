"""GRPO math: group-relative advantages, the clipped (and dual-clipped) ratio objective, loss
aggregation modes, and the three KL estimators. Pure tensor functions, no process groups.

Shapes: B sequences of T completion tokens; `mask` [B, T] is 1 on real completion tokens.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from megatrain.errors import ConfigError

SCALE_MODES = ("group", "batch", "none")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KL_ESTIMATORS = ("k1", "k2", "k3")


def group_advantages(rewards: Tensor, scale: str = "group", eps: float = 1e-6) -> Tensor:
    """Advantages [G, n] from rewards [G, n] (G prompts, n samples each).

    A = r - mean of the row, divided by (row std + eps) for `group`, by (std of all rewards + eps)
    for `batch`, not divided for `none`. std is the unbiased sample std (torch.std), as in TRL and
    verl. A zero-variance group gets exactly zeros in every mode.
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float64) if not isinstance(rewards, Tensor) else rewards
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ConfigError(f"group_advantages needs rewards [G, n] with n >= 2, got shape {tuple(rewards.shape)}")
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    flat = rewards.amax(dim=1) == rewards.amin(dim=1)
    centered = torch.where(flat[:, None], torch.zeros_like(centered), centered)
    if scale == "group":
        return centered / (rewards.std(dim=1, keepdim=True) + eps)
    if scale == "batch":
        return centered / (rewards.std() + eps)
    if scale == "none":
        return centered
    raise ConfigError(f"rl.scale_rewards={scale!r} is not allowed (allowed: {', '.join(SCALE_MODES)})")


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1 / k2 / k3).

    With log r = ref_logp - logp: k1 = -log r, k2 = (log r)^2 / 2, k3 = r - 1 - log r.
    k1 is unbiased but can be negative; k3 is unbiased and >= 0; k2 is biased, low variance.
    """
    log_ratio = ref_logp - logp
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ConfigError(f"rl.kl_estimator={estimator!r} is not allowed (allowed: {', '.join(KL_ESTIMATORS)})")


def aggregate(values: Tensor, mask: Tensor, mode: str, normalizer: Optional[float] = None) -> Tensor:
    """Reduce per-token `values` [B, T] under `mask` [B, T] to a scalar.

    token-mean: sum over all tokens / number of tokens. seq-mean-token-mean: each sequence's token
    mean, then the mean over sequences. seq-mean-token-sum: each sequence's token sum, then the mean
    over sequences. `normalizer` replaces the denominator (tokens for token-mean, sequences for the
    others) so a batch split over micro-batches and data-parallel ranks sums to the whole batch's
    value; by default it is this batch's own count. A sequence with mask all zero counts for nothing.
    """
    mask = mask.to(values.dtype)
    if mode == "token-mean":
        total = (values * mask).sum()
        return total / (normalizer if normalizer is not None else mask.sum().clamp(min=1))
    lengths = mask.sum(dim=1)
    per_seq = (values * mask).sum(dim=1)
    if mode == "seq-mean-token-mean":
        per_seq = per_seq / lengths.clamp(min=1)
    elif mode != "seq-mean-token-sum":
        raise ConfigError(f"rl.loss_agg={mode!r} is not allowed (allowed: {', '.join(LOSS_AGG_MODES)})")
    seqs = (lengths > 0).to(values.dtype).sum()
    return per_seq.sum() / (normalizer if normalizer is not None else seqs.clamp(min=1))


def sequence_weights(
    flat_groups: Tensor, truncated: Tensor, group_size: int, *, dynamic_filter: bool, mask_truncated: bool
) -> Tensor:
    """Loss weight (0 or 1) [B] of each sequence, B = groups x group_size, from `flat_groups` [groups]
    (bool: the group's rewards are all equal) and `truncated` [B] (bool: cut at max new tokens).

    dynamic_filter drops the sequences of flat groups (they have zero advantage anyway, but they
    would still count in the token-mean denominator); mask_truncated drops truncated sequences
    (DAPO's overlong filtering, TRL's mask_truncated_completions): a completion cut short is
    neither rewarded nor punished for an answer it had no room to finish. Both only remove
    sequences from the loss: the advantages are computed over every sample, as in TRL.
    """
    keep = torch.ones(truncated.shape[0], dtype=torch.float64)
    if dynamic_filter:
        keep = keep * (~flat_groups.bool()).double().repeat_interleave(group_size)
    if mask_truncated:
        keep = keep * (~truncated.bool()).double()
    return keep


def loss_normalizer(mask: Tensor, mode: str) -> float:
    """The denominator `aggregate` uses for this batch: tokens (token-mean) or non-empty sequences."""
    if mode == "token-mean":
        return float(mask.sum())
    return float((mask.sum(dim=1) > 0).sum())


def clipped_objective(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: Optional[float] = None,
) -> tuple[Tensor, Tensor]:
    """Per-token PPO/GRPO loss [B, T] and a clipped-token indicator [B, T].

    ratio = exp(logp - old_logp); loss = max(-A ratio, -A clamp(ratio, 1 - clip_low, 1 + clip_high));
    with dual clip c (> 1), tokens with A < 0 are further bounded: loss = min(loss, -A c) (Ye et al.
    2020, verl's clip_ratio_c). `advantages` is [B] (one per sequence) or [B, T].
    """
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    ratio = torch.exp(logp - old_logp)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    was_clipped = (clipped > unclipped).to(logp.dtype)
    if dual_clip is not None:
        bound = -adv * dual_clip
        dual = (adv < 0) & (loss > bound)
        loss = torch.where(dual, bound, loss)
        was_clipped = torch.where(dual, torch.ones_like(was_clipped), was_clipped)
    return loss, was_clipped


def token_logprobs(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """log pi(target) [B, T] and the entropy [B, T] of fp32 log_softmax(logits [B, T, V])."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    picked = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return picked, entropy
