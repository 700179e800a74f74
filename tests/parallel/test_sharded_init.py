"""Layout-independent initialisation: a model built on the meta device and materialised one module at a
time by `parallelize` holds, on every rank of TP 2 and 4, exactly the slices of the one-process model
built from the same seed (bit for bit), and the keyed init does not depend on the build order."""

from __future__ import annotations

import pytest
import torch

from megatrain.models.config import IHAConfig, ModelConfig
from megatrain.models.transformer import Transformer, init_seed_for
from megatrain.parallel.parallelize import SplitContext, apply_plan
from tests.parallel.test_plan import check_split

SEED = 11
MODELS = {
    "tiny": dict(),
    "tiny_tied": dict(tie_embeddings=True),
    "gqa_kv1": dict(kv_heads=1),
    "iha": dict(attention="iha", iha=IHAConfig(pseudo_heads=2)),
}


def config(name: str) -> ModelConfig:
    return ModelConfig(preset="tiny", vocab_size=64, **MODELS[name])


@pytest.mark.parametrize("name", list(MODELS))
def test_meta_build_equals_eager_build(name):
    cfg = config(name)
    eager = Transformer(cfg, seed=SEED).state_dict()
    meta = Transformer(cfg, seed=SEED, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    built = meta.materialize().state_dict()
    assert eager.keys() == built.keys()
    for key in eager:
        assert torch.equal(eager[key], built[key]), key
    other = Transformer(cfg, seed=SEED + 1).state_dict()
    assert not torch.equal(other["blocks.0.attn.q_proj.weight"], eager["blocks.0.attn.q_proj.weight"])


@pytest.mark.parametrize("name, tp", [("tiny", 2), ("tiny", 4), ("tiny_tied", 2), ("gqa_kv1", 4), ("iha", 2)])
def test_every_tp_rank_materialises_exactly_its_slice(name, tp):
    cfg = config(name)
    full = Transformer(cfg, seed=SEED)
    for rank in range(tp):
        split = apply_plan(Transformer(cfg, seed=SEED, device="meta"), SplitContext(full.config, tp, rank, None))
        assert not any(p.is_meta for p in split.parameters())
        check_split(full, split, rank, tp)
        if cfg.tie_embeddings:
            assert split.head.weight is split.embed.weight


def test_init_keys_are_per_name_and_order_free():
    assert init_seed_for(1, "embed") != init_seed_for(1, "head") != init_seed_for(2, "head")
    cfg = config("tiny")
    model = Transformer(cfg, seed=SEED, device="meta")
    for name in reversed(model.init_module_names()):  # any order gives the same weights
        model.materialize_module(name)
    eager = Transformer(cfg, seed=SEED).state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, eager[key]), key


def test_global_rng_keeps_seeding_the_default_key():
    cfg = config("tiny")
    torch.manual_seed(3)
    a = Transformer(cfg).state_dict()
    torch.manual_seed(3)
    b = Transformer(cfg).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name, tp", [("tiny", 2), ("tiny_tied", 2), ("gqa_kv1", 4), ("iha", 2)])
def test_given_weights_land_as_each_ranks_slice(name, tp):
    """An imported run / train.init_from: `initial_state` replaces the keyed init module by module, so
    every TP rank holds exactly its slice of the given weights (not of the seed's)."""
    cfg = config(name)
    given = Transformer(cfg, seed=SEED + 5)  # weights no seed-keyed init of SEED would produce
    for rank in range(tp):
        model = Transformer(cfg, seed=SEED, device="meta")
        model.initial_state = given.state_dict()
        split = apply_plan(model, SplitContext(given.config, tp, rank, None))
        split.materialize()
        check_split(given, split, rank, tp)


def test_given_weights_that_do_not_fit_are_one_line():
    from megatrain.engine.build import _check_initial_state
    from megatrain.errors import CheckpointError

    cfg = config("tiny")
    state = Transformer(cfg, seed=SEED).state_dict()
    state.pop("norm.weight")
    state["blocks.0.attn.q_proj.weight"] = state["blocks.0.attn.q_proj.weight"][:, :-1]
    with pytest.raises(
        CheckpointError,
        match=r"^'runs/x' does not match the model config \(missing: norm.weight; "
        r"shape: blocks.0.attn.q_proj.weight",
    ):
        _check_initial_state(Transformer(cfg, seed=0, device="meta"), state, "runs/x")
