"""`megatrain ttt`: the retrieval tasks and the jsonl loader, the job's outputs from a trained run
(ttt.init) and from its own pretraining, and bad input as one line with exit code 2."""

from __future__ import annotations

import json
import re
import signal

import numpy as np
import pytest

import megatrain
from megatrain.data.longcontext import (
    _corpus_text,
    answer_correct,
    haystack_tokens,
    jsonl_examples,
    load_jsonl,
    retrieval_document,
    retrieval_examples,
)
from megatrain.errors import DataError
from tests.conftest import REPO, read_metrics, run_cli, signal_after_records, start_launcher

TINY_TTT = [
    "ttt.steps=2",
    "ttt.span=16",
    "ttt.lr=1e-3",
    "ttt.batch=4",
    "ttt.max_new_tokens=6",
    "ttt.task.context_lengths=[64,96]",
    "ttt.task.depths=[0.2,0.8]",
    "ttt.task.examples=2",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_run):
    return megatrain.load(str(tiny_run))[1]


@pytest.mark.parametrize("kind", ["passkey", "needle", "multikey"])
def test_retrieval_examples_place_the_needle_in_the_held_out_novel(tokenizer, kind):
    examples = retrieval_examples(kind, tokenizer, length=300, depth=0.5, count=3, seed=1, keys=3)
    novel = _corpus_text("val")
    assert len(haystack_tokens(tokenizer, "val")) > 100000
    for e in examples:
        assert len(e.context) == 300 and e.length == 300 and e.depth == 0.5
        text = tokenizer.decode(e.context)
        assert e.answer in text and e.answer.isdigit()
        assert text.count("special magic number" if kind != "passkey" else "pass key is") == (
            3 if kind == "multikey" else 1
        )
        # The needle starts half-way through the filler.
        needle = text.index(
            " The pass key"
            if kind == "passkey"
            else "The special magic number for the " + tokenizer.decode(e.question).split("for the ")[1].split("?")[0]
        )
        assert 0.3 < needle / len(text) < 0.7
        # The filler is running text of the held-out novel (needles cut out, ends trimmed to whole tokens).
        pieces = re.split(
            r" ?The (?:pass key|special magic number)[^.]*\.(?: Remember it\. \d+ is the pass key\.)?", text
        )
        longest = max(pieces, key=len)[8:-8]
        assert len(longest) > 100 and longest in novel
        assert answer_correct(" " + e.answer + ". Remember", e) and not answer_correct(" 1" + e.answer, e)
    again = retrieval_examples(kind, tokenizer, length=300, depth=0.5, count=2, seed=1, keys=3)
    assert [a.context for a in again] == [e.context for e in examples[:2]]
    doc = retrieval_document(kind, tokenizer, np.random.default_rng(0), 100)
    assert doc.endswith(".") and ("pass key?" in doc or "magic number for the" in doc)


