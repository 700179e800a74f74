"""Bad input ends in one line on stderr and exit code 2, before anything is written or overwritten."""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO, TINY_JOB, child_env, read_metrics, run_cli


def one_line_error(proc, fragment: str):
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])
    lines = [line for line in proc.stderr.splitlines() if line.startswith("megatrain: error")]
    assert len(lines) == 1, proc.stderr[-4000:]
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


def tree_digest(path) -> dict:
    out = {}
    for dirpath, _, names in os.walk(path):
        for name in names:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["train.stepz=3"], "unknown config key 'train.stepz'"),
        (["train.steps=many"], "train.steps must be an integer"),
        (["train.micro_batch=3", "train.global_batch=8"], "not a multiple of train.micro_batch x DP"),
        (["--config", "no/such.yaml"], "config file 'no/such.yaml' does not exist"),
    ],
)
def test_config_errors_before_any_process_group(tmp_path, args, fragment):
    run_dir = tmp_path / "run"
    proc = run_cli(["pretrain", "--nproc-per-node", "2", *args, f"run.dir={run_dir}"], check=False, timeout=120)
    one_line_error(proc, fragment)
    assert not run_dir.exists()


def test_data_file_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\u00e9 au lait\n".encode("latin-1") * 10)
    gz = tmp_path / "bad.txt.gz"
    with gzip.open(gz, "wb") as fh:
        fh.write(b"fine text\n" * 50 + b"\xff\xfe broken\n")
    for source, fragment in [
        (tmp_path / "missing.txt", "missing.txt"),
        (empty, "empty.txt"),
        (latin, "latin1.txt"),
        (gz, "bad.txt.gz"),
    ]:
        proc = run_cli(
            ["pretrain", "--nproc-per-node", "2", *TINY_JOB, f"data.source={source}", f"run.dir={tmp_path / 'run'}"],
            check=False,
            timeout=120,
        )
        one_line_error(proc, fragment)
    assert "UTF-8" in proc.stderr


def test_existing_run_refused_and_checkpoint_errors(tmp_path):
    run_dir = tmp_path / "run"
    job = ["pretrain", *TINY_JOB, "train.steps=2", "log.eval_every=0", f"run.dir={run_dir}", "parallel.zero_stage=0"]
    run_cli(job)
    before = tree_digest(run_dir)

    # A second start without --resume must not touch the run.
    one_line_error(run_cli(job, check=False), "already holds checkpoints")
    # A different model cannot load these weights.
    one_line_error(
        run_cli([*job, "--resume", "model.dim=128"], check=False), "model.dim=64 but this run has model.dim=128"
    )
    # Nothing left to do at the final step.
    one_line_error(run_cli([*job, "--resume"], check=False), "nothing left to train")
    assert tree_digest(run_dir) == before

    # A truncated shard is caught from the manifest before anything loads.
    ckpt = run_dir / "checkpoints" / "step_2"
    victim = next(p for p in sorted(ckpt.iterdir()) if p.name.endswith("model_states.pt"))
    victim.write_bytes(victim.read_bytes()[:100])
    one_line_error(run_cli([*job, "--resume", "train.steps=4"], check=False), "is corrupt")
    # A missing metadata file means an incomplete checkpoint.
    (ckpt / "megatrain.json").unlink()
    one_line_error(run_cli([*job, "--resume", "train.steps=4"], check=False), "incomplete")
    assert not (run_dir / "checkpoints" / "step_4").exists()


def test_corrupt_shard_with_intact_size_fails_cleanly(tmp_path):
    """Garbage of the right size gets past the manifest; DeepSpeed's load error becomes one line."""
    run_dir = tmp_path / "run"
    job = ["pretrain", *TINY_JOB, "train.steps=2", "log.eval_every=0", f"run.dir={run_dir}", "parallel.zero_stage=0"]
    run_cli(job)
    ckpt = run_dir / "checkpoints" / "step_2"
    victim = next(p for p in sorted(ckpt.iterdir()) if p.name.endswith("model_states.pt"))
    victim.write_bytes(b"\0" * victim.stat().st_size)
    one_line_error(run_cli([*job, "--resume", "train.steps=4"], check=False), "could not be loaded")
    assert open(run_dir / "checkpoints" / "latest").read().strip() == "step_2"


NAN_SCRIPT = textwrap.dedent("""
    import sys, torch
    from megatrain.models import transformer

    real_forward = transformer.Transformer.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] in POISON:
                out = out * float("nan")
        return out

    transformer.Transformer.forward = forward
    from megatrain.cli import entry
    entry(sys.argv[1:])
""")


@pytest.mark.parametrize("poison, expect_code", [({3}, 0), ({3, 4, 5}, 2)])
def test_nonfinite_loss_skips_then_aborts(tmp_path, poison, expect_code):
    script = tmp_path / "nan_job.py"
    script.write_text(NAN_SCRIPT.replace("POISON", repr(poison)))
    run_dir = tmp_path / "run"
    # grad_accum 2 in one process: micro-batch 3 is the first of step 2, 5 the first of step 3.
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            "pretrain",
            *TINY_JOB,
            "train.steps=6",
            "train.max_nonfinite=2",
            "log.eval_every=0",
            f"run.dir={run_dir}",
            "parallel.zero_stage=2",
        ],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    records = read_metrics(run_dir)
    if expect_code == 0:
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert [r["step"] for r in records] == list(range(1, 7))
        assert records[1]["loss"] is None and records[1]["grad_norm"] is None  # step 2 skipped, logged
        assert all(r["loss"] is not None for i, r in enumerate(records) if i != 1)
    else:
        one_line_error(proc, "2 non-finite losses in a row at step 3")
        assert [r["loss"] for r in records][1:3] == [None, None]
