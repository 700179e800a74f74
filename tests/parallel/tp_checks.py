"""Tensor-parallel layer checks, run by test_tensor_parallel.py under torchrun with 2 gloo processes.

Each check builds the full-size layer on every rank from one seed, splits it, and compares the
split forward and every gradient with the full single-process computation (fp32, ~1e-5).
Usage: torchrun --nproc-per-node 2 tests/parallel/tp_checks.py CHECK [CHECK ...]
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatrain import kernels
from megatrain.models.config import ModelConfig
from megatrain.models.transformer import Transformer
from megatrain.parallel.groups import build_groups
from megatrain.parallel.parallelize import parallelize
from megatrain.parallel.plan import shard_specs
from megatrain.parallel.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    SequenceParallelRMSNorm,
    VocabParallelEmbedding,
    VocabParallelLMHead,
    copy_to_tp,
    gather_sequence,
    reduce_scatter_sequence,
)

TOL = dict(rtol=1e-5, atol=1e-5)


def close(actual, expected, what):
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"rank {dist.get_rank()}: {what}: {m}")


def local_part(t, dim, groups, replicas=1):
    parts = groups.tp_size // replicas
    return t.chunk(parts, dim=dim)[groups.tp_rank // replicas]


def check_cross_entropy(groups):
    """Vocab-parallel fused cross-entropy against torch's cross_entropy on the full logits, for both
    kernel backends (the Triton one through the interpreter)."""
    torch.manual_seed(0)
    tokens, dim, vocab = 13, 24, 40
    h_full = torch.randn(tokens, dim)
    w_full = torch.randn(vocab, dim) * 0.5
    target = torch.randint(0, vocab, (tokens,))
    target[3] = -100
    h_ref, w_ref = h_full.clone().requires_grad_(), w_full.clone().requires_grad_()
    ref = F.cross_entropy(h_ref @ w_ref.T, target, ignore_index=-100)
    ref.backward()
    for backend in ("torch", "triton"):
        os.environ["MEGATRAIN_KERNELS"] = backend
        h = h_full.clone().requires_grad_()
        head = VocabParallelLMHead(nn.Parameter(local_part(w_full, 0, groups).clone()), groups.tp_group)
        loss = head(h, target)
        loss.backward()
        close(loss, ref, f"{backend} loss")
        close(h.grad, h_ref.grad, f"{backend} dh")
        close(head.weight.grad, local_part(w_ref.grad, 0, groups), f"{backend} dW")
        logits = head(h_full)
        close(logits, h_full @ w_full.T, f"{backend} gathered logits")
    os.environ["MEGATRAIN_KERNELS"] = "auto"


def check_linear_embedding(groups):
    """Embedding -> column-parallel -> row-parallel, with and without sequence parallelism."""
    torch.manual_seed(1)
    vocab, dim, hidden, batch, seq = 16, 12, 20, 2, 6
    embed, up, down = nn.Embedding(vocab, dim), nn.Linear(dim, hidden, bias=True), nn.Linear(hidden, dim, bias=True)
    ids = torch.randint(0, vocab, (batch, seq))
    ref = down(F.silu(up(embed(ids))))
    ref.square().sum().backward()
    for sequence_parallel in (False, True):
        g = groups.tp_group
        p_embed = VocabParallelEmbedding.from_full(
            embed, g, rank=groups.tp_rank, parts=groups.tp_size, sequence_parallel=sequence_parallel
        )
        p_up = ColumnParallelLinear.from_full(up, g, rank=groups.tp_rank, parts=groups.tp_size)
        p_down = RowParallelLinear.from_full(
            down, g, rank=groups.tp_rank, parts=groups.tp_size, sequence_parallel=sequence_parallel
        )
        x = p_embed(ids)
        x = gather_sequence(x, g) if sequence_parallel else copy_to_tp(x, g)
        out = p_down(F.silu(p_up(x)))
        expected = local_part(ref, 1, groups) if sequence_parallel else ref
        close(out, expected.detach(), f"sp={sequence_parallel} output")
        # The loss is a sum over the sequence: with SP each rank holds part of it.
        loss = out.square().sum()
        loss.backward()
        close(p_embed.weight.grad, local_part(embed.weight.grad, 0, groups), f"sp={sequence_parallel} d embed")
        close(p_up.weight.grad, local_part(up.weight.grad, 0, groups), f"sp={sequence_parallel} d up.weight")
        close(p_up.bias.grad, local_part(up.bias.grad, 0, groups), f"sp={sequence_parallel} d up.bias")
        close(p_down.weight.grad, local_part(down.weight.grad, 1, groups), f"sp={sequence_parallel} d down.weight")
        # The bias gradient is complete on every rank (summed over the sequence shards with SP).
        close(p_down.bias.grad, down.bias.grad, f"sp={sequence_parallel} d down.bias")


def check_sequence_parallel_norm(groups):
    torch.manual_seed(2)
    x_full = torch.randn(2, 8, 10)
    weight = nn.Parameter(torch.rand(10) + 0.5)
    ref_w = weight.detach().clone().requires_grad_()
    (kernels.rms_norm(x_full, ref_w, 1e-5) * torch.arange(10.0)).sum().backward()
    norm = SequenceParallelRMSNorm(weight, 1e-5, groups.tp_group)
    x = local_part(x_full, 1, groups)
    out = norm(x)
    (out * torch.arange(10.0)).sum().backward()
    close(weight.grad, ref_w.grad, "norm weight grad")
    round_trip = reduce_scatter_sequence(gather_sequence(x, groups.tp_group), groups.tp_group)
    close(round_trip, x * groups.tp_size, "reduce_scatter(gather(x)) = T * x")


def _model_check(groups, sequence_parallel, kv_heads, tie, **extra):
    cfg = ModelConfig(preset="tiny", vocab_size=64, kv_heads=kv_heads, tie_embeddings=tie, **extra)
    torch.manual_seed(3)
    full = Transformer(cfg)
    torch.manual_seed(3)
    split = parallelize(Transformer(cfg), groups, sequence_parallel=sequence_parallel)
    ids = torch.randint(0, 64, (2, 8))
    labels = torch.randint(0, 64, (2, 8))
    ref = full(ids, labels)
    ref.backward()
    loss = split(ids, labels)
    loss.backward()
    what = f"model sp={sequence_parallel} kv_heads={kv_heads} tie={tie} {extra}"
    close(loss, ref, f"{what} loss")
    specs = shard_specs([n for n, _ in split.named_parameters()], full.config, groups.tp_size)
    full_params = dict(full.named_parameters())
    for name, param in split.named_parameters():
        dim, replicas = specs[name]
        expected = full_params[name].grad
        if expected is None:  # frozen (LoRA's W)
            assert param.grad is None and not param.requires_grad, f"{what}: {name} has a gradient"
            continue
        if dim is not None:
            expected = local_part(expected, dim, groups, replicas)
        close(param.grad, expected, f"{what} grad {name}")
    with torch.no_grad():
        close(split(ids), full(ids), f"{what} logits")


def check_model(groups):
    """The parallelized tiny model: loss, logits and every gradient equal the full model's, with KV
    heads split (kv_heads=2) and replicated (kv_heads=1), tied and untied, with and without SP."""
    for sequence_parallel, kv_heads, tie in [(False, 2, False), (True, 2, True), (False, 1, False), (True, 1, True)]:
        _model_check(groups, sequence_parallel, kv_heads, tie)


def check_comm_volume(groups):
    """The bytes the TP layers really sent in one forward + backward equal tp_comm_volume's count."""
    from megatrain.models.config import IHAConfig
    from megatrain.parallel import tensor_parallel
    from megatrain.parallel.parallelize import tp_comm_volume

    from megatrain.models.config import LowRankConfig

    lowrank = [
        dict(linear="cola", lowrank=LowRankConfig(rank=8)),
        dict(linear="sltrain", lowrank=LowRankConfig(rank=8, density=0.1)),
        dict(linear="lora", lowrank=LowRankConfig(rank=8, dropout=0.0)),
    ]
    for sequence_parallel, extra in [
        (False, {}),
        (True, {}),
        (False, dict(attention="iha", iha=IHAConfig(pseudo_heads=2))),
        *[(sp, kind) for kind in lowrank for sp in (False, True)],
    ]:
        cfg = ModelConfig(preset="tiny", vocab_size=64, **extra)
        model = parallelize(Transformer(cfg), groups, sequence_parallel=sequence_parallel)
        ids = torch.randint(0, 64, (2, 8))
        for key in tensor_parallel.COMM_BYTES:
            tensor_parallel.COMM_BYTES[key] = 0.0
        model(ids, ids).backward()
        counted = sum(tensor_parallel.COMM_BYTES.values())
        expected = tp_comm_volume(cfg, 16, groups.tp_size, sequence_parallel=sequence_parallel, bytes_per_element=4)
        computed = expected["per_step"] - expected["loss"]  # the loss kernel's collectives are not counted
        assert abs(counted - computed) < 1e-6 * computed, (sequence_parallel, extra, counted, expected)


