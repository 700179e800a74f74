"""What keeps a run alive and its run directory consistent: the run lock, preemption signals,
elastic auto-resume, and the test-only fault hook.

- `RunLock`: one job per run directory. `run.dir/megatrain.lock` holds the host, pid and process
  start time of the rank-0 process writing the run; a second job is refused with one line naming it.
  It is created atomically (written to a private file, then hard-linked into place) and removed on
  exit. A lock whose holder is gone is taken over: on the same host "gone" means its pid is not alive
  (or now belongs to a process started later); a lock from another host is never taken over
  automatically, because its pid cannot be checked from here: delete the file once that job is gone.
- `StopRequest`: SIGTERM and SIGUSR1 set a flag; the trainer agrees on it across ranks (it rides on
  the step's loss all-reduce), so every rank finishes the same step, checkpoints and exits 0.
  `LauncherStop` is the launcher's side (`megatrain pretrain|rl --nproc-per-node N`): it passes the
  first SIGTERM / SIGUSR1 on to its workers and keeps waiting for them, so the command exits 0.
- `auto_resume_enabled`: `train.auto_resume`, whose default (null) means on under an elastic launch
  (torchrun with --max-restarts > 0), so a restarted worker continues from the last checkpoint.
- `fault_point`: `MEGATRAIN_TEST_CRASH_AT=POINT:STEP[:RANK[:ACTION]]` makes that rank kill itself
  (or stall, or signal itself, or fail a write) at a named point of step STEP. For tests only: it
  is how the crash-safety tests hit a moment inside a checkpoint write exactly.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import time
from dataclasses import dataclass
from typing import Optional

from megatrain import env
from megatrain.errors import MegatrainError

__all__ = [
    "RunLock",
    "RunLockError",
    "check_run_lock",
    "StopRequest",
    "LauncherStop",
    "worker_pids",
    "auto_resume_enabled",
    "elastic_restart_count",
    "FAULT_ENV",
    "fault_spec",
    "fault_point",
]

LOCK_FILE = "megatrain.lock"


class RunLockError(MegatrainError):
    """Another live job holds the run directory."""


def _process_start(pid: int) -> Optional[int]:
    """Start time of `pid` in clock ticks since boot (/proc/PID/stat field 22), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            stat = fh.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its closing one.
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _pid_alive(pid: int, start: Optional[int]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    if start is not None:
        now = _process_start(pid)
        if now is not None and now != start:
            return False  # the pid was reused by a newer process
    return True


def _read_holder(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as fh:
            holder = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"host": "?", "pid": -1, "unreadable": True}
    return holder if isinstance(holder, dict) else {"host": "?", "pid": -1, "unreadable": True}


def _holder_alive(holder: dict) -> bool:
    if holder.get("unreadable"):
        return True  # nothing to check: leave it to a person
    if holder.get("host") != socket.gethostname():
        return True  # cannot check a pid on another host
    return _pid_alive(int(holder.get("pid", -1)), holder.get("start"))


def _describe(holder: dict) -> str:
    if holder.get("unreadable"):
        return "an unreadable lock"
    since = holder.get("time")
    when = f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" if since else ""
    return f"host {holder.get('host')} pid {holder.get('pid')}{when}"


def _refusal(run_dir: str, path: str, holder: dict) -> RunLockError:
    elsewhere = holder.get("host") != socket.gethostname() or holder.get("unreadable")
    hint = f"if that job is gone, delete {path}" if elsewhere else "wait for it to finish or stop it"
    return RunLockError(f"run.dir '{run_dir}' is in use by another job ({_describe(holder)}): {hint}")


def check_run_lock(run_dir: str) -> None:
    """Raise RunLockError (one line) when a live job holds `run_dir`; changes nothing."""
    path = os.path.join(run_dir, LOCK_FILE)
    holder = _read_holder(path)
    if holder is not None and _holder_alive(holder):
        raise _refusal(run_dir, path, holder)


class RunLock:
    """`run_dir/megatrain.lock`, held by this process from `acquire()` to `release()`."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_FILE)
        self.held = False

    def acquire(self) -> "RunLock":
        os.makedirs(self.run_dir, exist_ok=True)
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start": _process_start(os.getpid()),
            "time": time.time(),
        }
        mine = f"{self.path}.{me['host']}.{me['pid']}"
        with open(mine, "w", encoding="utf-8") as fh:
            json.dump(me, fh)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            for _ in range(5):
                try:
                    os.link(mine, self.path)  # atomic: fails if a lock exists, also on NFS
                    self.held = True
                    return self
                except FileExistsError:
                    pass
                holder = _read_holder(self.path)
                if holder is None:
                    continue  # released meanwhile
                if _holder_alive(holder):
                    raise _refusal(self.run_dir, self.path, holder)
                # Take over a dead holder's lock: move it aside, then check that what moved is what we judged.
                stale = f"{mine}.stale"
                try:
                    os.rename(self.path, stale)
                except FileNotFoundError:
                    continue
                moved = _read_holder(stale)
                same = moved is not None and (moved.get("pid"), moved.get("host")) == (
                    holder.get("pid"),
                    holder.get("host"),
                )
                if same:
                    os.unlink(stale)
                else:  # another job took it over between our read and the rename: give it back
                    os.rename(stale, self.path)
            raise RunLockError(f"run.dir '{self.run_dir}': could not take {self.path} (contended by other jobs)")
        finally:
            try:
                os.unlink(mine)
            except FileNotFoundError:
                pass

    def release(self) -> None:
        """Remove the lock if it is still this process's."""
        if not self.held:
            return
        self.held = False
        holder = _read_holder(self.path)
        if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class StopRequest:
    """SIGTERM / SIGUSR1 -> `signum` set; installed in the main thread for the length of a run."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signum = 0
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def install(self) -> "StopRequest":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


class LauncherStop(StopRequest):
    """The launcher's side of a stop, in the process that runs torchrun's elastic agent in-process
    (`megatrain pretrain|rl --nproc-per-node N`, `megatrain plan --build --world N`).

    The first SIGTERM or SIGUSR1 is passed on to the worker processes (its direct children that run
    `megatrain.cli`), which finish their step, checkpoint together and exit 0, while the agent keeps
    waiting for them as for any run: nothing is killed and nothing is timed out. `signum` records it
    so the launcher can report where the run stopped and exit 0. A second SIGTERM, or SIGINT after a
    stop request, stops the workers at once (SIGKILL through the agent's own shutdown: it raises
    torchrun's `SignalException`, which the launcher turns into one line); SIGINT before any stop
    request is torchrun's usual Ctrl-C (SIGINT to the workers). The agent itself is told to handle
    only SIGHUP and SIGQUIT (`AGENT_SIGNALS`, torchrun's --signals-to-handle), so it never sees
    these three.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    AGENT_SIGNALS = "SIGHUP,SIGQUIT"

    def __init__(self):
        super().__init__()  # signum: the stop signal passed on (first SIGTERM / SIGUSR1), 0 while none came
        self.hard = 0  # the signal that made the launcher stop the workers at once

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT or (signum == signal.SIGTERM and self.signum):
            from torch.distributed.elastic.multiprocessing import SignalException

            self.hard = signum
            death = signal.SIGKILL if self.signum else signal.SIGINT
            raise SignalException(f"megatrain launcher {os.getpid()} got {signal.Signals(signum).name}", sigval=death)
        if not self.signum:
            self.signum = signum
        for pid in worker_pids():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass


def worker_pids() -> list[int]:
    """The worker processes of this launcher: its direct children that run `megatrain.cli` (not their own
    children, such as data-loader or compile workers, which a signal would kill)."""
    import psutil  # a DeepSpeed dependency

    pids = []
    for child in psutil.Process().children(recursive=False):
        try:
            if "megatrain.cli" in child.cmdline():
                pids.append(child.pid)
        except psutil.Error:
            pass
    return pids


def elastic_restart_count() -> int:
    """How often torchrun's agent restarted this worker group (0 outside torchrun)."""
    return env.restart_count()


def auto_resume_enabled(setting: Optional[bool]) -> bool:
    """`train.auto_resume`: explicit true/false, or null = on when torchrun may restart workers
    (TORCHELASTIC_MAX_RESTARTS > 0, set by `torchrun --max-restarts N`)."""
    if setting is not None:
        return setting
    return env.max_restarts() > 0


# ---------------------------------------------------------------------------------------------
# Test-only fault hook

FAULT_ENV = "MEGATRAIN_TEST_CRASH_AT"
FAULT_POINTS, FAULT_ACTIONS = env.CRASH_POINTS, env.CRASH_ACTIONS  # where and how (megatrain.env)


@dataclass(frozen=True)
class FaultSpec:
    point: str
    step: int
    rank: int
    action: str


def fault_spec() -> Optional[FaultSpec]:
    """MEGATRAIN_TEST_CRASH_AT parsed (megatrain.env.crash_hook), or None; malformed: one line (ConfigError)."""
    hook = env.crash_hook()
    return None if hook is None else FaultSpec(*hook)


def fault_point(point: str, step: int, rank: int) -> None:
    """Act on MEGATRAIN_TEST_CRASH_AT when it names this point, step and rank (first attempt of an
    elastic job only, so a restarted worker runs through)."""
    spec = fault_spec()
    if spec is None or (spec.point, spec.step, spec.rank) != (point, step, rank) or elastic_restart_count() > 0:
        return
    if spec.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif spec.action == "term":
        os.kill(os.getpid(), signal.SIGTERM)
    elif spec.action == "stall":
        while True:
            time.sleep(3600)
    elif spec.action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{point} of step {step} ({FAULT_ENV})")
