"""Pipeline parallelism through the real trainer (DeepSpeed's pipeline engine, 1F1B): per-step fp32 losses
equal to one process on the same seed and global batch, alone, with a tied head (TiedLayerSpec) and composed
with TP and DP x ZeRO-1; per-stage checkpoint files with an exact resume; resharding between pipeline sizes
(2 -> 1 and 1 -> 2) through DeepSpeed's universal checkpoint; export to Hugging Face from a pipelined run; bad
layouts refused in one line before any process group starts."""

from __future__ import annotations

import os
import re

import pytest

from megatrain.config import load_config
from megatrain.errors import ConfigError
from tests.conftest import TINY_JOB, losses, run_cli

STEPS = ["train.steps=6", "log.eval_every=3", "parallel.zero_stage=1"]
# Logits of two exports whose weights differ by Adam's rounding noise (measured 2.4e-7 at logits ~1).
ATOL_LOGITS = 1e-5


def assert_close(a, b, rtol=1e-5, steps=6):
    assert len(a) == len(b) == steps, (a, b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= rtol * max(abs(x), abs(y)), f"step {i + 1}: {x} vs {y}\n{a}\n{b}"


# ---- one process, no training ---------------------------------------------------------------------------


def test_stage_bounds_balance_parameters_and_follow_a_partition():
    from megatrain.parallel.pipeline import stage_bounds

    assert stage_bounds([10, 20, 20, 10], 2) == [0, 2, 4]
    assert stage_bounds([10, 20, 20, 20, 20, 10], 3) == [0, 2, 4, 6]
    assert stage_bounds([1, 1, 100, 1], 2) == [0, 2, 4]
    assert stage_bounds([10, 20, 20, 20, 10], 2, blocks=[1, 2]) == [0, 2, 5]
    assert stage_bounds([5] * 6, 6) == [0, 1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("tied", [False, True])
def test_pipeline_names_map_to_transformer_names(tied):
    from torch import nn

    from megatrain.models.config import ModelConfig
    from megatrain.models.transformer import Transformer
    from megatrain.parallel.pipeline import pipeline_layers, pipeline_name, pipeline_universal_info, transformer_name

    cfg = ModelConfig(preset="tiny", vocab_size=64, tie_embeddings=tied).resolved()
    model = Transformer(cfg, seed=0, device="meta")
    layers = pipeline_layers(model)
    assert len(layers) == 4 + tied  # a tied head is a layer of its own, after the final norm
    pipe = set()
    for i, layer in enumerate(layers):  # DeepSpeed's names: "<index>.<name>", a TiedLayerSpec "tied_modules.<key>."
        module, prefix = (
            (layer, f"{i}.") if isinstance(layer, nn.Module) else (layer.build(), f"tied_modules.{layer.key}.")
        )
        pipe |= {prefix + name for name, _ in module.named_parameters()}
    assert ("tied_modules.embed.weight" in pipe) == tied
    assert {transformer_name(n, 2) for n in pipe} == {n for n, _ in model.named_parameters()}
    assert {pipeline_name(transformer_name(n, 2), 2, tied) for n in pipe} == pipe
    # The universal-checkpoint patterns name pipeline parameters; the tied copy of later stages is skipped.
    info = pipeline_universal_info(cfg)
    patterns = [p for key, value in info.items() if isinstance(value, list) for p in value]
    assert patterns and all(any(re.match(p, n) for n in pipe) for p in patterns)
    assert ("pipeline_replicated_parameter_patterns" in info) == tied


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["parallel.pipeline=3"], "parallel.pipeline=3 is more stages than model.layers=2"),
        (["parallel.pipeline=2", "parallel.zero_stage=2"], "parallel.pipeline=2 with parallel.zero_stage=2"),
        (["parallel.pipeline=2", "parallel.zero_stage=0"], "parallel.pipeline=2 with parallel.zero_stage=0"),
        (["parallel.pipeline=2", "parallel.pipeline_partition=[2,1]"], "parallel.pipeline_partition=[2, 1] must list"),
        (["parallel.pipeline=2", "parallel.microbatches=3", "train.grad_accum=2"], "parallel.microbatches=3 disagrees"),
    ],
)
def test_bad_pipeline_configs_are_one_line(extra, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, [*TINY_JOB, "parallel.zero_stage=1", *extra]).resolve(2)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_microbatches_default_from_the_batch_arithmetic():
    cfg = load_config(None, [*TINY_JOB, "parallel.zero_stage=1", "parallel.pipeline=2"]).resolve(4)
    assert cfg.train.grad_accum == 1  # global 8 = micro 4 x 1 x DP 2
    cfg = load_config(
        None,
        [*TINY_JOB, "parallel.zero_stage=1", "parallel.pipeline=2", "train.micro_batch=2", "parallel.microbatches=4"],
    ).resolve(2)
    assert cfg.train.grad_accum == 4


