"""Runs that survive: kill -9 at seeded moments (inside the checkpoint write too) then resume with
the uninterrupted run's losses, SIGTERM checkpoint-and-exit (of a rank, and of the `--nproc-per-node 2`
launcher: exit 0, one line; a second SIGTERM kills), torchrun --max-restarts recovery, the collective
watchdog naming a stalled rank, a full disk while saving, and the run-directory lock.

The multi-process tests share one uninterrupted 2-process run (`baseline`) and chain the kill
moments through one run directory: each resume is the run that gets killed at the next moment.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from megatrain.config import load_config
from megatrain.engine import checkpoint as ckpt
from megatrain.engine.health import LossSpikeDetector, Watchdog
from megatrain.engine.metrics import MetricsLogger, read_metrics
from megatrain.engine.resilience import (
    FAULT_ENV,
    RunLock,
    RunLockError,
    auto_resume_enabled,
    check_run_lock,
    fault_spec,
)
from megatrain.errors import ConfigError
from tests.conftest import REPO, TINY_JOB, child_env, free_port, signal_after_records, start_launcher

STEPS = 8
# 2 processes, ZeRO-1 (sharded optimizer state: one file per rank), a checkpoint every 2 steps.
JOB = [
    *TINY_JOB,
    f"train.steps={STEPS}",
    "log.eval_every=0",
    "log.tensorboard=false",
    "parallel.zero_stage=1",
    "checkpoint.every=2",
    "log.heartbeat_every=4",
]


def run(cmd: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `cmd` in its own process group, so a timeout ends its workers too."""
    full = child_env()
    full.update(env or {})
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(cmd[:6])} ... timed out\n{out[-3000:]}\n{err[-5000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def cli(args: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "megatrain.cli", *args], env=env, timeout=timeout)


def pretrain2(run_dir, *extra: str, env: dict | None = None, resume: bool = True) -> subprocess.CompletedProcess:
    return cli(
        ["pretrain", "--nproc-per-node", "2", *JOB, f"run.dir={run_dir}", *(["--resume"] if resume else []), *extra],
        env=env,
    )


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def step_losses(run_dir) -> list:
    return [(r["step"], r["loss"]) for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))]


def assert_latest_complete(run_dir) -> int:
    """`latest` names a committed folder whose manifest (sizes and checksums) holds; returns its step."""
    root = os.path.join(run_dir, "checkpoints")
    tag = ckpt.read_latest(root)
    assert tag is not None and not tag.endswith(ckpt.PARTIAL_SUFFIX), tag
    meta = ckpt.read_meta(os.path.join(root, tag), checksums=True)
    assert meta["checksums"] and all(name in meta["files"] for name in meta["checksums"])
    assert {"rng_rank0.pt", "rng_rank1.pt", "model.safetensors"} <= set(meta["checksums"])
    return meta["step"]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("resilience") / "straight"
    ok(pretrain2(run_dir, resume=False))
    return step_losses(run_dir)


# ---------------------------------------------------------------------------------------------
# multi-process


