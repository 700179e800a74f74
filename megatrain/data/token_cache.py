"""Stage 3 of the data path: every document of a source tokenised once into a memory-mapped array.

`build_token_cache` writes `<cache>/tokens/<key>.bin` (the token ids, EOS after each document) and
`<key>.json` (its metadata); `open_token_cache` / `TokenArray` map it read-only on every rank. The
key covers the source's fingerprint, the tokenizer's bytes, the text field and the cache version, so
any change to them builds a new entry instead of reusing a stale one.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import Iterator, Optional

import numpy as np

from megatrain.data.sources import HubSource, Source, describe_source, load_documents, source_fingerprint
from megatrain.data.tokenizer import Tokenizer
from megatrain.errors import DataError

__all__ = ["token_cache_path", "build_token_cache", "open_token_cache", "TokenArray"]

# Bump when the token-array layout changes, so older caches are rebuilt instead of misread.
_TOKEN_CACHE_VERSION = 1
# Documents are cut at newlines into chunks of about this many characters before encoding, so a
# novel-sized document is encoded on all cores and never held as one huge list of Python ints.
_ENCODE_CHUNK_CHARS = 1 << 16
# Characters handed to one batched encode call (its ids are Python ints until written out).
_ENCODE_BATCH_CHARS = 1 << 22


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def token_cache_path(source_files: Source, tokenizer: Tokenizer, cache_root: str, text_field: str = "text") -> str:
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


def build_token_cache(source_files: Source, tokenizer: Tokenizer, cache_root: str, text_field: str = "text") -> str:
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
        raise DataError(f"tokenizer '{tokenizer.path}' has no EOS piece, which token arrays need between documents")
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


def open_token_cache(
    source_files: Source, tokenizer: Tokenizer, cache_root: str, text_field: str = "text", key: str = "data.source"
) -> TokenArray:
    """The TokenArray `build_token_cache` wrote for this source and tokenizer (cheap, every rank).

    Raises:
        DataError: naming `key`, when no complete entry exists (data preparation has not run).
    """
    path = token_cache_path(source_files, tokenizer, cache_root, text_field)
    if _read_valid_meta(path) is None:
        raise DataError(f"{key}: no token cache at '{path}'; run data preparation (megatrain.data.prepare_data) first")
    return TokenArray(path)
