"""megatrain.generate: KV-cache decoding against full recomputation (dense and IHA), batching,
EOS and stop sequences per row, top-k / top-p / temperature sampling and its distribution, seeds,
log-probabilities, argument errors, TP=2 and ZeRO-3 in 2 gloo processes, and `megatrain generate`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import megatrain
from megatrain.models.config import IHAConfig, ModelConfig
from megatrain.errors import ConfigError
from megatrain.generate import generate, is_truncated
from megatrain.models.transformer import Transformer
from tests.conftest import REPO, child_env, free_port, run_cli

VOCAB = 64
PROMPTS = [[5, 9, 2, 33, 14, 7, 1], [40, 3], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [8]]
ATTENTION = {
    "mha": {},
    "iha": dict(attention="iha", iha=IHAConfig(pseudo_heads=2)),
    "iha-window": dict(attention="iha", iha=IHAConfig(pseudo_heads=3, mask="token_causal", window=6, rope="original")),
}


def tiny_model(**extra) -> Transformer:
    torch.manual_seed(2)
    # Seed 2: with the name-keyed init, a model whose 10-token rows include both truncated and finished
    # ones (test_is_truncated_... needs both kinds).
    # init_std 0.1: next-token distributions peaked like a trained model's, not near-uniform.
    return Transformer(ModelConfig(preset="tiny", vocab_size=VOCAB, max_seq_len=48, init_std=0.1, **extra)).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@torch.no_grad()
def recompute(model, prompt, new_tokens, temperature=1.0):
    """Log-probabilities log_softmax(logits / T) of `new_tokens` after `prompt`, from one full forward."""
    seq = torch.tensor([list(prompt) + list(new_tokens)])
    logits = model(seq)[0, len(prompt) - 1 : -1] / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(new_tokens)[:, None]).squeeze(-1)


@torch.no_grad()
def greedy_by_recomputation(model, prompt, n):
    """Greedy decoding that reruns the whole sequence for every token (no cache)."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


def truncate_after(tokens, is_end):
    """tokens up to and including the first index i with is_end(tokens[:i + 1])."""
    for i in range(len(tokens)):
        if is_end(tokens[: i + 1]):
            return tokens[: i + 1]
    return tokens


@pytest.mark.parametrize("attention", list(ATTENTION))
def test_cached_greedy_equals_full_recomputation_batched_and_alone(attention):
    model = tiny_model(**ATTENTION[attention])
    batched, logprobs = generate(model, PROMPTS, max_new_tokens=12, return_logprobs=True)
    for prompt, tokens, lps in zip(PROMPTS, batched, logprobs):
        assert tokens == greedy_by_recomputation(model, prompt, 12)
        assert generate(model, [prompt], max_new_tokens=12) == [tokens]
        torch.testing.assert_close(torch.tensor(lps), recompute(model, prompt, tokens), rtol=1e-5, atol=1e-5)
    assert len({tuple(t) for t in batched}) > 1  # not a degenerate model that says one thing


def test_eos_stops_only_its_row_and_finished_rows_leave_the_batch(model):
    full = generate(model, PROMPTS, max_new_tokens=10)
    eos = full[1][3]
    expected = [truncate_after(t, lambda s: s[-1] == eos) for t in full]
    assert len(expected[1]) == 4 and any(len(t) == 10 for t in expected)
    batch_sizes = []
    hook = model.register_forward_pre_hook(lambda mod, args: batch_sizes.append(args[0].shape[0]))
    try:
        out = generate(model, PROMPTS, max_new_tokens=10, eos_id=eos)
    finally:
        hook.remove()
    assert out == expected
    # Forward k (after the prefill) runs only the rows that have not finished by their k-th token.
    running = [sum(len(t) > k for t in expected) for k in range(1, 10)]
    assert batch_sizes == [len(PROMPTS)] + [n for n in running if n]
    assert generate(model, PROMPTS, max_new_tokens=10, eos_id=[eos, 63]) == [
        truncate_after(t, lambda s: s[-1] in (eos, 63)) for t in full
    ]


def test_prefill_projects_only_the_last_position_to_the_vocabulary(model):
    shapes = []
    hook = model.head.register_forward_hook(lambda mod, args, out: shapes.append(tuple(out.shape)))
    try:
        generate(model, PROMPTS, max_new_tokens=2)
    finally:
        hook.remove()
    assert shapes == [(4, 1, VOCAB), (4, 1, VOCAB)]
    assert not model.head._forward_pre_hooks  # the hook is gone afterwards
    assert model(torch.tensor([PROMPTS[0]])).shape == (1, len(PROMPTS[0]), VOCAB)