def test_jsonl_loader_fields_choices_and_truncation(tmp_path, tokenizer):
    path = tmp_path / "set.jsonl"
    rows = [
        {"doc": "Anne walked. " * 200, "q": "Who walked?", "a": "Anne"},
        {"doc": "It rained.", "q": "What happened?", "a": 1, "opts": ["sun", "rain", "snow"]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    records = load_jsonl(str(path), context_field="doc", question_field="q", answer_field="a", choices_field="opts")
    examples = jsonl_examples(records, tokenizer, length=50)
    assert len(examples[0].context) == 50 and examples[0].answer == "Anne" and examples[0].choices is None
    assert examples[1].answer == "B" and "B. rain" in tokenizer.decode(examples[1].question)
    assert answer_correct(" b) rain", examples[1]) and not answer_correct(" A", examples[1])
    assert answer_correct(" Anne, of course", examples[0])
    with pytest.raises(DataError, match="ttt.task.context_field.*line 1 has no field 'context'"):
        load_jsonl(str(path))
    with pytest.raises(DataError, match="ttt.task.answer_field.*line 1 has no field 'answer'"):
        load_jsonl(str(path), context_field="doc", question_field="q")
    (tmp_path / "bad.jsonl").write_text('{"context": "x", "question": "y", "answer": "z"}\nnot json\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_jsonl(str(tmp_path / "bad.jsonl"))


def test_job_from_a_trained_run_writes_table_jsonl_and_heatmap(tiny_run, tmp_path):
    run = tmp_path / "ttt"
    proc = run_cli(
        ["ttt", "--config", "launch/configs/ttt-tiny-cpu.yaml", f"ttt.init={tiny_run}", f"run.dir={run}", *TINY_TTT]
    )
    records = [json.loads(line) for line in (run / "ttt.jsonl").read_text().splitlines()]
    assert [(r["length"], r["depth"]) for r in records] == [(64, 0.2), (64, 0.8), (96, 0.2), (96, 0.8)]
    for r in records:
        for m in ("plain", "qttt", "think"):
            assert 0.0 <= r[f"{m}_acc"] <= 1.0
        assert r["examples"] == 2 and r["think_tokens"] == 64 and r["flops_qttt"] > r["flops_prefill"] > 0
        assert np.isfinite(r["qttt_loss_first"]) and np.isfinite(r["qttt_loss_last"])
    table = (run / "ttt.md").read_text()
    assert "| length | depth | plain acc | qttt acc | think acc |" in table and table.count("\n| 96 |") == 2
    assert (run / "ttt.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "length     96" in proc.stdout


@pytest.mark.slow
def test_job_pretrains_its_own_model_without_init(tmp_path):
    """Without ttt.init the job pretrains first. SIGTERM to `megatrain ttt` during that pretraining (the
    console command) checkpoints it and exits 0 without evaluating a half-trained model; the same command
    again continues the pretraining from that checkpoint, then evaluates. ~15 s."""
    run = tmp_path / "ttt"
    args = [
        "ttt",
        "--config",
        "launch/configs/ttt-tiny-cpu.yaml",
        f"run.dir={run}",
        "train.steps=60",
        "log.every=1",
        "train.micro_batch=4",
        "ttt.pretrain_documents=40",
        "data.seq_len=128",
        "ttt.think=false",
        *TINY_TTT,
    ]
    proc = start_launcher(args)
    out, err = signal_after_records(proc, run / "pretrain" / "metrics.jsonl", 3, signal.SIGTERM)
    assert proc.returncode == 0 and "Traceback" not in err, (out[-2000:], err[-3000:])
    stopped = read_metrics(run / "pretrain")[-1]["step"]
    checkpoint = run / "pretrain" / "checkpoints" / f"step_{stopped}"
    assert 3 <= stopped < 60 and checkpoint.is_dir()
    assert (
        f"stopped at step {stopped} (SIGTERM received); checkpoint {checkpoint}; run the same megatrain ttt "
        f"command again to continue"
    ) in out
    assert (
        f"megatrain: stopped the qTTT job's pretraining at step_{stopped}; run the same command again to continue it"
    ) in out
    assert not (run / "ttt.jsonl").exists()
    proc = run_cli(args)
    assert f"resumed from {checkpoint} at step {stopped}" in proc.stdout
    assert (run / "pretrain" / "checkpoints" / "latest").read_text().strip() == "step_60"
    assert len((run / "pretrain-data" / "passkey.jsonl").read_text().splitlines()) == 40
    records = [json.loads(line) for line in (run / "ttt.jsonl").read_text().splitlines()]
    assert len(records) == 4 and "think_acc" not in records[0]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["ttt.span=100"], "a context of 64 tokens is shorter than ttt.span + 1 = 101"),
        (["ttt.span=1400", "ttt.task.context_lengths=[1401]"], "ttt.span=1400 is longer than the model allows"),
        (["model.linear=cola", "ttt.target=q_lora"], "ttt.target=q_lora needs dense query projections"),
        (["ttt.target=k"], "ttt.target='k' is not allowed"),
        (["ttt.task.kind=jsonl"], "ttt.task.kind=jsonl needs ttt.task.path"),
        (["ttt.task.depths=[1.5]"], "ttt.task.depths: 1.5 is not a number in"),
        (["ttt.init=/nonexistent/run"], "ttt.init: '/nonexistent/run' is not a run"),
        (["parallel.context=2", "data.seq_len=129"], "parallel.context=2 does not divide data.seq_len=129"),
        (
            ["parallel.pipeline=2", "parallel.zero_stage=1"],
            "parallel.pipeline=2: pipeline parallelism runs in pretraining only; the ttt job",
        ),
    ],
)
def test_bad_input_is_one_line_with_exit_code_2(tmp_path, capsys, overrides, message):
    from megatrain.cli import main

    run = tmp_path / "run"
    code = main(
        ["ttt", "--config", str(REPO / "launch/configs/ttt-tiny-cpu.yaml"), f"run.dir={run}", *TINY_TTT, *overrides]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("megatrain: error: ") and message in lines[0], err
    assert not run.exists()


@pytest.mark.slow
def test_job_with_context_parallel_two_equals_one_process(tmp_path):
    """parallel.context=2 on 2 processes, without ttt.init: the job's pretraining runs context-parallel, then
    each context prefill is split over the two ranks (63 tokens: the split pads and drops a column), adaptation
    and answers run whole on each. The pretraining losses (rtol 1e-5) and the records equal one process's
    (accuracies, answers, FLOPs exactly, span losses to rtol 1e-5); rank 0 alone logs and writes. ~45 s."""
    common = [
        "--config",
        "launch/configs/ttt-tiny-cpu.yaml",
        "train.steps=4",
        "log.every=1",
        "train.micro_batch=4",
        "ttt.pretrain_documents=20",
        "data.seq_len=128",
        *TINY_TTT,
        "ttt.task.context_lengths=[63,96]",
    ]
    run_cli(["ttt", *common, f"run.dir={tmp_path / 'one'}"])
    proc = run_cli(["ttt", "--nproc-per-node", "2", *common, "parallel.context=2", f"run.dir={tmp_path / 'two'}"])
    one, two = (read_metrics(tmp_path / r / "pretrain") for r in ("one", "two"))
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (one, two)
    one, two = (
        [json.loads(line) for line in (tmp_path / r / "ttt.jsonl").read_text().splitlines()] for r in ("one", "two")
    )
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        for key in a:
            if key.startswith("qttt_loss"):
                assert b[key] == pytest.approx(a[key], rel=1e-5), (key, a, b)
            elif key != "seconds":
                assert b[key] == a[key], (key, a, b)
    assert proc.stdout.count("length     63  depth 0.20") == 1 and (tmp_path / "two" / "ttt.png").is_file()


@pytest.mark.parametrize(
    "nproc, overrides, message",
    [
        (3, ["parallel.context=3"], "parallel.context=3 does not divide model.heads=4"),
        (4, ["parallel.context=2"], "the ttt job runs in one context group: 4 processes (--nproc-per-node)"),
        (2, ["parallel.context=2", "parallel.tensor=2"], "parallel.tensor=2: the ttt job runs in one process or one"),
        (2, ["parallel.pipeline=2", "parallel.zero_stage=1"], "pipeline parallelism runs in pretraining only"),
    ],
)
def test_bad_context_layouts_are_one_line_before_any_process(tiny_run, tmp_path, capsys, nproc, overrides, message):
    from megatrain.cli import main

    run = tmp_path / "run"
    args = ["ttt", "--nproc-per-node", str(nproc), "--config", str(REPO / "launch/configs/ttt-tiny-cpu.yaml")]
    code = main([*args, f"ttt.init={tiny_run}", f"run.dir={run}", *TINY_TTT, *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("megatrain: error: ") and message in lines[0], err
    assert not run.exists()


def test_bad_input_through_the_real_command(tmp_path):
    proc = run_cli(
        ["ttt", "--config", "launch/configs/ttt-tiny-cpu.yaml", f"run.dir={tmp_path / 'run'}", "ttt.span=300"],
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("megatrain")] == [
        "megatrain: error: ttt.task.context_lengths: a context of 128 tokens is shorter than ttt.span + 1 = 301 "
        "(a span and the token after it); lower ttt.span or lengthen the contexts"
    ]


def test_cola_checkpoint_refuses_q_lora(tmp_path):
    """A model that has no dense W_Q (CoLA) is refused after loading too, before any work."""
    from megatrain.config import load_config
    from megatrain.errors import ConfigError
    from megatrain.ttt.config import check_against_model

    cfg = load_config("launch/configs/ttt-tiny-cpu.yaml", ["ttt.target=q_lora"])
    model_cfg = load_config(None, ["model.linear=cola"]).model.resolved()
    with pytest.raises(ConfigError, match="model.linear=cola"):
        check_against_model(cfg, model_cfg)