def check_iha(groups):
    """Interleaved head attention under TP=2: exact mode (heads all-gathered for the mixing) and local
    mode (head_groups = T) equal the single-process model, with rotary at virtual positions, through
    the fused kernel (Triton interpreter) and the reference."""
    from megatrain.models.config import IHAConfig

    for backend in ("torch", "triton"):
        os.environ["MEGATRAIN_KERNELS"] = backend
        _model_check(groups, False, 2, False, attention="iha", iha=IHAConfig(pseudo_heads=2, tp_mode="exact"))
        _model_check(
            groups,
            True,
            1,
            False,
            attention="iha",
            iha=IHAConfig(pseudo_heads=2, tp_mode="local", head_groups=2, mask="token_causal"),
        )
    os.environ["MEGATRAIN_KERNELS"] = "auto"


def check_lowrank(groups):
    """CoLA, SLTrain and LoRA under TP=2 (lowrank_parallel.py): loss, logits and every gradient slice equal
    the single-process model's, with and without sequence parallelism and with KV heads replicated."""
    from megatrain.models.config import LowRankConfig

    for linear in ("cola", "sltrain", "lora"):
        lowrank = LowRankConfig(rank=8, **{"cola": {}, "sltrain": {"density": 0.1}, "lora": {"dropout": 0.0}}[linear])
        _model_check(groups, False, 2, False, linear=linear, lowrank=lowrank)
        _model_check(groups, True, 1, True, linear=linear, lowrank=lowrank)