def test_stop_token_sequences(model):
    full = generate(model, PROMPTS, max_new_tokens=10)
    seq = full[2][4:6]
    expected = [truncate_after(t, lambda s: s[-2:] == seq) for t in full]
    assert len(expected[2]) <= 6
    assert generate(model, PROMPTS, max_new_tokens=10, stop=[seq]) == expected
    # A single token id is a one-token stop sequence.
    single = full[0][1]
    assert generate(model, PROMPTS, max_new_tokens=10, stop=single) == [
        truncate_after(t, lambda s: s[-1] == single) for t in full
    ]


class LetterTokenizer:
    """Token i decodes to one letter; enough to test stop strings."""

    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)

    def encode_letters(self, text):
        return [ord(c) - ord("a") for c in text]


def test_stop_strings_need_a_tokenizer_and_stop_each_row(model):
    tok = LetterTokenizer()
    full = generate(model, PROMPTS, max_new_tokens=10)
    text = tok.decode(full[0][3:5])
    expected = [truncate_after(t, lambda s: text in tok.decode(s)) for t in full]
    assert len(expected[0]) <= 5
    assert generate(model, PROMPTS, max_new_tokens=10, stop=[text, [63, 62]], tokenizer=tok) == expected
    with pytest.raises(ConfigError, match="stop strings need tokenizer="):
        generate(model, PROMPTS, max_new_tokens=10, stop=text)


def test_is_truncated_tells_rows_cut_at_max_new_tokens_from_rows_that_ended(model):
    tok = LetterTokenizer()
    full = generate(model, PROMPTS, max_new_tokens=10)
    eos, text = full[1][3], tok.decode(full[0][3:5])
    kwargs = dict(stop=[text, [63, 62]], eos_id=eos, tokenizer=tok)
    out = generate(model, PROMPTS, max_new_tokens=10, **kwargs)
    ended = [truncate_after(t, lambda s: s[-1] == eos or text in tok.decode(s) or s[-2:] == [63, 62]) for t in full]
    assert out == ended
    want = [len(e) == 10 and e == t and not (t[-1] == eos or text in tok.decode(t)) for e, t in zip(ended, full)]
    assert [is_truncated(t, 10, **kwargs) for t in out] == want
    assert True in want and False in want  # both kinds occur
    # A row that ends exactly at the limit (EOS, stop string or stop sequence as its last token) ran to completion.
    assert not is_truncated([1, 2, eos], 3, eos_id=eos)
    assert not is_truncated([1, 63, 62], 3, stop=[[63, 62]])
    assert not is_truncated(tok.encode_letters("xxab"), 4, stop="ab", tokenizer=tok)
    assert is_truncated([1, 2, 3], 3, eos_id=eos if eos not in (1, 2, 3) else 60)
    assert not is_truncated([1, 2], 3)  # shorter than the limit: it stopped by itself


def test_top_k_1_and_tiny_top_p_are_greedy(model):
    greedy, greedy_lp = generate(model, PROMPTS, max_new_tokens=8, return_logprobs=True)
    sampled, sampled_lp = generate(
        model, PROMPTS, max_new_tokens=8, temperature=1.0, top_k=1, seed=3, return_logprobs=True
    )
    assert sampled == greedy
    torch.testing.assert_close(torch.tensor(sampled_lp), torch.tensor(greedy_lp))  # T = 1: the same distribution
    assert generate(model, PROMPTS, max_new_tokens=8, temperature=2.0, top_p=1e-6, seed=4) == greedy


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(model):
    kwargs = dict(max_new_tokens=10, temperature=1.0, top_p=0.95)
    seeds = [11, 12, 13, 14]
    out = generate(model, PROMPTS, seed=seeds, **kwargs)
    assert out == generate(model, PROMPTS, seed=seeds, **kwargs)
    assert out != generate(model, PROMPTS, seed=[21, 22, 23, 24], **kwargs)
    # Each row alone, and the rows in another order, give the same samples for the same seed.
    for prompt, seed, tokens in zip(PROMPTS, seeds, out):
        assert generate(model, [prompt], seed=[seed], **kwargs) == [tokens]
    assert generate(model, PROMPTS[::-1], seed=seeds[::-1], **kwargs) == out[::-1]
    # One int seed: row i uses seed + i.
    assert generate(model, PROMPTS, seed=11, **kwargs) == out
    # The same prompt with different seeds (a GRPO group) gives different samples.
    group = generate(model, [PROMPTS[1]] * 6, seed=0, **kwargs)
    assert len({tuple(t) for t in group}) > 1


