"""megatrain.load, `megatrain export` (Hugging Face Llama layout) and `megatrain tokenizer`."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

import megatrain
from megatrain.engine.export import hf_name, megatrain_name
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def trained_run(tiny_run):
    return tiny_run  # the session's tiny pretrained run (read-only)


def test_load_run_dir_gives_working_model_and_tokenizer(trained_run):
    model, tokenizer, cfg = megatrain.load(str(trained_run))
    text = "It is a truth universally acknowledged"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    logits = model(torch.tensor([ids]))
    assert logits.shape == (1, len(ids), cfg.vocab_size)
    # The same weights as the checkpoint's consolidated file.
    ckpt = trained_run / "checkpoints" / "step_8" / "model.safetensors"
    with safe_open(str(ckpt), framework="pt") as fh:
        assert torch.equal(fh.get_tensor("norm.weight"), model.norm.weight.detach())


def test_export_hf_llama_round_trip(trained_run, tmp_path):
    out = tmp_path / "hf"
    run_cli(["export", str(trained_run), "--output", str(out)])
    config = json.load(open(out / "config.json"))
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (
        config["hidden_size"],
        config["num_hidden_layers"],
        config["num_attention_heads"],
        config["num_key_value_heads"],
    ) == (64, 2, 4, 2)
    assert os.path.isfile(out / "tokenizer.model")
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        names = set(fh.keys())
    assert "model.layers.1.self_attn.k_proj.weight" in names and "lm_head.weight" in names
    assert all(megatrain_name(hf_name(n)) == n for n in ["embed.weight", "blocks.0.mlp.down_proj.weight"])

    # Loading the export back gives the same function as loading the run.
    ref, tok, _ = megatrain.load(str(trained_run))
    back, _, _ = megatrain.load(str(out))
    ids = torch.tensor([tok.encode("Emma Woodhouse, handsome, clever, and rich")])
    assert torch.equal(ref(ids), back(ids))

    # A second export into a non-empty folder is refused (one line, exit 2).
    proc = run_cli(["export", str(trained_run), "--output", str(out)], check=False)
    assert proc.returncode == 2 and "not empty" in proc.stderr


def test_tokenizer_command(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(
        "the quick brown fox jumps over the lazy dog\n" * 200 + "pack my box with five dozen liquor jugs\n" * 200
    )
    prefix = tmp_path / "tok" / "sp"
    proc = run_cli(
        ["tokenizer", "--input", str(text), "--vocab-size", "290", "--type", "unigram", "--output", str(prefix)]
    )
    assert "vocab 290" in proc.stdout
    from megatrain.data.tokenizer import Tokenizer

    tok = Tokenizer(str(prefix) + ".model")
    assert tok.decode(tok.encode("the lazy fox")) == "the lazy fox"
    bad = run_cli(
        ["tokenizer", "--input", str(tmp_path / "nope.txt"), "--vocab-size", "300", "--output", str(prefix)],
        check=False,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("megatrain: error: ") and "nope.txt" in bad.stderr
