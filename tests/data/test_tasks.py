"""Synthetic tasks: deterministic generators, correct answers, labels, exact-match scoring, config
errors, and `megatrain pretrain` on a task with IHA (loss falls, accuracy logged)."""

from __future__ import annotations

import pytest
import torch

from megatrain.config import DataConfig, TaskConfig, load_config
from megatrain.constants import IGNORE_INDEX
from megatrain.data.tasks import (
    BOS,
    NUM_SPECIAL,
    PAD,
    QUERY,
    SEP,
    TASK_SOURCES,
    TaskBlocks,
    TaskTokenizer,
    evaluate_exact_match,
    exact_match_counts,
    generate,
    required_seq_len,
    task_vocab_size,
)
from megatrain.errors import ConfigError
from tests.conftest import read_metrics, run_cli


def test_generators_are_deterministic_and_splits_differ():
    cfg = TaskConfig(pairs=6, queries=3, hops=3, symbols=40, seed=5)
    for name in ("multikey", "multihop"):
        a, at_a = generate(name, cfg, 0, 17)
        b, at_b = generate(name, cfg, 0, 17)
        assert torch.equal(torch.from_numpy(a), torch.from_numpy(b)) and (at_a == at_b).all()
        assert len(a) == required_seq_len(name, cfg) + 1
        others = [
            generate(name, cfg, 1, 17)[0],
            generate(name, cfg, 0, 18)[0],
            generate(name, TaskConfig(pairs=6, queries=3, hops=3, symbols=40, seed=6), 0, 17)[0],
        ]
        assert all(not (o == a).all() for o in others)
        assert a.min() >= 0 and a.max() < task_vocab_size(cfg)
    blocks = TaskBlocks("multikey", cfg, 20, 0)
    # A block never depends on which others are drawn with it.
    assert torch.equal(blocks.batch([3, 9])[0][1], blocks.batch([9])[0][0])


@pytest.mark.parametrize("index", range(20))
def test_multikey_answers_are_the_queried_values(index):
    cfg = TaskConfig(pairs=8, queries=4, symbols=30)
    tokens, answer_at = generate("multikey", cfg, 0, index)
    tokens = tokens.tolist()
    assert tokens[0] == BOS and tokens[17] == SEP
    context = dict(zip(tokens[1:17:2], tokens[2:17:2]))
    assert len(context) == 8  # distinct keys
    assert all(k - NUM_SPECIAL < 15 <= v - NUM_SPECIAL for k, v in context.items())  # keys / values halves
    queried = [tokens[t] for t in answer_at]
    assert len(set(queried)) == 4
    for t in answer_at:
        assert tokens[t + 1] == context[tokens[t]]


@pytest.mark.parametrize("index", range(20))
def test_multihop_answer_follows_the_chain(index):
    cfg = TaskConfig(pairs=7, hops=3, symbols=20)
    tokens, answer_at = generate("multihop", cfg, 1, index)
    tokens = tokens.tolist()
    assert tokens[0] == BOS and tokens[-3] == QUERY and answer_at.tolist() == [len(tokens) - 2]
    mapping = dict(zip(tokens[1:15:2], tokens[2:15:2]))
    assert len(mapping) == 7  # a function: every key once
    x = tokens[-2]
    for _ in range(3):
        x = mapping[x]
    assert tokens[-1] == x


def test_batch_labels_only_at_answers_and_padding():
    cfg = TaskConfig(pairs=3, queries=2, symbols=10)
    blocks = TaskBlocks("multikey", cfg, 16, 0)
    inputs, labels = blocks.batch([0, 1])
    assert inputs.shape == labels.shape == (2, 16)
    tokens, answer_at = generate("multikey", cfg, 0, 1)
    assert inputs[1, : len(tokens) - 1].tolist() == tokens[:-1].tolist()
    assert (inputs[1, len(tokens) - 1 :] == PAD).all()
    assert (labels[1] != IGNORE_INDEX).nonzero().flatten().tolist() == answer_at.tolist()
    assert labels[1, answer_at].tolist() == tokens[answer_at + 1].tolist()
    assert torch.equal(blocks[1][: len(tokens)], torch.from_numpy(tokens))
    assert len(blocks) == cfg.train_size and len(TaskBlocks("multikey", cfg, 16, 1)) == cfg.val_size


