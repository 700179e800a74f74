"""Tensor-parallel pretraining through the real trainer (DeepSpeed engine with the TP x DP `mpu`):
per-step fp32 losses equal to one process on the same seed and global batch; checkpoints resharded
between TP sizes continue the same trajectory."""

from __future__ import annotations

import pytest

from tests.conftest import TINY_JOB, losses, run_cli

pytestmark = pytest.mark.slow

STEPS = ["train.steps=10", "log.eval_every=5"]


@pytest.fixture(scope="module")
def single_ckpt(tmp_path_factory):
    """One process, ZeRO-1, checkpoint at step 5: (per-step losses, run dir)."""
    run_dir = tmp_path_factory.mktemp("tp") / "single"
    run_cli(
        [
            "pretrain",
            *TINY_JOB,
            *STEPS,
            f"run.dir={run_dir}",
            "parallel.zero_stage=1",
            "checkpoint.every=5",
            "checkpoint.keep=0",
        ]
    )
    return losses(run_dir), run_dir


@pytest.fixture(scope="module")
def single(single_ckpt):
    return single_ckpt[0]


def assert_close(a, b, rtol=1e-5, steps=10):
    assert len(a) == len(b) == steps, (a, b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= rtol * max(abs(x), abs(y)), f"step {i + 1}: {x} vs {y}\n{a}\n{b}"


@pytest.mark.parametrize(
    "nproc, zero, sequence, recompute",
    [
        (2, 1, False, False),  # TP=2 x DP=1
        (2, 2, True, True),  # TP=2 x DP=1, sequence parallel, activation checkpointing
        (4, 1, True, False),  # TP=2 x DP=2, sequence parallel
        (4, 2, False, True),  # TP=2 x DP=2, activation checkpointing
    ],
)
def test_tensor_parallel_matches_single_process(single, tmp_path, nproc, zero, sequence, recompute):
    run_dir = tmp_path / "run"
    run_cli(
        [
            "pretrain",
            "--nproc-per-node",
            str(nproc),
            *TINY_JOB,
            *STEPS,
            f"run.dir={run_dir}",
            "parallel.tensor=2",
            f"parallel.zero_stage={zero}",
            f"parallel.sequence={str(sequence).lower()}",
            f"train.activation_checkpointing={str(recompute).lower()}",
        ]
    )
    assert_close(single, losses(run_dir))


def test_bad_tensor_sizes_refused_before_any_process_group(tmp_path):
    for extra, fragment in [
        (["parallel.tensor=3"], "parallel.tensor=3 does not divide model.heads=4"),
        (["parallel.tensor=2", "data.vocab_size=513"], "does not divide data.vocab_size=513"),
        (["parallel.tensor=4"], "parallel.tensor=4 does not divide the world size 2"),
    ]:
        proc = run_cli(
            ["pretrain", "--nproc-per-node", "2", *TINY_JOB, *extra, f"run.dir={tmp_path / 'r'}"],
            check=False,
            timeout=120,
        )
        assert proc.returncode == 2, proc.stderr[-3000:]
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("megatrain: error")]
        assert len(lines) == 1 and fragment in lines[0], proc.stderr[-3000:]
        assert not (tmp_path / "r").exists()


