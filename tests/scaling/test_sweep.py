"""Sweep files, their plan (IsoFLOP arithmetic, grid axes, width/depth sizes), the emitted Slurm and
torchrun scripts, and the local runner: resume skips finished runs and records failures."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from megatrain.cli import main
from megatrain.errors import ConfigError
from megatrain.scaling.collect import COLUMNS, collect, write_table
from megatrain.scaling.runner import STATUS_FILE, emit_slurm, emit_torchrun, run_local, run_state
from megatrain.scaling.spec import isoflop_points, model_counts, parse_sweep, plan_runs, size_for_params

from ..conftest import REPO, child_env

BASE = {
    "model": {"preset": "tiny", "multiple_of": 16, "max_seq_len": 64},
    "data": {"source": "embedded", "seq_len": 32, "vocab_size": 512},
    "train": {"micro_batch": 4, "global_batch": 8, "lr": 3e-3, "warmup_steps": 1, "seed": 7},
    "parallel": {"zero_stage": 0},
    "checkpoint": {"keep": 1},
    "log": {"every": 1, "eval_every": 0, "eval_batches": 2, "progress": False, "tensorboard": False},
}


def isoflop_spec(tmp_path, **extra):
    data = {
        "base": BASE,
        "dir": str(tmp_path / "sweep"),
        "mode": "isoflop",
        "budgets": [1e10, 4e10],
        "sizes": [2e4, 1e5, {"dim": 96, "layers": 3}, "tiny"],
        "size_rule": {"aspect": 32, "head_dim": 16},
        "min_steps": 2,
        **extra,
    }
    return parse_sweep(data)


def test_isoflop_points_arithmetic():
    # C = 6 N D: N = 1e5 at C = 6e10 trains 1e5 tokens = 390.6 steps of 256 -> 391 steps
    points = isoflop_points([6e10, 6e11], [1e5, 1e6], tokens_per_step=256, min_steps=50)
    assert points == [(6e10, 0, 391, 391 * 256), (6e11, 0, 3906, 3906 * 256), (6e11, 1, 391, 391 * 256)]
    # (6e10, N=1e6) has 39 steps < min_steps: dropped


def test_isoflop_plan(tmp_path):
    spec = isoflop_spec(tmp_path, axes={"model.linear": ["dense", "cola"]}, warmup_fraction=0.1)
    runs = plan_runs(spec)
    assert len({r.name for r in runs}) == len(runs)
    assert {r.method for r in runs} == {"model.linear=dense", "model.linear=cola"}
    for r in runs:
        assert r.tokens == r.steps * 8 * 32  # global batch x seq_len
        assert r.flops_6nd == pytest.approx(r.budget, rel=0.5 * 6 * r.params_non_embedding * 256 / r.budget + 1e-9)
        assert r.config["train"]["steps"] == r.steps and r.config["train"]["warmup_steps"] == int(0.1 * r.steps)
        assert r.config["run"]["dir"] == os.path.join(spec.dir, "runs", r.name)
        assert r.config["model"]["linear"] in ("dense", "cola")
        assert r.steps >= 2
    dense = [r for r in runs if r.method == "model.linear=dense" and r.budget == 1e10]
    assert [r.size for r in dense] == ["d48l1", "d64l2", "d96l3", "tiny"]
    sizes = sorted(r.params_non_embedding for r in dense)
    assert sizes[-1] / sizes[0] > 5
    # bigger models train fewer tokens at one budget
    assert sorted(dense, key=lambda r: r.params_non_embedding)[0].tokens > dense[2].tokens


def test_size_rule_hits_the_target_and_counts_exclude_vocab(tmp_path):
    from megatrain.models.config import ModelConfig

    base = ModelConfig(preset=None, dim=64, layers=1, heads=1, vocab_size=512, multiple_of=16)
    for target in (1e5, 1e6):
        sizes = size_for_params(target, base, 64, aspect=32, head_dim=16)
        model = ModelConfig(
            preset=None, vocab_size=512, multiple_of=16, **{k.split(".")[1]: v for k, v in sizes.items()}
        )
        counts = model_counts(model, 64)
        assert 0.7 < counts["params_non_embedding"] / target < 1.4
        assert sizes["model.dim"] % 16 == 0 and sizes["model.heads"] == sizes["model.dim"] // 16
        # total = non-embedding + input embedding + untied head
        assert counts["params"] == counts["params_non_embedding"] + 2 * 512 * sizes["model.dim"]


def test_grid_plan(tmp_path):
    spec = parse_sweep(
        {
            "base": BASE,
            "dir": str(tmp_path / "g"),
            "mode": "grid",
            "axes": {"train.lr": [1e-3, 3e-3], "size": [{"dim": 32, "layers": 1}, "tiny"], "tokens": [2560, 5120]},
        }
    )
    runs = plan_runs(spec)
    assert len(runs) == 8
    assert {r.steps for r in runs} == {10, 20}
    assert {r.method for r in runs} == {"train.lr=0.001", "train.lr=0.003"}
    assert runs[0].axes == {"train.lr": 1e-3, "size": "d32l1", "tokens": 2560}


@pytest.mark.parametrize(
    "data, message",
    [
        ({"mode": "grid", "budgets": [1]}, "'budgets' is for mode isoflop"),
        ({"mode": "isoflop", "sizes": [1e5]}, "needs 'budgets'"),
        ({"mode": "spiral"}, "mode='spiral' is not allowed"),
        ({"colour": 1}, "unknown key 'colour'"),
        ({"axes": {"train.lr": []}}, "axes.train.lr must be a non-empty list"),
        ({"axes": {"train.bogus": [1]}}, "unknown config key 'train.bogus'"),
        ({"axes": {"model.linear": ["dense", "sparse"]}}, "model.linear='sparse' is not allowed"),
        ({"mode": "isoflop", "budgets": [1e10], "sizes": ["huge"]}, "neither a preset"),
    ],
)
def test_bad_sweep_files_are_one_line(tmp_path, capsys, data, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"base": BASE, "dir": str(tmp_path / "s"), **data}))
    assert main(["sweep", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("megatrain: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "s").exists()


def test_dry_run_lists_every_run_and_writes_nothing(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    spec_data = {
        "base": BASE,
        "dir": str(tmp_path / "s"),
        "mode": "isoflop",
        "budgets": [1e10],
        "sizes": [2e4, 1e5],
        "size_rule": {"head_dim": 16},
    }
    path.write_text(yaml.safe_dump(spec_data))
    assert main(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 runs" in out and "C1e10_d48l1" in out and "C1e10_d64l2" in out
    assert not (tmp_path / "s").exists()


def test_emitted_scripts_parse_and_name_every_run(tmp_path):
    spec = isoflop_spec(tmp_path)
    runs = plan_runs(spec)
    slurm = emit_slurm(spec, runs, nproc=4)
    torchrun = emit_torchrun(spec, runs, nproc=4)
    for script in (slurm, torchrun):
        subprocess.run(["bash", "-n", script], check=True)
        text = open(script).read()
        for r in runs:
            assert r.name in text
            assert os.path.isfile(os.path.join(spec.dir, "configs", f"{r.name}.yaml"))
    slurm_text = open(slurm).read()
    assert f"#SBATCH --array=0-{len(runs) - 1}" in slurm_text and "--only" in slurm_text
    assert open(torchrun).read().count("torchrun --nnodes") == len(runs)
    # the array script's entry runs one named run through the local runner: check it resolves
    assert main(["sweep", os.path.join(spec.dir, "sweep.yaml"), "--only", "nope"]) == 2


def test_resume_skips_finished_runs_and_records_failures(tmp_path):
    # two real runs of 3 steps through `megatrain sweep`: one trains, one has a missing corpus file
    sweep = {
        "base": BASE,
        "dir": str(tmp_path / "sweep"),
        "mode": "grid",
        "overrides": {"train.steps": 3, "log.eval_every": 3},
        "axes": {"data.source": ["embedded", str(tmp_path / "missing.txt")]},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    proc = subprocess.run(
        [sys.executable, "-m", "megatrain.cli", "sweep", str(path), "--no-report"],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    spec = parse_sweep(sweep, str(path))
    runs = plan_runs(spec)
    ok, bad = runs
    assert run_state(spec, ok)[0] == "finished"
    state, error = run_state(spec, bad)
    assert state == "failed" and error.startswith("megatrain: error: ") and "missing.txt" in error
    status = json.load(open(os.path.join(spec.dir, "runs", bad.name, STATUS_FILE)))
    assert status["status"] == "failed" and status["returncode"] == 2
    assert "1 run(s) failed" in proc.stdout

    # relaunch: the finished run is skipped, the failed one tried again (here: it crashes differently)
    started = []

    def crash(command, log_path):
        started.append(command)
        with open(log_path, "a") as fh:
            fh.write("Traceback (most recent call last):\nRuntimeError: out of memory\n")
        return 1

    lines = []
    states = run_local(spec, runs, launch=crash, echo=lines.append)
    assert len(started) == 1 and started[0][started[0].index("--config") + 1].endswith(f"{bad.name}.yaml")
    assert "--resume" in started[0]
    assert states == {ok.name: "finished", bad.name: "failed"}
    assert "skipped" in lines[0] and "RuntimeError: out of memory" in lines[1]

    rows = collect(spec, runs)
    assert list(rows[0])[: len(COLUMNS)] == list(COLUMNS) and "axis:data.source" in rows[0]
    good = rows[0]
    assert good["status"] == "finished" and good["error"] is None and good["steps"] == 3
    assert good["tokens"] == 3 * 8 * 32 and good["final_val_loss"] == good["best_val_loss"] > 0
    assert good["params"] == good["params_non_embedding"] + 2 * 512 * 64  # tiny: dim 64, untied head
    assert good["flops"] > good["flops_6nd"] > 0 and good["wall_s"] > 0 and good["train_s"] > 0
    assert rows[1]["status"] == "failed" and "out of memory" in rows[1]["error"]
    csv_path, parquet_path = write_table(rows, str(tmp_path / "report"))
    import pandas as pd

    table = pd.read_parquet(parquet_path)
    assert list(table.columns) == list(pd.read_csv(csv_path).columns) and len(table) == 2

    # a finished run whose settings change is refused, not silently reused
    changed = parse_sweep({**sweep, "overrides": {"train.steps": 3, "log.eval_every": 3, "train.lr": 1e-2}}, str(path))
    with pytest.raises(ConfigError, match="finished with other settings"):
        run_local(changed, plan_runs(changed), launch=crash, echo=lines.append)
    assert len(started) == 1


def test_child_runs_get_the_command_lines_overrides(tmp_path, monkeypatch, capsys):
    """`megatrain sweep FILE a=b c=d ...`: every child run (`megatrain pretrain --config RUN.yaml --resume
    --nproc-per-node N`) resolves a config holding each override; a child's own parse of its command line is
    run here with the training itself left out. An override of a key the sweep sets per run (train.steps of
    an IsoFLOP budget, run.dir) is refused in one line, before anything is written."""
    import megatrain.engine.trainer as trainer
    import megatrain.scaling.runner as runner

    commands = []

    def launch(command, log_path):
        commands.append(command)
        return 1

    monkeypatch.setattr(runner, "_child_launcher", lambda threads: launch)
    shipped = str(REPO / "launch/configs/sweep-tiny-cpu.yaml")
    overrides = ["train.lr=1e-3", "train.seed=5", "log.every=5", "checkpoint.keep=2"]
    assert main(["sweep", shipped, *overrides, "--dir", str(tmp_path / "sweep"), "--no-report"]) == 0
    assert len(commands) == 20 and all(c[1:4] == ["-m", "megatrain.cli", "pretrain"] for c in commands)
    children = []
    monkeypatch.setattr(trainer, "pretrain", lambda cfg, *args, **kwargs: children.append(cfg))
    for command in commands:
        assert main(command[3:]) == 0
    assert len(children) == 20
    assert {(c.train.lr, c.train.seed, c.log.every, c.checkpoint.keep) for c in children} == {(1e-3, 5, 5, 2)}
    assert len({c.run.dir for c in children}) == 20 and len({c.train.steps for c in children}) > 1
    capsys.readouterr()

    for bad, key in (("train.steps=5", "train.steps=5"), (f"run.dir={tmp_path}", "run.dir=")):
        assert main(["sweep", shipped, "log.every=5", bad, "--dir", str(tmp_path / "refused"), "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"megatrain: error: sweep: the override {key}") and err.count("\n") == 1, err
        assert "would not reach run C1e10_d32l1" in err
    assert not (tmp_path / "refused").exists()


def test_shipped_sweep_config_plans():
    from megatrain.scaling.spec import load_sweep

    spec = load_sweep(str(REPO / "launch/configs/sweep-tiny-cpu.yaml"))
    runs = plan_runs(spec)
    assert spec.mode == "isoflop" and len({r.budget for r in runs}) == 5
    sizes = sorted({r.params_non_embedding for r in runs})
    assert len(sizes) == 4 and sizes[-1] / sizes[0] > 20
    assert all(r.steps >= spec.min_steps for r in runs)
