"""Synthetic retrieval tasks with exact answers: multi-key retrieval and multi-hop composition.

Each task is a seeded, deterministic generator of token sequences built directly from ids (no
sentencepiece), plus an exact-match evaluator. `megatrain pretrain` trains on them with
`data.source=task:multikey` or `data.source=task:multihop` (sizes in `data.task.*`): this module
registers the `task:` source kind (`TASK_SOURCES`) with megatrain.data.sources, where the data
entry points (and checks of the config) find it by prefix. The loss is taken on the answer tokens only and
every evaluation logs `val_exact_match` (all answers of a sequence right) and `val_answer_acc`
(answers right) into metrics.jsonl.

Vocabulary: 0 `<pad>`, 1 `<bos>`, 2 `<sep>`, 3 `<query>`, then `data.task.symbols` symbols `s0`, `s1`, ...

- multikey (several key-value pairs in a context, a subset queried; Zoology's MQAR):
  `<bos> k1 v1 k2 v2 ... kM vM <sep> q1 a1 q2 a2 ... qQ aQ`. Keys are distinct symbols from the
  first half of the symbols, values any symbol of the second half; the Q queries are distinct keys
  of the context, in random order; after each query the model must produce its value.
- data.task.length > 0 inserts `<pad>` tokens before `<sep>` (multikey) or `<query>` (multihop) so each
  sequence has that many tokens: the distance between the pairs and the queries grows with the context
  length while the task stays the same (Zoology's MQAR sweeps context length this way).
- multihop (follow a chain of `hops` lookups): `<bos> a1 b1 ... aM bM <query> x y`. The M pairs
  (distinct keys, shuffled) define a map f that holds a chain x -> f(x) -> ... of `hops` steps
  among distractor pairs; after x the model must produce y = f^hops(x), with no intermediate steps
  written out.

Sample i of a split is drawn from numpy's generator seeded with (data.task.seed, split, i), so a
sequence never depends on batch size, data-parallel layout or what was drawn before; validation is
split 1, a different stream from training (split 0).

Exact match by teacher-forced argmax equals greedy decoding here: the answers are the only
generated tokens, so if every answer's argmax is right, greedy decoding produces exactly the
reference continuation, and if one is wrong, so is the greedy output.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from megatrain.constants import IGNORE_INDEX
from megatrain.data.sources import register_source_kind
from megatrain.errors import ConfigError

__all__ = [
    "TASKS",
    "PREFIX",
    "PAD",
    "BOS",
    "SEP",
    "QUERY",
    "NUM_SPECIAL",
    "task_name",
    "task_vocab_size",
    "required_seq_len",
    "generate",
    "TaskTokenizer",
    "TaskBlocks",
    "TaskSources",
    "TASK_SOURCES",
    "exact_match_counts",
    "evaluate_exact_match",
]

TASKS = ("multikey", "multihop")
PAD, BOS, SEP, QUERY = 0, 1, 2, 3
NUM_SPECIAL = 4
TRAIN_SPLIT, VAL_SPLIT = 0, 1
PREFIX = "task"  # data.source=task:NAME


def _allowed_sources() -> str:
    return ", ".join(f"{PREFIX}:{name}" for name in TASKS)


def task_name(source: str) -> str:
    """'task:multikey' -> 'multikey' (ValueError for anything that is not a known task)."""
    name = source[len(PREFIX) + 1 :] if isinstance(source, str) and source.startswith(PREFIX + ":") else ""
    if name not in TASKS:
        raise ValueError(f"{source!r} is not a synthetic task (allowed: {_allowed_sources()})")
    return name


def task_vocab_size(task_cfg) -> int:
    """Vocabulary of the tasks: the 4 special tokens plus data.task.symbols symbols."""
    return NUM_SPECIAL + task_cfg.symbols


def _num_tokens(name: str, task_cfg) -> int:
    if name == "multikey":
        natural = 2 + 2 * task_cfg.pairs + 2 * task_cfg.queries
    else:
        natural = 4 + 2 * task_cfg.pairs
    return max(natural, int(getattr(task_cfg, "length", 0) or 0))


def _gap(name: str, task_cfg) -> np.ndarray:
    """The <pad> tokens between the context and the queries that stretch a sequence to data.task.length."""
    natural = 2 + 2 * task_cfg.pairs + 2 * task_cfg.queries if name == "multikey" else 4 + 2 * task_cfg.pairs
    return np.full(max(0, int(getattr(task_cfg, "length", 0) or 0) - natural), PAD, dtype=np.int64)


def required_seq_len(name: str, task_cfg) -> int:
    """The shortest data.seq_len that holds one sequence of task `name` (inputs are tokens[:-1])."""
    return _num_tokens(name, task_cfg) - 1


def generate(name: str, task_cfg, split: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Sequence `index` of `split` (0 train, 1 validation).

    Returns:
        tokens: int64 [L] (L = required_seq_len + 1, no padding).
        answer_at: int64 [A] positions t whose next token tokens[t + 1] is an answer.
    """
    rng = np.random.default_rng([int(task_cfg.seed), int(split), int(index)])
    pairs, symbols = task_cfg.pairs, task_cfg.symbols
    if name == "multikey":
        half = symbols // 2
        keys = rng.choice(half, size=pairs, replace=False)
        values = rng.integers(half, symbols, size=pairs)
        asked = rng.choice(pairs, size=task_cfg.queries, replace=False)
        context = np.stack([keys, values], axis=1).reshape(-1) + NUM_SPECIAL
        queries = np.stack([keys[asked], values[asked]], axis=1).reshape(-1) + NUM_SPECIAL
        gap = _gap(name, task_cfg)
        tokens = np.concatenate([[BOS], context, gap, [SEP], queries]).astype(np.int64)
        start = 2 + 2 * pairs + len(gap)  # position of the first query key
        answer_at = start + 2 * np.arange(task_cfg.queries)
        return tokens, answer_at.astype(np.int64)
    if name == "multihop":
        hops = task_cfg.hops
        chain = rng.choice(symbols, size=hops + 1, replace=False)  # x = chain[0], answer = chain[hops]
        others = np.setdiff1d(np.arange(symbols), chain[:hops])  # keys not already on the chain
        distractor_keys = rng.choice(others, size=pairs - hops, replace=False)
        keys = np.concatenate([chain[:hops], distractor_keys])
        values = np.concatenate([chain[1:], rng.integers(0, symbols, size=pairs - hops)])
        order = rng.permutation(pairs)
        context = np.stack([keys[order], values[order]], axis=1).reshape(-1) + NUM_SPECIAL
        tokens = np.concatenate(
            [[BOS], context, _gap(name, task_cfg), [QUERY, chain[0] + NUM_SPECIAL, chain[hops] + NUM_SPECIAL]]
        )
        return tokens.astype(np.int64), np.array([len(tokens) - 2], dtype=np.int64)
    raise ValueError(f"unknown task {name!r} (allowed: {', '.join(TASKS)})")


