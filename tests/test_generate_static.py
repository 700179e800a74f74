"""megatrain.generate's static KV cache against the dynamic one: token for token in fp32 (MHA, GQA, IHA),
with EOS and stop sequences ending rows at different lengths and per-row seeds, with eager decode steps
and with the steps as CUDA graphs run them (emulated on CPU: every static slot attended, finished rows
kept in batch-size buckets); KVCache.static_copy / begin_write; the cuda_graphs argument."""

from __future__ import annotations

import pytest
import torch

from megatrain.errors import ConfigError
from megatrain.generate import _sample, _stopped, generate
from megatrain.models.attention import KVCache
from megatrain.models.config import IHAConfig, ModelConfig
from megatrain.models.transformer import Transformer
from tests.generate_checks import emulated_graphs

VOCAB = 64
PROMPTS = [[5, 9, 2, 33, 14, 7, 1], [40, 3], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [8], [7, 7, 7]]
ATTENTION = {
    "mha": dict(kv_heads=4),
    "gqa": {},  # the tiny preset: 4 heads, 2 key/value heads
    "iha": dict(attention="iha", iha=IHAConfig(pseudo_heads=2)),
    "iha-window": dict(attention="iha", iha=IHAConfig(pseudo_heads=3, mask="token_causal", window=6, rope="original")),
}
SETTINGS = [dict(), dict(temperature=1.3, top_k=9, top_p=0.85, seed=[3, 1, 4, 1, 5])]


def tiny_model(**extra) -> Transformer:
    torch.manual_seed(2)
    return Transformer(ModelConfig(preset="tiny", vocab_size=VOCAB, max_seq_len=48, init_std=0.1, **extra)).eval()


@torch.no_grad()
def dynamic_decode(model, prompt, n, *, temperature=0.0, top_k=0, top_p=1.0, seed=0, eos=(), stops=()):
    """One prompt alone through a growing (dynamic) KVCache, sampled as generate samples a row."""
    cache = KVCache(model.config.layers)
    logits = model(torch.tensor([prompt]), cache=cache)[:, -1]
    generator = torch.Generator().manual_seed(seed)
    tokens, logprobs = [], []
    while True:
        uniform = torch.rand((1,), generator=generator, dtype=torch.float64) if temperature > 0 else None
        token, logprob = _sample(logits.float(), temperature, top_k, top_p, uniform, True)
        tokens.append(int(token))
        logprobs.append(float(logprob))
        if len(tokens) == n or _stopped(tokens, frozenset(eos), [list(s) for s in stops], [], 0, None):
            return tokens, logprobs
        logits = model(token[:, None], cache=cache, positions=torch.tensor([[len(prompt) + len(tokens) - 1]]))[:, 0]


def row_seeds(kwargs):
    seed = kwargs.get("seed", 0)
    return list(seed) if isinstance(seed, list) else [seed + i for i in range(len(PROMPTS))]


@pytest.mark.parametrize("attention", list(ATTENTION))
def test_static_cache_equals_the_dynamic_cache_token_for_token(attention):
    model = tiny_model(**ATTENTION[attention])
    for kwargs in SETTINGS:
        first = generate(model, PROMPTS, max_new_tokens=10, **kwargs)
        # An EOS and a two-token stop sequence taken from the rows themselves: rows end at different steps.
        eos, stop = first[1][2], first[2][3:5]
        sampling = {k: v for k, v in kwargs.items() if k != "seed"}
        expected = [
            dynamic_decode(model, p, 10, seed=s, eos=[eos], stops=[stop], **sampling)
            for p, s in zip(PROMPTS, row_seeds(kwargs))
        ]
        lengths = {len(t) for t, _ in expected}
        assert len(lengths) >= 2 and 10 in lengths, (attention, kwargs, lengths)
        captures = []
        for mode in ("eager", "graphs"):
            with emulated_graphs(captures) if mode == "graphs" else torch.no_grad():
                tokens, logprobs = generate(
                    model, PROMPTS, max_new_tokens=10, eos_id=eos, stop=[stop], return_logprobs=True, **kwargs
                )
            assert tokens == [t for t, _ in expected], (attention, kwargs, mode)
            for got, (_, want) in zip(logprobs, expected):
                torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-5)
        # One capture per batch-size bucket: 5 rows, then powers of two as rows finish.
        assert captures and set(captures) <= {5, 4, 2, 1} and captures == sorted(set(captures), reverse=True)


