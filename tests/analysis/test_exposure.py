"""The exposure index against the order the trainer really draws: ResumableSampler under DP=2 and DP=1."""

from __future__ import annotations

import numpy as np
import pytest

from megatrain.analysis.exposure import ExposureIndex, NgramIndex, TrainingOrder
from megatrain.data.sampler import PackedBlocks, ResumableSampler

SEQ_LEN, NUM_BLOCKS, GLOBAL_BATCH, SEED = 16, 24, 8, 11


def _trainer_steps(block: int, dp_size: int, micro_batch: int, steps: int) -> list[int]:
    """Steps (1-based) at which `block` went into some rank's micro-batch, walking the samplers exactly as
    Trainer.train_step does (one ResumableSampler per data-parallel rank, next_step() once per step)."""
    samplers = [ResumableSampler(NUM_BLOCKS, GLOBAL_BATCH, micro_batch, rank, dp_size, SEED) for rank in range(dp_size)]
    seen = []
    for step in range(1, steps + 1):
        for sampler in samplers:
            for micro in sampler.next_step():
                seen += [step] * micro.count(block)
    return seen


@pytest.fixture(scope="module")
def planted():
    """A random token stream (vocab 5000: its 4-grams are unique) with a phrase planted in block 13, and one
    planted across the boundary of blocks 5 and 6."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(100, 5000, size=NUM_BLOCKS * SEQ_LEN + 1).astype(np.uint16)
    phrase = np.array([1, 2, 3, 4, 5, 6, 7], dtype=np.uint16)
    tokens[13 * SEQ_LEN + 4 : 13 * SEQ_LEN + 11] = phrase
    # block 5 holds tokens [5 * SEQ_LEN, 6 * SEQ_LEN] inclusive, block 6 starts at 6 * SEQ_LEN: 9, 8, 7 lie in
    # block 5 and 7, 6, 5, 4 in block 6, no block holds all six
    straddle = np.array([9, 8, 7, 6, 5, 4], dtype=np.uint16)
    tokens[6 * SEQ_LEN - 2 : 6 * SEQ_LEN + 4] = straddle
    blocks = PackedBlocks(tokens, SEQ_LEN)
    return blocks, phrase.tolist(), straddle.tolist()


@pytest.mark.parametrize("dp_size, micro_batch", [(1, 4), (2, 2), (2, 4), (4, 1)])
def test_planted_phrase_found_at_the_steps_its_block_was_trained_on(planted, tmp_path, dp_size, micro_batch):
    blocks, phrase, _ = planted
    index = ExposureIndex.for_blocks(blocks, GLOBAL_BATCH, SEED, n=4, cache=str(tmp_path / "index"))
    steps = 3 * NUM_BLOCKS // GLOBAL_BATCH  # three epochs
    expected = _trainer_steps(13, dp_size, micro_batch, steps)
    assert len(expected) == 3  # once per epoch
    found = index.exposure(phrase, by_step=steps)
    assert found["steps"] == expected and found["first_step"] == expected[0] and found["count"] == 3
    # by the step before it was first drawn: unseen; at that step: seen once
    assert not index.exposure(phrase, by_step=expected[0] - 1)["seen"]
    assert index.exposure(phrase, by_step=expected[0])["count"] == 1
    # a sub-phrase shorter than the n-gram length takes the scan path and agrees
    assert index.exposure(phrase[2:5], by_step=steps)["steps"] == expected


def test_phrase_across_a_block_boundary_was_never_seen_whole(planted):
    blocks, phrase, straddle = planted
    index = ExposureIndex.for_blocks(blocks, GLOBAL_BATCH, SEED, n=4)
    assert not index.exposure(straddle, by_step=100)["seen"]
    assert index.exposure(straddle[:3], by_step=100)["seen"]  # its first half sits inside block 5
    # of its 4-grams only the last, [7, 6, 5, 4], lies in one block (block 6 starts at the shared token 7)
    assert index.ngram_overlap(straddle, by_step=100) == pytest.approx(1 / 3)
    assert index.ngram_overlap(phrase, by_step=100) == 1.0
    seen, unseen = index.split([phrase, straddle, [4999, 4998, 4997, 4996]], by_step=100)
    assert seen == [0] and unseen == [1, 2]


def test_index_agrees_with_a_brute_force_scan_and_reloads(planted, tmp_path):
    blocks, _, _ = planted
    built = NgramIndex.build(blocks.tokens, SEQ_LEN, 0, NUM_BLOCKS, 4)
    source = {"tokens": "t", "n": 4}
    built.save(str(tmp_path), source)
    loaded = NgramIndex.load(str(tmp_path), blocks.tokens, source)
    assert NgramIndex.load(str(tmp_path), blocks.tokens, {"tokens": "other", "n": 4}) is None
    order = TrainingOrder(NUM_BLOCKS, GLOBAL_BATCH, SEED)
    tokens = np.asarray(blocks.tokens)
    for start in (0, 17, 100, 6 * SEQ_LEN - 1, 230):
        query = tokens[start : start + 5].tolist()
        expected = sorted(
            b
            for b in range(NUM_BLOCKS)
            for o in range(SEQ_LEN + 1 - 4)
            if tokens[b * SEQ_LEN + o : b * SEQ_LEN + o + 5].tolist() == query
        )
        assert sorted(loaded.occurrences(query).tolist()) == expected
    # the global batch of a step is what the DP=2 ranks took together, in rank order
    ranks = [ResumableSampler(NUM_BLOCKS, GLOBAL_BATCH, 2, r, 2, SEED) for r in range(2)]
    for step in range(1, 7):
        union = [i for s in ranks for micro in s.next_step() for i in micro]
        assert order.blocks_of_step(step) == union
