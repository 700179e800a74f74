"""Hugging Face in both directions, checked against transformers' own Llama.

megatrain -> HF: `megatrain export` of dense GQA, tied-head, SLTrain- and ReLoRA-merged and TP-trained
runs loads with `AutoModelForCausalLM.from_pretrained` and gives megatrain's logits (fp32, 1e-5).
HF -> megatrain: folders written by transformers' `save_pretrained` (one file and sharded) import,
load and give transformers' logits; import -> export is bit-exact; the imported run directory
continues pretraining and is accepted as rl.init / ttt.init; each unsupported feature is one line.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import megatrain
from megatrain.engine.export import export_hf_llama
from megatrain.engine.hf_import import import_hf_llama, read_hf_llama
from megatrain.errors import CheckpointError, ConfigError
from tests.conftest import TINY_JOB, read_metrics, run_cli

transformers = pytest.importorskip("transformers")

SHORT = ["train.steps=2", "log.eval_every=0", "train.warmup_steps=1"]
# Runs that export to Llama, besides the session's dense GQA tiny_run: (extra overrides, processes).
RUNS = {
    "tied-sltrain": (
        ["model.tie_embeddings=true", "model.linear=sltrain", "model.lowrank.density=0.05", "parallel.zero_stage=0"],
        1,
    ),
    "relora": (
        [
            "model.linear=relora",
            "train.steps=3",
            "train.relora.every=2",
            "train.relora.restart_warmup=1",
            "parallel.zero_stage=0",
        ],
        1,
    ),
    "tp2": (["parallel.tensor=2", "parallel.zero_stage=1"], 2),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_run):
    root = tmp_path_factory.mktemp("hf-runs")
    done = {"dense-gqa": str(tiny_run)}

    def get(name: str) -> str:
        if name not in done:
            extra, nproc = RUNS[name]
            run_dir = str(root / name)
            run_cli(["pretrain", "--nproc-per-node", str(nproc), *TINY_JOB, *SHORT, *extra, f"run.dir={run_dir}"])
            done[name] = run_dir
        return done[name]

    return get


def _hf_logits(folder, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def _megatrain_logits(path, ids):
    model, _, cfg = megatrain.load(str(path))
    with torch.no_grad():
        return model(ids), cfg


IDS = torch.randint(0, 500, (2, 19), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["dense-gqa", "tied-sltrain", "relora", pytest.param("tp2", marks=pytest.mark.slow)])
def test_export_loads_in_transformers_with_equal_logits(runs, tmp_path, name):
    run_dir = runs(name)
    out = export_hf_llama(run_dir, str(tmp_path / "hf"))
    ours, cfg = _megatrain_logits(run_dir, IDS)
    theirs = _hf_logits(out, IDS)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["tie_word_embeddings"] == cfg.tie_embeddings
    assert config["num_key_value_heads"] == cfg.kv_heads < config["num_attention_heads"]


def _tiny_llama(tied=False, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        rms_norm_eps=1e-5,
    )
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


@pytest.fixture(scope="module")
def sentencepiece_model(tiny_run):
    from megatrain.engine.checkpoint import resolve_checkpoint_dir

    return os.path.join(resolve_checkpoint_dir(str(tiny_run)), "tokenizer.model")


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory, sentencepiece_model):
    """transformers-written folders: one-file untied, sharded untied, one-file tied (with tokenizer.model)."""
    root = tmp_path_factory.mktemp("hf-folders")
    out = {}
    for name, tied, shard in [("single", False, None), ("sharded", False, "60KB"), ("tied", True, None)]:
        model = _tiny_llama(tied=tied, seed=len(out))
        kwargs = {"max_shard_size": shard} if shard else {}
        model.save_pretrained(str(root / name), **kwargs)
        shutil.copyfile(sentencepiece_model, root / name / "tokenizer.model")
        out[name] = (root / name, model)
    assert os.path.isfile(root / "sharded" / "model.safetensors.index.json")
    assert not os.path.isfile(root / "single" / "model.safetensors.index.json")
    return out


@pytest.mark.parametrize("name", ["single", "sharded", "tied"])
def test_import_gives_transformers_logits(hf_folders, tmp_path, name):
    folder, model = hf_folders[name]
    with torch.no_grad():
        theirs = model(IDS).logits
    run_dir = import_hf_llama(str(folder), str(tmp_path / "run"))
    ours, cfg = _megatrain_logits(run_dir, IDS)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert cfg.tie_embeddings == (name == "tied")
    direct, _ = _megatrain_logits(folder, IDS)  # megatrain.load reads the folder itself too
    assert torch.equal(direct, ours)


def test_import_export_round_trip_is_bit_exact(hf_folders, tmp_path):
    folder, _ = hf_folders["sharded"]
    run_dir = tmp_path / "run"
    proc = run_cli(["import", str(folder), "--output", str(run_dir)])
    assert "wrote run directory" in proc.stdout
    out = export_hf_llama(str(run_dir), str(tmp_path / "back"))
    index = json.load(open(folder / "model.safetensors.index.json"))["weight_map"]
    original = {}
    for shard in set(index.values()):
        original.update(load_file(str(folder / shard)))
    back = load_file(os.path.join(out, "model.safetensors"))
    assert original.keys() == back.keys()
    for name in original:
        assert original[name].dtype == back[name].dtype and torch.equal(original[name], back[name]), name
    a, b = json.load(open(folder / "config.json")), json.load(open(os.path.join(out, "config.json")))
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "max_position_embeddings",
        "rms_norm_eps",
        "tie_word_embeddings",
    ):
        assert a[key] == b[key], key
    # A bf16 folder keeps its dtype through the round trip.
    bf16 = tmp_path / "bf16"
    _tiny_llama(dtype=torch.bfloat16).save_pretrained(str(bf16))
    shutil.copyfile(folder / "tokenizer.model", bf16 / "tokenizer.model")
    out16 = export_hf_llama(import_hf_llama(str(bf16), str(tmp_path / "run16")), str(tmp_path / "back16"))
    first, second = load_file(str(bf16 / "model.safetensors")), load_file(os.path.join(out16, "model.safetensors"))
    assert all(second[k].dtype == torch.bfloat16 and torch.equal(first[k], second[k]) for k in first)


def test_imported_run_continues_pretraining_and_starts_rl_and_ttt(hf_folders, tmp_path):
    folder, model = hf_folders["single"]
    run_dir = import_hf_llama(str(folder), str(tmp_path / "run"))
    config = os.path.join(run_dir, "config.yaml")
    short = [
        "train.steps=2",
        "train.warmup_steps=1",
        "train.micro_batch=2",
        "train.global_batch=2",
        "data.seq_len=32",
        "log.eval_every=0",
        "log.progress=false",
        "parallel.zero_stage=0",
    ]
    proc = run_cli(["pretrain", "--config", config, "--resume", *short])
    assert "started from the weights of" in proc.stdout + proc.stderr
    # The first log line after step 1 names each kernel op's path: the reference for CPU tensors under auto.
    assert "kernels (MEGATRAIN_KERNELS=auto, cpu): " in proc.stdout and "rms_norm torch" in proc.stdout
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
    # train.init_from=the Hugging Face folder itself starts from the same weights: the same losses.
    other = tmp_path / "init-from"
    run_cli(["pretrain", "--config", config, *short, f"run.dir={other}", f"train.init_from={folder}"])
    assert [r["loss"] for r in read_metrics(other)] == [r["loss"] for r in read_metrics(run_dir)]
    trained = load_file(os.path.join(run_dir, "checkpoints", "step_2", "model.safetensors"))
    imported = load_file(os.path.join(run_dir, "checkpoints", "step_0", "model.safetensors"))
    assert trained.keys() == imported.keys()
    assert all(trained[k].shape == imported[k].shape for k in trained)
    assert not torch.equal(trained["blocks.0.attn.q_proj.weight"], imported["blocks.0.attn.q_proj.weight"])
    assert read_metrics(run_dir)[0]["loss"] > 5.0  # a random model on a 512-piece vocabulary: ~ln(512)

    from megatrain.engine.reshard import convert_to_universal

    with pytest.raises(CheckpointError, match="holds weights only"):  # `megatrain reshard`: nothing to convert
        convert_to_universal(os.path.join(run_dir, "checkpoints", "step_0"))

    from megatrain.config import load_config
    from megatrain.rl.job import _check_start, resolve_starts

    fresh = import_hf_llama(str(folder), str(tmp_path / "fresh"))
    cfg = load_config(None, [f"rl.init={fresh}", f"run.dir={tmp_path / 'rl'}"])
    (start,) = resolve_starts(cfg.rl, fresh)
    _check_start(cfg, start)
    assert start.step == 0
    from megatrain.rl.job import preflight as rl_preflight

    hf_cfg = load_config(None, [f"rl.init={folder}", f"run.dir={tmp_path / 'rl-hf'}"])
    assert rl_preflight(hf_cfg, False, 1) is None  # checked without reading tensors; rl() imports into RUN/init
    with pytest.raises(ConfigError, match="rl.checkpoints needs rl.init to be a megatrain run"):
        rl_preflight(
            load_config(None, [f"rl.init={folder}", "rl.checkpoints=all", f"run.dir={tmp_path / 'x'}"]), False, 1
        )

    from megatrain.ttt.job import preflight

    ttt_cfg = load_config(None, [f"ttt.init={folder}", f"run.dir={tmp_path / 'ttt'}"])
    assert preflight(ttt_cfg) == str(folder)  # ttt loads through megatrain.load, which reads HF folders


def _edited(hf_folders, tmp_path, edit_config=None, edit_weights=None, name="single"):
    folder, _ = hf_folders[name]
    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    if edit_config:
        config = json.load(open(copy / "config.json"))
        edit_config(config)
        json.dump(config, open(copy / "config.json", "w"))
    if edit_weights:
        state = load_file(str(copy / "model.safetensors"))
        edit_weights(state)
        save_file(state, str(copy / "model.safetensors"))
    return copy


def _set(**values):
    return lambda config: config.update(values)


REFUSALS = [
    (_set(attention_bias=True), None, "attention_bias=True is not supported"),
    (_set(mlp_bias=True), None, "mlp_bias=True is not supported"),
    (_set(hidden_act="gelu"), None, "hidden_act='gelu' is not supported"),
    (
        _set(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}),
        None,
        "RoPE scaling 'yarn' is not supported",
    ),
    (_set(rope_scaling={"type": "linear", "factor": 2.0}), None, "RoPE scaling 'linear' is not supported"),
    (_set(head_dim=32), None, "head_dim=32 is not supported"),
    (_set(attention_dropout=0.1), None, "attention_dropout=0.1 is not supported"),
    (_set(model_type="mistral"), None, "model_type 'mistral' is not supported"),
    (_set(quantization_config={"quant_method": "gptq"}), None, "quantization_config"),
    (_set(tie_word_embeddings=True), None, "lm_head.weight differs from embed_tokens.weight"),
    (None, lambda s: s.pop("lm_head.weight"), "tie_word_embeddings=false but there is no lm_head.weight"),
    (None, lambda s: s.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}), "is a bias"),
    (None, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"), "blocks.1.mlp.up_proj.weight is missing"),
    (_set(intermediate_size=200), None, "config.json implies (64, 200)"),
]


@pytest.mark.parametrize("edit_config, edit_weights, fragment", REFUSALS)
def test_unsupported_features_are_refused_in_one_line(hf_folders, tmp_path, edit_config, edit_weights, fragment):
    folder = _edited(hf_folders, tmp_path, edit_config, edit_weights)
    with pytest.raises(CheckpointError) as err:
        read_hf_llama(str(folder))
    assert fragment in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(CheckpointError):
        megatrain.load(str(folder))


def test_import_command_refusals_are_one_line_and_write_nothing(hf_folders, tmp_path):
    biased = _edited(hf_folders, tmp_path, _set(attention_bias=True))
    out = tmp_path / "run"
    proc = run_cli(["import", str(biased), "--output", str(out)], check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("megatrain: error: ") and "attention_bias" in proc.stderr
    assert not out.exists() and not (tmp_path / "run.tmp").exists()
    # No sentencepiece tokenizer: refused unless --tokenizer names one.
    os.remove(biased / "tokenizer.model")
    json.dump({**json.load(open(biased / "config.json")), "attention_bias": False}, open(biased / "config.json", "w"))
    with pytest.raises(CheckpointError, match="no sentencepiece tokenizer.model"):
        import_hf_llama(str(biased), str(out))
    tokenizer = hf_folders["single"][0] / "tokenizer.model"
    assert os.path.isdir(import_hf_llama(str(biased), str(out), tokenizer=str(tokenizer)))
    with pytest.raises(CheckpointError, match="not empty"):
        import_hf_llama(str(biased), str(out), tokenizer=str(tokenizer))


def test_pickled_weights_are_refused(hf_folders, tmp_path):
    folder, model = hf_folders["single"]
    pickled = tmp_path / "pickled"
    shutil.copytree(folder, pickled)
    os.remove(pickled / "model.safetensors")
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    for path in (pickled, pickled / "pytorch_model.bin"):
        with pytest.raises(CheckpointError, match="safetensors only") as err:
            megatrain.load(str(path))
        assert "\n" not in str(err.value)


def test_init_from_refusals(hf_folders, tmp_path, tiny_run):
    from megatrain.config import load_config
    from megatrain.engine.trainer import preflight

    folder, _ = hf_folders["single"]
    model = [
        "model.preset=null",
        "model.dim=64",
        "model.layers=2",
        "model.heads=4",
        "model.kv_heads=2",
        "model.ffn_dim=176",
        "model.vocab_size=512",
        "model.norm_eps=1e-5",
        "model.max_seq_len=128",
        "data.seq_len=32",
    ]
    with pytest.raises(ConfigError, match="train.init_from=.* needs data.tokenizer"):
        load_config(None, [*model, f"train.init_from={folder}"])
    good = [
        *model,
        f"train.init_from={folder}",
        f"data.tokenizer={folder / 'tokenizer.model'}",
        f"run.dir={tmp_path / 'run'}",
    ]
    assert preflight(load_config(None, good), False, 1) is None
    with pytest.raises(CheckpointError, match="model.ffn_dim=176 but this run has model.ffn_dim=192"):
        preflight(load_config(None, [*good, "model.ffn_dim=192"]), False, 1)
    other_tokenizer = tmp_path / "other.model"
    other_tokenizer.write_bytes(b"not the same bytes")
    with pytest.raises(CheckpointError, match="another tokenizer"):
        preflight(load_config(None, [*good, f"data.tokenizer={other_tokenizer}"]), False, 1)
    with pytest.raises(CheckpointError, match="model.linear='dense' but this run has model.linear='cola'"):
        preflight(load_config(None, [*good, "model.linear=cola"]), False, 1)


def test_rl_starts_from_a_hugging_face_folder(hf_folders, tmp_path):
    """rl.init=FOLDER: one RL iteration; rank 0 imported the folder into RUN/init, the excursion starts there."""
    from tests.rl.test_rl_job import RL_JOB

    folder, _ = hf_folders["single"]
    run_dir = tmp_path / "rl"
    run_cli(
        [
            "rl",
            *RL_JOB,
            f"run.dir={run_dir}",
            f"rl.init={folder}",
            "rl.group_size=2",
            "rl.prompts_per_step=2",
            "rl.micro_batch=4",
            "rl.steps=2",
            "rl.eval.samples=2",
            "rl.eval.k=[1]",
            "rl.eval.problems=1",
            "log.eval_batches=1",
            "data.seq_len=32",
            "--stop-after",
            "1",
        ]
    )
    assert json.load(open(run_dir / "init" / "checkpoints" / "step_0" / "megatrain.json"))["weights_only"]
    assert (run_dir / "from_step_0" / "grpo" / "checkpoints" / "step_1" / "model.safetensors").is_file()
