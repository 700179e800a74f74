"""Exposure index: had the model seen this phrase by step t, and how often?

Two parts, both built from what the run already has (no corpus re-tokenised per query):

- `NgramIndex`: every n-gram of the training blocks of the token cache, as sorted 64-bit hashes with
  their token positions (built once in chunks of blocks, saved as .npy and reused). Only n-grams that
  lie inside one block are indexed: a training sequence is one block (seq_len + 1 tokens), so a
  phrase cut by a block boundary was never seen whole.
- `TrainingOrder`: when each block was consumed, from the run's own sampler
  (`megatrain.data.sampler.ResumableSampler.stream`, the order the trainer draws from). Global step s
  consumes stream positions [(s - 1) * global_batch, s * global_batch); each data-parallel rank takes
  a slice of those, so the steps at which a block was seen do not depend on the DP layout.

A query (token ids of a phrase) looks up the hash of its first n tokens, checks the candidates
against the token array (exact, so hash collisions cannot report a false hit) and keeps those that
fit in one block; each such block contributes one exposure per time the sampler had handed it out by
step t. Phrases shorter than n are matched by a vectorised scan of the token array instead.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np

from megatrain.data.sampler import ResumableSampler
from megatrain.errors import DataError

__all__ = ["NgramIndex", "TrainingOrder", "ExposureIndex", "DEFAULT_NGRAM"]

DEFAULT_NGRAM = 8
_HASH_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier; arithmetic wraps modulo 2^64
_CHUNK_BLOCKS = 1 << 14


def _hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """Polynomial hash of every n-gram of tokens (1-D): [len(tokens) - n + 1] uint64."""
    count = len(tokens) - n + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    t = tokens.astype(np.uint64, copy=False)
    h = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            h = h * _HASH_BASE + t[k : k + count]
    return h


class NgramIndex:
    """Sorted n-gram hashes over the training blocks [start_block, end_block) of a token array.

    Args:
        tokens: the token array (TokenArray / numpy), blocks of seq_len + 1 tokens with stride seq_len.
        hashes, positions: sorted hashes and the global token position of each n-gram.
    """

    def __init__(
        self, tokens, seq_len: int, start_block: int, end_block: int, n: int, hashes: np.ndarray, positions: np.ndarray
    ):
        self.tokens, self.seq_len, self.n = tokens, int(seq_len), int(n)
        self.start_block, self.end_block = int(start_block), int(end_block)
        self.hashes, self.positions = hashes, positions

    @classmethod
    def build(cls, tokens, seq_len: int, start_block: int, end_block: int, n: int = DEFAULT_NGRAM) -> "NgramIndex":
        if not 2 <= n <= seq_len + 1:
            raise DataError(f"exposure index: n-gram length {n} must be in [2, data.seq_len + 1 = {seq_len + 1}]")
        all_hashes, all_positions = [], []
        for first in range(start_block, end_block, _CHUNK_BLOCKS):
            last = min(end_block, first + _CHUNK_BLOCKS)
            base = first * seq_len
            chunk = np.asarray(tokens[base : last * seq_len + 1])
            h = _hashes(chunk, n)
            offsets = np.arange(len(h), dtype=np.int64)
            # keep n-grams that start in [first, last) blocks and end inside the same block
            keep = (offsets < (last - first) * seq_len) & (offsets % seq_len <= seq_len + 1 - n)
            all_hashes.append(h[keep])
            all_positions.append(offsets[keep] + base)
        hashes = np.concatenate(all_hashes) if all_hashes else np.zeros(0, np.uint64)
        positions = np.concatenate(all_positions) if all_positions else np.zeros(0, np.int64)
        order = np.argsort(hashes, kind="stable")
        return cls(tokens, seq_len, start_block, end_block, n, hashes[order], positions[order])

    # -- persistence: two .npy files and what they were built from ----------------------------

    def save(self, folder: str, source: dict) -> None:
        os.makedirs(folder, exist_ok=True)
        np.save(os.path.join(folder, "hashes.npy"), self.hashes)
        np.save(os.path.join(folder, "positions.npy"), self.positions)
        with open(os.path.join(folder, "index.json"), "w", encoding="utf-8") as fh:
            json.dump(
                {
                    **source,
                    "n": self.n,
                    "seq_len": self.seq_len,
                    "start_block": self.start_block,
                    "end_block": self.end_block,
                    "ngrams": int(len(self.hashes)),
                },
                fh,
                indent=1,
            )

    @classmethod
    def load(cls, folder: str, tokens, source: dict) -> Optional["NgramIndex"]:
        """The index saved in `folder` if it was built from `source` (else None)."""
        try:
            with open(os.path.join(folder, "index.json"), encoding="utf-8") as fh:
                meta = json.load(fh)
            if any(meta.get(k) != v for k, v in source.items()):
                return None
            hashes = np.load(os.path.join(folder, "hashes.npy"), mmap_mode="r")
            positions = np.load(os.path.join(folder, "positions.npy"), mmap_mode="r")
        except (OSError, ValueError):
            return None
        return cls(tokens, meta["seq_len"], meta["start_block"], meta["end_block"], meta["n"], hashes, positions)

    # -- queries --------------------------------------------------------------------------------

    def _fits(self, positions: np.ndarray, length: int) -> np.ndarray:
        """Training-block index (relative to start_block) of each occurrence, -1 where it crosses a boundary."""
        block = positions // self.seq_len
        ok = (
            (positions - block * self.seq_len + length - 1 <= self.seq_len)
            & (block >= self.start_block)
            & (block < self.end_block)
        )
        return np.where(ok, block - self.start_block, -1)

    def occurrences(self, ids: Sequence[int]) -> np.ndarray:
        """Training-block index (relative to start_block) of every occurrence of `ids` inside one block,
        one entry per occurrence (a phrase twice in a block counts twice)."""
        ids = np.asarray(ids, dtype=np.int64)
        length = len(ids)
        if length == 0:
            return np.zeros(0, dtype=np.int64)
        lo, hi = self.start_block * self.seq_len, self.end_block * self.seq_len + 1
        if length >= self.n:
            key = _hashes(ids[: self.n], self.n)[0]
            left, right = np.searchsorted(self.hashes, key, "left"), np.searchsorted(self.hashes, key, "right")
            candidates = np.asarray(self.positions[left:right], dtype=np.int64)
            candidates = candidates[candidates + length <= hi]
        else:  # shorter than the index's n-grams: scan the token array
            candidates = np.flatnonzero(np.asarray(self.tokens[lo : hi - length + 1]) == ids[0]).astype(np.int64) + lo
        if len(candidates):
            windows = np.asarray(self.tokens[candidates[:, None] + np.arange(length)[None]])
            candidates = candidates[(windows == ids[None]).all(axis=1)]
        blocks = [self._fits(candidates, length)]
        if length == 1:  # a block's last token is also the next block's first
            blocks.append(self._fits(candidates - self.seq_len, length + self.seq_len))
        out = np.concatenate(blocks)
        return out[out >= 0]

    def ngrams_of(self, ids: Sequence[int]) -> list[np.ndarray]:
        """For each n-gram of `ids`, the training blocks holding it (one entry per occurrence)."""
        ids = list(ids)
        return [self.occurrences(ids[i : i + self.n]) for i in range(len(ids) - self.n + 1)]


class TrainingOrder:
    """When each training block was consumed: the sampler's stream cut into global batches.

    Args:
        num_blocks: training blocks; global_batch: sequences per optimizer step; seed: train.seed.
    """

    def __init__(self, num_blocks: int, global_batch: int, seed: int):
        self.num_blocks, self.global_batch, self.seed = int(num_blocks), int(global_batch), int(seed)
        # dp_size 1 and micro_batch = global_batch: `stream` is the layout-independent order itself.
        self._sampler = ResumableSampler(self.num_blocks, self.global_batch, self.global_batch, 0, 1, self.seed)
        self._inverse: dict[int, np.ndarray] = {}

    def _epoch_inverse(self, epoch: int) -> np.ndarray:
        inv = self._inverse.get(epoch)
        if inv is None:
            order = np.asarray(self._sampler.stream(epoch * self.num_blocks, self.num_blocks), dtype=np.int64)
            inv = np.empty(self.num_blocks, dtype=np.int64)
            inv[order] = np.arange(self.num_blocks)
            self._inverse[epoch] = inv
        return inv

    def blocks_of_step(self, step: int) -> list[int]:
        """The global batch of 1-based step `step` (every DP rank's share, in rank order)."""
        return self._sampler.stream((step - 1) * self.global_batch, self.global_batch)

    def steps_of(self, blocks: np.ndarray, by_step: int) -> np.ndarray:
        """The 1-based steps <= by_step at which each of `blocks` was consumed (one entry per consumption,
        so a block seen in two epochs appears twice)."""
        blocks = np.asarray(blocks, dtype=np.int64)
        consumed = max(0, int(by_step)) * self.global_batch
        out = []
        for epoch in range((consumed + self.num_blocks - 1) // self.num_blocks):
            position = epoch * self.num_blocks + self._epoch_inverse(epoch)[blocks]
            out.append(position[position < consumed] // self.global_batch + 1)
        return np.sort(np.concatenate(out)) if out else np.zeros(0, dtype=np.int64)


class ExposureIndex:
    """n-gram index + training order: the exposure of any token sequence at any step."""

    def __init__(self, ngrams: NgramIndex, order: TrainingOrder):
        if order.num_blocks != ngrams.end_block - ngrams.start_block:
            raise ValueError("the n-gram index and the training order cover different numbers of blocks")
        self.ngrams, self.order = ngrams, order

    @classmethod
    def for_blocks(
        cls, blocks, global_batch: int, seed: int, n: int = DEFAULT_NGRAM, cache: Optional[str] = None
    ) -> "ExposureIndex":
        """From the run's training PackedBlocks (a token-cache source), reusing the index saved under `cache`."""
        if not all(hasattr(blocks, a) for a in ("tokens", "seq_len", "start_block", "end_block")):
            raise DataError(
                "the exposure index needs a training set cut from a token array (a file or hub "
                "source, or the embedded corpus); generated task: sources have none"
            )
        source = {
            "tokens": os.path.basename(getattr(blocks.tokens, "path", "")) or "array",
            "num_tokens": int(len(blocks.tokens)),
            "n": n,
            "seq_len": blocks.seq_len,
            "start_block": blocks.start_block,
            "end_block": blocks.end_block,
        }
        index = NgramIndex.load(cache, blocks.tokens, source) if cache else None
        if index is None:
            index = NgramIndex.build(blocks.tokens, blocks.seq_len, blocks.start_block, blocks.end_block, n)
            if cache:
                index.save(cache, source)
        return cls(index, TrainingOrder(len(blocks), global_batch, seed))

    def exposure(self, ids: Sequence[int], by_step: int) -> dict:
        """{"seen", "count" (times the whole sequence went through training by step), "first_step", "steps"}."""
        steps = self.order.steps_of(self.ngrams.occurrences(ids), by_step)
        return {
            "seen": bool(len(steps)),
            "count": int(len(steps)),
            "first_step": int(steps[0]) if len(steps) else None,
            "steps": steps.tolist(),
        }

    def ngram_overlap(self, ids: Sequence[int], by_step: int) -> Optional[float]:
        """Share of the n-grams of `ids` seen by step `by_step` (None if ids is shorter than n)."""
        grams = self.ngrams.ngrams_of(ids)
        if not grams:
            return None
        return sum(bool(len(self.order.steps_of(g, by_step))) for g in grams) / len(grams)

    def split(self, items: Sequence[Sequence[int]], by_step: int) -> tuple[list[int], list[int]]:
        """(indices of items seen whole by step `by_step`, indices of the rest)."""
        seen, unseen = [], []
        for i, ids in enumerate(items):
            (seen if self.exposure(ids, by_step)["seen"] else unseen).append(i)
        return seen, unseen
