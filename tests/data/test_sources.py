"""Stage 1: resolving sources, the generated-source registry, file checks, reading documents, the cache root."""

import gzip
import os
from types import SimpleNamespace

import pytest

import megatrain.data
from megatrain.config import Config, DataConfig
from megatrain.data import sources
from megatrain.data.sources import (
    HubSource,
    cache_dir,
    check_files,
    load_documents,
    register_source_kind,
    resolve_sources,
    source_kind,
)
from megatrain.data.tasks import TASK_SOURCES
from megatrain.errors import DataError

from tests.data.synthetic import all_docs, write_sources


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGATRAIN_CACHE", str(tmp_path / "cache"))


# ----------------------------------------------------------------------------------------------
# sources and documents


def test_each_format_gives_its_documents(tmp_path):
    paths, docs = write_sources(tmp_path)
    for path in paths:
        assert list(load_documents([path])) == docs[os.path.basename(path)], path
    assert list(load_documents(paths)) == all_docs(docs)
    assert list(load_documents(paths[::-1])) == [d for n in sorted(docs, reverse=True) for d in docs[n]]
    # the datasets library keeps its cache under ours, not under ~/.cache/huggingface
    assert os.path.isdir(os.path.join(os.environ["MEGATRAIN_CACHE"], "hf_datasets"))


def test_text_field_selects_the_column(tmp_path):
    path = tmp_path / "posts.jsonl"
    path.write_text('{"body": "hello there", "title": "t"}\n{"body": "second", "title": "u"}\n', encoding="utf-8")
    assert list(load_documents([str(path)], text_field="body")) == ["hello there", "second"]


def test_missing_text_field_names_field_fields_and_file(tmp_path):
    path = tmp_path / "posts.jsonl"
    path.write_text('{"body": "hello", "title": "t"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"'text'.*posts\.jsonl.*body, title"):
        list(load_documents([str(path)]))


def test_malformed_json_names_the_file(tmp_path):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text('{"text": "fine"}\n', encoding="utf-8")
    bad.write_text('{"text": "fine"}\n{"text": oops\n', encoding="utf-8")
    with pytest.raises(DataError, match="bad.jsonl"):
        list(load_documents([str(good), str(bad)]))


def test_resolve_directory_glob_list_and_hub(tmp_path):
    paths, _ = write_sources(tmp_path)
    (tmp_path / "README.md").write_text("not data")
    assert resolve_sources(str(tmp_path)) == paths  # supported files only, sorted
    assert resolve_sources(str(tmp_path / "*.txt*")) == [paths[0], paths[1]]
    assert resolve_sources([paths[2], paths[0]]) == [paths[2], paths[0]]  # a list keeps its order
    assert resolve_sources("hf:org/name") == HubSource("org/name", "train")
    assert resolve_sources("hf:org/name:validation") == HubSource("org/name", "validation")


@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda d: str(d / "missing.txt"), r"data.source: file '.*missing\.txt' does not exist"),
        (lambda d: str(d / "nothing*.jsonl"), r"data.source: '.*nothing\*\.jsonl' matches no files"),
        (
            lambda d: (d / "table.csv").write_text("a,b") and str(d / "table.csv"),
            r"table\.csv' has an unsupported extension \(allowed: .txt, .txt.gz, .jsonl",
        ),
        (lambda d: (d / "empty_dir").mkdir() or str(d / "empty_dir"), r"empty_dir' has no"),
        (lambda d: "hf:", r"not of the form hf:NAME"),
    ],
)
def test_resolve_errors(tmp_path, make, pattern):
    with pytest.raises(DataError, match=pattern):
        resolve_sources(make(tmp_path))


def test_embedded_source_uses_the_shipped_corpus(tmp_path, monkeypatch):
    # A stand-in file list, so this test does not depend on the shipped novels.
    from megatrain.data import corpus

    train, val = tmp_path / "one.txt.gz", tmp_path / "held_out.txt.gz"
    monkeypatch.setattr(corpus, "TRAIN_FILES", [train])
    monkeypatch.setattr(corpus, "VAL_FILES", [val])
    assert resolve_sources("embedded") == [str(train)]
    assert resolve_sources("embedded", key="data.val_source") == [str(val)]
    assert megatrain.data._sources(Config().data) == ([str(train)], [str(val)])
    extra = tmp_path / "extra.txt"
    extra.write_text("more")
    assert resolve_sources(["embedded", str(extra)]) == [str(train), str(extra)]


def test_val_source_key_is_named(tmp_path):
    with pytest.raises(DataError, match="^data.val_source: "):
        resolve_sources(str(tmp_path / "nope.txt"), key="data.val_source")


