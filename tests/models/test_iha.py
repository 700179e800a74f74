"""Interleaved head attention: MHA equivalence, init, masks/windows/schedule, cache decoding,
the tensor-parallel hook contract, FLOPs, and config errors (docs/iha.md)."""

from __future__ import annotations

import pytest
import torch

from megatrain.config import config_reference, load_config
from megatrain.models.config import IHAConfig, ModelConfig
from megatrain.errors import ConfigError
from megatrain.kernels import reference
from megatrain.models.attention import Attention, InterleavedHeadAttention, KVCache, iha_position_mask
from megatrain.models.transformer import Transformer, iha_layer_windows, rope_tables
from tests.conftest import run_cli
from tests.kernels.kernel_testing import fresh_generator

VOCAB = 61


def iha_model(seed=0, **iha) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(preset="tiny", vocab_size=VOCAB, attention="iha", iha=IHAConfig(**iha)))


def perturb_mixing(model: Transformer, gen: torch.Generator, scale: float = 0.2) -> None:
    """Move the mixing off its MHA-like init, so tests see real cross-head mixing."""
    with torch.no_grad():
        for block in model.blocks:
            for t in (block.attn.mix_q, block.attn.mix_k, block.attn.mix_v, block.attn.collapse):
                t.add_(scale * torch.randn(t.shape, generator=gen))


def module_pair(heads=4, kv_heads=2, dim=32, **iha_kwargs):
    """An Attention and an InterleavedHeadAttention with the same q/k/v/o weights."""
    torch.manual_seed(0)
    mha = Attention(dim, heads, kv_heads)
    iha = InterleavedHeadAttention(dim, heads, kv_heads, **iha_kwargs)
    iha.load_state_dict(mha.state_dict(), strict=False)
    return mha, iha


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_p1_identity_mixing_equals_mha_with_rope(kv_heads):
    mha, iha = module_pair(kv_heads=kv_heads, pseudo_heads=1)
    seed, gen = fresh_generator()
    x = torch.randn(2, 11, 32, generator=gen)
    cos, sin = rope_tables(8, 11, 10000.0)
    expected = mha(x, cos, sin)
    torch.testing.assert_close(iha(x, cos, sin), expected, rtol=1e-6, atol=1e-6, msg=f"seed {seed}")
    # The unfused (explicit positions) path too.
    pos = torch.arange(11)[None]
    torch.testing.assert_close(iha(x, cos, sin, positions=pos, key_positions=pos), expected, rtol=1e-6, atol=1e-6)


def test_p1_model_equals_mha_model():
    torch.manual_seed(0)
    mha = Transformer(ModelConfig(preset="tiny", vocab_size=VOCAB))
    iha = iha_model(pseudo_heads=1)
    missing, unexpected = iha.load_state_dict(mha.state_dict(), strict=False)
    assert not unexpected and all(".attn.mix_" in k or k.endswith(".attn.collapse") for k in missing)
    ids = torch.randint(0, VOCAB, (2, 17))
    torch.testing.assert_close(iha(ids), mha(ids), rtol=1e-5, atol=1e-5)


def test_init_starts_as_mha():
    model = iha_model(pseudo_heads=3, collapse="global")
    attn = model.blocks[0].attn
    eye = torch.eye(4)
    for mix in (attn.mix_q, attn.mix_k, attn.mix_v):
        assert mix.shape == (4, 4, 3)
        torch.testing.assert_close(mix, eye[:, :, None].expand(4, 4, 3))
    assert attn.collapse.shape == (4, 12)
    torch.testing.assert_close(attn.collapse.view(4, 4, 3).sum(-1), eye)
    # Identical pseudo-heads at their token's position (rope=original) that see every copy of every
    # earlier key (token_causal): exactly MHA at init.
    for collapse in ("per_head", "global"):
        mha, iha = module_pair(pseudo_heads=3, mask="token_causal", collapse=collapse)
        x = torch.randn(2, 9, 32)
        cos, sin = rope_tables(8, 9, 10000.0)
        at_tokens = cos.repeat_interleave(3, dim=0), sin.repeat_interleave(3, dim=0)  # [N*P, d/2]
        torch.testing.assert_close(iha(x, *at_tokens), mha(x, cos, sin), rtol=1e-5, atol=1e-6)
    # Parameter overhead per layer: 3*H*H*P + H*P (per-head collapse).
    mha_params = Transformer(ModelConfig(preset="tiny", vocab_size=VOCAB)).num_params()
    assert iha_model(pseudo_heads=2).num_params() - mha_params == 2 * (3 * 4 * 4 * 2 + 4 * 2)


