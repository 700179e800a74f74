"""The low-rank projection kinds (cola, sltrain, relora, lora): shapes, init, SLTrain's support,
ReLoRA's merge, dense export, the restart schedule and the bad-input lines. CPU, fast."""

from __future__ import annotations

import math

import pytest
import torch

from megatrain.config import load_config
from megatrain.models.config import ModelConfig
from megatrain.errors import ConfigError
from megatrain.models.layers import (
    CoLALinear,
    LoRALinear,
    LowRankOptions,
    SLTrainLinear,
    dense_state_dict,
    linear_options,
    make_linear,
)
from megatrain.models.transformer import Transformer
from megatrain.optim.relora import magnitude_prune, merge_and_reinit
from megatrain.optim.schedules import last_restart, lr_at, lr_with_restarts
from tests.conftest import TINY_JOB, run_cli


def tiny(kind: str, seed: int = 0, **lowrank) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(preset="tiny", vocab_size=97, linear=kind)
    for k, v in lowrank.items():
        setattr(cfg.lowrank, k, v)
    return Transformer(cfg).eval()


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["cola", "sltrain", "relora", "lora"])
def test_every_projection_is_replaced_and_trains(kind):
    model = tiny(kind)
    cls = {"cola": CoLALinear, "sltrain": SLTrainLinear, "relora": LoRALinear, "lora": LoRALinear}[kind]
    projections = [m for m in model.modules() if isinstance(m, cls)]
    assert len(projections) == 7 * model.config.layers
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert all(m.rank == 16 for m in projections)  # default rank = dim / 4 = 64 / 4
    logits = model(tokens())
    assert logits.shape == (2, 11, 97) and torch.isfinite(logits).all()
    model.train()
    model(tokens(), labels=tokens(2)).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if kind in ("relora", "lora"):  # W frozen, adapters train
        assert frozen and all(n.endswith("_proj.weight") for n in frozen)
    else:
        assert frozen == []


def test_cola_init_statistics_and_recompute():
    torch.manual_seed(0)
    layer = CoLALinear(384, 256, 32)
    expected = 32**-0.25 * (384 + 256) ** -0.25
    for t in (layer.cola_a, layer.cola_b):
        assert abs(t.std().item() / expected - 1) < 0.03
        assert abs(t.mean().item()) < 0.05 * expected
    assert torch.count_nonzero(layer.bias) == 0
    x = torch.randn(3, 5, 384, requires_grad=True)
    y = layer(x)
    ref = torch.nn.functional.silu(x @ layer.cola_a) @ layer.cola_b + layer.bias
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    layer_m = CoLALinear(384, 256, 32, recompute=True)
    layer_m.load_state_dict(layer.state_dict())
    x2 = x.detach().clone().requires_grad_(True)
    layer_m(x2).square().sum().backward()
    y.square().sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer_m.cola_a.grad, layer.cola_a.grad, rtol=1e-5, atol=1e-6)


def test_sltrain_support_init_and_function():
    torch.manual_seed(3)
    layer = SLTrainLinear(96, 160, 8, alpha=32.0, density=0.05, bias=False)
    index = layer.sparse_index
    assert index.dtype == torch.int64 and index.numel() == int(0.05 * 96 * 160)
    assert torch.equal(index, torch.unique(index)) and int(index.max()) < 96 * 160  # sorted, unique
    assert torch.count_nonzero(layer.lora_b) == 0
    bound = 1 / math.sqrt(96)
    assert layer.lora_a.abs().max() <= bound and layer.sparse_values.abs().max() <= bound
    assert layer.lora_a.std() > 0.8 * bound / math.sqrt(3)  # uniform(+-bound) has std bound/sqrt(3)
    with torch.no_grad():
        layer.lora_b.normal_()
    dense = torch.zeros(96 * 160)
    dense[index] = layer.sparse_values.detach()
    w = 32.0 / 8 * layer.lora_a.detach() @ layer.lora_b.detach() + dense.view(96, 160)
    x = torch.randn(4, 96)
    torch.testing.assert_close(layer(x), x @ w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.dense_weight(), w.T, rtol=1e-6, atol=1e-6)
    # The support comes from the seed: same seed, same support; another seed, another one.
    torch.manual_seed(3)
    assert torch.equal(SLTrainLinear(96, 160, 8, alpha=32.0, density=0.05).sparse_index, index)
    torch.manual_seed(4)
    assert not torch.equal(SLTrainLinear(96, 160, 8, alpha=32.0, density=0.05).sparse_index, index)


