"""Accuracy per (context length, depth) cell with and without qTTT, and the thinking baseline.

For every batch of examples (ttt.batch of them, contexts of one cell):

- plain: prefill the context once, answer greedily (`megatrain.generate(..., cache=)`);
- think: over the same prefilled context, decode T_think = 2 * steps * span tokens after the
  question, then read the question again and answer (in-context answering with the FLOP-matched
  budget spent on extra tokens);
- qttt: `megatrain.ttt.adapt` (its own prefill, `steps` span updates of the queries), then answer
  over its cache.

Accuracy counts answers judged right by `megatrain.data.longcontext.answer_correct`.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from megatrain.data.longcontext import (
    LongContextExample,
    answer_correct,
    jsonl_examples,
    load_jsonl,
    retrieval_examples,
)
from megatrain.generate import generate
from megatrain.ttt.adapt import adapt, prefill
from megatrain.ttt.flops import qttt_flops, think_tokens

__all__ = ["cell_examples", "evaluate_batch", "evaluate_cells", "METHODS"]

METHODS = ("plain", "qttt", "think")


def cell_examples(task_cfg, tokenizer, length: int, depth: Optional[float]) -> list[LongContextExample]:
    """The examples of one cell of `ttt.task` (jsonl: the first ttt.task.examples records, cut to `length`)."""
    if task_cfg.kind == "jsonl":
        records = load_jsonl(
            task_cfg.path,
            context_field=task_cfg.context_field,
            question_field=task_cfg.question_field,
            answer_field=task_cfg.answer_field,
            choices_field=task_cfg.choices_field,
        )
        return jsonl_examples(records[: task_cfg.examples], tokenizer, length)
    return retrieval_examples(
        task_cfg.kind,
        tokenizer,
        length=length,
        depth=float(depth),
        count=task_cfg.examples,
        seed=task_cfg.seed,
        keys=task_cfg.keys,
    )


def _answers(model, tokenizer, prompts, cache, max_new_tokens: int) -> list[str]:
    new = generate(model, prompts, max_new_tokens=max_new_tokens, cache=cache, eos_id=tokenizer.eos_id)
    return [tokenizer.decode(tokens) for tokens in new]


def evaluate_batch(model, tokenizer, examples: list[LongContextExample], ttt_cfg, methods=METHODS) -> dict:
    """{method: [correct (bool) per example], "qttt_losses": span losses per step, "answers": ...}."""
    contexts = [e.context for e in examples]
    questions = [e.question for e in examples]
    out: dict = {"answers": {}}
    if "plain" in methods or "think" in methods:
        cache = prefill(model, contexts)
        if "plain" in methods:
            out["answers"]["plain"] = _answers(model, tokenizer, questions, cache, ttt_cfg.max_new_tokens)
        if "think" in methods:
            budget = think_tokens(ttt_cfg.steps, ttt_cfg.span)
            thoughts = (
                generate(model, questions, max_new_tokens=budget, cache=cache) if budget else [[] for _ in questions]
            )
            again = [q + t + q for q, t in zip(questions, thoughts)]
            out["answers"]["think"] = _answers(model, tokenizer, again, cache, ttt_cfg.max_new_tokens)
    if "qttt" in methods:
        with adapt(
            model,
            contexts,
            steps=ttt_cfg.steps,
            span=ttt_cfg.span,
            lr=ttt_cfg.lr,
            target=ttt_cfg.target,
            seed=ttt_cfg.task.seed,
            lora_rank=ttt_cfg.lora_rank,
            optimizer=ttt_cfg.optimizer,
        ) as cache:
            out["answers"]["qttt"] = _answers(model, tokenizer, questions, cache, ttt_cfg.max_new_tokens)
            out["qttt_losses"] = list(cache.losses)
    for method, texts in out["answers"].items():
        out[method] = [answer_correct(text, e) for text, e in zip(texts, examples)]
    return out


def evaluate_cells(
    model,
    tokenizer,
    cfg,
    log: Callable[[str], None] = print,
    methods=METHODS,
    should_stop: Optional[Callable[[], bool]] = None,
) -> list[dict]:
    """One record per (length, depth) cell: accuracies of `methods`, FLOPs per example, losses, time.
    `should_stop` (a stop signal) is asked before each cell: when true, the cells done so far are returned."""
    t, task = cfg.ttt, cfg.ttt.task
    depths = [None] if task.kind == "jsonl" else task.depths
    records = []
    for length in task.context_lengths:
        for depth in depths:
            if should_stop is not None and should_stop():
                return records
            start = time.perf_counter()
            examples = cell_examples(task, tokenizer, length, depth)
            correct = {m: [] for m in methods}
            losses = []
            samples = {}
            for first in range(0, len(examples), t.batch):
                batch = examples[first : first + t.batch]
                result = evaluate_batch(model, tokenizer, batch, t, methods)
                for m in methods:
                    correct[m] += result[m]
                if "qttt_losses" in result:
                    losses.append(result["qttt_losses"])
                if not samples:
                    samples = {m: result["answers"][m][0] for m in methods}
                    samples["reference"] = batch[0].answer
            question = max(len(e.question) for e in examples)
            flops = qttt_flops(
                model.config,
                length,
                steps=t.steps,
                span=t.span,
                target=t.target,
                lora_rank=t.lora_rank,
                question=question,
            )
            record = {"task": task.kind, "length": length, "depth": depth, "examples": len(examples)}
            for m in methods:
                record[f"{m}_acc"] = sum(correct[m]) / len(correct[m])
            if losses:
                per_step = torch.tensor(losses).mean(dim=0).tolist()
                record["qttt_loss_first"], record["qttt_loss_last"] = per_step[0], per_step[-1]
            record.update(
                flops_prefill=flops["prefill"],
                flops_qttt=flops["qttt"],
                think_tokens=flops["think_tokens"],
                flops_think=flops["think"],
                flops_ratio=flops["ratio"],
                sample=samples,
                seconds=time.perf_counter() - start,
            )
            records.append(record)
            accs = "  ".join(f"{m} {record[f'{m}_acc']:.2f}" for m in methods)
            where = f"depth {depth:.2f}" if depth is not None else "jsonl"
            log(f"length {length:>6}  {where}  {accs}  ({record['seconds']:.1f}s)")
    return records