def test_sampling_follows_temperature_top_k_top_p_distribution(model):
    """One step for 4000 seeds: the empirical frequencies match softmax(logits / T) restricted to
    the top-k tokens, then to the smallest prefix holding top_p of their mass, renormalised."""
    prompt, temperature, top_k, top_p, n = PROMPTS[0], 0.5, 6, 0.8, 4000
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0, -1] / temperature
    probs, order = torch.softmax(logits.double(), dim=-1).sort(descending=True)
    probs = probs[:top_k] / probs[:top_k].sum()
    keep = int((probs.cumsum(0) < top_p).sum()) + 1
    expected = dict(zip(order[:keep].tolist(), (probs[:keep] / probs[:keep].sum()).tolist()))
    assert 2 <= keep < top_k  # both truncations matter for this model and prompt
    out = generate(
        model, [prompt] * n, max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p, seed=list(range(n))
    )
    counts = torch.bincount(torch.tensor([t[0] for t in out]), minlength=VOCAB)
    assert set(torch.nonzero(counts).flatten().tolist()) <= set(expected)
    for token, p in expected.items():
        assert abs(counts[token].item() / n - p) < 4 * (p * (1 - p) / n) ** 0.5 + 1e-3, (token, counts[token], p)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_equal_log_softmax_of_a_recomputed_forward(model, temperature):
    tokens, logprobs = generate(
        model, PROMPTS, max_new_tokens=9, temperature=temperature, top_k=20, seed=5, return_logprobs=True
    )
    for prompt, new, lps in zip(PROMPTS, tokens, logprobs):
        assert len(lps) == len(new) == 9
        expected = recompute(model, prompt, new, temperature=temperature or 1.0)
        torch.testing.assert_close(torch.tensor(lps), expected, rtol=1e-5, atol=1e-5)


def test_bf16_model_generates_with_fp32_logprobs():
    model = tiny_model().to(torch.bfloat16)
    tokens, logprobs = generate(model, PROMPTS, max_new_tokens=6, temperature=1.0, return_logprobs=True)
    assert [len(t) for t in tokens] == [6] * 4
    assert all(all(lp <= 0 and lp == lp for lp in row) for row in logprobs)
    assert all(0 <= t < VOCAB for row in tokens for t in row)