def test_sltrain_support_survives_save_and_load(tmp_path):
    from safetensors.torch import load_file

    from megatrain.engine.checkpoint import _full_tensors, _write_weights

    model = tiny("sltrain", seed=5, density=0.1)
    path = str(tmp_path / "model.safetensors")
    _write_weights(_full_tensors(model), path)
    state = load_file(path)
    assert "blocks.0.attn.q_proj.sparse_index" in state
    other = tiny("sltrain", seed=6, density=0.1)  # a different support before loading
    assert not torch.equal(other.blocks[0].attn.q_proj.sparse_index, model.blocks[0].attn.q_proj.sparse_index)
    other.load_state_dict(state, strict=True)
    for (n, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), n
    torch.testing.assert_close(other(tokens()), model(tokens()), rtol=0, atol=0)


def test_relora_merge_leaves_outputs_unchanged():
    model = tiny("relora", seed=2)
    with torch.no_grad():  # adapters that actually contribute
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(0, 0.05)
    before = model(tokens())
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    expected_w = [m.weight.detach() + m.scale * (m.lora_a @ m.lora_b).detach().T for m in layers]
    old_a = [m.lora_a.detach().clone() for m in layers]
    gen = torch.Generator().manual_seed(0)
    for m in layers:
        merge_and_reinit(m, gen)
    after = model(tokens())
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    for m, w, a in zip(layers, expected_w, old_a):
        torch.testing.assert_close(m.weight, w, rtol=1e-6, atol=1e-6)
        assert torch.count_nonzero(m.lora_b) == 0 and not torch.equal(m.lora_a, a)
        assert m.lora_a.abs().max() <= 1 / math.sqrt(m.in_features)