def test_reshard_tp2_to_tp1_continues_the_run(single_ckpt, tmp_path):
    """TP=2 for 5 steps, checkpoint, resume at TP=1 (DeepSpeed universal checkpoint), 5 more steps:
    the losses continue the uninterrupted single-process run; the TP checkpoint's consolidated
    weights are the full ones; `megatrain reshard` converts ahead of time; TP=1 -> TP=2 resumes too."""
    from safetensors.torch import load_file

    single_losses, single_dir = single_ckpt
    tp_dir, resumed = tmp_path / "tp2", tmp_path / "tp1"
    run_cli(
        [
            "pretrain",
            "--nproc-per-node",
            "2",
            *TINY_JOB,
            *STEPS,
            f"run.dir={tp_dir}",
            "parallel.tensor=2",
            "parallel.zero_stage=1",
            "train.stop_after=5",
            "checkpoint.every=5",
        ]
    )
    # Adam divides by sqrt(v): an element with a near-zero gradient moves up to ~lr on rounding noise
    # alone (seen: one element of 11264 off by 2.5e-5). So: all but 0.1% of each tensor within 1e-5,
    # and every element within train.lr; a wrong join or slice moves most elements by ~init std (0.02).
    full = load_file(str(single_dir / "checkpoints" / "step_5" / "model.safetensors"))
    joined = load_file(str(tp_dir / "checkpoints" / "step_5" / "model.safetensors"))
    assert full.keys() == joined.keys()
    lr = 3e-3  # TINY_JOB's train.lr
    for name in full:
        assert joined[name].shape == full[name].shape, name
        diff = (joined[name].float() - full[name].float()).abs()
        off = (diff > 1e-5 + 1e-5 * full[name].float().abs()).float().mean().item()
        assert off <= 1e-3 and diff.max().item() <= lr, (
            f"{name}: {off:.2%} of elements off, max {diff.max().item():.3g}"
        )

    proc = run_cli(
        ["pretrain", *TINY_JOB, *STEPS, f"run.dir={resumed}", "parallel.zero_stage=1", "--resume-from", str(tp_dir)]
    )
    assert "resharded to parallel.tensor=1" in proc.stdout + proc.stderr
    assert_close(single_losses, losses(tp_dir) + losses(resumed))
    assert not (tp_dir / "checkpoints" / "step_5" / "universal").exists()  # the source is only read

    # TP=1 -> TP=2 from a checkpoint converted ahead of time with `megatrain reshard`.
    run_cli(["reshard", str(single_dir / "checkpoints" / "step_5")])
    assert (single_dir / "checkpoints" / "step_5" / "universal" / "megatrain-universal.json").is_file()
    back = tmp_path / "back"
    run_cli(
        [
            "pretrain",
            "--nproc-per-node",
            "2",
            *TINY_JOB,
            *STEPS,
            f"run.dir={back}",
            "parallel.tensor=2",
            "parallel.zero_stage=1",
            "--resume-from",
            str(single_dir / "checkpoints" / "step_5"),
        ]
    )
    assert_close(single_losses, single_losses[:5] + losses(back))


def test_layout_change_at_zero_stage_0_refused(tmp_path):
    run_dir = tmp_path / "z0"
    run_cli(
        ["pretrain", *TINY_JOB, "train.steps=4", "train.stop_after=2", f"run.dir={run_dir}", "parallel.zero_stage=0"]
    )
    proc = run_cli(
        [
            "pretrain",
            "--nproc-per-node",
            "2",
            *TINY_JOB,
            "train.steps=4",
            f"run.dir={run_dir}",
            "parallel.zero_stage=0",
            "parallel.tensor=2",
            "--resume",
        ],
        check=False,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("megatrain: error")]
    assert len(lines) == 1 and "needs parallel.zero_stage=1 or 2" in lines[0], proc.stderr[-2000:]


