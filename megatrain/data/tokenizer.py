"""Stage 2 of the data path: sentencepiece tokenizers (loading, training on a source, a content-keyed cache).

Every tokenizer megatrain trains has the same layout, so token arrays and models can rely on it:

| id | piece   | use                                         |
|----|---------|---------------------------------------------|
| 0  | `<unk>` | never produced for text (byte fallback)      |
| 1  | `<s>`   | BOS                                          |
| 2  | `</s>`  | EOS, written after every document            |
| 3  | `<pad>` | padding                                      |

Training keeps the text as it is (identity normalisation, spaces kept, no dummy prefix) and falls
back to UTF-8 bytes for characters outside the vocabulary, so `decode(encode(text)) == text` for
any string. Without a dummy prefix, encoding a document piece by piece at newlines gives the same ids
as encoding it whole (no piece contains a newline), which `token_cache.build_token_cache` relies on to
encode long documents in parallel chunks.

Settings come from the run's data section, read duck-typed (`data_cfg.tokenizer`, `.vocab_size`,
`.tokenizer_type`, `.text_field`, `.cache_dir`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import uuid
from typing import Iterable, Iterator, Optional

import sentencepiece as spm

from megatrain.data.sources import Source, cache_dir, describe_source, load_documents, source_fingerprint
from megatrain.errors import DataError

__all__ = ["Tokenizer", "train_tokenizer", "get_tokenizer", "tokenizer_cache_path"]

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3

# Bump when the training options below change, so cached tokenizers from older options are not reused.
_TRAINER_VERSION = 1
# Sentencepiece drops training sentences longer than max_sentence_length bytes; lines are cut to
# this many characters (at most 4 UTF-8 bytes each) so nothing is silently skipped.
_TRAIN_LINE_CHARS = 4096
# Sentences sentencepiece keeps in memory; beyond this it reservoir-samples with the fixed seed below.
_MAX_TRAIN_SENTENCES = 1_000_000
_TRAIN_SEED = 20240601
# Unigram training gives slightly different models for different thread counts, so the count is a
# constant rather than os.cpu_count(): nodes that train the same tokenizer must agree on it.
_TRAIN_THREADS = 8


class Tokenizer:
    """A sentencepiece model: `encode(text) -> ids`, `decode(ids) -> text`.

    Args:
        model_path: a sentencepiece `.model` file.

    Raises:
        DataError: the file is missing, unreadable, empty or not a sentencepiece model.
    """

    def __init__(self, model_path: str):
        path = os.path.abspath(os.path.expanduser(str(model_path)))
        if not os.path.isfile(path):
            raise DataError(f"tokenizer file '{model_path}' does not exist")
        try:
            with open(path, "rb") as fh:
                proto = fh.read()
        except OSError as exc:
            raise DataError(f"tokenizer file '{model_path}' cannot be read: {exc.strerror}") from None
        if not proto:
            raise DataError(f"tokenizer file '{model_path}' is empty")
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError, ValueError):
            raise DataError(f"tokenizer file '{model_path}' is not a sentencepiece model") from None
        if processor.GetPieceSize() < 1:
            raise DataError(f"tokenizer file '{model_path}' is not a sentencepiece model (no pieces)")
        self._processor = processor
        self._path = path
        self._sha256 = hashlib.sha256(proto).hexdigest()

    def __repr__(self) -> str:
        return f"Tokenizer('{self._path}', vocab_size={self.vocab_size})"

    @property
    def path(self) -> str:
        """Absolute path of the `.model` file."""
        return self._path

    @property
    def sha256(self) -> str:
        """Hex digest of the model file's bytes (identifies the tokenizer in token-cache keys)."""
        return self._sha256

    @property
    def vocab_size(self) -> int:
        return self._processor.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return self._processor.bos_id()

    @property
    def eos_id(self) -> int:
        return self._processor.eos_id()

    @property
    def pad_id(self) -> int:
        return self._processor.pad_id()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`, optionally with BOS first and EOS last."""
        return self._processor.Encode(text, add_bos=bos, add_eos=eos)

    def encode_batch(self, texts: list[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        """`[encode(t) for t in texts]`, run by sentencepiece on all cores."""
        return self._processor.Encode(list(texts), add_bos=bos, add_eos=eos, num_threads=-1)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; BOS, EOS and padding decode to nothing."""
        return self._processor.Decode([int(i) for i in ids])


def _training_sentences(documents: Iterator[str]) -> Iterator[str]:
    """Lines of the documents, without empty ones, cut to at most _TRAIN_LINE_CHARS characters."""
    for doc in documents:
        for line in doc.split("\n"):
            line = line.rstrip("\r")
            if not line.strip():
                continue
            for start in range(0, len(line), _TRAIN_LINE_CHARS):
                yield line[start : start + _TRAIN_LINE_CHARS]


def _vocab_error(message: str, vocab_size: int) -> Optional[DataError]:
    """Sentencepiece's complaint about the vocabulary size, as one line for the user (None if other)."""
    too_high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", message)
    if too_high:
        return DataError(
            f"tokenizer vocab_size={vocab_size} is too large for the training text "
            f"(it supports at most {too_high.group(2)}); lower data.vocab_size or add text"
        )
    too_low = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", message)
    if too_low:
        return DataError(
            f"tokenizer vocab_size={vocab_size} is too small for the training text "
            f"(it needs at least {too_low.group(2)}); raise data.vocab_size"
        )
    return None


def _write_atomically(path: str, data: bytes) -> None:
    """Write `data` to `path` through a uniquely named temporary file and os.replace.

    Several processes (one per node on a shared filesystem) may write the same file at once; each
    replaces it with identical content, so readers always see a complete file.
    """
    tmp = f"{path}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def train_tokenizer(
    files: Source,
    model_prefix: str,
    vocab_size: int,
    model_type: str = "bpe",
    text_field: str = "text",
    cache_root: Optional[str] = None,
) -> str:
    """Train a sentencepiece model on the documents of `files` and return the `.model` path.

    Args:
        files: local .txt/.txt.gz/.jsonl/.json/.parquet files (or a HubSource), read with
            `sources.load_documents`; the files are read in sorted order, so the model does not
            depend on the order they were listed in.
        model_prefix: writes `<model_prefix>.model` and `<model_prefix>.vocab` (piece, score).
        vocab_size: number of pieces, including the 4 special ids and the 256 byte pieces.
        model_type: "bpe" or "unigram".
        text_field: the text column of jsonl/parquet records.
        cache_root: cache for the `datasets` library (default: `cache_dir()`).

    The result is deterministic: fixed sampling seed, fixed thread count, and the model's bytes do
    not depend on where it is written (it is trained in memory, then written atomically).

    Raises:
        DataError: no text, or a vocabulary size the text cannot support.
    """
    if isinstance(files, (list, tuple)):
        files = sorted(files)
    sentences = _training_sentences(load_documents(files, text_field=text_field, cache_root=cache_root))
    first = next(sentences, None)
    if first is None:
        raise DataError(f"tokenizer: the training text {describe_source(files)} has no non-empty lines")

    def all_sentences() -> Iterator[str]:
        yield first
        yield from sentences

    model = io.BytesIO()
    spm.set_random_generator_seed(_TRAIN_SEED)
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=all_sentences(),
            model_writer=model,
            model_prefix="",  # trained in memory; keeps temp names out of the model's bytes
            vocab_size=vocab_size,
            model_type=model_type,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            byte_fallback=True,
            character_coverage=0.9995,  # rare characters become bytes instead of taking pieces
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            max_sentence_length=4 * _TRAIN_LINE_CHARS,
            input_sentence_size=_MAX_TRAIN_SENTENCES,
            shuffle_input_sentence=True,
            num_threads=_TRAIN_THREADS,
            minloglevel=2,  # sentencepiece's INFO/WARNING lines would flood every node's log
        )
    except RuntimeError as exc:
        message = str(exc)
        raise (
            _vocab_error(message, vocab_size)
            or DataError(f"tokenizer training failed: {message.strip().splitlines()[-1]}")
        ) from None

    proto = model.getvalue()
    processor = spm.SentencePieceProcessor()
    processor.LoadFromSerializedProto(proto)
    vocab = "".join(f"{processor.IdToPiece(i)}\t{processor.GetScore(i):g}\n" for i in range(processor.GetPieceSize()))
    model_prefix = os.path.abspath(os.path.expanduser(model_prefix))
    os.makedirs(os.path.dirname(model_prefix), exist_ok=True)
    _write_atomically(model_prefix + ".vocab", vocab.encode("utf-8"))
    # The .model goes last: its presence is what marks a cached tokenizer as complete.
    _write_atomically(model_prefix + ".model", proto)
    return model_prefix + ".model"


def tokenizer_cache_path(data_cfg, train_files: Source) -> str:
    """Where `get_tokenizer` keeps the tokenizer trained for these files and settings.

    The key covers the files (sorted paths, sizes, mtimes), vocab_size, tokenizer_type, text_field and
    the trainer version, so editing the corpus or a setting trains a new tokenizer.
    """
    material = {
        "trainer_version": _TRAINER_VERSION,
        "sources": sorted(source_fingerprint(train_files), key=json.dumps),
        "vocab_size": data_cfg.vocab_size,
        "tokenizer_type": data_cfg.tokenizer_type,
        "text_field": data_cfg.text_field,
    }
    key = hashlib.sha256(json.dumps(material, sort_keys=True).encode("utf-8")).hexdigest()
    return os.path.join(cache_dir(data_cfg), "tokenizers", f"{key}.model")


def get_tokenizer(data_cfg, train_files: Source, *, allow_train: bool = True) -> Tokenizer:
    """The run's tokenizer: data.tokenizer's file, or for "auto" the cached one trained on train_files.

    With "auto", the tokenizer is trained once and cached (see `tokenizer_cache_path`); later calls
    load it. `allow_train=False` (used by cheap per-rank set-up) raises DataError instead of training.
    """
    if data_cfg.tokenizer != "auto":
        return Tokenizer(data_cfg.tokenizer)
    path = tokenizer_cache_path(data_cfg, train_files)
    if not os.path.isfile(path):
        if not allow_train:
            raise DataError(
                f"data.tokenizer=auto: no tokenizer trained yet for data.source (expected "
                f"'{path}'); run data preparation (megatrain.data.prepare_data) first"
            )
        train_tokenizer(
            train_files,
            path[: -len(".model")],
            data_cfg.vocab_size,
            model_type=data_cfg.tokenizer_type,
            text_field=data_cfg.text_field,
            cache_root=cache_dir(data_cfg),
        )
    return Tokenizer(path)
