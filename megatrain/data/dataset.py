"""Pretraining data: text sources -> a cached flat token array -> packed blocks -> resumable sampling.

The pipeline, and who runs each part:

1. `prepare_data(cfg)` (one process per node, before a barrier): resolves `data.source` and
   `data.val_source` into files, checks them, trains or loads the tokenizer and tokenises every
   document into `<cache>/tokens/<key>.bin`, EOS after each document. Idempotent and safe to run on
   several nodes sharing a filesystem.
2. `open_data(cfg)` (every rank, cheap): memory-maps those arrays as `PackedBlocks` of seq_len + 1
   tokens with stride seq_len, so every token is a label exactly once.
3. `ResumableSampler` (every rank): a seeded, epoch-by-epoch permutation of the blocks; a global
   step takes the next global_batch blocks of that stream and each data-parallel rank its slice, so
   the union over ranks does not depend on the layout and a checkpoint stores one number.

Text is read through the Hugging Face `datasets` library (its "text", "json" and "parquet"
builders for local files, so `.gz` files are decompressed on the fly), with its cache under
`<cache>/hf_datasets`. Local sources never touch the network: the offline switches are set before
`datasets` is imported unless the run reads a hub dataset.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import gzip
import hashlib
import itertools
import json
import os
import sys
import uuid
import zlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from megatrain.data.tokenizer import Tokenizer, cache_dir, get_tokenizer
from megatrain.errors import DataError

__all__ = [
    "HubSource", "SUPPORTED_EXTENSIONS", "resolve_sources", "check_files", "load_documents",
    "source_fingerprint", "build_token_cache", "token_cache_path", "TokenArray", "PackedBlocks",
    "ResumableSampler", "val_batches", "PretrainData", "prepare_data", "open_data",
]

SUPPORTED_EXTENSIONS = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".json", ".parquet")
_TEXT_EXTENSIONS = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".json")  # checked for UTF-8
_BUILDER_BY_EXTENSION = {".txt": "text", ".txt.gz": "text", ".jsonl": "json", ".jsonl.gz": "json",
                         ".json": "json", ".parquet": "parquet"}

# Bump when the token-array layout changes, so older caches are rebuilt instead of misread.
_TOKEN_CACHE_VERSION = 1
# Documents are cut at newlines into chunks of about this many characters before encoding, so a
# novel-sized document is encoded on all cores and never held as one huge list of Python ints.
_ENCODE_CHUNK_CHARS = 1 << 16
# Characters handed to one batched encode call (its ids are Python ints until written out).
_ENCODE_BATCH_CHARS = 1 << 22
_READ_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class HubSource:
    """A dataset on the Hugging Face hub, written `hf:NAME` or `hf:NAME:SPLIT` in a config."""

    name: str
    split: str = "train"

    def __str__(self) -> str:
        return f"hf:{self.name}:{self.split}"


Source = Union[list, HubSource]


# ----------------------------------------------------------------------------------------------
# resolving and checking sources


def _extension(path: str) -> Optional[str]:
    """The supported extension `path` ends with (longest match), or None."""
    lower = path.lower()
    for ext in sorted(SUPPORTED_EXTENSIONS, key=len, reverse=True):
        if lower.endswith(ext):
            return ext
    return None


def _allowed() -> str:
    return ", ".join(SUPPORTED_EXTENSIONS)


def _embedded_files(key: str) -> list[str]:
    # Imported here: the corpus package is data, and most callers never need it.
    from megatrain.data import corpus

    return [str(path) for path in (corpus.VAL_FILES if key.endswith("val_source") else corpus.TRAIN_FILES)]


def _parse_hub(spec: str, key: str) -> HubSource:
    parts = spec[len("hf:"):].split(":")
    if not parts[0] or len(parts) > 2 or (len(parts) == 2 and not parts[1]):
        raise DataError(f"{key}: '{spec}' is not of the form hf:NAME or hf:NAME:SPLIT")
    return HubSource(parts[0], parts[1] if len(parts) == 2 else "train")


def _resolve_one(spec: str, key: str) -> list[str]:
    path = os.path.abspath(os.path.expanduser(spec))
    if any(ch in spec for ch in "*?["):
        matches = sorted(p for p in glob.glob(os.path.expanduser(spec), recursive=True) if os.path.isfile(p))
        if not matches:
            raise DataError(f"{key}: '{spec}' matches no files")
        bad = [p for p in matches if _extension(p) is None]
        if bad:
            raise DataError(f"{key}: '{bad[0]}' (matched by '{spec}') has an unsupported extension "
                            f"(allowed: {_allowed()})")
        return [os.path.abspath(p) for p in matches]
    if os.path.isdir(path):
        # Only the directory's own files: a directory tree is read with an explicit 'dir/**/*.jsonl'.
        files = sorted(os.path.join(path, name) for name in os.listdir(path)
                       if not name.startswith(".") and _extension(name) is not None
                       and os.path.isfile(os.path.join(path, name)))
        if not files:
            raise DataError(f"{key}: directory '{spec}' has no {_allowed()} files")
        return files
    if not os.path.exists(path):
        raise DataError(f"{key}: file '{spec}' does not exist")
    if _extension(path) is None:
        raise DataError(f"{key}: file '{spec}' has an unsupported extension (allowed: {_allowed()})")
    return [path]


def resolve_sources(source: Any, key: str = "data.source") -> Union[list[str], HubSource]:
    """Turn a config value into absolute file paths, or a HubSource.

    `source` is "embedded" (the shipped corpus: its training novels, or for `data.val_source` its
    held-out novel), a file, a glob (`**` recurses), a directory (its supported files, sorted), a
    list of these, or "hf:NAME[:SPLIT]". Files keep the order given; globs and directories are sorted.

    Raises:
        DataError: one line naming `key` and the path, for a missing file, a pattern or directory
            with no matching files, or an unsupported extension.
    """
    if isinstance(source, str) and source.startswith("hf:"):
        return _parse_hub(source, key)
    items = list(source) if isinstance(source, (list, tuple)) else [source]
    if not items:
        raise DataError(f"{key}: the list of sources is empty")
    files: list[str] = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise DataError(f"{key}: {item!r} is not a path (expected 'embedded', a file, a glob, a "
                            f"directory, a list of these, or 'hf:NAME[:SPLIT]')")
        item = os.fspath(item)
        if item.startswith("hf:"):
            raise DataError(f"{key}: a hub dataset ('{item}') cannot be mixed with other sources in a list")
        files.extend(_embedded_files(key) if item == "embedded" else _resolve_one(item, key))
    return files


def _utf8_error_offset(stream) -> Optional[int]:
    """Offset of the first byte of `stream` that is not valid UTF-8, or None if it all decodes."""
    carry = b""  # an incomplete multi-byte character cut by the chunk boundary
    base = 0  # stream offset of carry[0]
    while True:
        chunk = stream.read(_READ_CHUNK_BYTES)
        data = carry + chunk
        try:
            # final=False leaves a trailing partial character for the next chunk instead of failing.
            _, consumed = codecs.utf_8_decode(data, "strict", not chunk)
        except UnicodeDecodeError as exc:
            return base + exc.start
        if not chunk:
            return None
        carry = data[consumed:]
        base += consumed


def check_files(files: Source, key: str = "data.source") -> None:
    """Check that every local file exists, is not empty, and (for text formats) is valid UTF-8.

    Streams each file in 1 MiB chunks (gzip files decompressed), so tens of MB take well under a
    second. A HubSource is not checked here.

    Raises:
        DataError: e.g. "data.source: file 'x.txt' is not valid UTF-8 (first bad byte at offset 1234)".
    """
    if isinstance(files, HubSource):
        return
    for path in files:
        if not os.path.isfile(path):
            raise DataError(f"{key}: file '{path}' does not exist")
        if os.path.getsize(path) == 0:
            raise DataError(f"{key}: file '{path}' is empty")
        ext = _extension(path)
        if ext not in _TEXT_EXTENSIONS:
            continue
        opener = gzip.open if ext.endswith(".gz") else open
        try:
            with opener(path, "rb") as fh:
                bad = _utf8_error_offset(fh)
                empty = fh.tell() == 0
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            raise DataError(f"{key}: file '{path}' is not a valid gzip file ({exc})") from None
        except OSError as exc:
            raise DataError(f"{key}: file '{path}' cannot be read: {exc.strerror or exc}") from None
        if empty:
            raise DataError(f"{key}: file '{path}' is empty")
        if bad is not None:
            where = "uncompressed offset" if ext.endswith(".gz") else "offset"
            raise DataError(f"{key}: file '{path}' is not valid UTF-8 (first bad byte at {where} {bad})")


def source_fingerprint(source: Source) -> list:
    """What identifies a source's content cheaply: per file [path, size, mtime_ns]; hub: name, split."""
    if isinstance(source, HubSource):
        return [["hf", source.name, source.split]]
    out = []
    for path in source:
        try:
            st = os.stat(path)
        except OSError:
            raise DataError(f"data source file '{path}' does not exist") from None
        out.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
    return out