@pytest.mark.slow
def test_kill9_at_seeded_moments_then_resume_matches_uninterrupted(baseline, tmp_path):
    """Five kill -9 moments (mid-step, inside the checkpoint write on either rank, between the rename
    and `latest`, inside the `latest` update), then a SIGTERM of one rank, then the rest: after every
    interruption `latest` names a complete checkpoint, and the stitched trajectory is the straight one."""
    rng = random.Random(15)
    run_dir = tmp_path / "chain"
    # (point, candidate steps, candidate ranks): the step and rank of each moment come from the seed.
    plan = [
        ("step", [2, 3], [0, 1]),
        ("ckpt_write", [4], [0, 1]),
        ("ckpt_commit", [4], [0]),
        ("latest", [6], [0]),
        ("ckpt_write", [6], [0, 1]),
    ]
    expect_latest = [None, 2, 2, 4, 4]  # `latest` after each kill
    moments = [(point, rng.choice(steps), rng.choice(ranks)) for point, steps, ranks in plan]
    if moments[0][1] == 2:  # killed inside step 2: no checkpoint yet
        expect_latest[0] = None
    else:
        expect_latest[0] = 2
    for (point, step, rank), latest in zip(moments, expect_latest):
        proc = pretrain2(run_dir, env={FAULT_ENV: f"{point}:{step}:{rank}"})
        assert proc.returncode != 0, f"{point}:{step}:{rank} did not kill the run\n{proc.stderr[-3000:]}"
        if latest is None:
            assert ckpt.read_latest(os.path.join(run_dir, "checkpoints")) is None
        else:
            assert assert_latest_complete(run_dir) == latest, (point, step, rank)
    # Preemption of one rank only: both agree to stop after step 5, checkpoint it and exit 0.
    proc = ok(pretrain2(run_dir, env={FAULT_ENV: "step:5:1:term"}))
    assert "stopped at step 5" in proc.stdout + proc.stderr
    assert assert_latest_complete(run_dir) == 5
    assert [s for s, _ in step_losses(run_dir)] == [1, 2, 3, 4, 5]
    ok(pretrain2(run_dir))
    assert assert_latest_complete(run_dir) == STEPS
    assert step_losses(run_dir) == baseline  # bit-for-bit: data position, optimizer, RNG all restored
    leftovers = [n for n in os.listdir(os.path.join(run_dir, "checkpoints")) if n.endswith(ckpt.PARTIAL_SUFFIX)]
    assert leftovers == []
    beats = {
        r["step"]: r["heartbeat"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if "heartbeat" in r
    }
    assert sorted(beats) == [4, 8]
    assert all(
        [b["rank"] for b in beat] == [0, 1] and all(b["since_last_step_s"] > 0 for b in beat) for beat in beats.values()
    )


# The launcher as a user starts it: the console command, a YAML file and overrides after it (the run's
# config.yaml, written by rank 0 of the workers, must hold every one of them), long enough to be signalled.
LAUNCHER_OVERRIDES = [
    "model.preset=tiny",
    "data.seq_len=32",
    "data.vocab_size=512",
    "train.micro_batch=4",
    "train.global_batch=8",
    "train.steps=500",
    "train.seed=7",
    "log.every=1",
    "log.eval_every=0",
    "log.progress=false",
    "log.tensorboard=false",
    "checkpoint.every=0",
    "parallel.zero_stage=1",
]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_stop_signal_to_the_launcher_checkpoints_and_exits_0(tmp_path, signum):
    """`kill -TERM` (a scheduler before preemption) or `kill -USR1` of `megatrain pretrain --config FILE
    --nproc-per-node 2 a=b ...` reaches its workers: both stop after the same step, write that checkpoint and
    exit 0, and so does the launcher, with one line naming the checkpoint (no torchrun traceback). The
    workers ran what the user typed: every override is in their config.yaml (~15 s each)."""
    run_dir = tmp_path / "stopped"
    overrides = [*LAUNCHER_OVERRIDES, f"run.dir={run_dir}"]
    proc = start_launcher(["pretrain", "--config", "launch/configs/tiny-cpu.yaml", "--nproc-per-node", "2", *overrides])
    out, err = signal_after_records(proc, os.path.join(run_dir, "metrics.jsonl"), 3, signum)
    assert proc.returncode == 0, (out[-2000:], err[-4000:])
    name = signal.Signals(signum).name
    last = step_losses(run_dir)[-1][0]
    assert 3 <= last < 500 and f"stopped at step {last} ({name} received)" in out
    assert assert_latest_complete(run_dir) == last
    checkpoint = os.path.join(run_dir, "checkpoints", f"step_{last}")
    lines = [line for line in err.splitlines() if line.startswith("megatrain:")]
    assert lines == [f"megatrain: stopped at step {last} on {name}; checkpoint {checkpoint}; continue with --resume"], (
        err[-4000:]
    )
    assert "Traceback" not in out + err and "SignalException" not in out + err
    with open(run_dir / "config.yaml") as fh:
        saved = yaml.safe_load(fh)
    assert saved == load_config(str(REPO / "launch/configs/tiny-cpu.yaml"), overrides).resolve(2).to_dict()
    assert (saved["model"]["preset"], saved["data"]["seq_len"], saved["train"]["steps"]) == ("tiny", 32, 500)
    meta = ckpt.read_meta(checkpoint)
    assert meta["layout"]["world_size"] == 2 and meta["layout"]["zero_stage"] == 1


@pytest.mark.slow
def test_second_sigterm_to_the_launcher_kills_the_workers(tmp_path):
    """Rank 1 stalls inside step 5, so the checkpoint a first SIGTERM asks for never comes; a second SIGTERM
    to the launcher kills both workers through torchrun's agent: exit 143, one line naming the last complete
    checkpoint, no process of the job left (~12 s)."""
    run_dir = tmp_path / "stalled"
    proc = start_launcher(
        [
            "pretrain",
            "--config",
            "launch/configs/tiny-cpu.yaml",
            "--nproc-per-node",
            "2",
            *LAUNCHER_OVERRIDES,
            "checkpoint.every=2",
            f"run.dir={run_dir}",
        ],
        env={FAULT_ENV: "step:5:1:stall"},
    )
    try:
        metrics, deadline = os.path.join(run_dir, "metrics.jsonl"), time.monotonic() + 240
        while not (os.path.exists(metrics) and len(read_metrics(metrics)) >= 4):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        time.sleep(1)  # both ranks inside step 5: rank 0 waits for rank 1 in the loss all-reduce
        proc.send_signal(signal.SIGTERM)
        time.sleep(1)
        assert proc.poll() is None  # the first one waits for the checkpoint
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, (out[-2000:], err[-4000:])
    lines = [line for line in err.splitlines() if line.startswith("megatrain:")]
    assert lines == [
        f"megatrain: a second SIGTERM while the workers were stopping on SIGTERM: killed them; the "
        f"last complete checkpoint is {run_dir / 'checkpoints' / 'step_4'} (step 4); continue with "
        f"--resume"
    ], err[-4000:]
    assert "Traceback" not in err and assert_latest_complete(run_dir) == 4
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # nothing left in the job's session


@pytest.mark.slow
def test_full_disk_while_saving_keeps_previous_checkpoint(tmp_path):
    run_dir = tmp_path / "full"
    proc = pretrain2(run_dir, "train.steps=4", env={FAULT_ENV: "ckpt_write:4:1:enospc"}, resume=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("megatrain: error")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "saving checkpoint step_4 failed on rank 1 (No space left on device" in errors[0]
    assert "step_2' is kept as latest" in errors[0]
    assert "Traceback" not in proc.stderr
    assert assert_latest_complete(run_dir) == 2
    assert not os.path.exists(os.path.join(run_dir, "checkpoints", "step_4.partial"))


@pytest.mark.slow
def test_stalled_rank_is_named_by_the_watchdog(tmp_path):
    start = time.monotonic()
    proc = pretrain2(tmp_path / "stall", "parallel.timeout_s=4", env={FAULT_ENV: "step:3:1:stall"}, resume=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "exceeded parallel.timeout_s=4" in line]
    assert lines, proc.stderr[-3000:]
    assert any(
        line.startswith("megatrain: error (rank 0)") and "stalled: rank 1 (in 'forward' of step 3)" in line
        for line in lines
    ), lines
    assert time.monotonic() - start < 120  # not the process group's own (much longer) timeout


@pytest.mark.slow
def test_torchrun_max_restarts_resumes_on_its_own(baseline, tmp_path):
    """torchrun restarts the group after rank 1 dies inside step 5; train.auto_resume (on under an
    elastic launch) continues from step_4 without --resume, and the trajectory is the straight one."""
    run_dir = tmp_path / "elastic"
    proc = ok(
        run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "1",
                "--nproc-per-node",
                "2",
                "--max-restarts",
                "1",
                "--monitor-interval",
                "0.2",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(free_port()),
                "--module",
                "megatrain.cli",
                "pretrain",
                *JOB,
                f"run.dir={run_dir}",
            ],
            env={FAULT_ENV: "step:5:1"},
        )
    )
    assert "resumed from" in proc.stdout and "step_4 at step 4" in proc.stdout
    assert step_losses(run_dir) == baseline


