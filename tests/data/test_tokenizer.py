"""Tokenizer training, loading, round trips and the trained-tokenizer cache."""

import os

import pytest

from megatrain.config import DataConfig
from megatrain.data import tokenizer as tokenizer_module
from megatrain.data.tokenizer import Tokenizer, get_tokenizer, tokenizer_cache_path, train_tokenizer
from megatrain.errors import DataError

from tests.data.synthetic import english_like


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGATRAIN_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    paths = []
    for i in range(2):
        path = root / f"part{i}.txt"
        path.write_text(english_like(i, 600), encoding="utf-8")
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("tok") / "small"
    return Tokenizer(train_tokenizer(corpus, str(prefix), vocab_size=400))


def test_train_writes_model_and_vocab(trained):
    assert trained.path.endswith("small.model") and os.path.isfile(trained.path)
    vocab_file = trained.path[: -len(".model")] + ".vocab"
    with open(vocab_file, encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    assert len(lines) == trained.vocab_size == 400
    assert [line.split("\t")[0] for line in lines[:4]] == ["<unk>", "<s>", "</s>", "<pad>"]
    # no temporary files left beside the model
    assert sorted(os.listdir(os.path.dirname(trained.path))) == ["small.model", "small.vocab"]


@pytest.mark.parametrize(
    "text",
    [
        "Elizabeth walked quickly towards the garden.",
        "  leading spaces, trailing spaces  ",
        "tabs\tand\n\nnewlines\r\n and   runs of   spaces",
        "café – naïve 日本",
        "emoji 🙂 and math ∑x² ≠ 0, Ωμέγα, привет",
        "digits 1234567890 and 3.14159",
        "",
    ],
)
def test_round_trip_is_exact(trained, text):
    ids = trained.encode(text)
    assert trained.decode(ids) == text
    assert all(0 <= i < trained.vocab_size for i in ids)
    assert 0 not in ids  # byte fallback: no <unk> for characters outside the vocabulary


def test_common_words_become_few_pieces(trained):
    text = "Elizabeth said to her sister"
    assert len(trained.encode(text)) < len(text) // 2


def test_special_ids(trained):
    assert (trained.bos_id, trained.eos_id, trained.pad_id) == (1, 2, 3)
    ids = trained.encode("Jane answered", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert ids[1:-1] == trained.encode("Jane answered")
    assert trained.decode(ids) == "Jane answered"
    assert trained.decode([1, 2, 3]) == ""


def test_encode_batch_matches_encode(trained):
    texts = ["the garden", "café", "", "Mr. Darcy replied."]
    assert trained.encode_batch(texts) == [trained.encode(t) for t in texts]


def test_training_is_deterministic(corpus, trained, tmp_path):
    again = train_tokenizer(list(reversed(corpus)), str(tmp_path / "elsewhere" / "other"), vocab_size=400)
    with open(again, "rb") as a, open(trained.path, "rb") as b:
        assert a.read() == b.read()


def test_impossible_vocab_size_is_a_data_error(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("ab ba ab ba\n" * 50, encoding="utf-8")
    with pytest.raises(DataError, match="vocab_size=5000 is too large"):
        train_tokenizer([str(path)], str(tmp_path / "tok"), vocab_size=5000)
    with pytest.raises(DataError, match=r"vocab_size=100 is too small .* at least 26\d"):
        train_tokenizer([str(path)], str(tmp_path / "tok"), vocab_size=100)  # 256 bytes + 4 specials + chars
    assert not os.path.exists(tmp_path / "tok.model")


def test_unigram_tokenizer_round_trips(corpus, tmp_path):
    tok = Tokenizer(train_tokenizer(corpus, str(tmp_path / "uni"), vocab_size=350, model_type="unigram"))
    text = "Elizabeth – naïve café 日本"
    assert tok.decode(tok.encode(text)) == text


def test_get_tokenizer_trains_once_and_reuses(corpus, tmp_path, monkeypatch):
    cfg = DataConfig(vocab_size=320, cache_dir=str(tmp_path / "c"))
    first = get_tokenizer(cfg, corpus)
    assert first.path == tokenizer_cache_path(cfg, corpus)
    assert first.path.startswith(str(tmp_path / "c" / "tokenizers") + os.sep)
    mtime = os.stat(first.path).st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("get_tokenizer retrained a cached tokenizer")

    monkeypatch.setattr(tokenizer_module, "train_tokenizer", no_training)
    second = get_tokenizer(cfg, list(reversed(corpus)))  # file order does not change the key
    assert second.path == first.path
    assert os.stat(second.path).st_mtime_ns == mtime
    assert second.sha256 == first.sha256


def test_cache_key_follows_settings_and_files(corpus, tmp_path):
    cfg = DataConfig(vocab_size=320, cache_dir=str(tmp_path / "c"))
    base = tokenizer_cache_path(cfg, corpus)
    assert tokenizer_cache_path(DataConfig(vocab_size=330, cache_dir=cfg.cache_dir), corpus) != base
    assert (
        tokenizer_cache_path(DataConfig(vocab_size=320, tokenizer_type="unigram", cache_dir=cfg.cache_dir), corpus)
        != base
    )
    assert tokenizer_cache_path(DataConfig(vocab_size=320, text_field="body", cache_dir=cfg.cache_dir), corpus) != base
    edited = tmp_path / "edited.txt"
    edited.write_text("one version\n", encoding="utf-8")
    before = tokenizer_cache_path(cfg, [str(edited)])
    edited.write_text("another, longer version\n", encoding="utf-8")
    assert tokenizer_cache_path(cfg, [str(edited)]) != before


def test_get_tokenizer_without_training_says_what_to_do(corpus, tmp_path):
    cfg = DataConfig(vocab_size=300, cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match="prepare_data"):
        get_tokenizer(cfg, corpus, allow_train=False)


def test_get_tokenizer_loads_a_given_model(trained):
    tok = get_tokenizer(DataConfig(tokenizer=trained.path), train_files=[])
    assert tok.path == trained.path and tok.vocab_size == trained.vocab_size


@pytest.mark.parametrize("content", [None, b"", b"this is plain text, not a model\n", b"\x00\xff\x10garbage"])
def test_bad_model_file_is_a_data_error(tmp_path, content):
    path = tmp_path / "broken.model"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match="broken.model") as info:
        Tokenizer(str(path))
    assert "\n" not in str(info.value)


def test_cache_key_recipe_is_stable(tmp_path):
    # Cached tokenizers stay valid only while the key is computed exactly this way (trainer version 1).
    import hashlib
    import json

    paths = []
    for name, text in (("b.txt", "second\n"), ("a.txt", "first one\n")):
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        os.utime(path, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
        paths.append(str(path))
    cfg = DataConfig(vocab_size=320, tokenizer_type="unigram", text_field="body", cache_dir=str(tmp_path / "c"))
    material = {
        "trainer_version": 1,
        "vocab_size": 320,
        "tokenizer_type": "unigram",
        "text_field": "body",
        "sources": [[paths[1], 10, 1_600_000_000_000_000_000], [paths[0], 7, 1_600_000_000_000_000_000]],
    }
    key = hashlib.sha256(json.dumps(material, sort_keys=True).encode("utf-8")).hexdigest()
    assert tokenizer_cache_path(cfg, paths) == str(tmp_path / "c" / "tokenizers" / f"{key}.model")
