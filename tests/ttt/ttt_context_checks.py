"""qTTT's context prefill split over a context group of 2 gloo processes (parallel.context=2), against one
process; run by test_adapt.py.

For GQA (one KV head per context rank), MHA, GQA with a single KV head and IHA: the cache every rank ends
with holds the one-process keys, values and positions (with contexts of odd and unequal lengths, so the
split adds a column of left padding, dropped from the cache again), and the span losses of every step and the
answers (tokens and log-probabilities) generated over the adapted cache equal the one-process ones.
Usage: torchrun --nproc-per-node 2 tests/ttt/ttt_context_checks.py
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from megatrain.generate import generate
from megatrain.models.config import IHAConfig, ModelConfig
from megatrain.models.transformer import Transformer
from megatrain.parallel.context_parallel import apply_context_parallel
from megatrain.parallel.groups import build_groups
from megatrain.ttt import adapt
from megatrain.ttt.adapt import prefill

CONTEXTS = [[(7 * i) % 60 + 4 for i in range(41)], [(5 * i + 3) % 60 + 4 for i in range(29)]]
PROMPTS = [[5, 9], [11]]


def run(model):
    with adapt(model, CONTEXTS, steps=3, span=8, lr=1e-2, seed=2) as cache:
        answers = generate(model, PROMPTS, max_new_tokens=5, cache=cache, return_logprobs=True)
        return list(cache.losses), answers


def main():
    dist.init_process_group("gloo")
    groups = build_groups(1, context=2)
    rank = dist.get_rank()
    cases = {
        "gqa": {},
        "mha": {"kv_heads": 4},
        "gqa-one-kv-head": {"kv_heads": 1},
        "iha": {"attention": "iha", "iha": IHAConfig(pseudo_heads=2)},
    }
    for name, extra in cases.items():
        cfg = ModelConfig(preset="tiny", vocab_size=64, max_seq_len=64, init_std=0.1, **extra)
        torch.manual_seed(3)
        full = Transformer(cfg).eval()
        split = copy.deepcopy(full)
        apply_context_parallel(split, groups)
        what = f"rank {rank} {name}"
        ref, got = prefill(full, CONTEXTS), prefill(split, CONTEXTS)
        width = ref.keys[0].shape[2]
        assert got.keys[0].shape[2] == width, what  # the pad added for the split (41 tokens) is dropped again
        assert got.frozen and got.context_lengths == ref.context_lengths, what
        assert torch.equal(got.positions, ref.positions), what
        for layer in range(full.config.layers):
            for a, b in ((got.keys[layer], ref.keys[layer]), (got.values[layer], ref.values[layer])):
                for row, context in enumerate(CONTEXTS):  # the context's own keys (a pad's see the other pads)
                    real = len(context)
                    torch.testing.assert_close(a[row, :, -real:], b[row, :, -real:], rtol=1e-5, atol=1e-6, msg=what)
        ref_losses, ref_answers = run(full)
        losses, answers = run(split)
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6, msg=what)
        assert answers[0] == ref_answers[0], (what, answers[0], ref_answers[0])
        for a, b in zip(answers[1], ref_answers[1]):
            torch.testing.assert_close(
                torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}"
            )
    dist.barrier()
    if rank == 0:
        print("ok: ttt context")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