@pytest.mark.parametrize(
    "prompts, kwargs, message",
    [
        ([], dict(max_new_tokens=4), "prompts must be a non-empty list"),
        ([[1, 2]], dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
        (
            [list(range(45))],
            dict(max_new_tokens=4),
            "prompt 0 has 45 tokens; with max_new_tokens=4 it may have at most",
        ),
        ([[1], []], dict(max_new_tokens=4), "prompt 1 is empty"),
        ([[1, 64]], dict(max_new_tokens=4), "prompt 0 has a token id outside [0, model.vocab_size=64)"),
        (["some text"], dict(max_new_tokens=4), "prompt 0 must be a list of token ids"),
        ([[1]], dict(max_new_tokens=4, temperature=-1.0), "temperature must be >= 0"),
        ([[1]], dict(max_new_tokens=4, top_p=0.0), "top_p must lie in (0, 1]"),
        ([[1]], dict(max_new_tokens=4, top_k=-2), "top_k must be an integer >= 0"),
        ([[1], [2]], dict(max_new_tokens=4, seed=[1]), "seed must be one int or a list of 2 ints"),
        ([[1]], dict(max_new_tokens=4, eos_id="</s>"), "eos_id must be a token id"),
        ([[1]], dict(max_new_tokens=4, stop=[[]]), "each stop item must be"),
    ],
)
def test_bad_arguments_raise_one_line(model, prompts, kwargs, message):
    with pytest.raises(ConfigError) as info:
        generate(model, prompts, **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert str(info.value).startswith("generate: ")


def test_longest_allowed_prompt_fills_max_seq_len(model):
    prompt = list(range(1, 45))  # 44 + 4 = max_seq_len: the last token fed sits at position 46
    out = generate(model, [prompt, [3]], max_new_tokens=4)
    assert out[0] == greedy_by_recomputation(model, prompt, 4)


def test_megatrain_generate_is_the_function_before_and_after_importing_the_module(model):
    # Here megatrain.generate (the submodule) is imported already: the package attribute is the module.
    assert megatrain.generate(model, PROMPTS, max_new_tokens=3) == generate(model, PROMPTS, max_new_tokens=3)
    code = (
        "import sys, megatrain; assert 'torch' not in sys.modules, 'import megatrain is not light'; "
        "f = megatrain.generate; import torch; from megatrain.config import ModelConfig; "
        "from megatrain.models.transformer import Transformer; "
        "m = Transformer(ModelConfig(preset='tiny', vocab_size=32)); "
        "a = f(m, [[1, 2]], max_new_tokens=3); b = megatrain.generate(m, [[1, 2]], max_new_tokens=3); "
        "import megatrain.generate; c = megatrain.generate(m, [[1, 2]], max_new_tokens=3); "
        "assert a == b == c and len(a[0]) == 3, (a, b, c); print('ok')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.slow
def test_tensor_parallel_and_zero3_generation_match_one_process():
    env = child_env()
    env["TRITON_INTERPRET"] = "1"
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
            "tests/generate_checks.py",
            "tp",
            "zero3",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    assert "ok: tp zero3" in proc.stdout


def test_generate_command_prints_continuations(tiny_run):
    prompts = ["It is a truth universally acknowledged", "Emma"]
    proc = run_cli(
        [
            "generate",
            str(tiny_run),
            "--prompt",
            prompts[0],
            "--prompt",
            prompts[1],
            "--max-new-tokens",
            "12",
            "--device",
            "cpu",
        ]
    )
    model, tok, _ = megatrain.load(str(tiny_run))
    new = generate(model, [tok.encode(p) for p in prompts], max_new_tokens=12, eos_id=tok.eos_id)
    expected = "\n\n".join(p + tok.decode(t) for p, t in zip(prompts, new)) + "\n"
    assert proc.stdout == expected
    assert all(len(t) > 0 for t in new) and len(proc.stdout) > sum(len(p) for p in prompts) + 4

    sampled = run_cli(
        [
            "generate",
            str(tiny_run),
            "--prompt",
            "Emma",
            "--max-new-tokens",
            "12",
            "--temperature",
            "0.9",
            "--top-p",
            "0.9",
            "--top-k",
            "50",
            "--seed",
            "3",
            "--stop",
            "\n",
        ]
    )
    new = generate(
        model,
        [tok.encode("Emma")],
        max_new_tokens=12,
        temperature=0.9,
        top_p=0.9,
        top_k=50,
        seed=3,
        eos_id=tok.eos_id,
        stop="\n",
        tokenizer=tok,
    )
    assert sampled.stdout == "Emma" + tok.decode(new[0]) + "\n"

    bad = run_cli(["generate", str(tiny_run), "--prompt", "Emma", "--max-new-tokens", "0"], check=False)
    assert bad.returncode == 2
    assert bad.stderr == "megatrain: error: generate: max_new_tokens must be an integer >= 1, got 0\n"
    missing = run_cli(["generate", str(tiny_run / "nope"), "--prompt", "Emma"], check=False)
    assert missing.returncode == 2 and missing.stderr.startswith("megatrain: error: ")


@pytest.mark.parametrize("with_transformers", [True, False])
def test_rollout_benchmark_writes_its_table(tiny_run, tmp_path, with_transformers):
    if with_transformers:
        pytest.importorskip("transformers")
    hide = "" if with_transformers else "sys.modules['transformers'] = None; "  # import fails as if absent
    code = (
        f"import runpy, sys; {hide}sys.argv = ['benchmarks/rollout.py'] + sys.argv[1:]; "
        "runpy.run_path('benchmarks/rollout.py', run_name='__main__')"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "--run",
            str(tiny_run),
            "--batch",
            "1,3",
            "--prompt-len",
            "5",
            "--new-tokens",
            "4",
            "--repeats",
            "1",
            "--out",
            str(tmp_path),
            "--tag",
            "r",
        ],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((tmp_path / "r.json").read_text())
    assert [r["batch"] for r in info["rows"]] == [1, 3]
    assert all(r["megatrain_tokens_per_s"] > 0 for r in info["rows"])
    table = (tmp_path / "r.md").read_text()
    if with_transformers:
        # The same weights decode the same tokens greedily in both libraries.
        assert all(r["rows_equal"] == 1.0 and r["ratio"] > 0 for r in info["rows"])
        assert "| transformers tok/s |" in table
    else:
        assert info["versions"]["transformers"] is None and "transformers is not installed" in table
        assert "ratio" not in info["rows"][0]