# ---- multi-process runs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, ZeRO-1, checkpoints at steps 3 and 6: (per-step losses, run dir)."""
    run_dir = tmp_path_factory.mktemp("pp") / "single"
    run_cli(["pretrain", *TINY_JOB, *STEPS, "checkpoint.every=3", f"run.dir={run_dir}"])
    return losses(run_dir), run_dir


@pytest.fixture(scope="module")
def pipelined(tmp_path_factory):
    """PP=2 (2 processes) for 3 steps, checkpoint, resume for 3 more: the run dir (checkpoints at 3 and 6)."""
    run_dir = tmp_path_factory.mktemp("pp") / "pp2"
    pp2 = ["pretrain", "--nproc-per-node", "2", *TINY_JOB, *STEPS, f"run.dir={run_dir}", "parallel.pipeline=2"]
    run_cli([*pp2, "train.stop_after=3"])
    step3 = run_dir / "checkpoints" / "step_3"
    for layer in range(4):  # embedding, 2 blocks, norm + head: one file each, written by their stage
        assert (step3 / f"layer_{layer:02d}-model_00-model_states.pt").is_file()
    proc = run_cli([*pp2, "--resume"])
    assert "resumed from" in proc.stdout + proc.stderr
    return run_dir


def assert_weights_close(full: dict, joined: dict) -> None:
    """Adam's rounding noise only (see test_tp_training): a wrong join moves ~init std."""
    assert full.keys() == joined.keys()
    for name in full:
        assert (joined[name] - full[name]).abs().max().item() <= 3e-3 / 10, name


@pytest.mark.slow
def test_pipeline_2_matches_one_process_and_resumes_exactly(single, pipelined):
    """PP=2 with a checkpoint (DeepSpeed's per-layer files) and a resume: the losses are the one-process ones;
    model.safetensors holds the full weights under the Transformer's names and `megatrain.load` reads the
    pipelined run."""
    import torch
    from safetensors.torch import load_file

    import megatrain

    single_losses, single_dir = single
    assert_close(single_losses, losses(pipelined))
    assert_weights_close(
        load_file(str(single_dir / "checkpoints" / "step_6" / "model.safetensors")),
        load_file(str(pipelined / "checkpoints" / "step_6" / "model.safetensors")),
    )
    model, _, _ = megatrain.load(str(pipelined))
    ids = torch.arange(8)[None]
    assert model(ids).shape == (1, 8, model.config.vocab_size)


@pytest.mark.slow
def test_reshard_between_pipeline_sizes(single, pipelined, tmp_path):
    """PP=2 -> 1 (`megatrain reshard` ahead of time) and PP=1 -> 2 (converted on resume): the resumed runs'
    losses continue the uninterrupted one-process run. The universal folder holds every parameter under the
    Transformer's name (the pipeline's names are symlinks to it), with the fp32 weights and Adam moments the
    one-process run has at that step."""
    import torch

    single_losses, single_dir = single
    step3 = pipelined / "checkpoints" / "step_3"
    run_cli(["reshard", str(step3)])
    universal = step3 / "universal" / "zero"
    assert os.readlink(universal / "2.block.attn.o_proj.weight") == "blocks.1.attn.o_proj.weight"
    proc = run_cli(["pretrain", *TINY_JOB, *STEPS, f"run.dir={tmp_path / 'pp1'}", "--resume-from", str(step3)])
    assert "resumed from" in proc.stdout + proc.stderr and "universal checkpoint" in proc.stdout + proc.stderr
    assert_close(single_losses[3:], losses(tmp_path / "pp1"), steps=3)

    # The one-process run's step 3 converted the same way: the same tensors under the same names.
    run_cli(["reshard", str(single_dir / "checkpoints" / "step_3")])
    reference = single_dir / "checkpoints" / "step_3" / "universal" / "zero"
    names = sorted(p.name for p in reference.iterdir() if p.is_dir() and not p.is_symlink())
    assert names == sorted(p.name for p in universal.iterdir() if p.is_dir() and not p.is_symlink())
    for name in names:
        for state in ("fp32", "exp_avg", "exp_avg_sq"):
            ours = torch.load(universal / name / f"{state}.pt", weights_only=True)["param"]
            theirs = torch.load(reference / name / f"{state}.pt", weights_only=True)["param"]
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-7, msg=f"{name} {state}")

    run_cli(
        [
            "pretrain",
            "--nproc-per-node",
            "2",
            *TINY_JOB,
            *STEPS,
            f"run.dir={tmp_path / 'back'}",
            "parallel.pipeline=2",
            "--resume-from",
            str(single_dir / "checkpoints" / "step_3"),
        ]
    )
    assert_close(single_losses[3:], losses(tmp_path / "back"), steps=3)


