"""The Llama-style decoder: outputs, loss, GQA, tying, cache/positions contract, init, FLOPs."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatrain.models.config import ModelConfig
from megatrain.errors import ConfigError
from megatrain.models.attention import Attention, KVCache
from megatrain.models.layers import make_linear
from megatrain.models.transformer import Transformer, build_model

VOCAB = 97


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(preset="tiny", vocab_size=VOCAB, **overrides)


def make(seed=0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return build_model(tiny(**overrides))


def ids(batch=2, n=12, seed=1, low=0, high=VOCAB):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (batch, n), generator=g)


def test_logits_shape_and_dtype():
    model = make()
    logits = model(ids(batch=3, n=11))
    assert logits.shape == (3, 11, VOCAB) and logits.dtype == torch.float32


def test_loss_equals_cross_entropy_of_logits():
    model = make()
    x = ids()
    labels = ids(seed=2)
    labels[0, :3] = -100
    loss = model(x, labels=labels)
    assert loss.dim() == 0
    expected = F.cross_entropy(model(x).reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected)


def test_backward_gives_finite_grads_for_every_parameter():
    model = make()
    model(ids(), labels=ids(seed=2)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_grouped_query_attention(kv_heads):
    model = make(kv_heads=kv_heads)
    attn = model.blocks[0].attn
    head_dim = model.config.head_dim
    assert attn.q_proj.weight.shape == (4 * head_dim, 64)
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (kv_heads * head_dim, 64)
    assert model(ids()).shape == (2, 12, VOCAB)


def test_gqa_equals_mha_with_repeated_kv_weights():
    gqa = make(kv_heads=2)
    mha = make(kv_heads=4)
    state = gqa.state_dict()
    for key, value in list(state.items()):
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            # kv head j serves query heads 2j and 2j+1: repeat each head's rows twice.
            state[key] = value.view(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64)
    mha.load_state_dict(state)
    x = ids()
    torch.testing.assert_close(mha(x), gqa(x), rtol=1e-5, atol=1e-5)


def test_tied_embeddings_share_one_parameter_counted_once():
    untied, tied = make(), make(tie_embeddings=True)
    assert tied.head.weight is tied.embed.weight
    table = VOCAB * 64
    assert sum(1 for p in tied.parameters() if p is tied.embed.weight) == 1
    assert tied.num_params(non_embedding=False) == untied.num_params(non_embedding=False) - table
    assert tied.num_params(non_embedding=True) == untied.num_params(non_embedding=True) - table
    assert untied.num_params(non_embedding=False) - untied.num_params(non_embedding=True) == table
    tied(ids(), labels=ids(seed=2)).backward()
    assert tied.embed.weight.grad is not None
    assert tied(ids()).shape == (2, 12, VOCAB)


def test_overfits_one_batch():
    model = make()
    x = ids(batch=4, n=16)
    labels = torch.roll(x, -1, dims=1)
    labels[:, -1] = -100
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        loss = model(x, labels=labels)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first, (first, loss.item())


@torch.no_grad()
@pytest.mark.parametrize("kv_heads", [2, 4])
def test_incremental_decoding_matches_full_forward(kv_heads):
    model = make(kv_heads=kv_heads).eval()
    x = ids(batch=2, n=13)
    full = model(x)
    cache = KVCache(model.config.layers)
    pieces = [model(x[:, :5], cache=cache)]
    assert cache.length == 5
    for i in range(5, 13):
        pieces.append(model(x[:, i : i + 1], cache=cache))
    assert cache.length == 13
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)


@torch.no_grad()
def test_explicit_positions_equal_default():
    model = make().eval()
    x = ids(batch=2, n=10)
    default = model(x)
    torch.testing.assert_close(model(x, positions=torch.arange(10)), default, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(x, positions=torch.arange(10).expand(2, 10)), default, rtol=1e-5, atol=1e-6)
    # With a cache, explicit positions that continue the prefix equal the defaults too.
    cache = KVCache(model.config.layers)
    model(x[:, :6], cache=cache, positions=torch.arange(6))
    tail = model(x[:, 6:], cache=cache, positions=torch.arange(6, 10).expand(2, 4))
    torch.testing.assert_close(tail, default[:, 6:], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_positions_act_through_relative_distance():
    model = make().eval()
    x = ids(batch=1, n=6)
    default = model(x)
    # RoPE sees only distances: shifting every position changes nothing, a gap changes the output.
    torch.testing.assert_close(model(x, positions=torch.arange(6) + 7), default, rtol=1e-4, atol=1e-5)
    gapped = model(x, positions=torch.tensor([0, 1, 2, 9, 10, 11]))
    torch.testing.assert_close(gapped[:, :3], default[:, :3], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(gapped[:, 3:], default[:, 3:], atol=1e-4)


def test_frozen_cache_is_read_only_and_carries_no_grad():
    model = make()
    context = ids(batch=2, n=8, low=0, high=40)  # context and span tokens are disjoint ids
    span = ids(batch=2, n=4, seed=3, low=50, high=VOCAB)
    cache = KVCache(model.config.layers)
    model(context, cache=cache)  # computed with grad enabled on purpose
    cache.freeze()
    assert cache.frozen and cache.length == 8
    assert all(not k.requires_grad and not v.requires_grad for k, v in zip(cache.keys, cache.values))

    labels = torch.roll(span, -1, dims=1)
    loss = model(span, labels=labels, cache=cache)
    assert cache.length == 8 and cache.positions.shape[-1] == 8
    loss.backward()
    grad = model.embed.weight.grad
    assert grad[torch.unique(span)].abs().sum() > 0
    assert torch.count_nonzero(grad[torch.unique(context)]) == 0  # nothing flows into the context

    # The span saw the context: same logits as a live cache of the same prefix.
    with torch.no_grad():
        frozen_logits = model(span, cache=cache)
        live = KVCache(model.config.layers)
        model(context, cache=live)
        torch.testing.assert_close(frozen_logits, model(span, cache=live), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(frozen_logits, model(torch.cat((context, span), 1))[:, 8:], rtol=1e-5, atol=1e-5)


def test_kv_cache_update_and_reset():
    cache = KVCache(2)
    k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    k_all, v_all = cache.update(0, k, v)
    assert k_all is k and cache.length == 3
    k_all, _ = cache.update(0, k[:, :, :1], v[:, :, :1])
    assert k_all.shape == (1, 2, 4, 4) and cache.length == 4
    cache.freeze()
    k_all, _ = cache.update(0, k, v)
    assert k_all.shape[2] == 7 and cache.length == 4
    cache.reset()
    assert cache.length == 0 and not cache.frozen and cache.keys == [None, None]


@torch.no_grad()
@pytest.mark.parametrize("capacity", [None, 13, 6])  # 6: the buffers must grow twice
def test_preallocated_cache_and_row_selection_match_concatenation(capacity):
    model = make(kv_heads=2).eval()
    x = ids(batch=3, n=13)
    full = model(x)
    cache = KVCache(model.config.layers, capacity=capacity)
    pieces = [model(x[:, :5], cache=cache)]
    for i in range(5, 9):
        pieces.append(model(x[:, i : i + 1], cache=cache))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full[:, :9], rtol=0, atol=1e-5)
    # Keep rows 2 and 0 (in that order): they continue as if decoded alone.
    cache.select(torch.tensor([2, 0]))
    assert cache.length == 9 and cache.keys[0].shape[0] == 2 and cache.positions.shape[0] in (1, 2)
    for i in range(9, 13):
        step = model(x[[2, 0], i : i + 1], cache=cache)
        torch.testing.assert_close(step, full[[2, 0], i : i + 1], rtol=0, atol=1e-5)
    assert cache.length == 13
    if capacity is not None:
        assert all(k.data_ptr() == buf[0].data_ptr() for k, buf in zip(cache.keys, cache._buffers))


@torch.no_grad()
def test_attention_alone_with_cache_matches_causal():
    torch.manual_seed(0)
    attn = Attention(32, 4, 2)
    x = torch.randn(2, 7, 32)
    theta = torch.rand(7, 4)
    full = attn(x, theta.cos(), theta.sin())
    cache = KVCache(1)
    first = attn(x[:, :4], theta[:4].cos(), theta[:4].sin(), cache=cache)
    rest = attn(x[:, 4:], theta[4:].cos(), theta[4:].sin(), cache=cache)
    torch.testing.assert_close(torch.cat((first, rest), 1), full, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_gives_identical_loss_and_grads(monkeypatch):
    import megatrain.models.transformer as transformer_module

    calls = []

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)

    monkeypatch.setattr(transformer_module, "checkpoint", counting_checkpoint)
    model = make().train()
    x, labels = ids(), ids(seed=2)
    loss = model(x, labels=labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing = True
    loss_ckpt = model(x, labels=labels)
    loss_ckpt.backward()
    assert calls == [False] * model.config.layers  # every block, non-reentrant
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-6, atol=1e-7, msg=n)


def test_init_stds_scaled_by_depth():
    torch.manual_seed(0)
    cfg = tiny(dim=256, layers=4, heads=4, kv_heads=4, ffn_dim=512, init_std=0.02)
    model = Transformer(cfg)
    out_std = 0.02 / math.sqrt(2 * 4)

    def std(t):
        return t.detach().float().std().item()

    assert std(model.embed.weight) == pytest.approx(0.02, rel=0.05)
    assert std(model.head.weight) == pytest.approx(0.02, rel=0.05)
    for block in model.blocks:
        for proj in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj, block.mlp.gate_proj, block.mlp.up_proj):
            assert std(proj.weight) == pytest.approx(0.02, rel=0.05)
            assert abs(proj.weight.mean().item()) < 1e-3
        assert std(block.attn.o_proj.weight) == pytest.approx(out_std, rel=0.05)
        assert std(block.mlp.down_proj.weight) == pytest.approx(out_std, rel=0.05)
        assert torch.equal(block.attn_norm.weight, torch.ones(256))
        assert torch.equal(block.mlp_norm.weight, torch.ones(256))
    assert torch.equal(model.norm.weight, torch.ones(256))


def test_same_seed_same_weights_different_seed_different():
    a, b, c = make(seed=5), make(seed=5), make(seed=6)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.blocks[0].attn.q_proj.weight, c.blocks[0].attn.q_proj.weight)


def test_rope_tables_stay_fp32_after_cast():
    model = make()
    cos = model.rope_cos.clone()
    assert "rope_cos" not in model.state_dict()
    model.to(torch.bfloat16)
    assert model.rope_cos.dtype == torch.float32 and model.rope_sin.dtype == torch.float32
    torch.testing.assert_close(model.rope_cos, cos, rtol=0, atol=0)
    assert model.blocks[0].attn.q_proj.weight.dtype == torch.bfloat16
    logits = model(ids())
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert model(ids(), labels=ids(seed=2)).dtype == torch.float32


def test_flops_per_token():
    model = make()
    cfg = model.config
    n = model.num_params(non_embedding=True)
    assert model.flops_per_token(128) == 6 * n + 12 * cfg.layers * cfg.heads * cfg.head_dim * 128
    per_block = 64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 176 + 2 * 64  # q, o; k, v (2 kv heads); mlp; norms
    assert n == 2 * per_block + 64 + VOCAB * 64


def test_make_linear_dense_and_unknown_kind():
    layer = make_linear(8, 4, role="attn.q")
    assert isinstance(layer, nn.Linear) and layer.bias is None and layer.weight.shape == (4, 8)
    with pytest.raises(
        ConfigError,
        match=r"model.linear='nope' is not a known projection kind \(allowed: dense, cola, sltrain, relora, lora\)",
    ):
        make_linear(8, 4, kind="nope")
    with pytest.raises(ConfigError, match="model.linear"):
        Transformer(tiny(linear="nope"))


def test_missing_vocab_size_is_a_config_error():
    with pytest.raises(ConfigError, match="model.vocab_size"):
        Transformer(ModelConfig(preset="tiny"))


def test_positions_out_of_range_rejected():
    model = make(max_seq_len=16)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(ids(n=4), positions=torch.arange(14, 18))


def test_cache_copy_never_writes_into_the_original_buffers():
    """Two continuations of one preallocated prefix (qTTT answers, then the thinking baseline) must
    not see each other's keys: the copy allocates buffers of its own."""
    from megatrain.models.attention import KVCache

    gen = torch.Generator().manual_seed(3)
    prefix = KVCache(1, capacity=16)
    k0, v0 = torch.randn(2, 1, 4, 8, generator=gen), torch.randn(2, 1, 4, 8, generator=gen)
    prefix.update(0, k0, v0)
    first, second = prefix.copy(), prefix.copy(capacity=32)
    k1, k2 = torch.randn(2, 1, 3, 8, generator=gen), torch.randn(2, 1, 5, 8, generator=gen)
    out1, _ = first.update(0, k1, k1)
    out2, _ = second.update(0, k2, k2)
    torch.testing.assert_close(out1, torch.cat((k0, k1), dim=2), rtol=0, atol=0)
    torch.testing.assert_close(first.keys[0], torch.cat((k0, k1), dim=2), rtol=0, atol=0)
    torch.testing.assert_close(out2, torch.cat((k0, k2), dim=2), rtol=0, atol=0)
    torch.testing.assert_close(prefix.keys[0], k0, rtol=0, atol=0)
    assert prefix.length == 4 and first.length == 7 and second.length == 9


def test_embed_init_std_sets_only_the_embedding():
    base = Transformer(ModelConfig(preset="tiny", vocab_size=512), seed=3)
    wide = Transformer(ModelConfig(preset="tiny", vocab_size=512, embed_init_std=1.0), seed=3)
    assert 0.9 < wide.embed.weight.std().item() < 1.1 and base.embed.weight.std().item() < 0.03
    for (name, p), (_, q) in zip(base.named_parameters(), wide.named_parameters()):
        if name != "embed.weight":
            assert torch.equal(p, q), name  # keyed init: every other tensor unchanged
    with pytest.raises(ConfigError, match="model.embed_init_std must be > 0"):
        ModelConfig(preset="tiny", vocab_size=512, embed_init_std=0.0).validate()
