"""megatrain.ttt.adapt: only query parameters move and all come back bit-exactly, the context's K/V
are computed once, span attention over the cached prefix equals full recomputation, the span loss
falls, a batch equals each example alone, answering through generate(cache=), IHA, q_lora, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import megatrain
import megatrain.ttt
from megatrain.models.config import IHAConfig, ModelConfig
from megatrain.errors import ConfigError
from megatrain.models.transformer import Transformer
from megatrain.ttt.adapt import ExampleQuery, prefill, span_view

VOCAB = 64
ATTENTION = {
    "mha": {},
    "iha": dict(attention="iha", iha=IHAConfig(pseudo_heads=2)),
}


def tiny_model(seed=0, **extra) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(preset="tiny", vocab_size=VOCAB, max_seq_len=96, init_std=0.1, **extra)).eval()


def contexts(lengths=(40, 29, 53), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in lengths]


def snapshot(model):
    return [(name, p, p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()]


def is_query(name: str) -> bool:
    return ".attn.q_proj." in name or name.endswith(".attn.mix_q")


@pytest.mark.parametrize("target", ["q", "q_lora"])
@pytest.mark.parametrize("attention", list(ATTENTION))
def test_only_queries_change_and_everything_is_restored(attention, target):
    model = tiny_model(**ATTENTION[attention])
    before = snapshot(model)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    ids = torch.tensor([contexts()[0][:20]])
    logits_before = model(ids)
    with megatrain.ttt.adapt(model, contexts(), steps=4, span=8, lr=1e-2, target=target, lora_rank=4) as cache:
        assert len(cache.losses) == 4
        adapted = dict(model.named_parameters())
        trainable = {n for n, p in adapted.items() if p.requires_grad}
        # Every trainable tensor is a per-example query parameter, and each of them moved.
        assert trainable and all(is_query(n) for n in trainable), trainable
        for block in model.blocks:
            assert isinstance(block.attn.q_proj, ExampleQuery)
            moved = block.attn.q_proj.weight if target == "q" else block.attn.q_proj.lora_b
            assert moved.detach().abs().sum() > 0 and moved.shape[0] == 3
            if target == "q":
                assert not torch.equal(moved.detach()[0], block.attn.q_proj.base.weight)
        # Every other tensor (the base W_Q included) is bit-identical to before.
        for name, param, value, _ in before:
            live = adapted.get(name.replace("q_proj.", "q_proj.base."), adapted.get(name))
            if name.endswith(".attn.mix_q"):
                continue  # replaced by the per-example mix for the duration of the block
            assert live is param and torch.equal(live.detach(), value), name
        logits_inside = model(ids.expand(3, -1))[0:1] if target == "q" else None
    after = list(model.named_parameters())
    assert [n for n, _ in after] == [n for n, *_ in before]  # same names, same order, no adapter left
    for (name, param, value, flag), (name2, live) in zip(before, after):
        assert live is param and torch.equal(live.detach(), value) and live.requires_grad == flag, name
    assert all(torch.equal(buffers[k], v) for k, v in model.named_buffers())
    assert torch.equal(model(ids), logits_before)
    if logits_inside is not None:
        assert not torch.allclose(logits_inside, logits_before)


def test_context_kv_projections_run_once_per_example():
    model = tiny_model()
    ctx = contexts()
    seen = {}

    def count(name):
        def hook(module, args):
            seen.setdefault(name, []).append(tuple(args[0].shape[:2]))

        return hook

    handles = [
        getattr(b.attn, proj).register_forward_pre_hook(count(f"{i}.{proj}"))
        for i, b in enumerate(model.blocks)
        for proj in ("k_proj", "v_proj")
    ]
    steps, span, width = 5, 8, max(len(c) for c in ctx)
    with megatrain.ttt.adapt(model, ctx, steps=steps, span=span, lr=1e-3) as cache:
        # The prefill over the whole (padded) context once, then only the k span tokens per step.
        assert len(seen) == 2 * len(model.blocks)
        for name, shapes in seen.items():
            assert shapes == [(3, width)] + [(3, span)] * steps, (name, shapes)
        seen.clear()
        # Answering reads the same cache: only the prompt and the new tokens are projected.
        megatrain.generate(model, [[5], [6, 7], [8]], max_new_tokens=3, cache=cache)
        for name, shapes in seen.items():
            assert shapes[0] == (3, 2) and all(n == 1 for _, n in shapes[1:]), (name, shapes)
    for h in handles:
        h.remove()


@pytest.mark.parametrize("attention", list(ATTENTION))
def test_span_over_cached_prefix_equals_full_recomputation(attention):
    model = tiny_model(**ATTENTION[attention])
    ctx = contexts()
    cache = prefill(model, ctx)
    span = 9
    starts = torch.tensor([0, 13, 40])
    windows = torch.stack([torch.tensor(c[s : s + span]) for c, s in zip(ctx, starts.tolist())])
    positions = starts[:, None] + torch.arange(span)
    with torch.no_grad():
        got = model(windows, cache=span_view(cache, starts, model.config.max_seq_len), positions=positions)
        for row, (c, s) in enumerate(zip(ctx, starts.tolist())):
            full = model(torch.tensor([c[: s + span]]))[0, s:]
            torch.testing.assert_close(got[row], full, rtol=1e-5, atol=1e-5)
    # The cache was only read.
    assert cache.frozen and cache.length == max(len(c) for c in ctx)


@pytest.mark.parametrize("target", ["q", "q_lora"])
@pytest.mark.parametrize("attention", list(ATTENTION))
def test_batch_equals_each_example_alone(attention, target):
    model = tiny_model(**ATTENTION[attention])
    ctx = contexts()
    prompts = [[5, 9], [11], [3, 4, 5]]
    kwargs = dict(steps=3, span=8, lr=1e-2, target=target, lora_rank=3)
    with megatrain.ttt.adapt(model, ctx, seed=4, **kwargs) as cache:
        batch = megatrain.generate(model, prompts, max_new_tokens=4, cache=cache, return_logprobs=True)
        starts = cache.span_starts
    for row in range(3):
        # Example b draws from seed + b: alone with that seed it takes the same spans.
        with megatrain.ttt.adapt(model, [ctx[row]], seed=4 + row, **kwargs) as alone:
            ref = megatrain.generate(model, [prompts[row]], max_new_tokens=4, cache=alone, return_logprobs=True)
        assert [s[0] for s in alone.span_starts] == [s[row] for s in starts]
        assert batch[0][row] == ref[0][0]
        torch.testing.assert_close(torch.tensor(batch[1][row]), torch.tensor(ref[1][0]), rtol=1e-5, atol=1e-5)


def test_adapted_answer_equals_a_model_with_the_adapted_weights():
    """generate(cache=) inside adapt equals plain decoding of context + prompt by a model whose W_Q
    is the adapted one, except that the context K/V stay those of the original weights: checked on
    a one-layer model, where the context's keys and values do not depend on W_Q at all."""
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(dim=32, layers=1, heads=4, kv_heads=2, ffn_dim=64, vocab_size=VOCAB, max_seq_len=96, init_std=0.1)
    ).eval()
    ctx = contexts((40, 29))
    prompts = [[5, 9], [11]]
    with megatrain.ttt.adapt(model, ctx, steps=3, span=8, lr=1e-2) as cache:
        got = megatrain.generate(model, prompts, max_new_tokens=5, cache=cache, return_logprobs=True)
        adapted = model.blocks[0].attn.q_proj.weight.detach().clone()
    for row in range(2):
        copy = tiny_copy(model)
        copy.blocks[0].attn.q_proj.weight.data.copy_(adapted[row])
        ref = megatrain.generate(copy, [ctx[row] + prompts[row]], max_new_tokens=5, return_logprobs=True)
        assert got[0][row] == ref[0][0]
        torch.testing.assert_close(torch.tensor(got[1][row]), torch.tensor(ref[1][0]), rtol=1e-5, atol=1e-5)


