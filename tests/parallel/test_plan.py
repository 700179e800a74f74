"""The tensor-parallel plan (megatrain.parallel.plan): it covers every parameter of the tiny, GQA and
IHA models exactly once, and what the checkpoint code derives from it (shard_specs,
universal_checkpoint_info, is_kv_split) is what parallelize really does to each parameter on every
rank. Single process: apply_plan only slices, so every rank's split is built here in turn."""

from __future__ import annotations

import copy
import dataclasses
import re

import pytest
import torch

from megatrain.models.config import IHAConfig, ModelConfig
from megatrain.errors import ConfigError
from megatrain.models.transformer import Transformer
from megatrain.parallel.groups import kv_replicas
from megatrain.parallel.parallelize import SplitContext, apply_plan
from megatrain.parallel.plan import (
    KV_COLUMN,
    ROW,
    TP_PLAN,
    PlanEntry,
    Role,
    TPPlan,
    is_kv_split,
    shard_specs,
    universal_checkpoint_info,
)

MODELS = {
    "tiny": dict(),
    "tiny_tied": dict(tie_embeddings=True),
    "gqa_kv1": dict(kv_heads=1),
    "mha": dict(kv_heads=4),
    "iha_exact": dict(attention="iha", iha=IHAConfig(pseudo_heads=2)),
    "iha_local": dict(
        attention="iha",
        kv_heads=1,
        tie_embeddings=True,
        iha=IHAConfig(pseudo_heads=2, tp_mode="local", head_groups=2, mask="token_causal"),
    ),
    "iha_global": dict(attention="iha", iha=IHAConfig(pseudo_heads=2, collapse="global", head_groups=2)),
}


def build(name: str, **extra) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(preset="tiny", vocab_size=64, **{**MODELS[name], **extra}))


def replace_role(plan: TPPlan, old: Role, new: Role) -> TPPlan:
    return TPPlan(tuple(PlanEntry(e.pattern, new if e.role is old else e.role) for e in plan.entries))