def test_check_files_accepts_good_files(tmp_path):
    paths, _ = write_sources(tmp_path)
    check_files(paths)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=r"data.source: file '.*empty\.txt' is empty"):
        check_files([str(path)])
    gz = tmp_path / "empty.txt.gz"
    with gzip.open(gz, "wb"):
        pass
    with pytest.raises(DataError, match=r"empty\.txt\.gz' is empty"):
        check_files([str(gz)])


def test_non_utf8_reports_the_offset(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_READ_CHUNK_BYTES", 64)  # the bad byte and a split character cross chunks
    head = ("naïve café " * 100).encode("utf-8")  # 1300 bytes
    bad = head + b"\xff" + head
    path = tmp_path / "latin.txt"
    path.write_bytes(bad)
    with pytest.raises(DataError, match=r"latin\.txt' is not valid UTF-8 \(first bad byte at offset 1300\)"):
        check_files([str(path)])
    gz = tmp_path / "latin.jsonl.gz"
    with gzip.open(gz, "wb") as fh:
        fh.write(bad)
    with pytest.raises(DataError, match=r"latin\.jsonl\.gz' is not valid UTF-8 .*offset 1300"):
        check_files([str(gz)], key="data.val_source")
    truncated = tmp_path / "cut.txt"
    truncated.write_bytes("日本".encode("utf-8")[:-1])
    with pytest.raises(DataError, match=r"cut\.txt' is not valid UTF-8 \(first bad byte at offset 3\)"):
        check_files([str(truncated)])


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "broken.txt.gz"
    path.write_bytes(b"this is not gzip data")
    with pytest.raises(DataError, match=r"broken\.txt\.gz' is not a valid gzip file"):
        check_files([str(path)])


def test_cache_dir_precedence(tmp_path, monkeypatch):
    explicit = tmp_path / "explicit"
    assert cache_dir(DataConfig(cache_dir=str(explicit))) == str(explicit) and explicit.is_dir()
    monkeypatch.setenv("MEGATRAIN_CACHE", str(tmp_path / "from_env"))
    assert cache_dir(DataConfig()) == str(tmp_path / "from_env")
    monkeypatch.delenv("MEGATRAIN_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir(DataConfig()) == str(tmp_path / "home" / ".cache" / "megatrain")


# ----------------------------------------------------------------------------------------------
# generated sources: the registry


@pytest.mark.parametrize(
    "spec", ["embedded", "hf:org/name", "books/*.txt", "C:\\data\\a.txt", "other:x", ["task:multikey"], None, 3]
)
def test_text_sources_have_no_kind(spec):
    assert source_kind(spec) is None


def test_task_sources_are_registered_when_the_package_is_imported():
    assert source_kind("task:multikey") is TASK_SOURCES
    assert source_kind("task:not_a_task") is TASK_SOURCES  # the kind's validate names the bad task


def test_register_refuses_a_taken_or_reserved_prefix(monkeypatch):
    monkeypatch.setattr(sources, "_KINDS", dict(sources._KINDS))
    register_source_kind(TASK_SOURCES)  # the same kind again is harmless
    with pytest.raises(ValueError, match="'task:' is already registered"):
        register_source_kind(SimpleNamespace(prefix="task"))
    for prefix in ("hf", "", "a:b"):
        with pytest.raises(ValueError, match="must be a non-empty name other than 'hf'"):
            register_source_kind(SimpleNamespace(prefix=prefix))
    other = SimpleNamespace(prefix="synthetic")
    register_source_kind(other)
    assert source_kind("synthetic:anything") is other


def test_read_jsonl_records_names_the_key_file_and_line(tmp_path):
    from megatrain.data.sources import read_jsonl_records
    from megatrain.errors import DataError

    good = tmp_path / "good.jsonl"
    good.write_text('{"a": 1}\n\n{"a": 2}\n', encoding="utf-8")
    assert list(read_jsonl_records(str(good), "x.path")) == [(1, {"a": 1}), (3, {"a": 2})]
    cases = {
        "missing.jsonl": (None, "x.path: file .* does not exist"),
        "empty.jsonl": ("\n  \n", "x.path: .* holds no records"),
        "list.jsonl": ('{"a": 1}\n[1, 2]\n', "line 2 is not a JSON object"),
        "broken.jsonl": ('{"a": 1}\n{"a": \n', "line 2 is not valid JSON"),
        "latin1.jsonl": (b'{"a": "caf\xe9"}\n', "is not UTF-8 text"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content, encoding="utf-8")
        with pytest.raises(DataError, match=message):
            list(read_jsonl_records(str(path), "x.path"))