@pytest.mark.parametrize(
    "pseudo, mask, window",
    [(1, "causal", None), (2, "causal", 4), (3, "token_causal", 6), (2, "token_causal", None), (3, "causal", 3)],
)
def test_position_mask_matches_kernel_rule(pseudo, mask, window):
    n = 7
    pos = torch.arange(n)[None]
    got = iha_position_mask(pos, pos, pseudo, mask, window)[0, 0]
    assert torch.equal(got, reference.iha_allowed(n, pseudo, mask, window))
    # Shifted positions (a cache that started later) give the same pattern.
    assert torch.equal(iha_position_mask(pos + 5, pos + 5, pseudo, mask, window)[0, 0], got)


def test_window_and_flop_matched_schedule_wiring():
    cfg = ModelConfig(
        preset="tiny",
        layers=5,
        vocab_size=VOCAB,
        attention="iha",
        iha=IHAConfig(pseudo_heads=2, window=8, schedule="flop_matched", full_every=2),
    ).resolved()
    assert iha_layer_windows(cfg) == [8, None, 8, None, 8]
    model = Transformer(cfg)
    assert [b.attn.window for b in model.blocks] == [8, None, 8, None, 8]
    uniform = iha_model(pseudo_heads=2, window=6)
    assert [b.attn.window for b in uniform.blocks] == [6, 6]
    # The window changes the output once the sequence is longer than it reaches.
    seed, gen = fresh_generator()
    full = iha_model(seed=3, pseudo_heads=2)
    windowed = iha_model(seed=3, pseudo_heads=2, window=4)
    perturb_mixing(full, torch.Generator().manual_seed(seed))
    perturb_mixing(windowed, torch.Generator().manual_seed(seed))
    ids = torch.randint(0, VOCAB, (1, 9), generator=gen)
    a, b = full(ids), windowed(ids)
    torch.testing.assert_close(a[:, :2], b[:, :2])  # the first 2 tokens = 4 virtual: inside the window
    assert (a[:, 3:] - b[:, 3:]).abs().max() > 1e-4


def test_rope_virtual_tables_cover_n_times_p():
    model = iha_model(pseudo_heads=3)
    assert model.rope_cos.shape[0] == model.config.max_seq_len * 3
    original = iha_model(pseudo_heads=3, rope="original")
    assert original.rope_cos.shape[0] == original.config.max_seq_len
    ids = torch.randint(0, VOCAB, (1, 5))
    last = torch.tensor([model.config.max_seq_len - 5 + i for i in range(5)])
    assert torch.isfinite(model(ids, positions=last)).all()


