"""Running a sweep's plan: locally one run after another, or as a Slurm job array / torchrun commands.

Each run is a normal pretraining run (`megatrain pretrain --config <sweep dir>/configs/<name>.yaml
--resume`) in its own directory `<sweep dir>/runs/<name>`. The local runner starts it as a child
process, so a crash (or an out-of-memory kill) ends that run only: its error (one line) is recorded
in the run's `sweep_status.json` and the sweep goes on. A run is finished when its metrics.jsonl
holds the record of its last step; finished runs are skipped when the sweep is launched again,
unfinished ones continue from their latest checkpoint, failed ones are tried again.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional

import yaml

from megatrain.errors import ConfigError
from megatrain.scaling.spec import SweepRun, SweepSpec

__all__ = ["write_plan", "run_local", "run_state", "emit_slurm", "emit_torchrun", "STATUS_FILE", "PLAN_FILE"]

STATUS_FILE = "sweep_status.json"  # in each run directory, written by the local runner
LOG_FILE = "sweep.log"  # the run's stdout and stderr, in its run directory
PLAN_FILE = "plan.json"  # in the sweep directory: every run's name, axes, N, D, budget
SPEC_FILE = "sweep.yaml"  # in the sweep directory: the sweep, self-contained (base inlined)


def run_dir(spec: SweepSpec, run: SweepRun) -> str:
    return os.path.join(spec.dir, "runs", run.name)


def config_path(spec: SweepSpec, run: SweepRun) -> str:
    return os.path.join(spec.dir, "configs", f"{run.name}.yaml")


def read_metrics(path: str) -> list[dict]:
    """The records of a run's metrics.jsonl ([] if none; a line cut by a crash is skipped)."""
    out = []
    file = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(file):
        return out
    with open(file, encoding="utf-8") as fh:
        for line in fh:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def run_state(spec: SweepSpec, run: SweepRun) -> tuple[str, Optional[str]]:
    """("finished" | "failed" | "pending", error line or None) of a run, from its directory."""
    path = run_dir(spec, run)
    if any(r.get("step") == run.steps for r in read_metrics(path)):
        return "finished", None
    status = _read_status(path)
    if status.get("status") == "failed":
        return "failed", status.get("error")
    return "pending", None


def _read_status(path: str) -> dict:
    try:
        with open(os.path.join(path, STATUS_FILE), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError):
        return {}


def write_plan(spec: SweepSpec, runs: list[SweepRun]) -> None:
    """Write the sweep directory's sweep.yaml, plan.json and one run config per run.

    A finished run whose config changed is refused (ConfigError) before anything is written: its results
    would no longer describe the sweep.
    """
    for run in runs:
        path = config_path(spec, run)
        if os.path.isfile(path) and run_state(spec, run)[0] == "finished":
            with open(path, encoding="utf-8") as fh:
                old = yaml.safe_load(fh)
            if old != run.config:
                raise ConfigError(
                    f"sweep dir '{spec.dir}': run {run.name} finished with other settings than the "
                    f"sweep now gives it; use a new dir (or delete {run_dir(spec, run)})"
                )
    os.makedirs(os.path.join(spec.dir, "configs"), exist_ok=True)
    os.makedirs(os.path.join(spec.dir, "runs"), exist_ok=True)
    _write_yaml(os.path.join(spec.dir, SPEC_FILE), spec.to_dict())
    for run in runs:
        _write_yaml(config_path(spec, run), run.config)
    plan = [
        {
            "name": r.name,
            "method": r.method,
            "size": r.size,
            "axes": r.axes,
            "budget": r.budget,
            "steps": r.steps,
            "tokens": r.tokens,
            "params_non_embedding": r.params_non_embedding,
        }
        for r in runs
    ]
    _write_text(os.path.join(spec.dir, PLAN_FILE), json.dumps(plan, indent=1) + "\n")


def _write_yaml(path: str, data) -> None:
    _write_text(path, yaml.safe_dump(data, sort_keys=False))


