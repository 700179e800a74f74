"""Sources, file checks, token caches, packed blocks, resumable sampling and prepare/open."""

import gzip
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from megatrain.config import Config
from megatrain.data import dataset as ds
from megatrain.data.dataset import (
    HubSource, PackedBlocks, ResumableSampler, TokenArray, build_token_cache, check_files, load_documents,
    open_data, prepare_data, resolve_sources, val_batches,
)
from megatrain.data.tokenizer import Tokenizer, train_tokenizer
from megatrain.errors import DataError

from tests.data.synthetic import english_like


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGATRAIN_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    text = root / "train.txt"
    text.write_text(english_like(0, 800), encoding="utf-8")
    return Tokenizer(train_tokenizer([str(text)], str(root / "tok"), vocab_size=400,
                                     cache_root=str(root / "cache")))


def write_sources(root):
    """One small file per format. Returns (paths sorted by name, {file name: its documents})."""
    docs = {"a.txt": ["Elizabeth walked.\nThe garden was quiet.\n"],
            "b.txt.gz": ["Café – naïve 日本.\nJane answered.\n"],
            "c.jsonl": ["first record", "second record, café"],
            "d.parquet": ["parquet one", "parquet two"],
            "e.json": ["json array one", "json array two"]}
    (root / "a.txt").write_text(docs["a.txt"][0], encoding="utf-8")
    with gzip.open(root / "b.txt.gz", "wt", encoding="utf-8") as fh:
        fh.write(docs["b.txt.gz"][0])
    with open(root / "c.jsonl", "w", encoding="utf-8") as fh:
        for i, text in enumerate(docs["c.jsonl"]):
            fh.write(json.dumps({"id": i, "text": text}, ensure_ascii=False) + "\n")
    pq.write_table(pa.table({"text": docs["d.parquet"], "n": [1, 2]}), root / "d.parquet")
    (root / "e.json").write_text(json.dumps([{"text": t} for t in docs["e.json"]]), encoding="utf-8")
    return [str(root / name) for name in sorted(docs)], docs


def all_docs(docs):
    return [d for name in sorted(docs) for d in docs[name]]


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


@pytest.mark.parametrize("make, pattern", [
    (lambda d: str(d / "missing.txt"), r"data.source: file '.*missing\.txt' does not exist"),
    (lambda d: str(d / "nothing*.jsonl"), r"data.source: '.*nothing\*\.jsonl' matches no files"),
    (lambda d: (d / "table.csv").write_text("a,b") and str(d / "table.csv"),
     r"table\.csv' has an unsupported extension \(allowed: .txt, .txt.gz, .jsonl"),
    (lambda d: (d / "empty_dir").mkdir() or str(d / "empty_dir"), r"empty_dir' has no"),
    (lambda d: "hf:", r"not of the form hf:NAME"),
])
def test_resolve_errors(tmp_path, make, pattern):
    with pytest.raises(DataError, match=pattern):
        resolve_sources(make(tmp_path))


def test_embedded_source_uses_the_shipped_corpus(tmp_path, monkeypatch):
    # A stand-in corpus module, so this test does not depend on the shipped novels.
    import megatrain.data
    from types import SimpleNamespace

    train, val = tmp_path / "one.txt.gz", tmp_path / "held_out.txt.gz"
    fake = SimpleNamespace(TRAIN_FILES=[train], VAL_FILES=[val])
    monkeypatch.setattr(megatrain.data, "corpus", fake, raising=False)
    assert resolve_sources("embedded") == [str(train)]
    assert resolve_sources("embedded", key="data.val_source") == [str(val)]
    assert ds._sources(Config().data) == ([str(train)], [str(val)])
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
    monkeypatch.setattr(ds, "_READ_CHUNK_BYTES", 64)  # the bad byte and a split character cross chunks
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


# ----------------------------------------------------------------------------------------------
# token cache


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
    assert tokenizer.decode(expected[eos[0] + 1:eos[1]]) == docs[1]


