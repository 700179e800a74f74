"""Evaluation of an RL run: pass@k on held-out problems, validation perplexity on the pretraining corpus."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatrain.config import Config
from megatrain.distributed import barrier
from megatrain.generate import generate
from megatrain.rl.passk import mean_pass_at_k
from megatrain.rl.rewards import load_reward, score
from megatrain.rl.rollout import STOP
from megatrain.rl.tasks import Problem


def evaluate(
    model, tokenizer, held_out: list[Problem], cfg: Config, groups, env, perplexity: bool = True
) -> list[dict]:
    """pass@k for every k of rl.eval.k (rows), each with mean_reward and (with `perplexity`) val_loss /
    val_ppl. The problems are split over DP ranks; every sample has a fixed seed, so two models are
    compared on the same random numbers."""
    e, rl = cfg.rl.eval, cfg.rl
    reward_fn = load_reward(rl.reward, rl.format_score)
    count = e.problems or len(held_out)
    mine = list(range(groups.dp_rank, count, groups.dp_size))
    rows = [tokenizer.encode(held_out[i].prompt) for i in mine for _ in range(e.samples)]
    seeds = [(rl.seed + 7) * 1_000_003 + i * e.samples + s for i in mine for s in range(e.samples)]
    was_training = model.training
    model.eval()
    completions = (
        generate(
            model,
            rows,
            max_new_tokens=rl.max_new_tokens,
            temperature=e.temperature,
            stop=STOP,
            eos_id=tokenizer.eos_id,
            seed=seeds,
            tokenizer=tokenizer,
        )
        if rows
        else []
    )
    correct = torch.zeros(count, dtype=torch.float64)
    reward_sum = torch.zeros(1, dtype=torch.float64)
    for n, completion in enumerate(completions):
        p = held_out[mine[n // e.samples]]
        text = tokenizer.decode([t for t in completion if t != tokenizer.eos_id])
        r = score(reward_fn, p.prompt, text, p.answer, rl.reward)
        reward_sum += r
        correct[mine[n // e.samples]] += float(r >= 1.0)
    if groups.dp_size > 1:
        both = torch.cat([correct, reward_sum]).to(env.device)
        dist.all_reduce(both, group=groups.dp_group)
        correct, reward_sum = both[:count].cpu(), both[count:].cpu()
    out = {"mean_reward": reward_sum.item() / (count * e.samples), "n": e.samples, "problems": count}
    if perplexity:
        out.update(validation_loss(model, tokenizer, cfg, groups, env))
    model.train(was_training)
    return [{"k": k, "pass_at_k": mean_pass_at_k(correct.long().tolist(), e.samples, k), **out} for k in e.k]


def validation_loss(model, tokenizer, cfg: Config, groups, env) -> dict:
    """Validation loss / perplexity on data.val_source (default: the held-out novel of the embedded
    corpus), log.eval_batches micro-batches of data.seq_len tokens per DP rank: the engine's Validator."""
    from megatrain.data.sampler import PackedBlocks
    from megatrain.data.sources import cache_dir, resolve_sources
    from megatrain.data.token_cache import build_token_cache, open_token_cache
    from megatrain.engine.validate import Validator

    d = cfg.data
    files = resolve_sources(d.val_source if d.val_source is not None else "embedded", "data.val_source")
    root = cache_dir(d)
    if env.local_rank == 0:
        build_token_cache(files, tokenizer, root, d.text_field)
    barrier()
    blocks = PackedBlocks(
        open_token_cache(files, tokenizer, root, d.text_field, "data.val_source"),
        min(d.seq_len, model.config.max_seq_len),
    )
    validator = Validator(
        blocks,
        micro_batch=cfg.rl.micro_batch,
        batches=cfg.log.eval_batches,
        dp_rank=groups.dp_rank,
        dp_size=groups.dp_size,
        device=env.device,
        group=groups.dp_group,
    )
    return validator.validate(model)
