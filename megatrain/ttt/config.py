"""The `ttt.*` config section: its schema and its checks.

The schema (`TTTConfig`, `TTTTaskConfig`) is registered with the central loader as the section `ttt`
(`megatrain.config.register_section`), so YAML files, `ttt.a=b` overrides, the saved config and
`megatrain config --reference` treat it like every other section; the loader checks each key's type.
`validate_ttt(cfg)` checks what needs no model; `check_against_model(cfg, model_cfg, question_tokens)`
what needs the model's size and kind. Both raise ConfigError with one line naming the key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from megatrain.config import register_section
from megatrain.errors import ConfigError
from megatrain.fields import config_field as _f
from megatrain.ttt.flops import think_tokens

__all__ = ["TTTConfig", "TTTTaskConfig", "validate_ttt", "check_against_model", "QUESTION_MARGIN"]


@dataclass
class TTTTaskConfig:
    """`ttt.task.*`: what qTTT is evaluated on (megatrain/data/longcontext.py)."""

    kind: str = _f(
        "passkey",
        "needle / passkey / multikey retrieval in the held-out novel, or jsonl (a real "
        "long-context set at ttt.task.path).",
        choices=["needle", "passkey", "multikey", "jsonl"],
    )
    path: Optional[str] = _f(None, "jsonl: the file, one record per line.")
    context_field: str = _f("context", "jsonl: field of the context text.")
    question_field: str = _f("question", "jsonl: field of the question.")
    answer_field: str = _f("answer", "jsonl: field of the answer (with choices: a letter, an index or the option).")
    choices_field: Optional[str] = _f("choices", "jsonl: field of the options (optional; multiple-choice accuracy).")
    context_lengths: list[int] = _f([256, 512], "Context lengths in tokens (jsonl: contexts are cut to each).")
    depths: list[float] = _f([0.1, 0.5, 0.9], "Needle depths in [0, 1] (retrieval tasks).")
    examples: int = _f(8, "Examples per (length, depth) cell (jsonl: the first N records).")
    keys: int = _f(4, "multikey: needles per context (one is queried).")
    seed: int = _f(0, "Seed of the generated examples.")


@dataclass
class TTTConfig:
    """`ttt.*`: query-only test-time training (megatrain/ttt; docs in megatrain/ttt/adapt.py)."""

    init: Optional[str] = _f(
        None,
        "Run, checkpoint, export or Hugging Face Llama folder to evaluate; null = first "
        "pretrain a model on the "
        "retrieval task with this config's model/data/train sections into RUN/pretrain.",
    )
    steps: int = _f(32, "qTTT gradient steps N per example.")
    span: int = _f(128, "Tokens k per sampled span.")
    lr: float = _f(1e-5, "qTTT learning rate.")
    target: str = _f(
        "q",
        "Trained parameters: q = every layer's W_Q (IHA: and mix_q), q_lora = a rank-r adapter on W_Q.",
        choices=["q", "q_lora"],
    )
    lora_rank: int = _f(8, "Adapter rank for ttt.target=q_lora.")
    optimizer: str = _f("adamw", "qTTT optimizer (AdamW without weight decay, or plain SGD).", choices=["adamw", "sgd"])
    batch: int = _f(8, "Examples adapted at once (each keeps its own queries).")
    max_new_tokens: int = _f(8, "Answer tokens generated (greedy).")
    think: bool = _f(True, "Also run the FLOP-matched thinking baseline (2 * steps * span tokens before answering).")
    pretrain_documents: int = _f(4000, "Without ttt.init: retrieval documents written for pretraining.")
    task: TTTTaskConfig = field(default_factory=TTTTaskConfig)


register_section("ttt", TTTConfig)


# Tokens reserved for the question of a generated retrieval task when checking lengths up front
# (the longest, the needle task's question, is ~45 tokens with a 512-token vocabulary).
QUESTION_MARGIN = 64


def _int(value, key: str, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{key} must be an integer >= {low}, got {value!r}")
    return value


def validate_ttt(cfg) -> None:
    """Model-independent checks of ttt.* (ConfigError, one line)."""
    from megatrain.parallel.checks import check_pretraining_only_layouts

    check_pretraining_only_layouts(cfg, "ttt")
    t, task = cfg.ttt, cfg.ttt.task
    _int(t.steps, "ttt.steps", 0)
    _int(t.span, "ttt.span", 1)
    _int(t.lora_rank, "ttt.lora_rank", 1)
    _int(t.batch, "ttt.batch", 1)
    _int(t.max_new_tokens, "ttt.max_new_tokens", 1)
    _int(t.pretrain_documents, "ttt.pretrain_documents", 1)
    if not t.lr > 0:
        raise ConfigError(f"ttt.lr must be > 0, got {t.lr}")
    lengths = task.context_lengths
    if not isinstance(lengths, list) or not lengths:
        raise ConfigError(f"ttt.task.context_lengths must be a non-empty list of token counts, got {lengths!r}")
    for length in lengths:
        _int(length, "ttt.task.context_lengths (each)", 1)
        if length < t.span + 1:
            raise ConfigError(
                f"ttt.task.context_lengths: a context of {length} tokens is shorter than ttt.span + 1 = "
                f"{t.span + 1} (a span and the token after it); lower ttt.span or lengthen the contexts"
            )
    depths = task.depths
    if not isinstance(depths, list) or not depths:
        raise ConfigError(f"ttt.task.depths must be a non-empty list of numbers in [0, 1], got {depths!r}")
    for depth in depths:
        if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
            raise ConfigError(f"ttt.task.depths: {depth!r} is not a number in [0, 1]")
    _int(task.examples, "ttt.task.examples", 1)
    if task.kind == "multikey":
        _int(task.keys, "ttt.task.keys", 2)
    if task.kind == "jsonl":
        if not task.path:
            raise ConfigError("ttt.task.kind=jsonl needs ttt.task.path (a .jsonl file)")
        if not os.path.isfile(task.path):
            raise ConfigError(f"ttt.task.path: file '{task.path}' does not exist")
        if t.init is None:
            raise ConfigError(
                "ttt.task.kind=jsonl needs ttt.init (a run, checkpoint or export to evaluate); "
                "only the retrieval tasks can pretrain their own model"
            )
    elif task.path is not None:
        raise ConfigError(f"ttt.task.path applies to ttt.task.kind=jsonl only (this run has ttt.task.kind={task.kind})")


def check_against_model(cfg, model_cfg, question_tokens: int = QUESTION_MARGIN) -> None:
    """Checks of ttt.* against the model that will be adapted (ConfigError, one line)."""
    t = cfg.ttt
    limit = model_cfg.max_seq_len
    if t.span + 1 > limit - 1:
        raise ConfigError(
            f"ttt.span={t.span} is longer than the model allows: ttt.span + 1 must be <= "
            f"model.max_seq_len - 1 = {limit - 1}"
        )
    if model_cfg.linear != "dense":
        raise ConfigError(
            f"ttt.target={t.target} needs dense query projections (model.linear=dense); the model has "
            f"model.linear={model_cfg.linear}, which has no single W_Q to adapt"
        )
    if t.target == "q_lora" and t.lora_rank > min(model_cfg.dim, model_cfg.heads * model_cfg.head_dim):
        raise ConfigError(
            f"ttt.lora_rank={t.lora_rank} exceeds the query projection's smaller side "
            f"{min(model_cfg.dim, model_cfg.heads * model_cfg.head_dim)}"
        )
    longest = max(cfg.ttt.task.context_lengths)
    need = longest + question_tokens + t.max_new_tokens
    if need > limit:
        raise ConfigError(
            f"ttt.task.context_lengths: {longest} tokens + the question (~{question_tokens}) + "
            f"ttt.max_new_tokens={t.max_new_tokens} exceed model.max_seq_len={limit}"
        )
    if t.think:
        need += think_tokens(t.steps, t.span) + question_tokens
        if need > limit:
            raise ConfigError(
                f"ttt.think=true: the thinking baseline decodes 2 x ttt.steps x ttt.span = "
                f"{think_tokens(t.steps, t.span)} tokens after a {longest}-token context, {need} in all, "
                f"beyond model.max_seq_len={limit}; set ttt.think=false or use a longer model.max_seq_len"
            )
