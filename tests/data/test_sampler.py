"""Stage 4: packed blocks, the resumable sampler and validation batches (index logic only)."""

import json

import numpy as np
import pytest
import torch

from megatrain.data.sampler import PackedBlocks, ResumableSampler, val_batches
from megatrain.errors import DataError


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
    assert flat == tokens[1 : 1 + len(blocks) * 8].tolist()


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
    epochs = [stream[e * n : (e + 1) * n] for e in range(4)]
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
