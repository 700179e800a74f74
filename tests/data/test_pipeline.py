"""The data entry points composing the stages: check_sources, prepare_data, open_data."""

import json

import numpy as np
import pytest

from megatrain.config import Config
from megatrain.data import check_sources, open_data, prepare_data
from megatrain.data.sampler import PackedBlocks
from megatrain.data.tasks import TaskBlocks, TaskTokenizer
from megatrain.errors import DataError

from tests.data.synthetic import english_like


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGATRAIN_CACHE", str(tmp_path / "cache"))


def make_config(tmp_path, **data):
    cfg = Config()
    cfg.data.vocab_size = 400
    cfg.data.seq_len = 32
    cfg.data.cache_dir = str(tmp_path / "cache")
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def test_prepare_then_open_holds_out_a_tail(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"book{i}.txt").write_text(english_like(10 + i, 150), encoding="utf-8")
    cfg = make_config(tmp_path, source=str(corpus), val_fraction=0.1)
    with pytest.raises(DataError, match="prepare_data"):
        open_data(cfg)
    prepare_data(cfg)
    prepare_data(cfg)  # idempotent
    data = open_data(cfg)
    assert data.vocab_size == data.tokenizer.vocab_size == 400
    total = PackedBlocks.num_blocks_in(len(data.train.tokens), 32)
    held_out = int(total * 0.1)
    assert held_out >= 1
    assert (len(data.train), len(data.val)) == (total - held_out, held_out)
    assert data.val.start_block == data.train.end_block == total - held_out
    inputs, labels = data.train.batch([0, 1])
    assert inputs.shape == (2, 32) and int(inputs.max()) < 400
    assert data.tokenizer.decode(inputs[0].tolist()) in (corpus / "book0.txt").read_text(encoding="utf-8")


def test_open_with_val_source_and_tiny_holdout(tmp_path):
    train, val = tmp_path / "train.txt", tmp_path / "val.jsonl"
    train.write_text(english_like(1, 200), encoding="utf-8")
    val.write_text(json.dumps({"text": english_like(2, 20)}) + "\n", encoding="utf-8")
    cfg = make_config(tmp_path, source=str(train), val_source=str(val))
    prepare_data(cfg)
    data = open_data(cfg)
    assert data.train.start_block == 0 and data.train.end_block == len(data.train)
    assert data.val.tokens.path != data.train.tokens.path and len(data.val) >= 1
    # a hold-out fraction below one block gives no validation set
    no_val = make_config(tmp_path, source=str(train), val_fraction=0.0)
    assert open_data(no_val).val is None


def test_prepare_reports_bad_files_by_key(tmp_path):
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text(english_like(1, 50), encoding="utf-8")
    bad.write_bytes(b"caf\xe9\n")
    cfg = make_config(tmp_path, source=[str(good)], val_source=str(bad))
    with pytest.raises(DataError, match=r"^data.val_source: file '.*bad\.txt' is not valid UTF-8 .*offset 3"):
        prepare_data(cfg)


def test_a_task_source_opens_through_its_kind(tmp_path):
    cfg = make_config(tmp_path, source="task:multihop", seq_len=24)
    assert check_sources(cfg) == (None, None)
    prepare_data(cfg)  # nothing to prepare: no tokenizer, no token cache
    assert not (tmp_path / "cache").exists()
    data = open_data(cfg)
    assert isinstance(data.tokenizer, TaskTokenizer) and data.vocab_size == cfg.data.task.symbols + 4
    assert isinstance(data.train, TaskBlocks) and isinstance(data.val, TaskBlocks)
    assert (data.train.split, data.val.split) == (0, 1) and data.train.seq_len == 24


def test_any_registered_kind_is_composed_without_special_cases(tmp_path, monkeypatch):
    # A kind the entry points have never heard of: they ask the registry, not the prefix.
    from types import SimpleNamespace

    from megatrain.data import sources

    monkeypatch.setattr(sources, "_KINDS", dict(sources._KINDS))
    blocks = PackedBlocks(np.arange(50), 4)
    kind = SimpleNamespace(prefix="counting", open=lambda d: (SimpleNamespace(vocab_size=50), blocks, None))
    sources.register_source_kind(kind)
    cfg = make_config(tmp_path, source="counting:up")
    assert check_sources(cfg) == (None, None)
    prepare_data(cfg)
    data = open_data(cfg)
    assert (data.train, data.val, data.vocab_size) == (blocks, None, 50)