def tiny_copy(model):
    import copy

    return copy.deepcopy(model)


def test_generate_with_prefilled_cache_equals_plain_generation():
    model = tiny_model()
    ctx = contexts()
    prompts = [[5, 9], [11], [3, 4, 5]]
    cache = prefill(model, ctx)
    for kwargs in (dict(), dict(temperature=0.9, seed=[1, 2, 3])):
        got = megatrain.generate(model, prompts, max_new_tokens=6, cache=cache, return_logprobs=True, **kwargs)
        ref = megatrain.generate(
            model, [c + p for c, p in zip(ctx, prompts)], max_new_tokens=6, return_logprobs=True, **kwargs
        )
        assert got[0] == ref[0]
        for a, b in zip(got[1], ref[1]):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-5)
    assert cache.frozen and cache.length == max(len(c) for c in ctx)  # generate left it as it was
    with pytest.raises(ConfigError, match="rows"):
        megatrain.generate(model, prompts[:2], max_new_tokens=2, cache=cache)
    with pytest.raises(ConfigError, match="prefix"):
        megatrain.generate(model, prompts, max_new_tokens=60, cache=cache)


def test_span_loss_falls_on_a_tiny_model():
    """A context that repeats a random 11-token phrase: attending to the phrase's earlier copy
    predicts the next token, and the queries alone can learn to do so."""
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    phrase = torch.randint(4, VOCAB, (11,), generator=g).tolist()
    ctx = (phrase * 8)[:85]
    probe = torch.tensor([20, 33, 47, 52, 60])
    span = 16

    def probe_loss(cache):
        windows = torch.stack([torch.tensor(ctx[s : s + span + 1]) for s in probe.tolist()])
        view = span_view(cache, probe, model.config.max_seq_len)
        view.keys = [k.expand(len(probe), -1, -1, -1) for k in view.keys]  # every probe reads example 0
        view.values = [v.expand(len(probe), -1, -1, -1) for v in view.values]
        view.rows = torch.zeros(len(probe), dtype=torch.long)
        with torch.no_grad():
            logits = model(windows[:, :-1], cache=view, positions=probe[:, None] + torch.arange(span))
        return F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()

    with megatrain.ttt.adapt(model, ctx, steps=0, span=span) as cache:
        start = probe_loss(cache)
    with megatrain.ttt.adapt(model, ctx, steps=24, span=span, lr=1e-2) as cache:
        end = probe_loss(cache)
        losses = cache.losses
    assert len(losses) == 24
    assert sum(losses[-6:]) / 6 < 0.8 * sum(losses[:6]) / 6, losses
    assert end < 0.8 * start, (start, end)