@pytest.mark.slow
def test_second_job_on_a_live_run_dir_is_refused(tmp_path):
    run_dir = tmp_path / "locked"
    lock = RunLock(str(run_dir)).acquire()  # this test process plays the live job
    try:
        proc = cli(["pretrain", "--nproc-per-node", "2", *JOB, f"run.dir={run_dir}"])
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(json.load(open(lock.path))["time"]))
        assert proc.returncode == 2
        assert proc.stderr.strip() == (
            f"megatrain: error: run.dir '{run_dir}' is in use by another job (host "
            f"{socket.gethostname()} pid {os.getpid()} since {since}): wait for it to "
            f"finish or stop it"
        )
    finally:
        lock.release()
    assert not os.path.exists(lock.path)


# ---------------------------------------------------------------------------------------------
# one process, no training


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_run_lock_refuses_live_takes_over_dead_and_releases(tmp_path):
    run_dir = str(tmp_path / "run")
    first = RunLock(run_dir).acquire()
    with pytest.raises(RunLockError, match=f"pid {os.getpid()}"):
        RunLock(run_dir).acquire()
    with pytest.raises(RunLockError, match="in use by another job"):
        check_run_lock(run_dir)
    first.release()
    assert not os.path.exists(first.path)
    check_run_lock(run_dir)  # free again

    # A holder on this host whose pid is gone is taken over.
    with open(first.path, "w") as fh:
        json.dump({"host": socket.gethostname(), "pid": _dead_pid(), "time": time.time()}, fh)
    check_run_lock(run_dir)
    lock = RunLock(run_dir).acquire()
    assert json.load(open(lock.path))["pid"] == os.getpid()
    lock.release()

    # A live pid that now belongs to a newer process (pid reuse) does not hold the lock.
    with open(first.path, "w") as fh:
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "start": 1, "time": time.time()}, fh)
    check_run_lock(run_dir)

    # Another host's lock is never taken over automatically: the line says how to clear it.
    with open(first.path, "w") as fh:
        json.dump({"host": "elsewhere.example", "pid": 4242, "time": time.time()}, fh)
    with pytest.raises(RunLockError, match=r"host elsewhere.example pid 4242 .*if that job is gone, delete"):
        RunLock(run_dir).acquire()
    assert json.load(open(first.path))["host"] == "elsewhere.example"  # untouched


