"""The loss-mixing pipeline (rl.pipeline=loss_mix): the gradient of one optimizer step of the recipe
equals w * grad L_RL + (1 - w) * grad L_SFT, each loss computed here on its own from the GRPO
formulas and the SFT NLL over the whole mini-batch. The recipe's own code runs (Excursion's
mini-batch, SFT batch and loss normalisation) around a stand-in engine, in one process."""

from __future__ import annotations

import copy
import types

import pytest
import torch

from megatrain.config import Config
from megatrain.models.config import ModelConfig
from megatrain.models.transformer import Transformer
from megatrain.rl import grpo
from megatrain.rl.job import Excursion
from megatrain.rl.tasks import Problem

VOCAB = 40


class CharTokenizer:
    """One token per character (ids 1..VOCAB-1), EOS 0: enough for prompts and solutions."""

    eos_id = 0

    def encode(self, text: str) -> list[int]:
        return [1 + ord(c) % (VOCAB - 1) for c in text]


class AccumulatingEngine:
    """What the recipe needs of a DeepSpeed engine for one optimizer step, without DeepSpeed:
    forward, backward scaled by 1 / gradient_accumulation_steps (DeepSpeed's default), and a step
    that keeps the accumulated gradient (a real engine would apply and clear it)."""

    def __init__(self, module, gas: int):
        self.module, self.gas = module, gas

    def __call__(self, ids):
        return self.module(ids)

    def backward(self, loss):
        (loss / self.gas).backward()

    def step(self):
        pass


def _excursion(model, ref_model, rl, problems, micro: int, gas: int) -> Excursion:
    ex = Excursion.__new__(Excursion)  # the recipe's methods, without checkpoints / DeepSpeed
    ex.rl, ex.pipeline, ex.ref_model = rl, "loss_mix", ref_model
    ex.engine = AccumulatingEngine(model, gas)
    ex.env = types.SimpleNamespace(device=torch.device("cpu"))
    ex.dp_size, ex.dp_rank = 1, 0
    ex.micro, ex.gas = micro, gas
    ex.mini = ex.local_mini = micro * gas
    ex.train_problems, ex.tokenizer = problems, CharTokenizer()
    return ex


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-sum"])
def test_loss_mix_gradient_is_weighted_sum_of_rl_and_sft_gradients(loss_agg):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(preset="tiny", vocab_size=VOCAB, max_seq_len=64, init_std=0.1)).train()
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    with torch.no_grad():  # a reference that differs from the policy, so the KL term has a gradient
        for p in ref_model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    rl = Config().rl
    rl.mix_weight, rl.kl_coef, rl.kl_estimator, rl.loss_agg = 0.3, 0.05, "k3", loss_agg
    rl.clip_low, rl.clip_high = 0.2, 0.28
    micro, gas = 2, 2
    problems = [
        Problem(question=f"{a}+{a + 3}", answer=str(2 * a + 3), solution=f"{a}+{a + 3}={2 * a + 3} #### {2 * a + 3}")
        for a in range(micro * gas)
    ]
    ex = _excursion(model, ref_model, rl, problems, micro, gas)

    # A hand-built rollout: 4 completions of different lengths (one empty-masked by its weight),
    # advantages of both signs, and old log-probabilities that put some ratios outside the clip range.
    tok = ex.tokenizer
    prompts = [tok.encode(p.prompt) for p in problems]
    completions = [[5, 9, 11, 3], [7, 2], [13, 13, 4, 8, 6], [21, 0]]
    full_ids, full_mask = ex._sequences(prompts, completions)
    for row, completion in enumerate(completions):  # the mask picks exactly the completion's next-token targets
        assert full_ids[row, 1:][full_mask[row] > 0].tolist() == completion
    with torch.no_grad():
        logp0, _ = grpo.token_logprobs(model(full_ids)[:, :-1], full_ids[:, 1:])
        old_full = logp0 + 0.3 * torch.randn(logp0.shape)
    ids_masks = [ex._sequences(prompts[s : s + micro], completions[s : s + micro]) for s in range(0, 4, micro)]
    # Right padding: a micro-batch's columns are the first columns of the full batch.
    old_logp = [old_full[s : s + micro, : ids.shape[1] - 1] for s, (ids, _) in zip(range(0, 4, micro), ids_masks)]
    roll = dict(
        ids_masks=ids_masks,
        old_logp=old_logp,
        advantages=torch.tensor([1.2, -0.7, -1.5, 0.4], dtype=torch.float64),
        keep=torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64),
    )  # the last one masked (truncated)

    model.zero_grad()
    ex._rl_minibatch(roll, list(range(gas)), update=0, stats=torch.zeros(5, dtype=torch.float64))
    mixed = _grads(model)

    # The RL loss over the whole mini-batch, from the GRPO formulas.
    model.zero_grad()
    ids, mask = full_ids, full_mask * roll["keep"].float()[:, None]
    logp, _ = grpo.token_logprobs(model(ids)[:, :-1], ids[:, 1:])
    with torch.no_grad():
        ref, _ = grpo.token_logprobs(ref_model(ids)[:, :-1], ids[:, 1:])
    pg, clipped = grpo.clipped_objective(logp, old_full, roll["advantages"].float(), clip_low=0.2, clip_high=0.28)
    assert 0 < float((clipped * mask).sum()) < float(mask.sum())  # some tokens clipped, some not
    rl_loss = grpo.aggregate(pg + rl.kl_coef * grpo.kl_estimate(logp, ref, "k3"), mask, loss_agg)
    rl_loss.backward()
    g_rl = _grads(model)

    # The SFT loss: token-mean NLL of each problem's " solution" + EOS after its prompt.
    model.zero_grad()
    targets = [tok.encode(" " + p.solution) + [tok.eos_id] for p in problems]
    sft_ids, sft_mask = ex._sequences(prompts, targets)
    for row, target in enumerate(targets):
        assert sft_ids[row, 1:][sft_mask[row] > 0].tolist() == target
    sft_logp, _ = grpo.token_logprobs(model(sft_ids)[:, :-1], sft_ids[:, 1:])
    sft_loss = -(sft_logp * sft_mask).sum() / sft_mask.sum()
    sft_loss.backward()
    g_sft = _grads(model)

    w = rl.mix_weight
    expected = w * g_rl + (1 - w) * g_sft
    # fp32 forwards over other batch shapes (micro-batches of 2 vs the whole 4) sum in another
    # order: measured differences are ~5e-7 of the largest entry.
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    # The two gradients point different ways, so a wrong weight (or a missing term) would show.
    for wrong in (g_rl, g_sft, 0.5 * g_rl + 0.5 * g_sft, (1 - w) * g_rl + w * g_sft):
        assert (mixed - wrong).norm() > 1e-2 * expected.norm()