def check_relora(groups):
    """ReLoRA's restart under TP=2 (merge into each W shard, re-draw of the whole factor keeping this
    rank's slice, magnitude pruning of the Adam moments with the whole layer's threshold) equals the
    one-process restart: two Adam steps, a restart before step 2, one more step; every parameter and
    moment is the slice of the full model's, and the losses match. KV heads split and replicated."""
    from types import SimpleNamespace

    from megatrain.models.config import LowRankConfig
    from megatrain.optim.relora import ReLoRA

    relora = SimpleNamespace(every=2, restart_warmup=1, warm_start_steps=0, prune="magnitude", prune_ratio=0.5)
    run_cfg = SimpleNamespace(train=SimpleNamespace(relora=relora, seed=7))
    for sequence_parallel, kv_heads in [(False, 2), (True, 1)]:
        cfg = ModelConfig(
            preset="tiny", vocab_size=64, kv_heads=kv_heads, linear="relora", lowrank=LowRankConfig(rank=8, dropout=0.0)
        )
        torch.manual_seed(3)
        full = Transformer(cfg)
        torch.manual_seed(3)
        split = parallelize(Transformer(cfg), groups, sequence_parallel=sequence_parallel)
        what = f"relora sp={sequence_parallel} kv_heads={kv_heads}"
        models = {"full": full, "split": split}
        drivers = {k: ReLoRA(run_cfg, m) for k, m in models.items()}
        assert len(drivers["split"].layers) == len(drivers["full"].layers) == 14, what
        opts = {k: torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-3) for k, m in models.items()}
        torch.manual_seed(4)
        batches = [(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))) for _ in range(3)]
        for step, (ids, labels) in enumerate(batches):
            for key in models:
                drivers[key].before_step(SimpleNamespace(optimizer=opts[key]), step)
                assert drivers[key].restarts_done == (step >= 2), what
            if step == 2:  # just restarted: W merged, factors re-drawn, moments pruned
                _compare_restart(split, full, opts, groups, what)
            losses = {}
            for key, model in models.items():
                opts[key].zero_grad()
                loss = model(ids, labels)
                loss.backward()
                opts[key].step()
                losses[key] = loss.detach()
            close(losses["split"], losses["full"], f"{what} loss at step {step}")


def _compare_restart(split, full, opts, groups, what):
    """Every parameter and Adam moment of the split model is its slice of the full model's."""
    specs = shard_specs([n for n, _ in split.named_parameters()], full.config, groups.tp_size)
    full_params = dict(full.named_parameters())
    for name, param in split.named_parameters():
        dim, replicas = specs[name]
        part = (lambda t: t) if dim is None else (lambda t: local_part(t, dim, groups, replicas))
        close(param.detach(), part(full_params[name].detach()), f"{what} {name}")
        if param.requires_grad:
            for key in ("exp_avg", "exp_avg_sq"):
                close(
                    opts["split"].state[param][key],
                    part(opts["full"].state[full_params[name]][key]),
                    f"{what} {key} of {name}",
                )
    assert any(n.endswith("lora_b") and (p == 0).all() for n, p in split.named_parameters()), what


CHECKS = {
    "relora": check_relora,
    "lowrank": check_lowrank,
    "iha": check_iha,
    "comm_volume": check_comm_volume,
    "cross_entropy": check_cross_entropy,
    "linear_embedding": check_linear_embedding,
    "sequence_parallel_norm": check_sequence_parallel_norm,
    "model": check_model,
}


def main(names):
    dist.init_process_group("gloo")
    groups = build_groups(dist.get_world_size())
    for name in names:
        CHECKS[name](groups)
    dist.barrier()
    if dist.get_rank() == 0:
        print("ok:", " ".join(names))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