def test_fault_hook_spec_is_validated(monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "ckpt_write:4:1:enospc")
    spec = fault_spec()
    assert (spec.point, spec.step, spec.rank, spec.action) == ("ckpt_write", 4, 1, "enospc")
    monkeypatch.setenv(FAULT_ENV, "step:3")
    assert fault_spec().rank == 0 and fault_spec().action == "kill"
    for bad in ("nowhere:3", "step", "step:0", "step:x", "step:3:1:explode", "latest:4:1"):
        monkeypatch.setenv(FAULT_ENV, bad)
        with pytest.raises(ConfigError, match=FAULT_ENV):
            fault_spec()


def test_auto_resume_follows_the_elastic_launch(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_MAX_RESTARTS", raising=False)
    assert auto_resume_enabled(None) is False and auto_resume_enabled(True) is True
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")  # `megatrain pretrain --nproc-per-node N`
    assert auto_resume_enabled(None) is False
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    assert auto_resume_enabled(None) is True and auto_resume_enabled(False) is False


def test_loss_spike_detector():
    det = LossSpikeDetector(window=6, zscore=4.0)
    for x in (3.0, 3.1, 2.9):
        assert det.score(x) is None  # window still filling (needs window / 2)
        det.accept(x)
    assert det.score(3.05) is None
    z = det.score(9.0)
    assert z is not None and z > 4.0
    assert det.score(2.0) is None  # only upward spikes
    state = det.state_dict()
    other = LossSpikeDetector(window=6, zscore=4.0)
    other.load_state_dict(state)
    assert other.score(9.0) == z
    assert LossSpikeDetector(window=0, zscore=4.0).score(1e9) is None


def test_watchdog_verdict_names_the_ranks_behind():
    dog = Watchdog(5.0, rank=0, world_size=3)
    dog.phase("forward", 3)
    dog.phase("backward", 3)
    dog.phase("optimizer step", 3)
    peers = {
        1: {"phase": "forward", "step": 3, "seq": 1, "age": 6.0},
        2: {"phase": "optimizer step", "step": 3, "seq": 3, "age": 6.0},
    }
    line = dog.verdict(peers)
    assert line == "'optimizer step' of step 3 exceeded parallel.timeout_s=5; stalled: rank 1 (in 'forward' of step 3)"
    assert "rank 2 (never reported)" in dog.verdict({1: {"phase": "optimizer step", "step": 3, "seq": 3, "age": 1}})
    even = {
        1: {"phase": "optimizer step", "step": 3, "seq": 3, "age": 6.0},
        2: {"phase": "optimizer step", "step": 3, "seq": 3, "age": 6.0},
    }
    assert "no rank is behind" in dog.verdict(even)


_SLOW_STORE_WATCHDOG = """
import datetime, sys, time
import torch.distributed as dist
from megatrain.engine.health import Watchdog


class SlowStore:
    # a real TCPStore whose set() spends 0.5 s in a C++ call that releases the GIL, as a store call
    # to a busy host does
    def __init__(self, store):
        self.store = store

    def set(self, key, value):
        try:
            self.store.wait(["never-set"], datetime.timedelta(seconds=0.5))
        except Exception:
            pass
        self.store.set(key, value)

    def check(self, keys):
        return self.store.check(keys)

    def get(self, key):
        return self.store.get(key)


store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=datetime.timedelta(seconds=10))
dog = Watchdog(0.25, rank=0, world_size=1, store=SlowStore(store)).start()
time.sleep(0.2)  # the thread has entered its first publish: inside store.wait
dog.stop()
assert not dog._thread.is_alive(), "stop() returned while the watchdog thread was still in a store call"
print("stopped", flush=True)
"""


def test_watchdog_stop_waits_for_its_thread_so_exit_is_clean():
    """A daemon thread inside a torch store call when the interpreter finalizes aborts the process
    ("terminate called without an active exception", pytorch#38228): a rank failed that way at exit after a
    clean `train.stop_after` run in CI. stop() waits for the thread, so the process exits 0."""
    proc = subprocess.run(
        [sys.executable, "-c", _SLOW_STORE_WATCHDOG],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stopped" in proc.stdout
    assert "terminate called" not in proc.stderr


def test_metrics_jsonl_survives_a_cut_line(tmp_path):
    run_dir = str(tmp_path)
    logger = MetricsLogger(run_dir, enabled=True, tensorboard=False, progress=False, total_steps=4, start_step=0)
    for step in (1, 2):
        logger.log({"step": step, "loss": 1.0 / step})
    logger.close()
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path, "a") as fh:
        fh.write('{"step": 3, "loss": 0.3')  # a crash mid-write
    records = read_metrics(path)
    assert [r["step"] for r in records] == [1, 2]
    # Resuming at step 2 drops the cut line; new records start on a line of their own.
    logger = MetricsLogger(run_dir, enabled=True, tensorboard=False, progress=False, total_steps=4, start_step=2)
    logger.log({"step": 3, "loss": 0.25})
    logger.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    assert all(json.loads(line) for line in open(path))


def test_stop_signal_is_recorded(monkeypatch):
    from megatrain.engine.resilience import StopRequest

    stop = StopRequest().install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.signum == signal.SIGUSR1 and stop.name == "SIGUSR1"
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGUSR1) is not stop._handle