def check_split(full, split, rank: int, tp: int, plan: TPPlan = TP_PLAN) -> None:
    """Every parameter of `split` (rank `rank` of `tp`) is the part of `full` the plan derives for it,
    carries the Megatron attributes DeepSpeed reads accordingly, and the universal-checkpoint
    patterns and KV names derived from the plan name exactly the parameters split that way."""
    full_params = dict(full.named_parameters())
    split_params = dict(split.named_parameters())
    assert list(split_params) == list(full_params)
    specs = shard_specs(list(split_params), full.config, tp, plan)
    for name, param in split_params.items():
        dim, replicas = specs[name]
        expected = full_params[name].detach()
        if dim is not None:
            expected = expected.chunk(tp // replicas, dim=dim)[rank // replicas]
        assert param.shape == expected.shape and torch.equal(param.detach(), expected), f"{name}: spec {specs[name]}"
        assert getattr(param, "partition_dim", None) == dim, f"{name}: marked {getattr(param, 'partition_dim', None)}"
        if dim is not None:  # a replicated KV slice is counted once in the gradient norm
            assert param.tensor_model_parallel == (rank % replicas == 0), name
    if kv_replicas(full.config.kv_heads, tp) > 1:  # what engine/reshard.py de-duplicates
        assert [n for n in split_params if is_kv_split(n, plan)] == [n for n, s in specs.items() if s.replicas > 1]
    from deepspeed.checkpoint.constants import PARAMETER_WITH_ROW_PARALLELISM_PATTERNS, TP_REPLICATED_PARAMETER_PATTERNS

    info = universal_checkpoint_info(full, plan)
    along_1 = [n for n, p in split_params.items() if getattr(p, "partition_dim", None) == 1]
    whole = [n for n, p in split_params.items() if not hasattr(p, "partition_dim")]
    assert info.get(PARAMETER_WITH_ROW_PARALLELISM_PATTERNS, []) == [re.escape(n) + "$" for n in along_1]
    assert info.get(TP_REPLICATED_PARAMETER_PATTERNS, []) == [re.escape(n) + "$" for n in whole]


@pytest.mark.parametrize("model", list(MODELS))
def test_every_parameter_has_exactly_one_plan_entry(model):
    full = build(model)
    for name, _ in full.named_parameters():
        module = name.rpartition(".")[0]
        matched = [e.pattern for e in TP_PLAN.entries if e.matches(module)]
        assert len(matched) == 1, f"{name}: matched by {matched}"


def test_every_plan_entry_is_used():
    modules = {name for model in MODELS for name, _ in build(model).named_modules()}
    for entry in TP_PLAN.entries:
        assert any(entry.matches(m) for m in modules), f"plan entry {entry.pattern} matches no module"


@pytest.mark.parametrize(
    "model, tp, sequence_parallel",
    [
        ("tiny", 2, False),
        ("tiny_tied", 2, True),
        ("gqa_kv1", 2, False),
        ("gqa_kv1", 4, True),
        ("mha", 4, False),
        ("tiny", 4, False),
        ("iha_exact", 2, True),
        ("iha_local", 2, False),
        ("iha_global", 2, False),
    ],
)
def test_derived_checkpoint_patterns_agree_with_parallelize(model, tp, sequence_parallel):
    full = build(model)
    for rank in range(tp):
        split = apply_plan(
            copy.deepcopy(full), SplitContext(full.config, tp, rank, None, sequence_parallel=sequence_parallel)
        )
        check_split(full, split, rank, tp)


def test_planted_mismatch_fails():
    """A role whose declared split disagrees with the layer parallelize builds for it, a KV role that
    forgets its replication, an entry overlapping another, or a module left out: each is caught."""
    full = build("gqa_kv1")
    split = apply_plan(copy.deepcopy(full), SplitContext(full.config, 2, 1, None))
    check_split(full, split, 1, 2)
    wrong_dim = replace_role(TP_PLAN, ROW, dataclasses.replace(ROW, split={"weight": 0}))
    with pytest.raises(AssertionError):
        check_split(full, split, 1, 2, wrong_dim)
    no_replicas = replace_role(TP_PLAN, KV_COLUMN, dataclasses.replace(KV_COLUMN, kv_heads=False))
    with pytest.raises(AssertionError):
        check_split(full, split, 1, 2, no_replicas)
    overlapping = TPPlan(TP_PLAN.entries + (PlanEntry(r"blocks\.\d+\.attn\.o_proj", ROW),))
    with pytest.raises(ValueError, match="several entries"):
        shard_specs([n for n, _ in full.named_parameters()], full.config, 2, overlapping)
    without_norm = TPPlan(tuple(e for e in TP_PLAN.entries if e.pattern != "norm"))
    with pytest.raises(ValueError, match="no entry for module 'norm'"):
        apply_plan(copy.deepcopy(full), SplitContext(full.config, 2, 0, None), without_norm)


def test_universal_checkpoint_info_is_pinned():
    """The merge patterns saved in every checkpoint's model states (a change alters checkpoint bytes)."""
    from deepspeed.checkpoint.constants import PARAMETER_WITH_ROW_PARALLELISM_PATTERNS, TP_REPLICATED_PARAMETER_PATTERNS

    def names(*parts):
        return [re.escape(p) + "$" for p in parts]

    per_layer_row = lambda i: (f"blocks.{i}.attn.o_proj.weight", f"blocks.{i}.mlp.down_proj.weight")
    norms = lambda i: (f"blocks.{i}.attn_norm.weight", f"blocks.{i}.mlp_norm.weight")
    info = universal_checkpoint_info(build("tiny"))
    assert info[PARAMETER_WITH_ROW_PARALLELISM_PATTERNS] == names(*per_layer_row(0), *per_layer_row(1))
    assert info[TP_REPLICATED_PARAMETER_PATTERNS] == names(*norms(0), *norms(1), "norm.weight")
    mixing = lambda i: (
        f"blocks.{i}.attn_norm.weight",
        *(f"blocks.{i}.attn.{m}" for m in ("mix_q", "mix_k", "mix_v", "collapse")),
        f"blocks.{i}.mlp_norm.weight",
    )
    info = universal_checkpoint_info(build("iha_exact"))
    assert info[TP_REPLICATED_PARAMETER_PATTERNS] == names(*mixing(0), *mixing(1), "norm.weight")


@pytest.mark.parametrize("linear, tp, kv_heads", [("cola", 2, 2), ("sltrain", 4, 1), ("lora", 2, 1), ("relora", 2, 2)])
def test_lowrank_factors_follow_the_plan(linear, tp, kv_heads):
    """The column / row roles name the low-rank factors: b split along D_out in column roles, a along
    D_in in row roles, the other factor (and SLTrain's values and support) whole; every rank's factors
    are exactly those slices, with the attributes and universal-checkpoint patterns to match."""
    full = build("tiny", linear=linear, kv_heads=kv_heads)
    names = [n for n, _ in full.named_parameters()]
    specs = shard_specs(names + ["blocks.0.attn.q_proj.sparse_index"], full.config, tp)
    factor = {
        "cola": ("cola_a", "cola_b"),
        "sltrain": ("lora_a", "lora_b"),
        "lora": ("lora_a", "lora_b"),
        "relora": ("lora_a", "lora_b"),
    }[linear]
    assert specs[f"blocks.0.attn.q_proj.{factor[0]}"] == (None, 1)
    assert specs[f"blocks.0.attn.q_proj.{factor[1]}"] == (1, 1)
    assert specs[f"blocks.0.mlp.down_proj.{factor[0]}"] == (0, 1)
    assert specs[f"blocks.0.mlp.down_proj.{factor[1]}"] == (None, 1)
    assert specs[f"blocks.0.attn.k_proj.{factor[1]}"] == (1, kv_replicas(kv_heads, tp))
    assert specs["blocks.0.attn.q_proj.sparse_index"] == (None, 1)
    for rank in range(tp):
        split = apply_plan(copy.deepcopy(full), SplitContext(full.config, tp, rank, None))
        check_split(full, split, rank, tp)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["parallel.tensor=8"], "does not divide model.heads=4"),
        (
            ["parallel.tensor=2", "model.heads=8", "model.kv_heads=8", "model.ffn_dim=177"],
            "does not divide model.ffn_dim=177",
        ),
        (
            ["parallel.tensor=4", "model.heads=12", "model.dim=96", "model.kv_heads=6"],
            "model.kv_heads=6: one must divide",
        ),
        (["parallel.tensor=2", "model.vocab_size=65"], "does not divide model.vocab_size=65"),
    ],
)
def test_bad_splits_fail_in_config_naming_the_dimension(overrides, fragment):
    """Every split a layout needs is checked from the config alone (before any process group); the
    low-rank rank r is never split, so any r works (checked by the plan tests above)."""
    from megatrain.config import load_config

    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_config(None, ["model.preset=tiny", *overrides])
    load_config(None, ["model.preset=tiny", "parallel.tensor=2", "model.linear=cola", "model.lowrank.rank=7"])
    load_config(None, ["model.preset=tiny", "parallel.tensor=2", "model.linear=relora", "model.lowrank.rank=7"])