def test_q_lora_starts_from_the_base_model():
    model = tiny_model()
    ctx = contexts()
    with megatrain.ttt.adapt(model, ctx, steps=1, span=8, lr=1e-2, target="q") as full:
        first_full = full.losses[0]
    with megatrain.ttt.adapt(model, ctx, steps=2, span=8, lr=1e-2, target="q_lora", lora_rank=2) as lora:
        assert model.blocks[0].attn.q_proj.lora_a.shape == (3, 64, 2)
    assert lora.losses[0] == pytest.approx(first_full, rel=1e-6)  # B = 0: the same model at step 0
    assert lora.losses[1] != lora.losses[0]


def test_bad_inputs_are_one_line_config_errors():
    model = tiny_model()
    ctx = contexts()
    with pytest.raises(ConfigError, match=r"context 1 has 29 tokens, shorter than ttt.span \+ 1"):
        with megatrain.ttt.adapt(model, ctx, span=30):
            pass
    with pytest.raises(ConfigError, match="ttt.span=200 is longer than the model allows"):
        with megatrain.ttt.adapt(model, ctx, span=200):
            pass
    with pytest.raises(ConfigError, match="ttt.target='k'"):
        with megatrain.ttt.adapt(model, ctx, target="k", span=8):
            pass
    with pytest.raises(ConfigError, match="ttt.optimizer"):
        with megatrain.ttt.adapt(model, ctx, span=8, optimizer="lion"):
            pass
    torch.manual_seed(0)
    cola = Transformer(ModelConfig(preset="tiny", vocab_size=VOCAB, max_seq_len=96, linear="cola"))
    with pytest.raises(ConfigError, match="ttt.target=q_lora needs dense query projections.*cola"):
        with megatrain.ttt.adapt(cola, ctx, target="q_lora", span=8):
            pass
    # Nothing was left behind by the refused calls.
    assert all(not isinstance(b.attn.q_proj, ExampleQuery) for b in model.blocks)


def _run_two_processes(script: str, ok: str) -> None:
    import subprocess
    import sys

    from tests.conftest import REPO, child_env, free_port

    env = child_env()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(free_port()),
            script,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    assert ok in proc.stdout


@pytest.mark.slow
def test_tensor_parallel_two_processes_match_one():
    _run_two_processes("tests/ttt/ttt_checks.py", "ok: ttt tp")


@pytest.mark.slow
def test_context_parallel_prefill_two_processes_match_one():
    """parallel.context=2: the context prefill split over 2 ranks fills the one-process cache; adaptation
    and answers over it equal one process's (tests/ttt/ttt_context_checks.py). ~15 s."""
    _run_two_processes("tests/ttt/ttt_context_checks.py", "ok: ttt context")