def test_graph_buckets_keep_finished_rows_until_the_next_power_of_two():
    model = tiny_model()
    full = generate(model, PROMPTS, max_new_tokens=8)
    eos = [full[4][0], full[0][2]]  # row 4 ends at its first token, row 0 at its third, another one later
    batch_sizes, captures = [], []
    hook = model.register_forward_pre_hook(lambda mod, args: batch_sizes.append(args[0].shape[0]))
    try:
        with emulated_graphs(captures):
            out = generate(model, PROMPTS, max_new_tokens=8, eos_id=eos)
    finally:
        hook.remove()
    assert out == generate(model, PROMPTS, max_new_tokens=8, eos_id=eos)
    running = [sum(len(t) > k for t in out) for k in range(1, 8)]  # rows still running after token k
    # Prefill with 5 rows; then each step runs the bucket min(previous, next power of two >= running),
    # twice at a bucket's first step (the emulated capture runs it, then the replay).
    expected, bucket, seen, kept = [5], 5, [], False
    for n in running:
        if n == 0:
            break
        bucket = min(bucket, 1 << (n - 1).bit_length())
        kept |= bucket > n  # a finished row still in the batch
        expected += [bucket] if bucket in seen else [bucket, bucket]
        seen += [] if bucket in seen else [bucket]
    assert batch_sizes == expected and captures == seen and len(seen) > 1 and kept, (running, batch_sizes)


def test_prefilled_cache_continues_through_the_static_copy():
    model = tiny_model()
    context = [[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]
    prefix = KVCache(model.config.layers)
    with torch.no_grad():
        model(torch.tensor(context), cache=prefix)
    before = [k.clone() for k in prefix.keys]
    out = generate(model, [[20, 21], [22]], max_new_tokens=6, cache=prefix)
    with emulated_graphs():
        assert generate(model, [[20, 21], [22]], max_new_tokens=6, cache=prefix) == out
    assert out == [generate(model, [c + p], max_new_tokens=6)[0] for c, p in zip(context, [[20, 21], [22]])]
    assert all(torch.equal(a, b) for a, b in zip(before, prefix.keys)) and prefix.static is None


def test_static_kv_cache_writes_in_place_and_rejects_overflow():
    cache = KVCache(1).static_copy(2, 4, pad_position=15)
    assert cache.length == 0 and cache.positions.tolist() == [[15] * 4] * 2
    cache.begin_write(3)
    index = cache.static.index
    cache.append_positions(torch.tensor([[0, 1, 2]]))
    k = torch.randn(2, 1, 3, 2)
    keys, _ = cache.update(0, k, k)
    assert torch.equal(keys, k) and cache.length == 3
    cache.begin_write(1)
    decode_index = cache.static.index
    cache.append_positions(torch.tensor([[3], [9]]))
    cache.update(0, k[:, :, :1], k[:, :, :1])
    assert decode_index is not index and cache.positions.tolist() == [[0, 1, 2, 3], [0, 1, 2, 9]]
    copy = cache.copy()
    copy.select(torch.tensor([1]))
    assert cache.keys[0].shape[0] == 2 and copy.positions.tolist() == [[0, 1, 2, 9]]
    with pytest.raises(ValueError, match="do not fit a static cache of capacity 4"):
        cache.begin_write(1)
    full = KVCache(1).static_copy(1, 4, pad_position=15, attend_all=True)
    full.begin_write(1)
    assert full.append_positions(torch.tensor([[0]])).tolist() == [[0, 15, 15, 15]]
    full.begin_write(1)
    assert full.static.index.tolist() == [1]  # advanced in place: the same tensor
    with pytest.raises(ValueError, match="got 2 new positions but begin_write chose 1 slots"):
        full.append_positions(torch.tensor([[1, 2]]))


def test_cuda_graphs_argument():
    model = tiny_model()
    assert generate(model, PROMPTS, max_new_tokens=3, cuda_graphs=False) == generate(model, PROMPTS, max_new_tokens=3)
    with pytest.raises(
        ConfigError,
        match=r"^generate: cuda_graphs=True needs a model on a CUDA device, not a model "
        r"on cpu$",
    ):
        generate(model, PROMPTS, max_new_tokens=3, cuda_graphs=True)
    with pytest.raises(ConfigError, match="cuda_graphs must be None, True or False"):
        generate(model, PROMPTS, max_new_tokens=3, cuda_graphs="yes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("attention", ["mha", "gqa", "iha"])
def test_cuda_graph_steps_equal_eager_steps_in_fp32(attention):
    model = tiny_model(**ATTENTION[attention]).cuda()
    for kwargs in SETTINGS:
        eos = generate(model, PROMPTS, max_new_tokens=10, cuda_graphs=False, **kwargs)[1][2]
        eager = generate(
            model, PROMPTS, max_new_tokens=10, eos_id=eos, return_logprobs=True, cuda_graphs=False, **kwargs
        )
        graphs = generate(
            model, PROMPTS, max_new_tokens=10, eos_id=eos, return_logprobs=True, cuda_graphs=True, **kwargs
        )
        assert graphs[0] == eager[0], (attention, kwargs)
        for got, want in zip(graphs[1], eager[1]):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-5)