class TaskTokenizer:
    """Names for the task vocabulary, so logs and samples are readable: `<bos> s3 s41 ...`.

    `path` is None: there is no sentencepiece model to copy into checkpoints.
    """

    path = None

    def __init__(self, symbols: int):
        self.symbols = int(symbols)
        self.pieces = ["<pad>", "<bos>", "<sep>", "<query>"] + [f"s{i}" for i in range(self.symbols)]
        self._ids = {piece: i for i, piece in enumerate(self.pieces)}

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def encode(self, text: str) -> list[int]:
        """Whitespace-separated piece names -> ids (KeyError names an unknown piece)."""
        out = []
        for piece in text.split():
            if piece not in self._ids:
                raise KeyError(
                    f"'{piece}' is not in the task vocabulary (<pad> <bos> <sep> <query> s0..s{self.symbols - 1})"
                )
            out.append(self._ids[piece])
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self.pieces[int(i)] for i in ids)


class TaskBlocks:
    """One split of a task as fixed-length training blocks, the interface of `PackedBlocks`.

    Block i is sequence i padded with `<pad>` to seq_len + 1 tokens; `batch` returns inputs and
    labels [B, seq_len] where labels are -100 except at the answer positions, so the loss (and
    the accuracy) covers the answers only.
    """

    def __init__(self, name: str, task_cfg, seq_len: int, split: int):
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r} (allowed: {', '.join(TASKS)})")
        need = required_seq_len(name, task_cfg)
        if seq_len < need:
            raise ValueError(f"task {name} needs seq_len >= {need}, got {seq_len}")
        self.name, self.task_cfg, self.seq_len, self.split = name, task_cfg, int(seq_len), int(split)
        self.size = task_cfg.train_size if split == TRAIN_SPLIT else task_cfg.val_size

    def __len__(self) -> int:
        return self.size

    def _check(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < self.size:
            raise IndexError(f"sequence {index} out of range for {self.size} sequences")
        return index

    def __getitem__(self, index: int) -> Tensor:
        """Sequence `index` as int64 [seq_len + 1], padded with <pad>."""
        tokens, _ = generate(self.name, self.task_cfg, self.split, self._check(index))
        block = np.full(self.seq_len + 1, PAD, dtype=np.int64)
        block[: len(tokens)] = tokens
        return torch.from_numpy(block)

    def batch(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        """(inputs, labels), int64 [B, seq_len]; labels -100 except at answer positions."""
        inputs = np.full((len(indices), self.seq_len), PAD, dtype=np.int64)
        labels = np.full((len(indices), self.seq_len), IGNORE_INDEX, dtype=np.int64)
        for row, index in enumerate(indices):
            tokens, answer_at = generate(self.name, self.task_cfg, self.split, self._check(index))
            inputs[row, : len(tokens) - 1] = tokens[:-1]
            labels[row, answer_at] = tokens[answer_at + 1]
        return torch.from_numpy(inputs), torch.from_numpy(labels)

    @staticmethod
    def answer_counts(logits: Tensor, labels: Tensor) -> Tensor:
        """Validation extras of a task split: `exact_match_counts` (the trainer reports
        val_exact_match and val_answer_acc from them)."""
        return exact_match_counts(logits, labels)


class TaskSources:
    """The `task:NAME` kind of data.source (see megatrain.data.sources.GeneratedSourceKind).

    Reads data.source, data.seq_len and data.task.* from the data section `data_cfg`.
    """

    prefix = PREFIX

    def __repr__(self) -> str:
        return "megatrain.data.tasks.TASK_SOURCES"

    def validate(self, data_cfg) -> None:
        """ConfigError (one line naming the key) for an unknown task, impossible sizes or a short seq_len."""
        source, t = data_cfg.source, data_cfg.task
        try:
            name = task_name(source)
        except ValueError:
            raise ConfigError(
                f"data.source={source!r} is not a synthetic task (allowed: {_allowed_sources()})"
            ) from None
        for key in ("pairs", "queries", "hops", "symbols", "train_size", "val_size"):
            if getattr(t, key) < 1:
                raise ConfigError(f"data.task.{key} must be >= 1, got {getattr(t, key)}")
        if t.length < 0:
            raise ConfigError(f"data.task.length must be >= 0 (0 = no gap), got {t.length}")
        if name == "multikey":
            if t.queries > t.pairs:
                raise ConfigError(f"data.task.queries={t.queries} exceeds data.task.pairs={t.pairs}")
            if t.symbols < 2 * t.pairs:
                raise ConfigError(
                    f"data.task.symbols={t.symbols} must be >= 2 x data.task.pairs={2 * t.pairs} "
                    f"(keys and values come from separate halves; keys are distinct)"
                )
        else:
            if t.hops > t.pairs:
                raise ConfigError(f"data.task.hops={t.hops} exceeds data.task.pairs={t.pairs}")
            if t.symbols < t.pairs + 1:
                raise ConfigError(f"data.task.symbols={t.symbols} must be > data.task.pairs={t.pairs}")
        need = required_seq_len(name, t)
        if data_cfg.seq_len < need:
            raise ConfigError(
                f"data.seq_len={data_cfg.seq_len} is too short for {source} with these data.task "
                f"sizes: it needs >= {need}"
            )

    def vocab_size(self, data_cfg) -> int:
        return task_vocab_size(data_cfg.task)

    def required_seq_len(self, data_cfg) -> int:
        return required_seq_len(task_name(data_cfg.source), data_cfg.task)

    def open(self, data_cfg) -> tuple[TaskTokenizer, TaskBlocks, TaskBlocks]:
        """(TaskTokenizer, training TaskBlocks, validation TaskBlocks)."""
        name = task_name(data_cfg.source)
        train = TaskBlocks(name, data_cfg.task, data_cfg.seq_len, TRAIN_SPLIT)
        val = TaskBlocks(name, data_cfg.task, data_cfg.seq_len, VAL_SPLIT)
        return TaskTokenizer(data_cfg.task.symbols), train, val


TASK_SOURCES = TaskSources()
register_source_kind(TASK_SOURCES)


def exact_match_counts(logits: Tensor, labels: Tensor) -> Tensor:
    """float64 [4]: (sequences with every answer right, sequences, answers right, answers).

    logits [B, N, V]; labels [B, N], -100 where there is no answer. Sequences without answers
    are not counted.
    """
    answer = labels != IGNORE_INDEX
    right = (logits.argmax(dim=-1) == labels) & answer
    has_answer = answer.any(dim=1)
    exact = ((right | ~answer).all(dim=1) & has_answer).sum()
    return torch.stack([exact, has_answer.sum(), right.sum(), answer.sum()]).double()


@torch.no_grad()
def evaluate_exact_match(
    model, blocks: TaskBlocks, batch_size: int = 64, limit: Optional[int] = None, device=None
) -> dict:
    """Exact-match accuracy of `model` (input_ids [B, N] -> logits [B, N, V]) on `blocks`.

    Returns {"exact_match": fraction of sequences with every answer right, "answer_acc": fraction
    of answers right, "sequences": how many were scored}.
    """
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    total = torch.zeros(4, dtype=torch.float64)
    count = len(blocks) if limit is None else min(limit, len(blocks))
    for start in range(0, count, batch_size):
        inputs, labels = blocks.batch(range(start, min(start + batch_size, count)))
        if device is not None:
            inputs, labels = inputs.to(device), labels.to(device)
        total += exact_match_counts(model(inputs), labels).cpu()
    if was_training:
        model.train()
    return {
        "exact_match": (total[0] / total[1]).item(),
        "answer_acc": (total[2] / total[3]).item(),
        "sequences": int(total[1].item()),
    }
