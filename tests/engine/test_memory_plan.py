"""`megatrain plan`: the per-rank parameter and optimizer bytes it plans are what a built model and its
optimizer really hold (one process), every TP rank's parameter count matches the split parallelize
makes, and `--build` measures a >= 700M-parameter model built at TP=4 with each rank's peak host memory
under a third of the full fp32 model, and a ZeRO-3 build whose peak is the rank's partition plus one
module."""

from __future__ import annotations

import re

import pytest
import torch

from megatrain.config import load_config
from megatrain.engine.memory_plan import plan_memory, plan_model_config
from megatrain.models.transformer import Transformer
from megatrain.optim import build_optimizer
from megatrain.parallel.parallelize import SplitContext, apply_plan
from tests.conftest import TINY_JOB, run_cli

CASES = {
    "adamw": [],
    "cola": ["model.linear=cola"],
    "sltrain": ["model.linear=sltrain"],
    "lora": ["model.linear=lora"],
    "galore": ["optim.name=galore", "optim.rank=8"],
    "fira_left": ["optim.name=fira", "optim.rank=8", "optim.proj_type=left"],
}


def held_optimizer_bytes(optimizer) -> int:
    """Bytes of every tensor an optimizer holds in its state, 0-dim scalars (step counters, Fira's
    limiter norm) aside."""
    total = 0
    for opt in (optimizer, getattr(optimizer, "projected", None)):
        if opt is None:
            continue
        for state in opt.state.values():
            total += sum(v.numel() * v.element_size() for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0)
    return total


@pytest.mark.parametrize("case", list(CASES))
def test_planned_param_and_optimizer_bytes_equal_a_built_model(case):
    cfg = load_config(None, [*TINY_JOB, "parallel.zero_stage=0", "train.dtype=fp32", *CASES[case]])
    plan = plan_memory(cfg, 1)
    model = Transformer(plan_model_config(cfg), seed=cfg.train.seed)
    assert plan.params == model.num_params(non_embedding=False)
    assert plan.param_bytes == sum(p.numel() * p.element_size() for p in model.parameters())
    optimizer = build_optimizer(cfg.optim, model, lr=1e-3, on_cuda=False)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    optimizer.step()
    if getattr(optimizer, "projected", None) is not None:
        optimizer.projected.step()
    assert plan.optimizer_bytes == held_optimizer_bytes(optimizer) > 0
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    assert plan.grad_bytes == trainable and plan.master_bytes == 0


