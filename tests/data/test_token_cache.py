"""Stage 3: token caches (documents with EOS, chunked encoding, reuse, concurrent builds, rebuilds)."""

import json
import os

import numpy as np
import pytest

from megatrain.data import token_cache
from megatrain.data.token_cache import TokenArray, build_token_cache, open_token_cache, token_cache_path
from megatrain.data.tokenizer import Tokenizer, train_tokenizer
from megatrain.errors import DataError

from tests.data.synthetic import all_docs, english_like, write_sources


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGATRAIN_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    text = root / "train.txt"
    text.write_text(english_like(0, 800), encoding="utf-8")
    return Tokenizer(train_tokenizer([str(text)], str(root / "tok"), vocab_size=400, cache_root=str(root / "cache")))


def test_token_cache_is_documents_with_eos(tmp_path, tokenizer):
    paths, by_file = write_sources(tmp_path)
    docs = all_docs(by_file)
    path = build_token_cache(paths, tokenizer, str(tmp_path / "cache"))
    tokens = TokenArray(path)
    expected = [t for d in docs for t in tokenizer.encode(d) + [tokenizer.eos_id]]
    assert tokens[:].tolist() == expected
    assert tokens.dtype == np.uint16 and len(tokens) == len(expected)
    assert tokens.meta["num_docs"] == len(docs) == int((tokens[:] == tokenizer.eos_id).sum())
    assert tokens.meta["tokenizer"]["sha256"] == tokenizer.sha256
    assert tokens.meta["sources"] == paths
    # the token stream decodes back to the documents
    eos = [i for i, t in enumerate(expected) if t == tokenizer.eos_id]
    assert tokenizer.decode(expected[eos[0] + 1 : eos[1]]) == docs[1]


def test_chunked_encoding_equals_whole_documents(tmp_path, tokenizer, monkeypatch):
    docs = [english_like(5, 40), "no newline at all " * 30, "x\n" * 50 + "tail"]
    with open(tmp_path / "docs.jsonl", "w", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps({"text": d}) + "\n")
    monkeypatch.setattr(token_cache, "_ENCODE_CHUNK_CHARS", 37)
    monkeypatch.setattr(token_cache, "_ENCODE_BATCH_CHARS", 101)
    tokens = TokenArray(build_token_cache([str(tmp_path / "docs.jsonl")], tokenizer, str(tmp_path / "c")))
    assert tokens[:].tolist() == [t for d in docs for t in tokenizer.encode(d) + [tokenizer.eos_id]]


def test_tokenizer_with_dummy_prefix_encodes_documents_whole(tmp_path, monkeypatch):
    # A user's sentencepiece model (defaults: "▁" prepended to every encoded string) must not get a
    # spurious space at each chunk boundary.
    import sentencepiece as spm

    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(english_like(3, 300).splitlines()),
        model_prefix=str(tmp_path / "user"),
        vocab_size=120,
        minloglevel=2,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
    )
    user = Tokenizer(str(tmp_path / "user.model"))
    doc = english_like(4, 30)
    assert user.encode(doc) != [t for line in doc.splitlines(keepends=True) for t in user.encode(line)]
    (tmp_path / "doc.txt").write_text(doc, encoding="utf-8")
    monkeypatch.setattr(token_cache, "_ENCODE_CHUNK_CHARS", 50)
    tokens = TokenArray(build_token_cache([str(tmp_path / "doc.txt")], user, str(tmp_path / "c")))
    assert tokens[:].tolist() == user.encode(doc) + [user.eos_id]


def test_token_cache_is_reused_and_keyed_by_content(tmp_path, tokenizer):
    paths, _ = write_sources(tmp_path)
    root = str(tmp_path / "cache")
    first = build_token_cache(paths, tokenizer, root)
    stamps = (os.stat(first).st_mtime_ns, os.stat(first[:-4] + ".json").st_mtime_ns)
    second = build_token_cache(paths, tokenizer, root)
    assert second == first
    assert (os.stat(second).st_mtime_ns, os.stat(second[:-4] + ".json").st_mtime_ns) == stamps
    assert sorted(os.listdir(os.path.dirname(first))) == sorted(
        os.path.basename(p) for p in (first, first[:-4] + ".json")
    )  # no temporary files left
    # other text field, other files or edited files: another entry
    assert build_token_cache(paths[:1], tokenizer, root) != first
    with open(paths[0], "a", encoding="utf-8") as fh:
        fh.write("One more line.\n")
    assert build_token_cache(paths, tokenizer, root) != first


def _build_after_barrier(barrier, paths, tokenizer, root, results):
    barrier.wait()
    results.put(build_token_cache(paths, tokenizer, root))


def test_concurrent_builds_agree(tmp_path, tokenizer):
    # Several nodes preparing the same data on a shared filesystem at the same moment.
    import multiprocessing

    paths, by_file = write_sources(tmp_path)
    root = str(tmp_path / "shared")
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [
        ctx.Process(target=_build_after_barrier, args=(barrier, paths, tokenizer, root, results)) for _ in range(3)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
    assert [proc.exitcode for proc in procs] == [0, 0, 0]
    built = {results.get(timeout=5) for _ in procs}
    assert len(built) == 1
    path = built.pop()
    expected = [t for d in all_docs(by_file) for t in tokenizer.encode(d) + [tokenizer.eos_id]]
    assert TokenArray(path)[:].tolist() == expected
    assert not [name for name in os.listdir(os.path.dirname(path)) if ".tmp." in name]


def test_incomplete_cache_entry_is_rebuilt(tmp_path, tokenizer):
    paths, _ = write_sources(tmp_path)
    root = str(tmp_path / "cache")
    path = build_token_cache(paths, tokenizer, root)
    full = TokenArray(path)[:].copy()
    with open(path, "r+b") as fh:  # as if a crash left a short .bin beside old metadata
        fh.truncate(10)
    with pytest.raises(DataError, match="missing or incomplete"):
        TokenArray(path)
    assert build_token_cache(paths, tokenizer, root) == path
    assert np.array_equal(TokenArray(path)[:], full)


def test_open_finds_what_build_wrote_and_names_the_key_otherwise(tmp_path, tokenizer):
    paths, _ = write_sources(tmp_path)
    root = str(tmp_path / "cache")
    with pytest.raises(DataError, match=r"^data.val_source: no token cache at .*megatrain.data.prepare_data"):
        open_token_cache(paths, tokenizer, root, key="data.val_source")
    built = build_token_cache(paths, tokenizer, root)
    assert built == token_cache_path(paths, tokenizer, root)
    opened = open_token_cache(paths, tokenizer, root)
    assert opened.path == built and len(opened) == opened.meta["num_tokens"]


def test_cache_key_recipe_is_stable(tmp_path):
    # Existing caches stay valid only while the key is computed exactly this way (format version 1).
    import hashlib
    from types import SimpleNamespace

    path = tmp_path / "a.txt"
    path.write_text("some text\n", encoding="utf-8")
    os.utime(path, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    fake_tokenizer = SimpleNamespace(sha256="ab" * 32)
    material = {
        "version": 1,
        "sources": [[str(path), 10, 1_700_000_000_000_000_000]],
        "tokenizer_sha256": "ab" * 32,
        "text_field": "body",
    }
    key = hashlib.sha256(json.dumps(material, sort_keys=True).encode("utf-8")).hexdigest()
    assert token_cache_path([str(path)], fake_tokenizer, "/c", "body") == os.path.join("/c", "tokens", key + ".bin")
