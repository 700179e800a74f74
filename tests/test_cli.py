"""The command line keeps what the user typed: no word is dropped or reordered, also in the processes a
command starts. `pretrain` / `rl --nproc-per-node N` and `plan --build --world N` give their workers their
own command line, unchanged (`args.argv`); `bench` hands its processes a spec with the user's config and
overrides; `sweep` writes its overrides into every run's YAML.

End to end with a YAML file and several overrides: `plan --build` here; the 2-process pretraining in
tests/engine/test_resilience.py (test_stop_signal_to_the_launcher_checkpoints_and_exits_0, which checks the
workers' config.yaml) and the 2-process RL job in tests/rl/test_rl_job.py (test_sigterm_to_the_rl_launcher_...);
through cheaper seams: the workers' parse of the launcher's argv here, bench's worker config in
tests/test_bench.py, the sweep's child runs in tests/scaling/test_sweep.py.
"""

from __future__ import annotations

import re

import pytest

from megatrain import cli
from megatrain.config import load_config
from megatrain.engine.memory_plan import plan_memory
from tests.conftest import REPO, run_cli

CONFIG = "launch/configs/tiny-cpu.yaml"
SMALL = ["model.preset=tiny", "data.vocab_size=512", "data.seq_len=32"]


@pytest.mark.slow
def test_plan_build_workers_keep_every_override():
    """`megatrain plan FILE --world 2 --build parallel.tensor=2 ...`: the two workers build TP=2 (they used to
    get `plan --build --config FILE parallel.tensor=2 ...`, where the first override filled plan's CONFIG
    slot and was dropped, so they built and reported tensor 1). ~12 s."""
    overrides = ["parallel.tensor=2", "parallel.zero_stage=1", *SMALL]
    proc = run_cli(["plan", CONFIG, "--world", "2", "--build", *overrides])
    planned = plan_memory(load_config(str(REPO / CONFIG), overrides), 2).params
    assert planned < plan_memory(load_config(str(REPO / CONFIG), [*overrides, "parallel.tensor=1"]), 2).params
    # The report (the layout line and the table) is printed by the workers, not by the launcher.
    assert "layout: world 2 = parallel.tensor 2 x 1 data-parallel, ZeRO-1" in proc.stdout, proc.stdout
    rows = re.findall(r"^\s+(\d) \|\s+([\d,]+) \|\s+([\d,]+) \|", proc.stdout, flags=re.M)
    assert [(rank, int(held.replace(",", ""))) for rank, _, held in rows] == [("0", planned), ("1", planned)]


@pytest.mark.parametrize(
    "argv",
    [
        ["plan", "--config", "CONFIG", "parallel.tensor=2", *SMALL, "--world", "2"],
        ["plan", "CONFIG", "parallel.tensor=2", "--world", "2", *SMALL],
        ["plan", "--world", "2", "parallel.tensor=2", "--config", "CONFIG", *SMALL],
        ["plan", "parallel.tensor=2", *SMALL, "--world", "2"],
    ],
    ids=["flag-first", "positional", "override-before-flag", "no-yaml"],
)
def test_plan_keeps_the_first_override_in_every_spelling(argv, capsys):
    argv = [str(REPO / CONFIG) if a == "CONFIG" else a for a in argv]
    assert cli.main(argv) == 0
    assert "layout: world 2 = parallel.tensor 2 x 1 data-parallel" in capsys.readouterr().out


def test_a_yaml_given_twice_is_one_line(capsys):
    path = str(REPO / CONFIG)
    assert cli.main(["plan", path, "--config", path]) == 2
    assert capsys.readouterr().err == (
        f"megatrain: error: plan: give the YAML config once (as CONFIG or --config), not '{path}' and '{path}'\n"
    )


def _capture(monkeypatch, module, name, seen, result=None):
    def fake(cfg, *args, **kwargs):
        seen.append(cfg.to_dict())
        return result

    monkeypatch.setattr(module, name, fake)


@pytest.mark.parametrize("command", ["pretrain", "rl", "plan"])
def test_workers_get_the_command_line_as_typed_and_resolve_the_same_config(command, monkeypatch, tmp_path):
    """The launcher hands torchrun exactly the words it was given, flags and overrides interleaved as typed;
    a worker (RANK and WORLD_SIZE set) parsing them resolves the config the launcher checked."""
    import megatrain.engine.plan_command as plan_command
    import megatrain.engine.trainer as trainer
    import megatrain.rl.job as rl_job

    run_dir = str(tmp_path / "run")
    path = str(REPO / CONFIG)
    argv = {
        "pretrain": [
            "pretrain",
            "train.steps=3",
            "--config",
            path,
            "--nproc-per-node",
            "2",
            *SMALL,
            "--resume",
            "train.lr=1e-3",
            f"run.dir={run_dir}",
        ],
        "rl": [
            "rl",
            "rl.steps=3",
            "--config",
            path,
            "--nproc-per-node",
            "2",
            "--stop-after",
            "1",
            *SMALL,
            "rl.group_size=4",
            f"run.dir={run_dir}",
        ],
        "plan": [
            "plan",
            "--config",
            path,
            "parallel.tensor=2",
            "--world",
            "2",
            *SMALL,
            "--build",
            "parallel.zero_stage=1",
        ],
    }[command]
    launcher, workers, spawned = [], [], []
    _capture(monkeypatch, trainer, "preflight", launcher)
    _capture(monkeypatch, trainer, "pretrain", workers)
    _capture(monkeypatch, rl_job, "preflight", launcher)
    _capture(monkeypatch, rl_job, "rl", workers)
    _capture(monkeypatch, plan_command, "plan_report", launcher, result="")
    _capture(monkeypatch, plan_command, "build_report", workers)
    monkeypatch.setattr(cli, "_spawn_torchrun", lambda nproc, words, run_dir=None: spawned.append((nproc, words)) or 0)
    assert cli.main(list(argv)) == 0
    assert spawned == [(2, argv)]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(list(spawned[0][1])) == 0
    assert len(launcher) == len(workers) == 1 and workers[0] == launcher[0]
    overrides = [a for a in argv if "=" in a]
    assert workers[0] == load_config(path, overrides).to_dict()


def test_config_reference_lists_the_jobs_sections():
    """`megatrain config --reference` in a fresh process lists rl.* and ttt.*, whose schemas the jobs own
    (megatrain/rl/config.py, megatrain/ttt/config.py): the package root declares them to the loader."""
    from megatrain.rl.config import RLConfig
    from megatrain.ttt.config import TTTConfig
    from tests.test_config import _section_keys

    out = run_cli(["config", "--reference"]).stdout
    keys = [line.split("`")[1] for line in out.splitlines()[2:]]
    jobs = [*_section_keys(RLConfig, "rl"), *_section_keys(TTTConfig, "ttt")]
    assert "rl.pipeline" in jobs and "ttt.task.context_lengths" in jobs
    start = keys.index("rl.init")
    assert keys[start : start + len(jobs)] == jobs and keys[-1] == "deepspeed"
    bad = run_cli(["config", "rl.eval.k=[1, x]"], check=False)
    assert (bad.returncode, bad.stderr) == (2, "megatrain: error: rl.eval.k[1] must be an integer, got 'x'\n")
