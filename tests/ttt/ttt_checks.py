"""megatrain.ttt.adapt under TP=2 in 2 gloo processes, against one process; run by test_adapt.py.

For dense (GQA with KV heads split) and IHA (tp_mode exact) models: the span losses of every step,
each rank's slice of the adapted per-example W_Q (and the replicated per-example mix_q), and the
answers generated over the adapted cache equal the single-process ones; on exit every parameter
of the split model is back bit-exactly.
Usage: torchrun --nproc-per-node 2 tests/ttt/ttt_checks.py
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatrain.models.config import IHAConfig, ModelConfig
from megatrain.generate import generate
from megatrain.models.transformer import Transformer
from megatrain.parallel.groups import build_groups
from megatrain.parallel.parallelize import parallelize
from megatrain.ttt import adapt

CONTEXTS = [[(7 * i) % 60 + 4 for i in range(40)], [(5 * i + 3) % 60 + 4 for i in range(29)]]
PROMPTS = [[5, 9], [11]]


def run(model, target):
    with adapt(model, CONTEXTS, steps=3, span=8, lr=1e-2, seed=2, target=target, lora_rank=4) as cache:
        answers = generate(model, PROMPTS, max_new_tokens=5, cache=cache, return_logprobs=True)
        weights = []
        for block in model.blocks:
            q = block.attn.q_proj
            weights.append((q.weight if target == "q" else q.lora_b).detach().clone())
            if hasattr(block.attn, "pseudo_heads"):
                weights.append(block.attn.__dict__["mix_q"].detach().clone())  # rows 0..B-1 of the last forward
        return list(cache.losses), answers, weights


def main():
    dist.init_process_group("gloo")
    groups = build_groups(2)
    rank = dist.get_rank()
    cases = [(dict(), "q"), (dict(), "q_lora"), (dict(attention="iha", iha=IHAConfig(pseudo_heads=2)), "q")]
    for extra, target in cases:
        cfg = ModelConfig(preset="tiny", vocab_size=64, max_seq_len=64, init_std=0.1, **extra)
        torch.manual_seed(3)
        full = Transformer(cfg).eval()
        torch.manual_seed(3)
        split = parallelize(Transformer(cfg), groups).eval()
        before = {n: p.detach().clone() for n, p in split.named_parameters()}
        ref_losses, ref_answers, ref_weights = run(full, target)
        losses, answers, weights = run(split, target)
        what = f"rank {rank} {extra} {target}"
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-5, msg=what)
        assert answers[0] == ref_answers[0], (what, answers[0], ref_answers[0])
        for a, b in zip(answers[1], ref_answers[1]):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-5)
        for w, ref in zip(weights, ref_weights):
            if w.dim() == 3 and w.shape != ref.shape:  # column-parallel: this rank's rows of W_Q / its B columns
                dim = 1 if target == "q" else 2
                ref = ref.chunk(2, dim=dim)[rank]
            # Adam divides by the gradient's own scale, so an entry whose gradient is ~0 may move by a
            # visible fraction of a step (lr = 1e-2) on float noise: atol 1e-4 = 1% of one step.
            torch.testing.assert_close(w, ref, rtol=1e-5, atol=1e-4, msg=lambda m: f"{what}: {tuple(w.shape)} {m}")
        after = dict(split.named_parameters())
        assert list(after) == list(before) and all(torch.equal(after[n], before[n]) for n in before), what
    dist.barrier()
    if rank == 0:
        print("ok: ttt tp")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