def test_chunked_encoding_equals_whole_documents(tmp_path, tokenizer, monkeypatch):
    docs = [english_like(5, 40), "no newline at all " * 30, "x\n" * 50 + "tail"]
    with open(tmp_path / "docs.jsonl", "w", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps({"text": d}) + "\n")
    monkeypatch.setattr(ds, "_ENCODE_CHUNK_CHARS", 37)
    monkeypatch.setattr(ds, "_ENCODE_BATCH_CHARS", 101)
    tokens = TokenArray(build_token_cache([str(tmp_path / "docs.jsonl")], tokenizer, str(tmp_path / "c")))
    assert tokens[:].tolist() == [t for d in docs for t in tokenizer.encode(d) + [tokenizer.eos_id]]


def test_tokenizer_with_dummy_prefix_encodes_documents_whole(tmp_path, monkeypatch):
    # A user's sentencepiece model (defaults: "▁" prepended to every encoded string) must not get a
    # spurious space at each chunk boundary.
    import sentencepiece as spm

    spm.SentencePieceTrainer.Train(sentence_iterator=iter(english_like(3, 300).splitlines()),
                                   model_prefix=str(tmp_path / "user"), vocab_size=120, minloglevel=2,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False)
    user = Tokenizer(str(tmp_path / "user.model"))
    doc = english_like(4, 30)
    assert user.encode(doc) != [t for line in doc.splitlines(keepends=True) for t in user.encode(line)]
    (tmp_path / "doc.txt").write_text(doc, encoding="utf-8")
    monkeypatch.setattr(ds, "_ENCODE_CHUNK_CHARS", 50)
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
        os.path.basename(p) for p in (first, first[:-4] + ".json"))  # no temporary files left
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
    procs = [ctx.Process(target=_build_after_barrier, args=(barrier, paths, tokenizer, root, results))
             for _ in range(3)]
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


# ----------------------------------------------------------------------------------------------
# packed blocks


def test_packed_blocks_shapes_and_shift():
    tokens = np.arange(1000, dtype=np.uint16)
    blocks = PackedBlocks(tokens, seq_len=16)
    assert len(blocks) == (1000 - 1) // 16
    block = blocks[3]
    assert block.dtype == torch.int64 and block.shape == (17,)
    assert block.tolist() == list(range(48, 65))
    inputs, labels = blocks.batch([0, 5, 2])
    assert inputs.shape == labels.shape == (3, 16)
    assert inputs.dtype == labels.dtype == torch.int64
    assert torch.equal(labels[:, :-1], inputs[:, 1:])
    assert labels[1].tolist() == list(range(81, 97))
    with pytest.raises(IndexError):
        blocks[len(blocks)]


def test_every_token_is_a_label_exactly_once():
    tokens = np.arange(1, 530, dtype=np.int64)  # distinct values so positions can be traced
    blocks = PackedBlocks(torch.from_numpy(tokens), seq_len=8)
    _, labels = blocks.batch(range(len(blocks)))
    flat = labels.flatten().tolist()
    assert len(flat) == len(set(flat))
    assert flat == tokens[1:1 + len(blocks) * 8].tolist()


def test_block_ranges_split_one_array():
    tokens = np.arange(101, dtype=np.int32)
    train, val = PackedBlocks(tokens, 10, 0, 8), PackedBlocks(tokens, 10, 8)
    assert (len(train), len(val)) == (8, 2)
    assert val[0].tolist() == list(range(80, 91))
    assert train[7][-1] == val[0][0]  # only the boundary token is shared
    with pytest.raises(ValueError):
        PackedBlocks(tokens, 10, 5, 20)


def test_too_few_tokens_for_one_block():
    with pytest.raises(DataError, match=r"data.seq_len=64 needs at least 65 tokens .* has 40"):
        PackedBlocks(np.arange(40), seq_len=64)


# ----------------------------------------------------------------------------------------------
# sampling


def take(sampler, steps):
    return [sampler.next_step() for _ in range(steps)]


def flat(step):
    return [i for micro in step for i in micro]