# A stand-in worker: its command line names megatrain.cli, as torchrun's workers do; it records each stop
# signal it receives in the file given as its first argument.
_FAKE_WORKER = """
import signal, sys, time
path = sys.argv[1]
def record(signum, frame):
    with open(path, "a") as fh:
        fh.write(signal.Signals(signum).name + "\\n")
for sig in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(sig, record)
open(path, "a").close()
time.sleep(60)
"""


def test_launcher_passes_the_first_stop_on_and_kills_on_the_second(tmp_path):
    """LauncherStop (the launcher of `--nproc-per-node N`): SIGTERM and SIGUSR1 go on to the workers (only
    them: another child is left alone) and the launcher keeps waiting; a second SIGTERM, or SIGINT, raises
    torchrun's SignalException, whose signal the agent then sends to the workers: SIGKILL after a stop request,
    SIGINT (the usual Ctrl-C) before one."""
    from torch.distributed.elastic.multiprocessing import SignalException

    from megatrain.engine.resilience import LauncherStop, worker_pids

    received = tmp_path / "received"
    worker = subprocess.Popen([sys.executable, "-c", _FAKE_WORKER, str(received), "megatrain.cli"])
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    before = [signal.getsignal(sig) for sig in LauncherStop.SIGNALS]
    stop = LauncherStop().install()
    try:
        deadline = time.monotonic() + 30
        while not received.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert worker_pids() == [worker.pid]
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            os.kill(os.getpid(), signum)
            while len(received.read_text().split()) < (1 if signum == signal.SIGTERM else 2):
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert received.read_text().split() == ["SIGTERM", "SIGUSR1"]
        assert stop.signum == signal.SIGTERM and stop.name == "SIGTERM" and bystander.poll() is None
        with pytest.raises(SignalException) as hard:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        assert hard.value.sigval == signal.SIGKILL and stop.hard == signal.SIGTERM
        stop.restore()
        stop = LauncherStop().install()
        with pytest.raises(SignalException) as interrupt:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        assert interrupt.value.sigval == signal.SIGINT and stop.signum == 0
    finally:
        stop.restore()
        for proc in (worker, bystander):
            proc.kill()
            proc.wait()
    assert [signal.getsignal(sig) for sig in LauncherStop.SIGNALS] == before


