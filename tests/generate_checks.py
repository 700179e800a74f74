"""megatrain.generate in 2 gloo processes, against one process; run by test_generate.py.

tp: the model split over TP=2 (with and without sequence parallelism, dense and IHA) generates the
same tokens and log-probabilities as the full model, greedy and sampled, with rows finishing early,
with eager decode steps and with the steps as CUDA graphs run them (`emulated_graphs`).
zero3: each rank generates its own prompts through a ZeRO-3 DeepSpeed engine's module; the ranks
finish after different numbers of steps (so one must keep joining the other's parameter gathers),
and each rank's output equals the full model's.
Usage: torchrun --nproc-per-node 2 tests/generate_checks.py CHECK [CHECK ...]
"""

from __future__ import annotations

import contextlib
import copy
import sys

import torch
import torch.distributed as dist

from megatrain.models.config import IHAConfig, ModelConfig
from megatrain.generate import generate
from megatrain.models.transformer import Transformer

PROMPTS = [[5, 9, 2, 33, 14, 7, 1], [40, 3], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [8]]
SETTINGS = [dict(), dict(temperature=0.8, seed=[3, 1, 4, 1]), dict(temperature=1.2, top_k=7, top_p=0.8, seed=9)]


@contextlib.contextmanager
def emulated_graphs(captures=None):
    """Inside, `generate` decodes as it does with CUDA graphs (attention over every static slot,
    batch-size buckets with finished rows kept in them, inputs copied into per-bucket tensors), on any
    device: a "capture" runs the step once on its own input tensors and a "replay" reruns it there and
    copies the logits into the tensor the capture returned. `captures` (a list) gets each capture's
    batch size."""
    import megatrain.generate as gen

    def capture(step, ids, positions):
        static_ids, static_positions = ids.clone(), positions.clone()
        logits = step.forward(static_ids, static_positions)
        if captures is not None:
            captures.append(ids.shape[0])
        return gen._Graph(
            lambda: logits.copy_(step.forward(static_ids, static_positions)), static_ids, static_positions, logits
        )

    saved = gen._use_graphs, gen._capture
    gen._use_graphs, gen._capture = (lambda setting, model, device: setting is not False), capture
    try:
        yield
    finally:
        gen._use_graphs, gen._capture = saved


def assert_same(out, ref, what):
    (tokens, logprobs), (ref_tokens, ref_logprobs) = out, ref
    assert tokens == ref_tokens, f"rank {dist.get_rank()}: {what}: {tokens} != {ref_tokens}"
    for row, (a, b) in enumerate(zip(logprobs, ref_logprobs)):
        torch.testing.assert_close(
            torch.tensor(a),
            torch.tensor(b),
            rtol=1e-5,
            atol=1e-5,
            msg=lambda m: f"rank {dist.get_rank()}: {what} row {row}: {m}",
        )


def check_tp(groups):
    from megatrain.parallel.parallelize import parallelize

    cases = [(False, {}), (True, {}), (False, dict(attention="iha", iha=IHAConfig(pseudo_heads=2, tp_mode="exact")))]
    for sequence_parallel, extra in cases:
        cfg = ModelConfig(preset="tiny", vocab_size=64, max_seq_len=40, **extra)
        torch.manual_seed(3)
        full = Transformer(cfg).eval()
        torch.manual_seed(3)
        split = parallelize(Transformer(cfg), groups, sequence_parallel=sequence_parallel).eval()
        for kwargs in SETTINGS:
            what = f"sp={sequence_parallel} {extra} {kwargs}"
            ref = generate(full, PROMPTS, max_new_tokens=9, return_logprobs=True, **kwargs)
            # An EOS that ends row 0 early and not all rows at once: rows leave the batch mid-way.
            eos = ref[0][0][2]
            assert any(eos not in row for row in ref[0]), what
            ref = generate(full, PROMPTS, max_new_tokens=9, return_logprobs=True, eos_id=eos, **kwargs)
            out = generate(split, PROMPTS, max_new_tokens=9, return_logprobs=True, eos_id=eos, **kwargs)
            assert_same(out, ref, what)
            # The decode as CUDA graphs run it (static slots, batch-size buckets), with the TP collectives.
            captures = []
            with emulated_graphs(captures):
                out = generate(split, PROMPTS, max_new_tokens=9, return_logprobs=True, eos_id=eos, **kwargs)
            assert_same(out, ref, f"graphs {what}")
            assert captures[0] == len(PROMPTS) and captures == sorted(set(captures), reverse=True), captures


def check_zero3(groups):
    import deepspeed

    cfg = ModelConfig(preset="tiny", vocab_size=64, max_seq_len=40)
    torch.manual_seed(5)
    model = Transformer(cfg)
    full = copy.deepcopy(model).eval()
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
        # Threshold 0: even the tiny model's parameters are partitioned and gathered in every forward.
        config={
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,
        },
    )
    module = engine.module.eval()
    assert all(p.numel() == 0 for p in module.parameters()), "parameters not partitioned by ZeRO-3"
    rank = dist.get_rank()
    # Rank 0 stops at its first token (EOS = that token), rank 1 runs all 12 steps.
    prompts = [PROMPTS[0]] if rank == 0 else [PROMPTS[2], PROMPTS[3]]
    first = generate(full, prompts, max_new_tokens=1)
    eos = first[0][0] if rank == 0 else 63
    for kwargs in (dict(), dict(temperature=0.8, seed=rank)):
        ref = generate(full, prompts, max_new_tokens=12, eos_id=eos, return_logprobs=True, **kwargs)
        if rank == 0 and not kwargs:
            assert ref[0][0] == [eos], ref
        for wrapped in (module, engine):  # the engine itself is unwrapped to its module
            out = generate(wrapped, prompts, max_new_tokens=12, eos_id=eos, return_logprobs=True, **kwargs)
            assert_same(out, ref, f"zero3 {kwargs}")


CHECKS = {"tp": check_tp, "zero3": check_zero3}


def main(names):
    dist.init_process_group("gloo")
    groups = None
    if "tp" in names:
        from megatrain.parallel.groups import build_groups

        groups = build_groups(dist.get_world_size())
    for name in names:
        CHECKS[name](groups)
    dist.barrier()
    if dist.get_rank() == 0:
        print("ok:", " ".join(names))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
