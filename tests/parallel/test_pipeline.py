"""Pipeline parallelism through the real trainer (DeepSpeed's pipeline engine, 1F1B): per-step fp32 losses
equal to one process on the same seed and global batch, alone and composed with TP and DP x ZeRO-1; per-stage
checkpoint files with an exact resume; bad layouts refused in one line before any process group starts."""

from __future__ import annotations

import pytest

from megatrain.config import load_config
from megatrain.errors import ConfigError
from tests.conftest import TINY_JOB, losses, run_cli

STEPS = ["train.steps=6", "log.eval_every=3", "parallel.zero_stage=1"]


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


def test_pipeline_names_map_to_transformer_names():
    from megatrain.models.config import ModelConfig
    from megatrain.models.transformer import Transformer
    from megatrain.parallel.pipeline import pipeline_layers, pipeline_name, transformer_name

    model = Transformer(ModelConfig(preset="tiny", vocab_size=64).resolved(), seed=0, device="meta")
    pipe = {f"{i}.{name}" for i, layer in enumerate(pipeline_layers(model)) for name, _ in layer.named_parameters()}
    assert {transformer_name(n, 2) for n in pipe} == {n for n, _ in model.named_parameters()}
    assert {pipeline_name(transformer_name(n, 2), 2) for n in pipe} == pipe


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["parallel.pipeline=3"], "parallel.pipeline=3 is more stages than model.layers=2"),
        (["parallel.pipeline=2", "parallel.zero_stage=2"], "parallel.pipeline=2 with parallel.zero_stage=2"),
        (["parallel.pipeline=2", "parallel.zero_stage=0"], "parallel.pipeline=2 with parallel.zero_stage=0"),
        (["parallel.pipeline=2", "model.tie_embeddings=true"], "with model.tie_embeddings=true"),
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
    """One process, ZeRO-1: (per-step losses, run dir)."""
    run_dir = tmp_path_factory.mktemp("pp") / "single"
    run_cli(["pretrain", *TINY_JOB, *STEPS, f"run.dir={run_dir}"])
    return losses(run_dir), run_dir


@pytest.mark.slow
def test_pipeline_2_matches_one_process_and_resumes_exactly(single, tmp_path):
    """PP=2 (2 processes) for 3 steps, checkpoint (DeepSpeed's per-layer files), resume for 3 more: the losses
    are the one-process ones; model.safetensors holds the full weights under the Transformer's names and
    `megatrain.load` reads the pipelined run."""
    import torch
    from safetensors.torch import load_file

    import megatrain

    single_losses, single_dir = single
    run_dir = tmp_path / "pp2"
    run_cli(
        [
            "pretrain",
            "--nproc-per-node",
            "2",
            *TINY_JOB,
            *STEPS,
            f"run.dir={run_dir}",
            "parallel.pipeline=2",
            "train.stop_after=3",
        ]
    )
    step3 = run_dir / "checkpoints" / "step_3"
    for layer in range(4):  # embedding, 2 blocks, norm + head: one file each, written by their stage
        assert (step3 / f"layer_{layer:02d}-model_00-model_states.pt").is_file()
    proc = run_cli(
        [
            "pretrain",
            "--nproc-per-node",
            "2",
            *TINY_JOB,
            *STEPS,
            f"run.dir={run_dir}",
            "parallel.pipeline=2",
            "--resume",
        ]
    )
    assert "resumed from" in proc.stdout + proc.stderr
    assert_close(single_losses, losses(run_dir))

    full = load_file(str(single_dir / "checkpoints" / "step_6" / "model.safetensors"))
    joined = load_file(str(run_dir / "checkpoints" / "step_6" / "model.safetensors"))
    assert full.keys() == joined.keys()
    for name in full:  # Adam's rounding noise only (see test_tp_training): a wrong join moves ~init std
        assert (joined[name] - full[name]).abs().max().item() <= 3e-3 / 10, name
    model, _, _ = megatrain.load(str(run_dir))
    ids = torch.arange(8)[None]
    assert model(ids).shape == (1, 8, model.config.vocab_size)

    proc = run_cli(
        ["pretrain", *TINY_JOB, *STEPS, "train.steps=8", f"run.dir={run_dir}", "--resume"], check=False, timeout=120
    )
    assert proc.returncode == 2 and "parallel.pipeline=2, this run has 1" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        ["parallel.tensor=2", "parallel.sequence=true"],  # PP=2 x TP=2 (sequence parallel)
        ["train.activation_checkpointing=true"],  # PP=2 x DP=2, ZeRO-1, recomputation per stage
    ],
)
def test_pipeline_composes_with_tensor_and_data_parallel(single, tmp_path, extra):
    run_dir = tmp_path / "run"
    run_cli(
        ["pretrain", "--nproc-per-node", "4", *TINY_JOB, *STEPS, f"run.dir={run_dir}", "parallel.pipeline=2", *extra]
    )
    assert_close(single[0], losses(run_dir))


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