@pytest.mark.parametrize("kind", ["sltrain", "cola"])
def test_lowrank_tp2_dp2_matches_one_process_and_reshards_to_tp1(tmp_path, kind):
    """SLTrain (factors, sparse values and the support buffer) and CoLA (its factors, the row-parallel
    roles' r-wide all-reduce) at TP=2 x DP=2 for 3 steps equal one process, the consolidated checkpoint
    holds the full tensors, and resumed at TP=1 (resharded through DeepSpeed's universal checkpoint) the
    run continues the one-process run. Layer-level parity of CoLA, SLTrain and LoRA at TP=2, with
    sequence parallelism and replicated KV heads: tp_checks.py lowrank. (LoRA and ReLoRA, whose frozen W
    has no optimizer state: test_adapter_kinds_reshard_tp2_to_tp1.)"""
    from safetensors.torch import load_file

    lowrank = [f"model.linear={kind}", "model.lowrank.rank=8", "train.steps=6", "log.eval_every=3"]
    if kind == "sltrain":
        lowrank.append("model.lowrank.density=0.1")
    single, tp, resumed = tmp_path / "single", tmp_path / "tp2dp2", tmp_path / "tp1"
    run_cli(
        ["pretrain", *TINY_JOB, *STEPS, *lowrank, f"run.dir={single}", "parallel.zero_stage=1", "checkpoint.every=3"]
    )
    run_cli(
        [
            "pretrain",
            "--nproc-per-node",
            "4",
            *TINY_JOB,
            *STEPS,
            *lowrank,
            f"run.dir={tp}",
            "parallel.tensor=2",
            "parallel.zero_stage=1",
            "train.stop_after=3",
            "checkpoint.every=3",
        ]
    )
    full = load_file(str(single / "checkpoints" / "step_3" / "model.safetensors"))
    joined = load_file(str(tp / "checkpoints" / "step_3" / "model.safetensors"))
    assert full.keys() == joined.keys()
    for name in full:
        assert joined[name].shape == full[name].shape, name
        if name.endswith("sparse_index"):
            assert (joined[name] == full[name]).all(), name
        else:  # Adam on rounding noise (see test_reshard_tp2_to_tp1_continues_the_run): a few elements, < lr
            diff = (joined[name].float() - full[name].float()).abs()
            off = int((diff > 1e-5 + 1e-5 * full[name].float().abs()).sum())
            assert off <= max(2, diff.numel() // 1000) and diff.max().item() <= 3e-3, (name, off, diff.max().item())
    proc = run_cli(
        [
            "pretrain",
            *TINY_JOB,
            *STEPS,
            *lowrank,
            f"run.dir={resumed}",
            "parallel.zero_stage=1",
            "--resume-from",
            str(tp),
        ]
    )
    assert "resharded to parallel.tensor=1" in proc.stdout + proc.stderr
    assert_close(losses(single), losses(tp) + losses(resumed), steps=6)


@pytest.mark.parametrize("kind", ["relora", "lora"])
def test_adapter_kinds_reshard_tp2_to_tp1(tmp_path, kind):
    """ReLoRA and LoRA keep W frozen (no optimizer state, so nothing of it in DeepSpeed's universal
    checkpoint): the TP=2 run equals the one-process run step for step (for ReLoRA with its restarts every
    2 steps at TP=2: merge, re-draw, magnitude pruning through DeepSpeed's fp32 masters and
    optimizer-state fragments; layer-level restart parity of every parameter and moment: tp_checks.py
    relora), and its step-3 checkpoint resumed at TP=1 takes W from the checkpoint's full
    model.safetensors and the adapters and their moments from the universal checkpoint, and continues
    the one-process run step for step (for ReLoRA with a restart after the reshard)."""
    adapters = [
        f"model.linear={kind}",
        "model.lowrank.rank=8",
        "model.lowrank.dropout=0",
        "train.steps=6",
        "log.eval_every=3",
        "parallel.zero_stage=1",
        "checkpoint.every=3",
    ]
    if kind == "relora":
        adapters += ["train.relora.every=2", "train.relora.restart_warmup=1"]
    single, tp, resumed = tmp_path / "single", tmp_path / "tp2", tmp_path / "tp1"
    run_cli(["pretrain", *TINY_JOB, *STEPS, *adapters, f"run.dir={single}"])
    run_cli(["pretrain", "--nproc-per-node", "2", *TINY_JOB, *STEPS, *adapters, f"run.dir={tp}", "parallel.tensor=2"])
    assert_close(losses(single), losses(tp), steps=6)
    proc = run_cli(
        [
            "pretrain",
            *TINY_JOB,
            *STEPS,
            *adapters,
            f"run.dir={resumed}",
            "--resume-from",
            str(tp / "checkpoints" / "step_3"),
        ]
    )
    assert "resharded to parallel.tensor=1" in proc.stdout + proc.stderr
    assert_close(losses(single), losses(tp)[:3] + losses(resumed), steps=6)
