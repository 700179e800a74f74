"""megatrain.env: every environment variable megatrain reads is checked before any process group starts;
a bad value is one line naming it (exit 2 from the CLI), never a traceback from inside a rank."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from megatrain import env
from megatrain.errors import ConfigError
from tests.conftest import REPO, TINY_JOB, child_env

# variable -> (bad values, a good value and what it parses to)
CASES = {
    "RANK": (["-1", "zero", "1.5"], ("0", 0)),
    "WORLD_SIZE": (["0", "two"], ("4", 4)),
    "LOCAL_RANK": (["-2", "x"], ("0", 0)),
    "LOCAL_WORLD_SIZE": (["0", "8x"], ("2", 2)),
    "MASTER_ADDR": (["my host"], ("10.0.0.1", "10.0.0.1")),
    "MASTER_PORT": (["0", "65536", "port"], ("29500", 29500)),
    "TORCHELASTIC_RESTART_COUNT": (["-1", "one"], ("2", 2)),
    "TORCHELASTIC_MAX_RESTARTS": (["-3", "1.0"], ("1", 1)),
    "TORCHELASTIC_USE_AGENT_STORE": (["maybe"], ("True", True)),
    "MEGATRAIN_TEST_CRASH_AT": (
        ["nowhere:3", "step:0", "latest:4:1"],
        ("ckpt_write:4:1:enospc", ("ckpt_write", 4, 1, "enospc")),
    ),
    "MEGATRAIN_PEAK_FLOPS": (["abc", "nan", "inf", "-1", "0"], ("989e12", 989e12)),
    "MEGATRAIN_CACHE": ([__file__], ("/tmp", "/tmp")),  # an existing file is not a cache directory
    "MEGATRAIN_KERNELS": (["cuda"], ("Torch", "torch")),
    "MEGATRAIN_KERNELS_POISON": (["2", "yes"], ("1", True)),
    "TRITON_INTERPRET": (["maybe", "2"], ("true", True)),
    "OMP_NUM_THREADS": (["0", "four"], ("3", 3)),
}


def test_every_variable_megatrain_reads_is_listed():
    """A grep of megatrain/ and kernels/ for environment reads finds only megatrain.env's own."""
    readers = []
    for folder in ("megatrain", "kernels"):
        for root, _, names in os.walk(REPO / folder):
            for name in names:
                path = os.path.join(root, name)
                if not name.endswith(".py") or path.endswith(os.path.join("megatrain", "env.py")):
                    continue
                text = open(path, encoding="utf-8").read()
                for pattern in ("os.environ.get(", "os.getenv(", "os.environ["):
                    for line in text.splitlines():
                        if pattern in line and "setdefault" not in line and "= str(" not in line:
                            readers.append(f"{path}: {line.strip()}")
    # Left: the CLI's error prefix (the rank label of a message that is already being printed).
    assert [r for r in readers if "prefix" not in r and 'os.environ.get("RANK")' not in r] == []
    assert set(CASES) == set(env.VARIABLES)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_value_is_one_line_naming_the_variable(monkeypatch, name):
    bad_values, (good, parsed) = CASES[name]
    for var in env.VARIABLES:
        monkeypatch.delenv(var, raising=False)
    for bad in bad_values:
        monkeypatch.setenv(name, bad)
        with pytest.raises(ConfigError) as err:
            env.check_environment()
        assert f"{name}={bad!r}" in str(err.value) and "allowed" in str(err.value) and "\n" not in str(err.value)
        assert isinstance(err.value, ValueError)  # the kernels report bad settings as ValueError
    monkeypatch.setenv(name, good)
    if name in ("RANK", "LOCAL_RANK"):
        monkeypatch.setenv("WORLD_SIZE", "1")
    env.check_environment()
    assert env.VARIABLES[name]() == parsed
    monkeypatch.setenv(name, "")  # empty means unset
    env.check_environment()


def test_ranks_must_be_below_the_sizes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match="RANK='2' is not allowed .allowed: 0..WORLD_SIZE-1 = 0..1"):
        env.check_environment()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ConfigError, match="LOCAL_RANK='1'"):
        env.check_environment()


def test_cli_refuses_before_any_process_starts(tmp_path):
    """A bad variable under `megatrain pretrain --nproc-per-node 2`: one line, exit 2, nothing written."""
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "megatrain.cli", "pretrain", "--nproc-per-node", "2", *TINY_JOB, f"run.dir={run_dir}"],
        cwd=REPO,
        env={**child_env(), "TORCHELASTIC_MAX_RESTARTS": "soon"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr == (
        "megatrain: error: environment variable TORCHELASTIC_MAX_RESTARTS='soon' is not allowed "
        "(allowed: an integer >= 0)\n"
    )
    assert not run_dir.exists()


def test_init_distributed_checks_first(monkeypatch):
    """Code that starts the process group without the CLI (launch scripts, tests) is checked too."""
    from megatrain.config import load_config
    from megatrain.engine.deepspeed import init_distributed

    monkeypatch.setenv("MASTER_PORT", "99999")
    with pytest.raises(ConfigError, match="MASTER_PORT='99999'"):
        init_distributed(load_config(None, []))