@pytest.mark.slow
def test_export_of_a_pipelined_run(single, pipelined, tmp_path):
    """`megatrain export` of the PP=2 run: Hugging Face's Llama gives the pipelined run's logits (fp32, 1e-5),
    and those of the one-process run's export up to Adam's rounding noise in the weights."""
    import torch

    import megatrain

    transformers = pytest.importorskip("transformers")
    ids = torch.randint(0, 500, (2, 19), generator=torch.Generator().manual_seed(0))

    def hf_logits(run_dir, out):
        run_cli(["export", str(run_dir), "--output", str(out)])
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        with torch.no_grad():
            return hf(ids).logits

    ours = hf_logits(pipelined, tmp_path / "hf-pp2")
    model, _, _ = megatrain.load(str(pipelined))
    with torch.no_grad():
        torch.testing.assert_close(ours, model(ids), rtol=0, atol=1e-5)
    reference = hf_logits(single[1], tmp_path / "hf-single")
    torch.testing.assert_close(ours, reference, rtol=0, atol=ATOL_LOGITS)


@pytest.mark.slow
def test_tied_head_pipeline_matches_one_process(tmp_path):
    """model.tie_embeddings=true at PP=2: the embedding (first stage) and the head (last stage) are one
    TiedLayerSpec whose gradient DeepSpeed all-reduces between the stages; the losses and gradient norms are
    the one-process tied run's, model.safetensors holds the one weight as embed.weight, and `megatrain.load`
    gives a tied model."""
    import torch
    from safetensors.torch import load_file

    import megatrain
    from tests.conftest import read_metrics

    tied = [*TINY_JOB, *STEPS, "train.steps=4", "log.eval_every=2", "model.tie_embeddings=true"]
    run_cli(["pretrain", *tied, f"run.dir={tmp_path / 'single'}"])
    run_cli(["pretrain", "--nproc-per-node", "2", *tied, f"run.dir={tmp_path / 'pp2'}", "parallel.pipeline=2"])
    assert_close(losses(tmp_path / "single"), losses(tmp_path / "pp2"), steps=4)
    norms = [[r["grad_norm"] for r in read_metrics(tmp_path / d) if "loss" in r] for d in ("single", "pp2")]
    assert_close(*norms, steps=4)  # the tied gradient counted once in the clipping norm
    full = load_file(str(tmp_path / "single" / "checkpoints" / "step_4" / "model.safetensors"))
    joined = load_file(str(tmp_path / "pp2" / "checkpoints" / "step_4" / "model.safetensors"))
    assert "embed.weight" in joined and "head.weight" not in joined
    assert_weights_close(full, joined)
    model, _, _ = megatrain.load(str(tmp_path / "pp2"))
    assert model.head.weight is model.embed.weight
    assert model(torch.arange(8)[None]).shape == (1, 8, model.config.vocab_size)


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        ["parallel.tensor=2", "parallel.sequence=true"],  # PP=2 x TP=2 (sequence parallel)
        ["train.activation_checkpointing=true"],  # PP=2 x DP=2, ZeRO-1, recomputation per stage
    ],
)
def test_pipeline_composes_with_tensor_and_data_parallel(single, tmp_path, extra):
    """Losses equal one process; `megatrain reshard` of the final checkpoint joins the TP slices (merge patterns
    under the pipeline's names) and the ZeRO-1 partitions of every stage into the full fp32 weights."""
    import torch
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    run_cli(
        ["pretrain", "--nproc-per-node", "4", *TINY_JOB, *STEPS, f"run.dir={run_dir}", "parallel.pipeline=2", *extra]
    )
    assert_close(single[0], losses(run_dir))
    run_cli(["reshard", str(run_dir)])
    zero = run_dir / "checkpoints" / "step_6" / "universal" / "zero"
    full = load_file(str(single[1] / "checkpoints" / "step_6" / "model.safetensors"))
    assert_weights_close(full, {name: torch.load(zero / name / "fp32.pt", weights_only=True)["param"] for name in full})


@pytest.mark.slow
def test_bad_pipeline_layouts_refused_before_any_process_group(tmp_path):
    for extra, fragment in [
        (["parallel.pipeline=3"], "parallel.pipeline=3 is more stages than model.layers=2"),
        (["parallel.pipeline=2", "parallel.zero_stage=2"], "parallel.pipeline=2 with parallel.zero_stage=2"),
    ]:
        proc = run_cli(
            ["pretrain", "--nproc-per-node", "2", *TINY_JOB, *extra, f"run.dir={tmp_path / 'r'}"],
            check=False,
            timeout=120,
        )
        assert proc.returncode == 2, proc.stderr[-3000:]
        lines = [line for line in proc.stderr.splitlines() if line.startswith("megatrain: error")]
        assert len(lines) == 1 and fragment in lines[0], proc.stderr[-3000:]
        assert not (tmp_path / "r").exists()