def test_sampler_shapes_and_determinism():
    a = ResumableSampler(100, global_batch=16, micro_batch=2, dp_rank=1, dp_size=2, seed=7)
    b = ResumableSampler(100, global_batch=16, micro_batch=2, dp_rank=1, dp_size=2, seed=7)
    steps = take(a, 5)
    assert steps == take(b, 5)
    assert all(len(step) == 4 and all(len(m) == 2 for m in step) for step in steps)
    assert a.consumed_samples == 80
    other_seed = ResumableSampler(100, global_batch=16, micro_batch=2, dp_rank=1, dp_size=2, seed=8)
    assert take(other_seed, 5) != steps


@pytest.mark.parametrize("micro", [1, 2])
def test_union_over_ranks_equals_single_rank(micro):
    gb, dp, steps = 8, 4, 8  # 30 blocks: steps 3 and 7 cross an epoch boundary
    single = take(ResumableSampler(30, gb, micro * dp, 0, 1, seed=3), steps)
    ranks = [take(ResumableSampler(30, gb, micro, r, dp, seed=3), steps) for r in range(dp)]
    for s in range(steps):
        per_rank = [flat(ranks[r][s]) for r in range(dp)]
        assert all(len(ranks[r][s]) == gb // (micro * dp) for r in range(dp))
        # rank r holds the r-th contiguous slice of the single-process step
        assert [i for part in per_rank for i in part] == flat(single[s])


def test_ranks_are_disjoint_within_an_epoch():
    dp, gb = 4, 16
    ranks = [ResumableSampler(64, gb, 2, r, dp, seed=1) for r in range(dp)]
    for _ in range(4):  # one epoch: 64 blocks = 4 steps
        parts = [set(flat(sampler.next_step())) for sampler in ranks]
        assert sum(len(p) for p in parts) == len(set().union(*parts)) == gb


def test_resume_continues_identically():
    reference = ResumableSampler(50, 12, 3, dp_rank=2, dp_size=4, seed=11)
    expected = take(reference, 9)
    first = ResumableSampler(50, 12, 3, dp_rank=2, dp_size=4, seed=11)
    take(first, 4)
    state = first.state_dict()
    assert state == {"consumed_samples": 48, "seed": 11, "num_blocks": 50}
    resumed = ResumableSampler(50, 12, 3, dp_rank=2, dp_size=4, seed=999)  # the saved seed wins
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert take(resumed, 5) == expected[4:]
    started_there = ResumableSampler(50, 12, 3, dp_rank=2, dp_size=4, seed=11, consumed_samples=48)
    assert take(started_there, 5) == expected[4:]


def test_epochs_are_permutations_and_steps_cross_them():
    n, gb = 10, 4
    sampler = ResumableSampler(n, gb, 2, 0, 1, seed=5)
    stream = [i for step in take(sampler, 10) for i in flat(step)]  # 40 positions = 4 epochs
    epochs = [stream[e * n:(e + 1) * n] for e in range(4)]
    assert all(sorted(e) == list(range(n)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 4  # each epoch reshuffles
    assert sampler.epoch == 4
    gen = torch.Generator().manual_seed(5 * 1000003 + 1)
    assert epochs[1] == torch.randperm(n, generator=gen).tolist()


def test_sampler_validation():
    with pytest.raises(ValueError, match=r"global_batch=10 is not a multiple of micro_batch x dp_size = 2 x 4"):
        ResumableSampler(100, 10, 2, 0, 4, seed=0)
    with pytest.raises(ValueError, match="dp_rank"):
        ResumableSampler(100, 8, 2, 4, 4, seed=0)
    sampler = ResumableSampler(100, 8, 2, 0, 4, seed=0)
    with pytest.raises(DataError, match="100"):
        sampler.load_state_dict({"consumed_samples": 8, "seed": 0, "num_blocks": 90})


def test_val_batches_shard_and_wrap():
    per_rank = [val_batches(7, micro_batch=2, dp_rank=r, dp_size=2, num_batches=3) for r in range(2)]
    assert per_rank[0] == [[0, 1], [4, 5], [1, 2]]
    assert per_rank[1] == [[2, 3], [6, 0], [3, 4]]
    blocks = PackedBlocks(np.arange(100), 9)
    assert val_batches(blocks, 3, 0, 1, 2) == [[0, 1, 2], [3, 4, 5]]


# ----------------------------------------------------------------------------------------------
# prepare / open


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