@pytest.mark.parametrize(
    "iha",
    [
        dict(pseudo_heads=2),
        dict(pseudo_heads=3, mask="token_causal", collapse="global", window=6),
        dict(pseudo_heads=2, rope="original", window=4, schedule="flop_matched"),
        dict(pseudo_heads=4, head_groups=2),
    ],
)
def test_cache_decoding_equals_full_forward(iha):
    seed, gen = fresh_generator()
    model = iha_model(seed=1, **iha)
    perturb_mixing(model, gen)
    ids = torch.randint(0, VOCAB, (2, 12), generator=gen)
    full = model(ids)
    cache = KVCache(len(model.blocks))
    steps = [model(ids[:, :5], cache=cache)] + [model(ids[:, i : i + 1], cache=cache) for i in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    assert cache.length == 12 and cache.keys[0].shape == (2, 4, 12, iha["pseudo_heads"] * 16)
    # Explicit positions without a cache, and a frozen cache queried by a later span (qTTT's path).
    torch.testing.assert_close(model(ids, positions=torch.arange(12)), full, rtol=1e-5, atol=1e-5)
    ctx = KVCache(len(model.blocks))
    model(ids[:, :8], cache=ctx)
    ctx.freeze()
    torch.testing.assert_close(model(ids[:, 8:], cache=ctx), full[:, 8:], rtol=1e-5, atol=1e-5)
    assert ctx.length == 8


def test_gradients_reach_mixing_and_respect_groups():
    model = iha_model(pseudo_heads=2, head_groups=2)
    perturb_mixing(model, torch.Generator().manual_seed(0))
    ids = torch.randint(0, VOCAB, (2, 10))
    model(ids, labels=torch.randint(0, VOCAB, (2, 10))).backward()
    attn = model.blocks[0].attn
    for p in (attn.mix_q, attn.mix_k, attn.mix_v, attn.collapse):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    cross = attn.mix_q.grad[:2, 2:]  # heads 0-1 and 2-3 are different groups
    assert torch.equal(cross, torch.zeros_like(cross))


@pytest.mark.parametrize(
    "collapse, groups, gather",
    [("per_head", 1, True), ("global", 2, True), ("per_head", 2, False), ("global", 4, False)],
)
def test_tensor_parallel_hook_contract(collapse, groups, gather):
    """Two simulated TP ranks: local heads + gather_heads (exact) or block mixing (local) = full."""
    torch.manual_seed(0)
    attn = InterleavedHeadAttention(32, 4, 4, pseudo_heads=2, collapse=collapse, head_groups=groups, window=6)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in (attn.mix_q, attn.mix_k, attn.mix_v, attn.collapse):
            t.add_(0.3 * torch.randn(t.shape, generator=gen))
    q, k, v = (torch.randn(2, 4, 7, 8, generator=gen) for _ in range(3))
    cos, sin = rope_tables(8, 14, 10000.0)
    full = attn.mix_and_attend(q, k, v, cos, sin)
    for rank in range(2):
        local = slice(2 * rank, 2 * rank + 2)
        attn.heads, attn.head_offset = 2, 2 * rank
        attn.gather_heads = (lambda *_: (q, k, v)) if gather else None
        out = attn.mix_and_attend(q[:, local], k[:, local], v[:, local], cos, sin)
        torch.testing.assert_close(out, full[:, local], rtol=1e-5, atol=1e-6)


def test_flops_count_p_squared_attention_and_window():
    mha = Transformer(ModelConfig(preset="tiny", vocab_size=VOCAB))
    iha = iha_model(pseudo_heads=3)
    # The attention term is linear in the sequence length: its slope carries the P^2 factor.
    slope = lambda m: m.flops_per_token(512) - m.flops_per_token(256)  # noqa: E731
    assert slope(iha) == 9 * slope(mha)
    windowed = iha_model(pseudo_heads=3, window=30)
    assert slope(windowed) == 0  # 2W = 60 < N*P keys at both lengths
    assert windowed.flops_per_token(256) < iha.flops_per_token(256)


def test_config_reference_lists_iha_keys():
    ref = config_reference()
    for key in (
        "model.iha.pseudo_heads",
        "model.iha.mask",
        "model.iha.collapse",
        "model.iha.rope",
        "model.iha.window",
        "model.iha.schedule",
        "model.iha.full_every",
        "model.iha.tp_mode",
        "data.task.pairs",
    ):
        assert f"`{key}`" in ref


def test_flop_matched_window_defaults_to_n_over_2p():
    """schedule=flop_matched without a window: N/(2P) virtual tokens for N = model.max_seq_len."""
    from megatrain.models.transformer import iha_layer_windows

    cfg = load_config(
        None,
        [
            "model.attention=iha",
            "model.iha.schedule=flop_matched",
            "model.max_seq_len=64",
            "data.seq_len=64",
            "model.layers=4",
        ],
    ).model.resolved()
    assert iha_layer_windows(cfg) == [16, None, 16, None]
    cfg.max_seq_len, cfg.iha.pseudo_heads = 33, 2
    assert iha_layer_windows(cfg) == [8, None, 8, None]  # 33 // 4 = 8, a multiple of P


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["model.iha.pseudo_heads=0"], "model.iha.pseudo_heads must be >= 1"),
        (["model.iha.window=3"], "model.iha.window=3 must be a positive multiple of model.iha.pseudo_heads=2"),
        (["model.iha.window=0"], "model.iha.window=0 must be a positive multiple"),
        (["model.iha.mask=sliding"], "model.iha.mask='sliding' is not allowed (allowed: causal, token_causal)"),
        (["model.iha.head_groups=3"], "model.iha.head_groups=3 must be >= 1 and divide model.heads=4"),
        (
            ["parallel.tensor=2", "model.iha.tp_mode=local"],
            "set model.iha.head_groups to a multiple of parallel.tensor=2",
        ),
        (["parallel.tensor=2", "model.iha.collapse=global"], "model.iha.collapse=global with parallel.tensor=2"),
        (["parallel.tensor=3"], "parallel.tensor=3 does not divide model.heads=4"),
        (["model.iha.pseudo_headz=2"], "unknown config key 'model.iha.pseudo_headz'"),
    ],
)
def test_config_errors_name_the_key(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.attention=iha", *overrides])
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_iha_keys_refused_without_iha_and_backend_check(monkeypatch):
    from megatrain.engine.trainer import resolve_config

    with pytest.raises(ConfigError, match="model.iha.window applies to model.attention=iha only"):
        load_config(None, ["model.iha.window=4"])
    # The backend is the machine's: loading ignores it, the explicit resolve step (the preflight) checks it.
    cfg = load_config(None, ["model.attention=iha"])
    with pytest.raises(ConfigError, match="model.attention=iha with MEGATRAIN_KERNELS=triton needs a CUDA GPU"):
        cfg.resolve(1, cuda=False, triton_needs_cuda=True)
    cfg.resolve(1, cuda=True, triton_needs_cuda=True)
    if not torch.cuda.is_available():
        monkeypatch.setenv("MEGATRAIN_KERNELS", "triton")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ConfigError, match="model.attention=iha with MEGATRAIN_KERNELS=triton needs a CUDA GPU"):
            resolve_config(load_config(None, ["model.attention=iha"]), 1)