@pytest.mark.parametrize("tp, extra", [(2, []), (4, ["model.kv_heads=1"]), (2, ["model.tie_embeddings=true"])])
def test_planned_params_per_tp_rank_equal_the_split(tp, extra):
    cfg = load_config(None, [*TINY_JOB, f"parallel.tensor={tp}", "parallel.zero_stage=1", *extra])
    plan = plan_memory(cfg, 2 * tp)
    assert plan.dp == 2
    for rank in range(tp):
        model = Transformer(plan_model_config(cfg), seed=1, device="meta")
        split = apply_plan(model, SplitContext(model.config, tp, rank, None))
        assert sum(p.numel() for p in split.parameters()) == plan.params
    # ZeRO 1 shards the AdamW moments over DP; ZeRO-3 the weights too (rounded up per tensor).
    zero3 = plan_memory(load_config(None, [*TINY_JOB, "parallel.zero_stage=3", *extra]), 2)
    full = plan_memory(load_config(None, [*TINY_JOB, "parallel.zero_stage=0", *extra]), 1)
    assert full.params / 2 <= zero3.params <= full.params / 2 + 64
    assert zero3.optimizer_bytes == -(-full.optimizer_bytes // 8 // 2) * 8


def test_sltrain_plan_counts_the_transient_dense_weight(monkeypatch):
    """SLTrain builds W = scale a b + S [D_in, D_out] per call (kernels/sparse_lowrank.py): the plan
    counts the largest one (the MLP's, split over TP) in the activations' dtype; other kinds build
    none. The figure is the largest W the Triton path's forward+backward of that projection builds
    (the interpreter here; the kernel is an opaque custom op, so the builds are counted at build_weight)."""
    from megatrain.kernels import sparse_lowrank
    from megatrain.models.layers import SLTrainLinear
    from tests.kernels.kernel_testing import ran_kernel

    built = []
    build_weight = sparse_lowrank.build_weight

    def counting_build_weight(*args, **kwargs):
        weight = build_weight(*args, **kwargs)
        built.append(weight.numel())
        return weight

    monkeypatch.setattr(sparse_lowrank, "build_weight", counting_build_weight)
    cfg = load_config(None, [*TINY_JOB, "parallel.zero_stage=0", "train.dtype=fp32", "model.linear=sltrain"])
    m = plan_model_config(cfg)
    plan, plan_tp2 = (
        plan_memory(cfg, 1),
        plan_memory(
            load_config(
                None,
                [*TINY_JOB, "parallel.zero_stage=0", "train.dtype=fp32", "model.linear=sltrain", "parallel.tensor=2"],
            ),
            2,
        ),
    )
    assert plan.transient_bytes == 4 * m.dim * m.ffn_dim and plan_tp2.transient_bytes == plan.transient_bytes // 2
    assert plan.total_bytes == plan.model_state_bytes + plan.activation_bytes + plan.transient_bytes
    assert plan_memory(load_config(None, [*TINY_JOB, "model.linear=cola"]), 1).transient_bytes == 0
    model = Transformer(m, seed=0)
    monkeypatch.setenv("MEGATRAIN_KERNELS", "triton")
    layer = next(mod for mod in model.modules() if isinstance(mod, SLTrainLinear) and mod.out_features == m.ffn_dim)
    x = torch.randn(3, m.dim, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert ran_kernel(y, "sparse_lowrank_linear"), y.grad_fn
    assert built == [m.dim * m.ffn_dim] * 2  # forward, and backward's rebuild for dx


def test_plan_command_prints_the_plan_and_refuses_bad_splits(tmp_path):
    proc = run_cli(["plan", *TINY_JOB, "parallel.tensor=2", "--world", "4"])
    assert "world 4 = parallel.tensor 2 x 2 data-parallel" in proc.stdout
    assert re.search(r"optimizer state\s+\d", proc.stdout)
    proc = run_cli(["plan", *TINY_JOB, "parallel.tensor=8", "--world", "8"], check=False)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("megatrain: error")]
    assert proc.returncode == 2 and len(lines) == 1 and "does not divide model.heads=4" in lines[0], proc.stderr


@pytest.mark.slow
def test_build_700m_at_tp4_peaks_under_a_third_of_the_fp32_model():
    """4 gloo ranks build the 760m preset (704M parameters with an 8192 vocabulary) through the engine;
    each holds its quarter, and its host memory grows by less than a third of the full fp32 model."""
    proc = run_cli(
        [
            "plan",
            *TINY_JOB,
            "model.preset=760m",
            "model.vocab_size=8192",
            "parallel.tensor=4",
            "--world",
            "4",
            "--build",
        ],
        timeout=600,
    )
    full = Transformer(
        plan_model_config(load_config(None, [*TINY_JOB, "model.preset=760m", "model.vocab_size=8192"])),
        seed=0,
        device="meta",
    )
    full_bytes = 4 * full.num_params(non_embedding=False)
    assert full_bytes >= 4 * 700e6
    rows = re.findall(
        r"^\s+(\d) \|\s+([\d,]+) \|\s+([\d,]+) \|.*?\|\s+([\d.]+) (MiB|GiB) \|\s+([\d.]+) (MiB|GiB) \|",
        proc.stdout,
        flags=re.M,
    )
    assert len(rows) == 4, proc.stdout
    unit = {"MiB": 2**20, "GiB": 2**30}
    for _, planned, held, before, bu, peak, pu in rows:
        assert planned == held
        grown = float(peak) * unit[pu] - float(before) * unit[bu]
        assert grown < full_bytes / 3, (grown, full_bytes, proc.stdout)


@pytest.mark.slow
def test_zero3_build_peaks_at_the_partition_plus_one_module():
    """2 gloo ranks build an 8-layer 760m (252M parameters) under ZeRO-3: each holds half, and its host
    memory grows by its partition plus one full module (each rank initialises one full-size module at a
    time and keeps its slice), with a tenth of the model as slack for the process's own allocations; a
    build that materialised the whole model on a rank would grow by more than the full model."""
    shape = [*TINY_JOB, "model.preset=760m", "model.vocab_size=8192", "model.layers=8"]
    proc = run_cli(["plan", *shape, "parallel.zero_stage=3", "--world", "2", "--build"], timeout=600)
    full = Transformer(plan_model_config(load_config(None, shape)), seed=0, device="meta")
    full_bytes = 4 * full.num_params(non_embedding=False)
    largest = max(
        4 * sum(p.numel() for p in full.get_submodule(name)._parameters.values() if p is not None)
        for name in full.init_module_names()
    )
    unit = {"MiB": 2**20, "GiB": 2**30}
    rows = re.findall(
        r"^\s+(\d) \|\s+([\d,]+) \|\s+([\d,]+) \|\s+([\d.]+) (MiB|GiB) \|\s+([\d.]+) (MiB|GiB) \|"
        r"\s+([\d.]+) (MiB|GiB) \|",
        proc.stdout,
        flags=re.M,
    )
    assert len(rows) == 2, proc.stdout
    for _, planned, held, weights, wu, before, bu, peak, pu in rows:
        assert planned == held
        held_bytes = float(weights) * unit[wu]
        assert abs(held_bytes - full_bytes / 2) < 0.01 * full_bytes, (held_bytes, full_bytes)  # fp32 halves
        grown = float(peak) * unit[pu] - float(before) * unit[bu]
        assert grown < held_bytes + largest + 0.1 * full_bytes, (grown, held_bytes, largest, full_bytes, proc.stdout)


@pytest.mark.parametrize("tp_mode, tp", [("exact", 1), ("exact", 2), ("local", 2)])
def test_iha_plan_counts_what_the_kernel_path_saves(monkeypatch, tp_mode, tp):
    """`megatrain plan`'s IHA activations are what kernels.iha_attention (the Triton path, through
    the interpreter) really saves for backward: the mixing GEMMs' inputs, the P pseudo-heads q~, k~,
    v~, o~ and the fp32 logsumexp. Measured with saved-tensor hooks on one rank's call (H_in heads
    in, H_out = H / tp out; exact mode gathers all H heads first)."""
    from types import SimpleNamespace

    from megatrain import kernels
    from megatrain.engine.memory_plan import iha_extra_elements

    monkeypatch.setenv("MEGATRAIN_KERNELS", "triton")
    heads, head_dim, pseudo, batch, seq = 4, 16, 2, 2, 24
    heads_out = heads // tp
    heads_in = heads if tp_mode == "exact" else heads_out
    m = SimpleNamespace(
        dim=heads * head_dim,
        heads=heads,
        kv_heads=heads,
        head_dim=head_dim,
        iha=SimpleNamespace(pseudo_heads=pseudo, tp_mode=tp_mode),
    )
    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(batch, seq, heads_in, head_dim, generator=gen).to(torch.bfloat16).transpose(1, 2).requires_grad_()
        for _ in range(3)
    )
    mixes = [torch.randn(heads_in, heads_out, pseudo, generator=gen, requires_grad=True) for _ in range(3)]
    collapse = torch.randn(heads_out, pseudo, generator=gen, requires_grad=True)
    angles = torch.rand(seq * pseudo, head_dim // 2, generator=gen)
    cos, sin = angles.cos(), angles.sin()
    tables = {cos.untyped_storage().data_ptr(), sin.untyped_storage().data_ptr()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if t.numel() >= batch * seq and storage.data_ptr() not in tables:  # not a weight or a table
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        kernels.iha_attention(q, k, v, *mixes, collapse, cos, sin)
    mha_qkv = (m.dim + 2 * m.kv_heads * head_dim) / tp  # MHA's q, k, v, which the plan already counts
    planned = batch * seq * (iha_extra_elements(m, tp, 2) + mha_qkv) * 2
    assert sum(saved.values()) == planned


PIPELINED = [*TINY_JOB, "model.layers=4", "parallel.zero_stage=1", "parallel.pipeline=2"]


def test_pipeline_plan_per_stage_splits_the_model_and_counts_1f1b_micro_batches():
    """parallel.pipeline=2 on 2 ranks (DP 1, 2 micro-batches of 4): each stage holds the layers the run's
    stage bounds give it, the stages' parameters add up to the model, stage 0 holds 2 micro-batches'
    activations and stage 1 one (1F1B), and what the stages hold per micro-batch is the whole model's
    activations plus the residual stream stage 1 receives; `plan_memory` is the largest stage."""
    from megatrain.engine.memory_plan import format_plan, plan_stages
    from megatrain.parallel.pipeline import layer_weights, stage_bounds

    cfg = load_config(None, PIPELINED).resolve(2)
    stages = plan_stages(cfg, 2)
    whole = plan_memory(load_config(None, [*PIPELINED, "parallel.pipeline=1"]).resolve(1), 1)
    model_cfg = plan_model_config(cfg)
    weights = layer_weights(Transformer(model_cfg, seed=0, device="meta"))
    bounds = stage_bounds(weights, 2)
    assert [s.params for s in stages] == [sum(weights[bounds[i] : bounds[i + 1]]) for i in range(2)]
    assert sum(s.params for s in stages) == whole.params
    assert sum(s.optimizer_bytes for s in stages) == whole.optimizer_bytes  # ZeRO-1 over one DP rank
    assert [s.in_flight for s in stages] == [2, 1] and cfg.train.grad_accum == 2
    assert stages[0].stage_layers.startswith("embedding") and stages[1].stage_layers.endswith("norm + head")
    received = cfg.train.micro_batch * cfg.data.seq_len * 2 * model_cfg.dim * 4  # fp32 residual pair
    per_micro = stages[0].activation_bytes / 2 + stages[1].activation_bytes
    assert per_micro == pytest.approx(whole.activation_bytes + received, abs=2)
    assert plan_memory(cfg, 2).total_bytes == max(s.total_bytes for s in stages)
    text = format_plan(stages)
    assert re.search(r"^\s+0 \| embedding, blocks 0-1 .*\|\s+2 \|", text, flags=re.M), text
    assert "largest: stage 0" in text
    tied = plan_stages(load_config(None, [*PIPELINED, "model.tie_embeddings=true"]), 2)
    embedding = model_cfg.vocab_size * model_cfg.dim
    assert tied[1].params == stages[1].params  # the head's own weight becomes the tied one: same size
    assert tied[0].params == stages[0].params
    whole_tied = plan_memory(load_config(None, [*PIPELINED, "parallel.pipeline=1", "model.tie_embeddings=true"]), 1)
    assert sum(s.params for s in tied) == whole_tied.params + embedding  # the first and last stage both hold it


@pytest.mark.slow
def test_pipeline_build_holds_each_stages_planned_parameters():
    """`megatrain plan --build` on 2 pipeline stages: each rank builds only its stage (DeepSpeed's
    PipelineModule) and holds exactly the parameters planned for that stage."""
    proc = run_cli(["plan", *PIPELINED, "--world", "2", "--build"], timeout=300)
    rows = re.findall(r"^\s+(\d) \|\s+([\d,]+) \|\s+([\d,]+) \|", proc.stdout, flags=re.M)
    assert len(rows) == 2, proc.stdout
    assert all(planned == held for _, planned, held in rows) and rows[0][1] != rows[1][1], proc.stdout