SPIKE_SCRIPT = """
import sys
from megatrain.models import transformer

real_forward = transformer.Transformer.forward
calls = {"n": 0}

def forward(self, *args, **kwargs):
    out = real_forward(self, *args, **kwargs)
    if self.training:
        calls["n"] += 1
        if calls["n"] == 4:  # one process, grad_accum 1: the 4th training forward is step 4
            out = out * 20
    return out

transformer.Transformer.forward = forward
from megatrain.cli import entry
entry(sys.argv[1:])
"""


@pytest.mark.slow
@pytest.mark.parametrize("zero", [0, 2])
def test_loss_spike_logged_and_skipped(tmp_path, zero):
    """ZeRO-0 skips on the host before the step; the lean ZeRO-2 step drops it on the device."""
    run_dir = tmp_path / "spike"
    proc = ok(
        run(
            [
                sys.executable,
                "-c",
                SPIKE_SCRIPT,
                "pretrain",
                *TINY_JOB,
                "log.eval_every=0",
                "log.tensorboard=false",
                f"parallel.zero_stage={zero}",
                "train.global_batch=4",
                "train.steps=4",
                "train.spike_window=4",
                "train.spike_zscore=20",
                "train.spike_skip=true",
                f"run.dir={run_dir}",
            ]
        )
    )
    records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    spikes = [r for r in records if "spike_z" in r]
    assert [r["step"] for r in spikes] == [4], records
    assert spikes[0]["spike_z"] > 20 and spikes[0]["grad_norm"] is None  # the update was skipped
    assert all(r["grad_norm"] is not None for r in records if r["step"] != 4)
    assert "step 4: loss spike" in proc.stdout and "update skipped" in proc.stdout


SHIMS = {
    # srun: drop its options, become a process group of its own (the job step), remember its pid.
    "srun": 'while [[ "$1" == --* ]]; do shift; done\necho $$ > "$SHIM_DIR/step.pid"\nexec setsid "$@"\n',
    # scancel --signal=USR1 JOB: every process of the step, not the batch shell.
    "scancel": 'kill -s "${1#--signal=}" -- -"$(cat "$SHIM_DIR/step.pid")"\n',
    "scontrol": 'case "$1" in show) echo 127.0.0.1 ;; requeue) echo "$2" > "$SHIM_DIR/requeued" ;; esac\n',
    # torchrun: a shell (whose default action on SIGUSR1 is to die) starting one worker that waits for
    # a stop signal through megatrain's handler and records the arguments it was given.
    "torchrun": 'echo "$@" > "$SHIM_DIR/argv"\n"$PYTHON" - <<PY\n'
    "import os, time\nfrom megatrain.engine.resilience import StopRequest\n"
    'stop = StopRequest().install()\nopen(os.path.join(os.environ["SHIM_DIR"], "ready"), "w").close()\n'
    "while not stop.signum:\n    time.sleep(0.05)\n"
    'open(os.path.join(os.environ["SHIM_DIR"], "stopped"), "w").write(stop.name)\nPY\n',
}