def test_exact_match_counts():
    labels = torch.full((3, 5), IGNORE_INDEX)
    labels[0, 1], labels[0, 3], labels[1, 2] = 4, 5, 6  # row 2 has no answers: not counted
    logits = torch.zeros(3, 5, 8)
    logits[0, 1, 4] = logits[0, 3, 5] = logits[1, 2, 6] = 1.0
    assert exact_match_counts(logits, labels).tolist() == [2, 2, 3, 3]
    logits[0, 3, 7] = 2.0  # one of row 0's two answers wrong
    assert exact_match_counts(logits, labels).tolist() == [1, 2, 2, 3]


def test_evaluate_with_an_oracle_and_a_wrong_model():
    cfg = TaskConfig(pairs=4, queries=2, symbols=16, val_size=10)
    blocks = TaskBlocks("multikey", cfg, 13, 1)

    def oracle(inputs):  # looks the answer up in the context, as a perfect model would
        logits = torch.zeros(*inputs.shape, task_vocab_size(cfg))
        for b, row in enumerate(inputs.tolist()):
            table = dict(zip(row[1:9:2], row[2:9:2]))
            for t in range(10, len(row)):
                if row[t] in table:
                    logits[b, t, table[row[t]]] = 1.0
        return logits

    assert evaluate_exact_match(oracle, blocks, batch_size=3) == {
        "exact_match": 1.0,
        "answer_acc": 1.0,
        "sequences": 10,
    }
    wrong = evaluate_exact_match(lambda x: torch.zeros(*x.shape, task_vocab_size(cfg)), blocks)
    assert wrong["exact_match"] == 0.0


def test_tokenizer_round_trip():
    tok = TaskTokenizer(12)
    assert tok.vocab_size == 16 and tok.path is None
    assert tok.decode(tok.encode("<bos> s0 s11 <sep>")) == "<bos> s0 s11 <sep>"
    with pytest.raises(KeyError, match="s12"):
        tok.encode("s12")


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (
            ["data.source=task:retrieval"],
            "data.source='task:retrieval' is not a synthetic task (allowed: task:multikey",
        ),
        (["data.source=task:multikey", "data.seq_len=16"], "data.seq_len=16 is too short for task:multikey"),
        (["data.source=task:multikey", "data.task.queries=9"], "data.task.queries=9 exceeds data.task.pairs=8"),
        (["data.source=task:multihop", "data.task.hops=0"], "data.task.hops must be >= 1"),
        (["data.source=task:multikey", "data.task.symbols=10"], "data.task.symbols=10 must be >= 2 x data.task.pairs"),
        (["data.source=task:multikey", "model.vocab_size=32"], "model.vocab_size=32 is smaller than task:multikey's"),
    ],
)
def test_task_config_errors(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert fragment in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "source, task, seq_len, message",
    [
        (
            "task:retrieval",
            {},
            64,
            "data.source='task:retrieval' is not a synthetic task (allowed: task:multikey, task:multihop)",
        ),
        (
            "task:multikey",
            {},
            16,
            "data.seq_len=16 is too short for task:multikey with these data.task sizes: it needs >= 25",
        ),
        ("task:multikey", {"queries": 9}, 64, "data.task.queries=9 exceeds data.task.pairs=8"),
        ("task:multihop", {"hops": 0}, 64, "data.task.hops must be >= 1, got 0"),
        ("task:multihop", {"hops": 9}, 64, "data.task.hops=9 exceeds data.task.pairs=8"),
        ("task:multihop", {"symbols": 8}, 64, "data.task.symbols=8 must be > data.task.pairs=8"),
        (
            "task:multikey",
            {"symbols": 10},
            64,
            "data.task.symbols=10 must be >= 2 x data.task.pairs=16 (keys and "
            "values come from separate halves; keys are distinct)",
        ),
    ],
)
def test_the_task_kind_validates_the_data_section(source, task, seq_len, message):
    data = DataConfig(source=source, seq_len=seq_len, task=TaskConfig(**task))
    with pytest.raises(ConfigError) as info:
        TASK_SOURCES.validate(data)
    assert str(info.value) == message
    # the same line as the config's own check, so config can delegate to the kind unchanged
    overrides = [f"data.source={source}", f"data.seq_len={seq_len}"] + [f"data.task.{k}={v}" for k, v in task.items()]
    with pytest.raises(ConfigError) as from_config:
        load_config(None, overrides)
    assert str(from_config.value) == message