# ----------------------------------------------------------------------------------------------
# reading documents through `datasets`


def _import_datasets(local_only: bool):
    """Import `datasets`, offline unless a hub source is read.

    The switches are read when `datasets` is first imported, so they only take effect here if nothing
    imported it earlier; `prepare_data` imports it online first when any source is on the hub. They
    are defaults: a user's own HF_HUB_OFFLINE / HF_DATASETS_OFFLINE always wins.
    """
    if local_only and "datasets" not in sys.modules:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    return datasets


@contextlib.contextmanager
def _quiet(datasets):
    """Silence `datasets`' progress bars and info logs ("Generating train split ...") for one load."""
    bars_were_enabled = datasets.is_progress_bar_enabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    # CRITICAL, not ERROR: a malformed file is reported once, as our DataError naming the file.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars_were_enabled:
            datasets.enable_progress_bars()


def _first_line(exc: BaseException) -> str:
    # datasets wraps parse errors (DatasetGenerationError); the cause says what was wrong.
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _load_local(datasets, builder: str, files: list[str], hf_cache: str):
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    with _quiet(datasets):
        return datasets.load_dataset(builder, data_files=files, split="train", cache_dir=hf_cache, **kwargs)


def _load_group(datasets, builder: str, files: list[str], hf_cache: str):
    """Load consecutive files of one format as one dataset; name the failing file on a parse error."""
    import pyarrow

    # What datasets and pyarrow raise for a malformed file (parse errors arrive wrapped in a
    # DatasetGenerationError); anything else is a bug and keeps its traceback.
    malformed = (datasets.exceptions.DatasetsError, pyarrow.ArrowException, ValueError, OSError)
    try:
        return _load_local(datasets, builder, files, hf_cache)
    except malformed as exc:
        culprit, reason = files[0], _first_line(exc)
        if len(files) > 1:  # find which file it was; only on this error path
            for path in files:
                try:
                    _load_local(datasets, builder, [path], hf_cache)
                except malformed as single:
                    culprit, reason = path, _first_line(single)
                    break
        raise DataError(f"file '{culprit}' cannot be read as {builder}: {reason}") from None