def test_cli_reports_iha_error_in_one_line(tmp_path):
    proc = run_cli(
        [
            "pretrain",
            "--nproc-per-node",
            "2",
            "model.attention=iha",
            "model.iha.window=5",
            f"run.dir={tmp_path / 'run'}",
        ],
        check=False,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("megatrain: error")]
    assert len(lines) == 1 and "model.iha.window=5" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_checkpoint_meta_round_trip_and_resume_check():
    import dataclasses

    from megatrain.engine.checkpoint import needs_reshard
    from megatrain.errors import CheckpointError

    cfg = ModelConfig(
        preset="tiny", vocab_size=VOCAB, attention="iha", iha=IHAConfig(pseudo_heads=3, window=6, collapse="global")
    ).resolved()
    saved = dataclasses.asdict(cfg)
    rebuilt = ModelConfig.from_dict(saved)
    assert rebuilt == cfg and isinstance(rebuilt.iha, IHAConfig)
    assert ModelConfig.from_dict({**saved, "exported_from_linear": "lora"}) == cfg  # unknown keys are ignored
    meta = {"model": saved, "layout": {"zero_stage": 0, "tensor": 1, "dp": 1, "world_size": 1}}
    assert needs_reshard(meta, "ckpt", cfg, 0, 1, 1) is False
    changed = dataclasses.replace(cfg, iha=dataclasses.replace(cfg.iha, window=8))
    with pytest.raises(CheckpointError, match="model.iha.window=6 but this run has model.iha.window=8"):
        needs_reshard(meta, "ckpt", changed, 0, 1, 1)
    other_mode = dataclasses.replace(cfg, iha=dataclasses.replace(cfg.iha, tp_mode="local"))
    assert needs_reshard(meta, "ckpt", other_mode, 0, 1, 1) is False
