"""Shared test set-up: one token/tokenizer cache per session, and a runner for real CLI jobs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run through Triton's interpreter. It must be chosen before any
# kernel module is imported (triton.jit reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
# Modules that the jobs tests start import by name (rl.reward=toy_rewards.letter_e): on the children's
# PYTHONPATH, as a user's own folder would be. The repository root never is (its kernels/ folder is
# megatrain.kernels and must not shadow Hugging Face's `kernels`).
PLUGINS = REPO / "tests" / "plugins"

# Small enough that a step takes milliseconds on 2 cores, large enough to learn something.
TINY_JOB = [
    "model.preset=tiny",
    "data.source=embedded",
    "data.seq_len=32",
    "data.vocab_size=512",
    "train.steps=8",
    "train.micro_batch=4",
    "train.global_batch=8",
    "train.lr=3e-3",
    "train.warmup_steps=2",
    "train.seed=7",
    "log.every=1",
    "log.eval_every=4",
    "log.eval_batches=2",
    "log.progress=false",
    "checkpoint.keep=0",
]


@pytest.fixture(scope="session", autouse=True)
def megatrain_cache(tmp_path_factory):
    """Every test (and every process it starts) shares one cache, so the tokenizer trains once."""
    path = os.environ.get("MEGATRAIN_TEST_CACHE") or str(tmp_path_factory.mktemp("megatrain-cache"))
    old = os.environ.get("MEGATRAIN_CACHE")
    os.environ["MEGATRAIN_CACHE"] = path
    yield path
    if old is None:
        os.environ.pop("MEGATRAIN_CACHE", None)
    else:
        os.environ["MEGATRAIN_CACHE"] = old


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict:
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env["PYTHONPATH"] = os.pathsep.join([str(PLUGINS), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_cli(args: list[str], timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m megatrain.cli ARGS` in a fresh process (as a user would run `megatrain ARGS`)."""
    proc = subprocess.run(
        [sys.executable, "-m", "megatrain.cli", *args],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"megatrain {' '.join(args)} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A tiny model pretrained once per session (TINY_JOB, one process, 8 steps, checkpoints at
    steps 4 and 8) for tests that need a trained run: generation, RL and qTTT start from it.
    Treat it as read-only."""
    run_dir = tmp_path_factory.mktemp("tiny-run") / "run"
    run_cli(
        ["pretrain", *TINY_JOB, "log.eval_every=0", "parallel.zero_stage=0", "checkpoint.every=4", f"run.dir={run_dir}"]
    )
    return run_dir


def read_metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir)]


def start_launcher(args: list[str], env: dict | None = None) -> subprocess.Popen:
    """`megatrain ARGS` through the installed console script (as a user starts it), in a session of its own
    (so a failed test can end its workers with os.killpg), stdout and stderr captured."""
    full = child_env()
    full.update(env or {})
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "megatrain"), *args],
        cwd=REPO,
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def signal_after_records(proc: subprocess.Popen, metrics, records: int, signum: int, timeout: float = 240):
    """Send `signum` to `proc` once its metrics.jsonl `metrics` holds `records` records; returns (stdout,
    stderr) at its exit. Whatever is left of the job is killed if the test fails."""
    from megatrain.engine.metrics import read_metrics as read_records  # skips a line still being written

    try:
        deadline = time.monotonic() + timeout
        while not (os.path.exists(metrics) and len(read_records(str(metrics))) >= records):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signum)
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