def test_slurm_script_forwards_the_signal_and_requeues(tmp_path):
    """launch/slurm.sbatch with stand-ins for srun/scancel/scontrol/torchrun: Slurm's SIGUSR1 to the batch
    shell reaches the worker (not the agent, which survives it), the job exits 0 and requeues itself,
    and the worker was told to resume into the job's own run directory."""
    shim_dir = tmp_path / "bin"
    shim_dir.mkdir()
    for name, body in SHIMS.items():
        path = shim_dir / name
        path.write_text("#!/usr/bin/env bash\n" + body)
        path.chmod(0o755)
    env = {
        "PATH": f"{shim_dir}:{os.environ['PATH']}",
        "SHIM_DIR": str(shim_dir),
        "PYTHON": sys.executable,
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "megatrain",
        "SLURM_JOB_NODELIST": "n1",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_GPUS_PER_NODE": "gpu:1",
        "SLURM_SUBMIT_DIR": str(REPO),
    }
    full = child_env()
    full.update(env)
    script = str(REPO / "launch" / "slurm.sbatch")
    job = subprocess.Popen(
        ["bash", script, "launch/configs/tiny-cpu.yaml", "train.steps=9"],
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (shim_dir / "ready").exists():
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()
            time.sleep(0.05)
        job.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@180` does
        out, err = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 0, (out, err)
    assert (shim_dir / "stopped").read_text() == "SIGUSR1"
    assert (shim_dir / "requeued").read_text().strip() == "4242"
    argv = (shim_dir / "argv").read_text().split()
    assert "run.dir=runs/megatrain-4242" in argv and "--resume" in argv and argv[-1] == "train.steps=9"


def _fake_checkpoint(root, step: int) -> str:
    """A committed checkpoint folder with a megatrain manifest (no DeepSpeed files needed here)."""
    path = os.path.join(root, f"step_{step}")
    os.makedirs(path)
    files = {"rng_rank0.pt": b"rng" * 10, "model.safetensors": b"w" * 64, "mp_rank_00_model_states.pt": b"d" * 32}
    for name, data in files.items():
        with open(os.path.join(path, name), "wb") as fh:
            fh.write(data)
    sizes, checksums = ckpt._manifest(path)
    with open(os.path.join(path, ckpt.META_FILE), "w") as fh:
        json.dump({"format": ckpt.FORMAT_VERSION, "step": step, "files": sizes, "checksums": checksums}, fh)
    return path


def test_manifest_checksums_catch_same_size_damage_and_name_the_previous_checkpoint(tmp_path):
    root = str(tmp_path / "checkpoints")
    _fake_checkpoint(root, 2)
    newest = _fake_checkpoint(root, 4)
    meta = ckpt.read_meta(newest, checksums=True)
    assert set(meta["checksums"]) == {"rng_rank0.pt", "model.safetensors"}  # DeepSpeed's files: sizes only
    with open(os.path.join(newest, "model.safetensors"), "r+b") as fh:
        fh.write(b"X")  # same size, different bytes
    ckpt.read_meta(newest)  # sizes still agree
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.read_meta(newest, checksums=True)
    assert str(err.value) == (
        f"checkpoint '{newest}' is corrupt: file 'model.safetensors' fails its sha256 check; "
        f"the previous complete checkpoint is '{os.path.join(root, 'step_2')}' (resume with "
        f"--resume-from it)"
    )


def test_prune_drops_partials_and_an_abandoned_future(tmp_path):
    root = str(tmp_path / "checkpoints")
    for step in (2, 4, 6, 8):
        _fake_checkpoint(root, step)
    os.makedirs(os.path.join(root, "step_10.partial"))
    ckpt._prune(root, keep=2, current="step_6")  # step_8 came from a run that crashed before `latest`
    assert sorted(os.listdir(root)) == ["step_4", "step_6"]