def _write_text(path: str, text: str) -> None:
    """Write atomically; a unique temporary name, since the array tasks of one sweep write the same files."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=os.path.basename(path) + ".")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def pretrain_command(spec: SweepSpec, run: SweepRun, nproc: int) -> list[str]:
    """The child process of one run: the same path as `megatrain pretrain` (resuming if it was cut short)."""
    return [
        sys.executable,
        "-m",
        "megatrain.cli",
        "pretrain",
        "--config",
        config_path(spec, run),
        "--resume",
        "--nproc-per-node",
        str(nproc),
    ]


def _error_line(log_path: str, start: int, returncode: int) -> str:
    """The attempt's own one-line error (`megatrain: error: ...`), else the last line it printed; reads the
    log from byte `start`, where this attempt began (earlier attempts are above it)."""
    try:
        with open(log_path, "rb") as fh:
            fh.seek(start)
            lines = [line.strip() for line in fh.read().decode("utf-8", "replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    for line in reversed(lines):
        if line.startswith("megatrain: error"):
            return line
    tail = lines[-1] if lines else ""
    return f"exit code {returncode}" + (f": {tail}" if tail else "")


def run_local(
    spec: SweepSpec,
    runs: list[SweepRun],
    *,
    nproc: int = 1,
    only: Optional[str] = None,
    echo: Callable[[str], None] = print,
    launch: Optional[Callable[[list[str], str], int]] = None,
    jobs: int = 1,
    planned: bool = False,
) -> dict:
    """Run the sweep's runs in child processes, `jobs` at a time; returns {name: state} after it.

    only: run just this one (a Slurm array task). launch(command, log_path) -> exit code starts one child
    (default: subprocess with stdout and stderr into the run's sweep.log). jobs > 1 runs that many children
    at once, each with OMP_NUM_THREADS = cores / (jobs x nproc) (small models on a many-core machine).
    planned: the sweep directory's plan was written already (a study writes its whole plan once).
    """
    if only is not None and only not in {r.name for r in runs}:
        raise ConfigError(f"--only {only}: no run of that name in the sweep (see {os.path.join(spec.dir, PLAN_FILE)})")
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    if not planned:
        write_plan(spec, runs)
    # One child at a time keeps the environment's threads; concurrent children split the cores.
    launch = launch or _child_launcher(None if jobs == 1 else max(1, (os.cpu_count() or 1) // (jobs * nproc)))
    todo = [r for r in runs if only is None or r.name == only]
    if jobs == 1:
        return {
            run.name: _run_one(spec, run, f"[{i}/{len(todo)}] {run.name}", nproc, launch, echo)
            for i, run in enumerate(todo, 1)
        }
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {
            run.name: pool.submit(_run_one, spec, run, f"[{i}/{len(todo)}] {run.name}", nproc, launch, echo)
            for i, run in enumerate(todo, 1)
        }
        return {name: future.result() for name, future in futures.items()}


def _run_one(spec: SweepSpec, run: SweepRun, prefix: str, nproc: int, launch, echo) -> str:
    """Start one run's child unless it finished before; record its sweep_status.json; returns its state."""
    state, _ = run_state(spec, run)
    if state == "finished":
        echo(f"{prefix}: finished before, skipped")
        return state
    path = run_dir(spec, run)
    os.makedirs(path, exist_ok=True)
    log_path = os.path.join(path, LOG_FILE)
    start = os.path.getsize(log_path) if os.path.exists(log_path) else 0
    started = time.perf_counter()
    code = launch(pretrain_command(spec, run, nproc), log_path)
    wall = time.perf_counter() - started
    state, _ = run_state(spec, run)
    error = None
    if code != 0 or state != "finished":
        state, error = "failed", _error_line(log_path, start, code)
    cpu = getattr(launch, "cpu_seconds", {}).pop(log_path, None)  # a custom launcher may not measure it
    status = {
        "status": "ok" if state == "finished" else "failed",
        "error": error,
        "wall_s": wall,
        "cpu_s": cpu,
        "returncode": code,
        "command": shlex.join(pretrain_command(spec, run, nproc)),
    }
    _write_text(os.path.join(path, STATUS_FILE), json.dumps(status, indent=1) + "\n")
    echo(f"{prefix}: {'done' if error is None else 'FAILED: ' + error} ({wall:.0f} s)")
    return state


def _child_launcher(threads: Optional[int]):
    """The default launcher: one child with stdout and stderr appended to the run's log, OMP_NUM_THREADS=threads
    when given; each child's own CPU time (os.wait4) lands in launch.cpu_seconds[log_path]."""

    def launch(command: list[str], log_path: str) -> int:
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        with open(log_path, "a", encoding="utf-8") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            _, status, usage = os.wait4(proc.pid, 0)
        launch.cpu_seconds[log_path] = usage.ru_utime + usage.ru_stime
        return os.waitstatus_to_exitcode(status)

    launch.cpu_seconds = {}
    return launch


def emit_slurm(spec: SweepSpec, runs: list[SweepRun], nproc: int) -> str:
    """Write `<sweep dir>/sweep.sbatch`: a job array with one task per run, each running this sweep's local
    runner for that run only (skip if finished, record a failure). Returns its path."""
    write_plan(spec, runs)
    spec_file = os.path.abspath(os.path.join(spec.dir, SPEC_FILE))
    log_dir = os.path.abspath(os.path.join(spec.dir, "slurm"))
    os.makedirs(log_dir, exist_ok=True)
    names = "\n".join(f"  {shlex.quote(r.name)}" for r in runs)
    text = f"""#!/bin/bash
# megatrain sweep {spec.dir}: one Slurm array task per run ({len(runs)} runs).
#   sbatch {os.path.join(spec.dir, "sweep.sbatch")}
# Each task trains one run through `megatrain sweep --only NAME` (finished runs are skipped, a failure is
# recorded in the run's {STATUS_FILE}); afterwards: megatrain sweep --report {spec.dir}
#SBATCH --job-name=megatrain-sweep
#SBATCH --array=0-{len(runs) - 1}
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={nproc}
#SBATCH --output={log_dir}/%A_%a.out
set -euo pipefail
RUNS=(
{names}
)
cd {shlex.quote(os.getcwd())}
exec {shlex.quote(sys.executable)} -m megatrain.cli sweep {shlex.quote(spec_file)} --nproc-per-node {nproc} \\
    --only "${{RUNS[$SLURM_ARRAY_TASK_ID]}}" --no-report
"""
    path = os.path.join(spec.dir, "sweep.sbatch")
    _write_text(path, text)
    return path


def emit_torchrun(spec: SweepSpec, runs: list[SweepRun], nproc: int) -> str:
    """Write `<sweep dir>/sweep_torchrun.sh`: one torchrun command per run, each skipped when the run's
    metrics already hold its last step. Returns its path."""
    write_plan(spec, runs)
    lines = [
        "#!/bin/bash",
        f"# megatrain sweep {spec.dir}: one torchrun command per run ({len(runs)} runs), one after another.",
        "# Several nodes: run this script on every node with NNODES and MASTER=host:port set.",
        f"# Afterwards: megatrain sweep --report {spec.dir}",
        "set -u",
        'NNODES="${NNODES:-1}"',
        'MASTER="${MASTER:-127.0.0.1:29500}"',
        f"cd {shlex.quote(os.getcwd())}",
    ]
    for run in runs:
        metrics = shlex.quote(os.path.join(run_dir(spec, run), "metrics.jsonl"))
        finished = f"grep -q '^{{\"step\": {run.steps},' {metrics} 2>/dev/null"
        command = (
            f'torchrun --nnodes "$NNODES" --nproc-per-node {nproc} --rdzv-backend c10d '
            f'--rdzv-endpoint "$MASTER" --rdzv-id {shlex.quote(run.name)} -m megatrain.cli pretrain '
            f"--config {shlex.quote(config_path(spec, run))} --resume"
        )
        lines.append(f"# run {run.name}")
        lines.append(f'{finished} || {command} || echo "run {run.name} failed" >&2')
    path = os.path.join(spec.dir, "sweep_torchrun.sh")
    _write_text(path, "\n".join(lines) + "\n")
    return path
