"""Stage 4 of the data path: blocks and the order they are read in. Pure index logic: no file
reading, no tokenizer.

`PackedBlocks` cuts one token stream (a memory-mapped TokenArray, or any array) into training
sequences of seq_len + 1 tokens with stride seq_len, so every token is a label exactly once.
`ResumableSampler` is a seeded, epoch-by-epoch permutation of the blocks: a global step takes the
next global_batch blocks of that stream and each data-parallel rank its slice, so the union over
ranks does not depend on the layout and a checkpoint stores one number. `val_batches` walks the
validation blocks in order.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from megatrain.errors import DataError

__all__ = ["PackedBlocks", "ResumableSampler", "val_batches"]


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
            raise DataError(
                f"data.seq_len={self.seq_len} needs at least {self.seq_len + 1} tokens for one "
                f"block, but the token array has {len(tokens)}"
            )
        end_block = total if end_block is None else end_block
        if not 0 <= start_block < end_block <= total:
            raise ValueError(
                f"block range [{start_block}, {end_block}) is empty or outside the {total} blocks of the token array"
            )
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
        return torch.from_numpy(np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int64))

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

    def __init__(
        self,
        num_blocks: int,
        global_batch: int,
        micro_batch: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        consumed_samples: int = 0,
    ):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if micro_batch < 1 or dp_size < 1 or global_batch < 1:
            raise ValueError(
                f"global_batch, micro_batch and dp_size must be >= 1, got {global_batch}, {micro_batch}, {dp_size}"
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is not in [0, dp_size={dp_size})")
        if global_batch % (micro_batch * dp_size):
            raise ValueError(
                f"global_batch={global_batch} is not a multiple of micro_batch x dp_size = "
                f"{micro_batch} x {dp_size} = {micro_batch * dp_size}"
            )
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

    def stream(self, start: int, count: int) -> list[int]:
        """Block indices at stream positions [start, start + count): global step s (1-based) draws
        positions [(s - 1) * global_batch, s * global_batch), whatever the data-parallel layout."""
        out: list[int] = []
        position, end = start, start + count
        while position < end:
            epoch, offset = divmod(position, self.num_blocks)
            take = min(end - position, self.num_blocks - offset)
            out.extend(self._order(epoch)[offset : offset + take].tolist())
            position += take
        return out

    def next_step(self) -> list[list[int]]:
        """This rank's block indices for the next global step: grad_accum lists of micro_batch."""
        per_rank = self.global_batch // self.dp_size
        mine = self.stream(self.consumed_samples + self.dp_rank * per_rank, per_rank)
        self.consumed_samples += self.global_batch
        return [mine[i * self.micro_batch : (i + 1) * self.micro_batch] for i in range(self.grad_accum)]

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed, "num_blocks": self.num_blocks}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position. The saved seed is kept, so the data order continues even
        if train.seed was changed for the resumed run.

        Raises:
            DataError: the saved num_blocks differs (the training data or seq_len changed).
        """
        if int(state["num_blocks"]) != self.num_blocks:
            raise DataError(
                f"checkpoint data position was saved for {state['num_blocks']} training blocks "
                f"but the data now has {self.num_blocks}: data.source, data.seq_len or the "
                f"tokenizer changed since the checkpoint"
            )
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