def test_lora_dropout_only_in_training():
    torch.manual_seed(0)
    layer = LoRALinear(32, 48, 4, alpha=32.0, dropout=0.5)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(6, 32)
    torch.testing.assert_close(layer.eval()(x), x @ layer.dense_weight().T, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(layer.train()(x), layer.eval()(x))


@pytest.mark.parametrize("kind", ["sltrain", "relora", "lora"])
def test_dense_export_is_exact(kind):
    model = tiny(kind, seed=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.05)
    state = dense_state_dict(model.state_dict(), kind, LowRankOptions(rank=16))
    dense = tiny("dense", seed=9)
    dense.load_state_dict(state, strict=True)
    torch.testing.assert_close(dense(tokens()), model(tokens()), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="cola"):
        dense_state_dict(tiny("cola").state_dict(), "cola", LowRankOptions())


def test_magnitude_prune_keeps_the_largest():
    t = torch.tensor([[0.1, -5.0, 0.3], [2.0, -0.2, 0.05], [0.0, 1.0, -3.0], [0.4, 0.6, -0.7]])
    out = magnitude_prune(t, 0.75)  # zero 9 of 12: keep -5, -3, 2
    assert torch.count_nonzero(out) == 3
    assert set(out[out != 0].tolist()) == {-5.0, -3.0, 2.0}
    assert torch.equal(magnitude_prune(t, 0.0), t)


def test_restart_schedule_is_jagged_and_pure():
    kw = dict(lr=1.0, steps=100, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    assert [last_restart(s, every=25) for s in (0, 24, 25, 49, 50, 99)] == [None, None, 25, 25, 50, 75]
    assert [last_restart(s, every=25, warm_start_steps=10) for s in (9, 10, 34, 35)] == [None, 10, 10, 35]
    lrs = [lr_with_restarts(s, **kw, every=25, restart_warmup=5) for s in range(100)]
    plain = [lr_at(s, **kw) for s in range(100)]
    for s in range(100):
        restart = last_restart(s, every=25)
        if restart is not None and s - restart < 5:
            assert lrs[s] == pytest.approx(plain[restart + 5] * (s - restart + 1) / 5)
        else:
            assert lrs[s] == plain[s]
    assert lrs[25] < 0.25 * lrs[24] and lrs[29] == pytest.approx(plain[30])  # drop, then re-warm to the curve
    # The trainer's entry point uses it when train.relora.every is set (model.linear=relora only).
    from megatrain.optim.schedules import lr_for_config

    cfg = load_config(
        None,
        [
            "model.linear=relora",
            "train.steps=100",
            "train.warmup_steps=10",
            "train.relora.every=25",
            "train.relora.restart_warmup=5",
            "train.lr=1.0",
        ],
    )
    assert lr_for_config(cfg.train, 26) == pytest.approx(
        lr_with_restarts(26, **{**kw, "lr": 1.0}, every=25, restart_warmup=5)
    )
    dense = load_config(None, ["train.steps=100"])
    assert dense.train.relora.every is None


def test_relora_defaults_are_filled():
    cfg = load_config(None, ["model.linear=relora", "train.steps=2000"])
    assert cfg.train.relora.every is None  # validation fills nothing; the explicit resolve step does
    cfg.resolve(1)
    assert cfg.train.relora.every == 200 and cfg.train.relora.restart_warmup == 10
    cfg = load_config(None, ["model.linear=relora", "train.steps=2000", "train.relora.every=100"]).resolve(1)
    assert cfg.train.relora.every == 100 and cfg.train.relora.restart_warmup == 5
    with pytest.raises(
        ConfigError, match=r"train.relora.restart_warmup must be in \[0, train.relora.every=20\), got 25"
    ):
        load_config(None, ["model.linear=relora", "train.steps=200", "train.relora.restart_warmup=25"])


def test_rank_default_and_explicit():
    with linear_options(LowRankOptions(rank=5)):
        assert make_linear(40, 30, kind="cola", role="attn.q").rank == 5
    assert make_linear(40, 30, kind="lora", role="x").rank == 7  # outside a model: min(d_in, d_out) // 4


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model.linear=cola", "model.lowrank.rank=40"], "model.lowrank.rank=40 exceeds min(d_in, d_out)=32"),
        (["model.linear=sltrain", "model.lowrank.density=0"], "model.lowrank.density must be in (0, 1]"),
        (["model.linear=sltrain", "model.lowrank.density=1.5"], "model.lowrank.density must be in (0, 1]"),
        (
            ["model.linear=cola", "model.lowrank.density=0.1"],
            "model.lowrank.density does not apply to model.linear=cola",
        ),
        (["model.linear=dense", "model.lowrank.rank=8"], "model.lowrank.rank does not apply to model.linear=dense"),
        (["model.linear=lora", "train.relora.every=10"], "train.relora.every applies to model.linear=relora only"),
        (["model.linear=relora", "train.relora.prune_ratio=1.0"], "train.relora.prune_ratio must be in [0, 1)"),
        (
            ["model.linear=relora", "train.relora.every=10", "train.relora.restart_warmup=10"],
            "train.relora.restart_warmup must be in [0, train.relora.every=10)",
        ),
        (["model.linear=relora", "parallel.zero_stage=3"], "parallel.zero_stage=3 is not supported"),
        (["model.linear=lora", "model.lowrank.dropout=1"], "model.lowrank.dropout must be in [0, 1)"),
        (["model.linear=sltrain", "model.lowrank.recompute=true"], "model.lowrank.recompute does not apply"),
    ],
)
def test_bad_input_is_one_line_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.preset=tiny", *overrides])
    assert key in str(err.value) and "\n" not in str(err.value)


def test_bad_input_through_the_cli(tmp_path):
    proc = run_cli(
        ["pretrain", *TINY_JOB, f"run.dir={tmp_path / 'run'}", "model.linear=relora", "model.lowrank.rank=100"],
        check=False,
        timeout=120,
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "model.lowrank.rank=100 exceeds" in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()
