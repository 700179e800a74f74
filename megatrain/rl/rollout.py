"""One RL iteration's samples: `collect_rollout` generates, scores and prepares them as a `Rollout`.

This rank samples rl.group_size completions for each of its prompts of the iteration (mini-batch j's
prompts split over the data-parallel ranks), scores them with the reward, takes their log-probabilities
under the sampling policy (and the KL reference), and computes group advantages over the whole
(all-gathered) batch, so every rank sees the same advantages whatever the process count.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from megatrain.distributed import all_reduce_sum
from megatrain.generate import generate, is_truncated
from megatrain.rl import grpo
from megatrain.rl.rewards import score

STOP = ["\nQuestion:"]  # the next problem of the prompt format starts: the answer is over


@dataclasses.dataclass
class Rollout:
    """This rank's share of one iteration's samples, ready for updates. Micro-batch m holds sequences
    m * micro .. (m + 1) * micro - 1 of this rank."""

    ids_masks: list  # per micro-batch: (ids [b, L] right-padded, completion mask [b, L-1] over targets)
    old_logp: list  # per micro-batch: log-probabilities [b, L-1] under the sampling policy
    advantages: torch.Tensor  # [sequences] float64, one per sequence
    keep: torch.Tensor  # [sequences] loss weight 0 or 1 (rl.dynamic_filter, rl.mask_truncated)
    metrics: dict = dataclasses.field(default_factory=dict)  # the iteration's reward statistics (every rank alike)
    timings: dict = dataclasses.field(default_factory=dict)  # generate_s, reward_s, logprob_s of this rank


def pad_sequences(prompts: list[list[int]], completions: list[list[int]], device):
    """Right-padded ids [B, L] and the completion mask over next-token targets [B, L-1]."""
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    width = max(lengths)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width - 1)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        mask[i, len(p) - 1 : len(p) + len(c) - 1] = 1.0
    return ids.to(device), mask.to(device)


def collect_rollout(job, it: int) -> Rollout:
    """Iteration `it`'s rollout on this rank, for excursion `job` (its engine, tokenizer, data order, reward)."""
    rl, G = job.rl, job.rl.group_size
    timings = {}
    t0 = time.perf_counter()
    global_ids = job.stream(job.rl_iteration(it) * rl.prompts_per_step, rl.prompts_per_step)
    local = job.local_prompts()
    problems = [job.train_problems[global_ids[pos]] for pos in local]
    prompt_ids = [job.tokenizer.encode(p.prompt) for p in problems]
    rows = [ids for ids in prompt_ids for _ in range(G)]
    seeds = [(rl.seed * 1_000_003 + it) * 100_003 + pos * G + s for pos in local for s in range(G)]
    job.engine.module.eval()
    completions = generate(
        job.engine.module,
        rows,
        max_new_tokens=rl.max_new_tokens,
        temperature=rl.temperature,
        top_p=rl.top_p,
        stop=STOP,
        eos_id=job.tokenizer.eos_id,
        seed=seeds,
        tokenizer=job.tokenizer,
    )
    job.engine.module.train()
    timings["generate_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    local_rewards = torch.tensor(
        [
            score(job.reward_fn, problems[i // G].prompt, job.text(c), problems[i // G].answer, rl.reward)
            for i, c in enumerate(completions)
        ],
        dtype=torch.float64,
    ).view(len(local), G)
    timings["reward_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    seq_prompts = [prompt_ids[i // G] for i in range(len(rows))]
    ids_masks = [
        job._sequences(seq_prompts[s : s + job.micro], completions[s : s + job.micro])
        for s in range(0, len(rows), job.micro)
    ]
    old_logp, kl_seq = _old_logprobs(job, ids_masks)
    roll = _advantages(job, local_rewards, kl_seq, completions, local)
    roll.ids_masks, roll.old_logp = ids_masks, old_logp
    timings["logprob_s"] = time.perf_counter() - t0
    roll.timings = timings
    return roll


@torch.no_grad()
def _old_logprobs(job, ids_masks: list) -> tuple[list, list]:
    """Log-probabilities of each micro-batch under the sampling policy, and (with a KL reference model) each
    sequence's summed KL estimate [b]."""
    old_logp, kl_seq = [], []
    for ids, mask in ids_masks:
        logp, _ = job.logprobs(job.engine.module, ids)
        old_logp.append(logp)
        if job.ref_model is not None:
            ref, _ = job.logprobs(job.ref_model, ids)
            kl = grpo.kl_estimate(logp, ref, job.rl.kl_estimator)
            kl_seq.append((kl * mask).sum(dim=1))
    return old_logp, kl_seq


def _advantages(job, local_rewards: torch.Tensor, kl_seq: list, completions: list, local: list[int]) -> Rollout:
    """Group advantages over the whole batch, the loss weights and the iteration's reward statistics."""
    rl, G = job.rl, job.rl.group_size
    # Global rewards [P, G] in prompt order, identical on every rank, for the advantages.
    rewards_all = job.gather_rows(local_rewards, local)
    shaped = local_rewards.clone()
    if job.ref_model is not None and rl.kl_in == "reward":
        shaped = shaped - rl.kl_coef * torch.cat(kl_seq).double().view(len(local), G).cpu()
    shaped_all = job.gather_rows(shaped, local)
    advantages = grpo.group_advantages(shaped_all, scale=rl.scale_rewards)
    flat = shaped_all.amax(dim=1) == shaped_all.amin(dim=1)
    truncated = torch.tensor(
        [
            is_truncated(c, rl.max_new_tokens, stop=STOP, eos_id=job.tokenizer.eos_id, tokenizer=job.tokenizer)
            for c in completions
        ],
        dtype=torch.bool,
    )
    keep = grpo.sequence_weights(
        flat[local], truncated, G, dynamic_filter=rl.dynamic_filter, mask_truncated=rl.mask_truncated
    )
    lengths = torch.tensor([float(len(c)) for c in completions], dtype=torch.float64)
    stats = torch.tensor(
        [lengths.sum().item(), float(len(completions)), truncated.double().sum().item()], dtype=torch.float64
    )
    all_reduce_sum(stats)
    metrics = dict(
        reward_mean=rewards_all.mean().item(),
        reward_std=rewards_all.std().item(),
        solved=(rewards_all >= 1.0).double().mean().item(),
        response_length=(stats[0] / stats[1]).item(),
        truncated=(stats[2] / stats[1]).item(),
        filtered_groups=flat.double().mean().item(),
    )
    return Rollout(ids_masks=[], old_logp=[], advantages=advantages[local].reshape(-1), keep=keep, metrics=metrics)