def _texts(ds, text_field: str, origin: str) -> Iterator[str]:
    if text_field not in ds.column_names:
        raise DataError(f"field '{text_field}' (data.text_field) is not in {origin} "
                        f"(fields present: {', '.join(ds.column_names) or 'none'})")
    dtype = getattr(ds.features[text_field], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise DataError(f"field '{text_field}' (data.text_field) of {origin} holds {dtype or 'non-text'} "
                        f"values, not text")
    for batch in ds.select_columns([text_field]).iter(batch_size=256):
        for text in batch[text_field]:
            if text:
                yield text


def load_documents(source: Union[Source, str], text_field: str = "text",
                   cache_root: Optional[str] = None) -> Iterator[str]:
    """Yield the documents of a source, in order, through the `datasets` library.

    A .txt/.txt.gz file is one document (the "text" builder with sample_by="document"; `\\r\\n`
    becomes `\\n` as in any text-mode read); a .jsonl/.json/.parquet record is one document (its
    `text_field`); a HubSource yields the `text_field` of each row of its split. Empty documents are
    skipped. `datasets` keeps its cache under `<cache_root>/hf_datasets`.

    Raises:
        DataError: a file that cannot be parsed, or records without `text_field` (the message names
            the field and the fields present).
    """
    if isinstance(source, (str, os.PathLike)):
        source = resolve_sources(os.fspath(source))
    hf_cache = os.path.join(cache_root or cache_dir(), "hf_datasets")
    if isinstance(source, HubSource):
        datasets = _import_datasets(local_only=False)
        try:
            with _quiet(datasets):
                ds = datasets.load_dataset(source.name, split=source.split, cache_dir=hf_cache)
        except Exception as exc:
            hint = ""
            if datasets.config.HF_HUB_OFFLINE:
                hint = " (offline mode is on: set HF_HUB_OFFLINE=0 to download it)"
            raise DataError(f"hub dataset '{source}' cannot be loaded: {_first_line(exc)}{hint}") from None
        yield from _texts(ds, text_field, f"hub dataset '{source}'")
        return
    datasets = _import_datasets(local_only=True)
    for builder, group in itertools.groupby(source, key=lambda p: _BUILDER_BY_EXTENSION.get(_extension(p))):
        files = list(group)
        if builder is None:
            raise DataError(f"file '{files[0]}' has an unsupported extension (allowed: {_allowed()})")
        ds = _load_group(datasets, builder, files, hf_cache)
        origin = f"'{files[0]}'" if len(files) == 1 else f"the {builder} files ('{files[0]}', ...)"
        yield from _texts(ds, text_field, origin)


# ----------------------------------------------------------------------------------------------
# token cache


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def token_cache_path(source_files: Source, tokenizer: Tokenizer, cache_root: str,
                     text_field: str = "text") -> str:
    """`<cache_root>/tokens/<key>.bin` for this source and tokenizer (whether or not it exists yet).

    key = sha256 of (the files' paths, sizes and mtimes in the order given, since order decides the
    token order; the tokenizer file's sha256; text_field; the cache format version).
    """
    material = {
        "version": _TOKEN_CACHE_VERSION,
        "sources": source_fingerprint(source_files),
        "tokenizer_sha256": tokenizer.sha256,
        "text_field": text_field,
    }
    key = hashlib.sha256(json.dumps(material, sort_keys=True).encode("utf-8")).hexdigest()
    return os.path.join(cache_root, "tokens", f"{key}.bin")


def _meta_path(bin_path: str) -> str:
    return bin_path[: -len(".bin")] + ".json"


def _read_valid_meta(bin_path: str) -> Optional[dict]:
    """The metadata of a complete cache entry at `bin_path`, or None if it is absent or inconsistent."""
    try:
        with open(_meta_path(bin_path), encoding="utf-8") as fh:
            meta = json.load(fh)
        size = os.path.getsize(bin_path)
    except (OSError, ValueError):
        return None
    key = os.path.basename(bin_path)[: -len(".bin")]
    try:
        complete = size == meta["num_tokens"] * np.dtype(meta["dtype"]).itemsize
    except (KeyError, TypeError):
        return None
    if meta.get("key") != key or meta.get("version") != _TOKEN_CACHE_VERSION or not complete:
        return None
    return meta


def _splits_at_newlines(tokenizer: Tokenizer) -> bool:
    """Whether encoding text in pieces cut after newlines gives the ids of the whole text.

    True for tokenizers from `train_tokenizer` (no dummy prefix, no piece holding a newline); a
    user's model that prepends "▁" to every encoded string, or has newline pieces, fails a probe and
    has its documents encoded whole.
    """
    probes = ["the\nend", "a\n\nb", "x \n y", "word.\n\n\n  Next"]
    for text in probes:
        cut = text.index("\n") + 1
        if tokenizer.encode(text) != tokenizer.encode(text[:cut]) + tokenizer.encode(text[cut:]):
            return False
    return True


def _document_chunks(doc: str, split: bool = True) -> list[str]:
    """`doc` cut after newlines into pieces of about _ENCODE_CHUNK_CHARS characters (if `split`)."""
    if not split or len(doc) <= _ENCODE_CHUNK_CHARS:
        return [doc]
    chunks, start = [], 0
    while start < len(doc):
        cut = doc.rfind("\n", start, start + _ENCODE_CHUNK_CHARS)
        if cut < 0:  # one very long line: cut at the next newline instead
            cut = doc.find("\n", start + _ENCODE_CHUNK_CHARS)
        end = len(doc) if cut < 0 else cut + 1
        chunks.append(doc[start:end])
        start = end
    return chunks


def _encoded_documents(documents: Iterator[str], tokenizer: Tokenizer) -> Iterator[np.ndarray]:
    """The documents' token ids, in order, as a few arrays; EOS after each document."""
    eos = np.array([tokenizer.eos_id], dtype=np.int64)
    split = _splits_at_newlines(tokenizer)
    pending: list[str] = []
    ends: list[bool] = []  # pending[i] is the last chunk of its document
    chars = 0

    def flush() -> np.ndarray:
        parts = []
        for ids, last in zip(tokenizer.encode_batch(pending), ends):
            parts.append(np.asarray(ids, dtype=np.int64))
            if last:
                parts.append(eos)
        pending.clear()
        ends.clear()
        return np.concatenate(parts)

    for doc in documents:
        chunks = _document_chunks(doc, split)
        for i, chunk in enumerate(chunks):
            pending.append(chunk)
            ends.append(i == len(chunks) - 1)
            chars += len(chunk)
            if chars >= _ENCODE_BATCH_CHARS:
                yield flush()
                chars = 0
    if pending:
        yield flush()


def build_token_cache(source_files: Source, tokenizer: Tokenizer, cache_root: str,
                      text_field: str = "text") -> str:
    """Tokenise every document of the source into a flat token array; return its `.bin` path.

    Writes `<cache_root>/tokens/<key>.bin` (uint16 when the vocabulary fits, else uint32; EOS after
    each document, no BOS) and `<key>.json` (num_tokens, dtype, num_docs, tokenizer path and sha256,
    sources); see `token_cache_path` for the key. An existing complete entry is reused as it is.

    Safe to run from several processes at once (one per node on a shared filesystem): each writes
    its own temporary files and atomically replaces the entry with identical content, the metadata
    last, so a reader that finds the `.json` always finds the complete `.bin`.

    Raises:
        DataError: the source yields no text, or the tokenizer has no EOS id.
    """
    if tokenizer.eos_id < 0:
        raise DataError(f"tokenizer '{tokenizer.path}' has no EOS piece, which token arrays need "
                        f"between documents")
    bin_path = token_cache_path(source_files, tokenizer, cache_root, text_field)
    if _read_valid_meta(bin_path) is not None:
        return bin_path
    os.makedirs(os.path.dirname(bin_path), exist_ok=True)
    dtype = _token_dtype(tokenizer.vocab_size)
    suffix = f".tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp_bin = bin_path + suffix
    num_tokens = num_docs = 0
    try:
        with open(tmp_bin, "wb") as out:
            docs = load_documents(source_files, text_field=text_field, cache_root=cache_root)
            for tokens in _encoded_documents(docs, tokenizer):
                out.write(tokens.astype(dtype).tobytes())
                num_tokens += len(tokens)
                num_docs += int((tokens == tokenizer.eos_id).sum())
        if num_tokens == 0:
            raise DataError(f"data source {describe_source(source_files)} holds no text to tokenise")
        meta = {
            "version": _TOKEN_CACHE_VERSION,
            "key": os.path.basename(bin_path)[: -len(".bin")],
            "num_tokens": num_tokens,
            "dtype": dtype.name,
            "num_docs": num_docs,
            "eos_id": tokenizer.eos_id,
            "vocab_size": tokenizer.vocab_size,
            "tokenizer": {"path": tokenizer.path, "sha256": tokenizer.sha256},
            "text_field": text_field,
            "sources": [str(source_files)] if isinstance(source_files, HubSource) else list(source_files),
        }
        os.replace(tmp_bin, bin_path)
        tmp_meta = _meta_path(bin_path) + suffix
        with open(tmp_meta, "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=1)
        os.replace(tmp_meta, _meta_path(bin_path))
    finally:
        for leftover in (tmp_bin, _meta_path(bin_path) + suffix):
            if os.path.exists(leftover):
                os.remove(leftover)
    return bin_path


def describe_source(source: Source) -> str:
    """A short quoted description of a source for error messages (first three files)."""
    if isinstance(source, HubSource):
        return f"'{source}'"
    shown = ", ".join(f"'{f}'" for f in source[:3])
    return f"({shown}{', ...' if len(source) > 3 else ''})"


class TokenArray:
    """A read-only memory map of a token cache entry: `len()`, `arr[i]`, `arr[a:b]` (numpy).

    Args:
        path: the entry's `.bin` or `.json` file.
    """

    def __init__(self, path: str):
        bin_path = path[: -len(".json")] + ".bin" if path.endswith(".json") else path
        meta = _read_valid_meta(bin_path)
        if meta is None:
            raise DataError(f"token cache '{bin_path}' is missing or incomplete")
        self.path = bin_path
        self.meta = meta
        self.dtype = np.dtype(meta["dtype"])
        self._tokens = np.memmap(bin_path, dtype=self.dtype, mode="r", shape=(meta["num_tokens"],))

    def __len__(self) -> int:
        return self._tokens.shape[0]

    def __getitem__(self, index):
        return self._tokens[index]

    def __repr__(self) -> str:
        return f"TokenArray('{self.path}', num_tokens={len(self)}, dtype={self.dtype.name})"


# ----------------------------------------------------------------------------------------------
# blocks and sampling


class PackedBlocks:
    """Fixed-length training sequences cut from one token stream.

    Block i is `tokens[(start_block + i) * seq_len : (start_block + i) * seq_len + seq_len + 1]`:
    seq_len + 1 tokens with stride seq_len, so consecutive blocks share one boundary token and every
    token after the first is a label exactly once. `start_block` / `end_block` select a range of the
    stream's blocks, so a training set and a held-out tail can share one array.

    Args:
        tokens: a TokenArray, numpy array or 1-D tensor of token ids.
        seq_len: tokens per input sequence.
        start_block, end_block: the range of blocks (end_block None = all that fit).

    Raises:
        DataError: fewer than seq_len + 1 tokens (not one block).
    """

    def __init__(self, tokens, seq_len: int, start_block: int = 0, end_block: Optional[int] = None):
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.cpu().numpy()
        self.tokens = tokens
        self.seq_len = int(seq_len)
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        total = self.num_blocks_in(len(tokens), self.seq_len)
        if total < 1:
            raise DataError(f"data.seq_len={self.seq_len} needs at least {self.seq_len + 1} tokens for one "
                            f"block, but the token array has {len(tokens)}")
        end_block = total if end_block is None else end_block
        if not 0 <= start_block < end_block <= total:
            raise ValueError(f"block range [{start_block}, {end_block}) is empty or outside the "
                             f"{total} blocks of the token array")
        self.start_block = start_block
        self.end_block = end_block

    @staticmethod
    def num_blocks_in(num_tokens: int, seq_len: int) -> int:
        """How many blocks of seq_len + 1 tokens with stride seq_len fit in num_tokens tokens."""
        return max(0, (num_tokens - 1) // seq_len)

    def __len__(self) -> int:
        return self.end_block - self.start_block

    def __getitem__(self, index: int) -> torch.Tensor:
        """Block `index` as int64 `[seq_len + 1]`."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"block {index} out of range for {len(self)} blocks")
        start = (self.start_block + index) * self.seq_len
        return torch.from_numpy(np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int64))

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """`(inputs, labels)`, both int64 `[B, seq_len]`; labels are the inputs shifted left by one."""
        blocks = torch.stack([self[i] for i in indices])
        return blocks[:, :-1].contiguous(), blocks[:, 1:].contiguous()


class ResumableSampler:
    """Deterministic infinite stream of block indices, sharded over data-parallel ranks.

    The stream is epoch 0's permutation of range(num_blocks), then epoch 1's, and so on; epoch e's
    permutation comes from a torch.Generator seeded with `seed * 1000003 + e`. Each global step
    takes the next global_batch positions of the stream; rank r takes the contiguous slice
    `[r * GB / dp, (r + 1) * GB / dp)` of them and splits it into micro-batches. The union over ranks
    is therefore the same for every data-parallel layout, and the whole position is one number,
    `consumed_samples`.

    Args:
        num_blocks: blocks in the training set.
        global_batch: sequences per optimizer step over all ranks (GB).
        micro_batch: sequences per rank per micro-step.
        dp_rank, dp_size: this rank and the number of data-parallel ranks.
        seed: data-order seed.
        consumed_samples: stream position to start from (resume).

    Raises:
        ValueError: GB not a multiple of micro_batch x dp_size, or out-of-range arguments.
    """

    def __init__(self, num_blocks: int, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int,
                 seed: int, consumed_samples: int = 0):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if micro_batch < 1 or dp_size < 1 or global_batch < 1:
            raise ValueError(f"global_batch, micro_batch and dp_size must be >= 1, got "
                             f"{global_batch}, {micro_batch}, {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is not in [0, dp_size={dp_size})")
        if global_batch % (micro_batch * dp_size):
            raise ValueError(f"global_batch={global_batch} is not a multiple of micro_batch x dp_size = "
                             f"{micro_batch} x {dp_size} = {micro_batch * dp_size}")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        self.num_blocks = int(num_blocks)
        self.global_batch = int(global_batch)
        self.micro_batch = int(micro_batch)
        self.dp_rank = int(dp_rank)
        self.dp_size = int(dp_size)
        self.seed = int(seed)
        self.consumed_samples = int(consumed_samples)
        self.grad_accum = self.global_batch // (self.micro_batch * self.dp_size)
        self._orders: dict[int, torch.Tensor] = {}

    @property
    def epoch(self) -> int:
        """The epoch the next sample comes from."""
        return self.consumed_samples // self.num_blocks

    def _order(self, epoch: int) -> torch.Tensor:
        order = self._orders.get(epoch)
        if order is None:
            generator = torch.Generator()
            # Reduced into torch's seed range; seed and epoch still give distinct streams.
            generator.manual_seed((self.seed * 1000003 + epoch) % (1 << 63))
            order = torch.randperm(self.num_blocks, generator=generator)
            if len(self._orders) >= 2:  # a step spans at most a few epochs; keep memory flat
                self._orders.pop(min(self._orders))
            self._orders[epoch] = order
        return order

    def _stream(self, start: int, count: int) -> list[int]:
        """Block indices at stream positions [start, start + count)."""
        out: list[int] = []
        position, end = start, start + count
        while position < end:
            epoch, offset = divmod(position, self.num_blocks)
            take = min(end - position, self.num_blocks - offset)
            out.extend(self._order(epoch)[offset:offset + take].tolist())
            position += take
        return out

    def next_step(self) -> list[list[int]]:
        """This rank's block indices for the next global step: grad_accum lists of micro_batch."""
        per_rank = self.global_batch // self.dp_size
        mine = self._stream(self.consumed_samples + self.dp_rank * per_rank, per_rank)
        self.consumed_samples += self.global_batch
        return [mine[i * self.micro_batch:(i + 1) * self.micro_batch] for i in range(self.grad_accum)]

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed, "num_blocks": self.num_blocks}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position. The saved seed is kept, so the data order continues even
        if train.seed was changed for the resumed run.

        Raises:
            DataError: the saved num_blocks differs (the training data or seq_len changed).
        """
        if int(state["num_blocks"]) != self.num_blocks:
            raise DataError(f"checkpoint data position was saved for {state['num_blocks']} training blocks "
                            f"but the data now has {self.num_blocks}: data.source, data.seq_len or the "
                            f"tokenizer changed since the checkpoint")
        self.seed = int(state["seed"])
        self.consumed_samples = int(state["consumed_samples"])
        self._orders.clear()


def val_batches(blocks, micro_batch: int, dp_rank: int, dp_size: int, num_batches: int) -> list[list[int]]:
    """This rank's validation micro-batches: `num_batches` lists of `micro_batch` block indices.

    Validation step j covers positions [j * micro_batch * dp_size, (j + 1) * micro_batch * dp_size)
    of the blocks in order, rank r its r-th slice; positions wrap modulo the number of blocks when
    the validation set is smaller than what is asked for.

    Args:
        blocks: the validation PackedBlocks (or anything with len(), or an int count).
    """
    n = blocks if isinstance(blocks, int) else len(blocks)
    if n < 1:
        raise ValueError("the validation set has no blocks")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} is not in [0, dp_size={dp_size})")
    out = []
    for step in range(num_batches):
        first = (step * dp_size + dp_rank) * micro_batch
        out.append([(first + k) % n for k in range(micro_batch)])
    return out


# ----------------------------------------------------------------------------------------------
# one entry point per role: prepare (one process per node), open (every rank)


@dataclass
class PretrainData:
    """What a pretraining run reads: the tokenizer and the training / validation blocks."""

    tokenizer: Tokenizer
    train: PackedBlocks
    val: Optional[PackedBlocks]
    vocab_size: int


def _sources(data_cfg) -> tuple[Source, Optional[Source]]:
    """(training source, validation source or None to hold out a tail of the training blocks)."""
    train = resolve_sources(data_cfg.source, "data.source")
    if data_cfg.val_source is not None:
        return train, resolve_sources(data_cfg.val_source, "data.val_source")
    if data_cfg.source == "embedded":
        return train, resolve_sources("embedded", "data.val_source")
    return train, None


def check_sources(cfg) -> tuple[Source, Optional[Source]]:
    """Resolve data.source / data.val_source and check the files (cheap; raises DataError).

    Run before any process group starts, so a missing or non-UTF-8 file is one line, not one per rank.
    A synthetic task (data.source=task:NAME, megatrain.data.tasks) has no files: (None, None).
    """
    from megatrain.data.tasks import is_task_source

    if is_task_source(cfg.data.source):
        return None, None
    train, val = _sources(cfg.data)
    check_files(train, "data.source")
    if val is not None:
        check_files(val, "data.val_source")
    if cfg.data.tokenizer != "auto" and not os.path.isfile(cfg.data.tokenizer):
        raise DataError(f"data.tokenizer: file '{cfg.data.tokenizer}' does not exist (give a sentencepiece "
                        f".model file or 'auto')")
    return train, val


def prepare_data(cfg) -> None:
    """Validate the files, train or load the tokenizer, and build the token caches (idempotent).

    Heavy: run it in one process per node before a barrier, then `open_data` on every rank.
    """
    from megatrain.data.tasks import is_task_source

    d = cfg.data
    if is_task_source(d.source):  # generated on the fly: nothing to prepare
        return
    train, val = _sources(d)
    if any(isinstance(s, HubSource) for s in (train, val)):
        _import_datasets(local_only=False)  # before any local read imports it offline
    check_sources(cfg)
    tokenizer = get_tokenizer(d, train)
    root = cache_dir(d)
    build_token_cache(train, tokenizer, root, d.text_field)
    if val is not None:
        build_token_cache(val, tokenizer, root, d.text_field)


def _open_tokens(source: Source, tokenizer: Tokenizer, root: str, text_field: str, key: str) -> TokenArray:
    path = token_cache_path(source, tokenizer, root, text_field)
    if _read_valid_meta(path) is None:
        raise DataError(f"{key}: no token cache at '{path}'; run data preparation "
                        f"(megatrain.data.dataset.prepare_data) first")
    return TokenArray(path)


def _blocks(tokens: TokenArray, seq_len: int, key: str, start: int = 0, end: Optional[int] = None) -> PackedBlocks:
    try:
        return PackedBlocks(tokens, seq_len, start, end)
    except DataError as exc:
        raise DataError(f"{key}: {exc}") from None


def open_data(cfg) -> PretrainData:
    """The tokenizer and memory-mapped train/val blocks prepared by `prepare_data` (cheap, every rank).

    Validation: data.val_source if given; the held-out novel for the embedded corpus; otherwise the
    last data.val_fraction of the training blocks (which training then excludes), or None if that is
    less than one block. A synthetic task (data.source=task:NAME) opens through
    `megatrain.data.tasks.open_task_data`.
    """
    from megatrain.data.tasks import is_task_source, open_task_data

    d = cfg.data
    if is_task_source(d.source):
        return open_task_data(cfg)
    train_source, val_source = _sources(d)
    tokenizer = get_tokenizer(d, train_source, allow_train=False)
    root = cache_dir(d)
    train_tokens = _open_tokens(train_source, tokenizer, root, d.text_field, "data.source")
    if val_source is not None:
        val_tokens = _open_tokens(val_source, tokenizer, root, d.text_field, "data.val_source")
        train = _blocks(train_tokens, d.seq_len, "data.source")
        val = _blocks(val_tokens, d.seq_len, "data.val_source")
    else:
        total = PackedBlocks.num_blocks_in(len(train_tokens), d.seq_len)
        held_out = int(total * d.val_fraction)
        if held_out >= 1 and total - held_out >= 1:
            train = _blocks(train_tokens, d.seq_len, "data.source", 0, total - held_out)
            val = _blocks(train_tokens, d.seq_len, "data.source", total - held_out, total)
        else:
            train, val = _blocks(train_tokens, d.seq_len, "data.source"), None
    return PretrainData(tokenizer=tokenizer, train=train, val=val, vocab_size=tokenizer.vocab_size)
