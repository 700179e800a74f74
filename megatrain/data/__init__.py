"""Pretraining data: the entry points that compose the data stages.

The stages, each a module, imported one way (a stage imports only those before it):

    sources.py      resolve a data.source into files or a hub dataset; check the files; read
                    documents through `datasets`; fingerprints; the registry of generated kinds
    tokenizer.py    the sentencepiece tokenizer, trained on a source once and cached
    token_cache.py  every document tokenised once into a memory-mapped array (EOS after each)
    sampler.py      packed blocks, the resumable sampler, validation batches (index logic only)
    tasks.py        synthetic tasks: the `task:NAME` kind, registered with sources

The roles of a run:

1. `check_sources(cfg)` (before any process group starts): resolves and checks the files, so a bad
   file is one line, not one per rank.
2. `prepare_data(cfg)` (one process per node, before a barrier): trains or loads the tokenizer and
   builds the token caches under `<cache>/tokens/`. Idempotent; safe on several nodes sharing a
   filesystem.
3. `open_data(cfg)` (every rank, cheap): memory-maps those arrays as `PackedBlocks`; the trainer then
   draws them through `sampler.ResumableSampler`.

A generated source (`sources.source_kind(data.source)` is not None, e.g. task:multikey) has nothing
to check or prepare: `open_data` asks its kind for the tokenizer and blocks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import megatrain.data.tasks  # noqa: F401  (registers the task:NAME source kind with sources)
from megatrain.data.sampler import PackedBlocks
from megatrain.data.sources import (
    HubSource,
    Source,
    cache_dir,
    check_files,
    import_datasets,
    resolve_sources,
    source_kind,
)
from megatrain.data.token_cache import TokenArray, build_token_cache, open_token_cache
from megatrain.data.tokenizer import get_tokenizer
from megatrain.errors import DataError

__all__ = ["PretrainData", "check_sources", "prepare_data", "open_data"]


@dataclass
class PretrainData:
    """What a pretraining run reads: the tokenizer and the training / validation blocks.

    `tokenizer` is a `tokenizer.Tokenizer` (or a generated kind's, e.g. `tasks.TaskTokenizer`);
    `train` / `val` are `PackedBlocks` (or blocks with the same interface); `val` may be None.
    """

    tokenizer: Any
    train: Any
    val: Optional[Any]
    vocab_size: int


def _sources(data_cfg) -> tuple[Source, Optional[Source]]:
    """(training source, validation source or None to hold out a tail of the training blocks)."""
    train = resolve_sources(data_cfg.source, "data.source")
    if data_cfg.val_source is not None:
        return train, resolve_sources(data_cfg.val_source, "data.val_source")
    if data_cfg.source == "embedded":
        return train, resolve_sources("embedded", "data.val_source")
    return train, None


def check_sources(cfg) -> tuple[Optional[Source], Optional[Source]]:
    """Resolve data.source / data.val_source and check the files (cheap; raises DataError).

    Run before any process group starts, so a missing or non-UTF-8 file is one line, not one per rank.
    A generated source (e.g. data.source=task:NAME) has no files: (None, None).
    """
    if source_kind(cfg.data.source) is not None:
        return None, None
    train, val = _sources(cfg.data)
    check_files(train, "data.source")
    if val is not None:
        check_files(val, "data.val_source")
    if cfg.data.tokenizer != "auto" and not os.path.isfile(cfg.data.tokenizer):
        raise DataError(
            f"data.tokenizer: file '{cfg.data.tokenizer}' does not exist (give a sentencepiece .model file or 'auto')"
        )
    return train, val


def prepare_data(cfg) -> None:
    """Validate the files, train or load the tokenizer, and build the token caches (idempotent).

    Heavy: run it in one process per node before a barrier, then `open_data` on every rank.
    """
    d = cfg.data
    if source_kind(d.source) is not None:  # generated on the fly: nothing to prepare
        return
    train, val = _sources(d)
    if any(isinstance(s, HubSource) for s in (train, val)):
        import_datasets(local_only=False)  # before any local read imports it offline
    check_sources(cfg)
    tokenizer = get_tokenizer(d, train)
    root = cache_dir(d)
    build_token_cache(train, tokenizer, root, d.text_field)
    if val is not None:
        build_token_cache(val, tokenizer, root, d.text_field)


def _blocks(tokens: TokenArray, seq_len: int, key: str, start: int = 0, end: Optional[int] = None) -> PackedBlocks:
    try:
        return PackedBlocks(tokens, seq_len, start, end)
    except DataError as exc:
        raise DataError(f"{key}: {exc}") from None


def open_data(cfg) -> PretrainData:
    """The tokenizer and memory-mapped train/val blocks prepared by `prepare_data` (cheap, every rank).

    Validation: data.val_source if given; the held-out novel for the embedded corpus; otherwise the
    last data.val_fraction of the training blocks (which training then excludes), or None if that is
    less than one block. A generated source opens through its kind (`sources.source_kind`).
    """
    d = cfg.data
    kind = source_kind(d.source)
    if kind is not None:
        tokenizer, train, val = kind.open(d)
        return PretrainData(tokenizer=tokenizer, train=train, val=val, vocab_size=tokenizer.vocab_size)
    train_source, val_source = _sources(d)
    tokenizer = get_tokenizer(d, train_source, allow_train=False)
    root = cache_dir(d)
    train_tokens = open_token_cache(train_source, tokenizer, root, d.text_field, "data.source")
    if val_source is not None:
        val_tokens = open_token_cache(val_source, tokenizer, root, d.text_field, "data.val_source")
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