def test_the_task_kind_reports_vocabulary_and_length():
    data = DataConfig(source="task:multihop", seq_len=64, task=TaskConfig(pairs=5, symbols=30))
    TASK_SOURCES.validate(data)
    assert TASK_SOURCES.vocab_size(data) == 34 == task_vocab_size(data.task)
    assert TASK_SOURCES.required_seq_len(data) == 13 == required_seq_len("multihop", data.task)
    data.source = "task:multikey"
    assert TASK_SOURCES.required_seq_len(data) == 2 + 2 * 5 + 2 * 4 - 1


@pytest.mark.slow
def test_pretrain_on_task_with_iha_loss_falls_and_logs_accuracy(tmp_path):
    run_dir = tmp_path / "run"
    run_cli(
        [
            "pretrain",
            "model.preset=tiny",
            "model.attention=iha",
            "model.iha.pseudo_heads=2",
            "data.source=task:multikey",
            "data.seq_len=26",
            "train.steps=12",
            "train.micro_batch=16",
            "train.lr=3e-3",
            "train.warmup_steps=2",
            "train.seed=7",
            "log.every=1",
            "log.eval_every=12",
            "log.eval_batches=2",
            "log.progress=false",
            "log.tensorboard=false",
            "checkpoint.keep=0",
            "parallel.zero_stage=0",
            f"run.dir={run_dir}",
        ],
        timeout=300,
    )
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 13))
    first, last = records[0]["loss"], records[-1]["loss"]
    assert first > 3.9  # ln(64) = 4.16 at init: 60 symbols + 4 special tokens
    assert last < first - 0.4, (first, last)
    final = records[-1]
    assert 0.0 <= final["val_exact_match"] <= 1.0 and 0.0 < final["val_answer_acc"] <= 1.0


@pytest.mark.parametrize("name", ["multikey", "multihop"])
def test_length_stretches_a_sequence_with_a_pad_gap_before_the_queries(name):
    """data.task.length: the same pairs and answers, <pad> between the context and the queries."""
    short = TaskConfig(pairs=4, queries=2, symbols=16, seed=3)
    long = TaskConfig(pairs=4, queries=2, symbols=16, seed=3, length=40)
    a, at_a = generate(name, short, 0, 5)
    b, at_b = generate(name, long, 0, 5)
    assert len(b) == 40 and required_seq_len(name, long) == 39
    gap = len(b) - len(a)
    context = 1 + 2 * short.pairs
    assert (a[:context] == b[:context]).all() and (b[context : context + gap] == PAD).all()
    assert (a[context:] == b[context + gap :]).all()
    assert (at_b == at_a + gap).all() and (b[at_b + 1] == a[at_a + 1]).all()
    blocks = TaskBlocks(name, long, 39, 0)
    inputs, labels = blocks.batch([5])
    assert (labels[0][labels[0] != IGNORE_INDEX] == torch.from_numpy(a[at_a + 1])).all()
    with pytest.raises(ConfigError, match="data.task.length must be >= 0"):
        load_config(None, [f"data.source=task:{name}", "data.task.length=-1", "data.seq_len=64"])
