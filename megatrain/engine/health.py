"""Health of a running job: the collective watchdog and the loss-spike detector.

`Watchdog` (parallel.timeout_s): the trainer names each phase of a step as it enters it
(`watchdog.phase("backward", step)`: attribute writes, no I/O). A daemon thread publishes this rank's
(phase, step, sequence number) to the process group's key-value store about once a second and, when
a phase has run longer than the timeout, reads every rank's and ends the process with one line:

    megatrain: error (rank 0): 'optimizer step' of step 3 exceeded parallel.timeout_s=5; stalled: rank 1
    (in 'forward' of step 3)

Every rank runs the same phases in the same order, so the ranks with the lowest sequence number are
the ones the others wait for. When no rank is behind, every rank sits in the same collective and the
line says so (the backend or the network hangs). The process group's own timeout is set beyond
parallel.timeout_s (`process_group_timeout`) so the watchdog, which can name the rank, speaks first.

`LossSpikeDetector` (train.spike_window, train.spike_zscore): a step's loss is a spike when it lies
more than `zscore` standard deviations above the mean of the last `window` accepted losses.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
import threading
import time
from collections import deque
from typing import Callable, Optional

__all__ = ["Watchdog", "default_store", "process_group_timeout", "LossSpikeDetector", "EXIT_STALLED"]

EXIT_STALLED = 3
_KEY = "megatrain/health/rank{}"


def process_group_timeout(timeout_s: float) -> datetime.timedelta:
    """torch.distributed's own timeout: a backstop well past the watchdog's."""
    return datetime.timedelta(seconds=2 * timeout_s + 60)


def default_store():
    """The key-value store of the default process group (torchrun's agent store or env:// TCPStore).

    torch exposes it only through this private accessor (present since torch 1.x, still in 2.13);
    without it the watchdog still ends the job, naming the phase but not the stalled rank.
    """
    import torch.distributed.distributed_c10d as c10d

    getter = getattr(c10d, "_get_default_store", None)
    try:
        return getter() if getter is not None else None
    except Exception:
        return None


class Watchdog:
    """Per-rank watchdog of the step's phases; see the module docstring."""

    def __init__(
        self, timeout_s: float, rank: int, world_size: int, store=None, on_timeout: Optional[Callable[[], None]] = None
    ):
        self.timeout_s = timeout_s
        self.rank, self.world_size = rank, world_size
        self.store = store
        self.on_timeout = on_timeout
        self.poll_s = max(0.05, min(1.0, timeout_s / 5))
        self.name, self.step, self.seq = "start-up", 0, 0
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="megatrain-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def stop(self, join_timeout_s: float = 30.0) -> None:
        """End the thread and wait for it: a daemon thread still inside a store call (torch releases the GIL
        there) when the interpreter finalizes is killed by pthread_exit from a C++ destructor, and the
        process aborts with "terminate called without an active exception" after a clean run
        (pytorch/pytorch#38228). The wait is bounded for a store whose host is gone."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(join_timeout_s)

    def phase(self, name: str, step: int) -> None:
        """Main thread: this rank now runs `name` of step `step` (collectives included)."""
        self.name, self.step = name, step
        self.seq += 1
        self.started = time.monotonic()

    def _state(self) -> dict:
        return {
            "phase": self.name,
            "step": self.step,
            "seq": self.seq,
            "age": round(time.monotonic() - self.started, 3),
        }

    def _publish(self) -> None:
        if self.store is not None:
            try:
                self.store.set(_KEY.format(self.rank), json.dumps(self._state()))
            except Exception:
                pass  # the store's host is gone: the timeout below still ends this process

    def _peers(self) -> dict:
        out = {}
        if self.store is None:
            return out
        for r in range(self.world_size):
            key = _KEY.format(r)
            try:
                if self.store.check([key]):
                    out[r] = json.loads(self.store.get(key))
            except Exception:
                continue
        return out

    def verdict(self, peers: dict) -> str:
        """The one line: this rank's phase, and which ranks the others wait for."""
        head = f"'{self.name}' of step {self.step} exceeded parallel.timeout_s={self.timeout_s:g}"
        if not peers:
            return head + " (the other ranks' state is unknown)"
        peers = dict(peers)
        peers[self.rank] = self._state()
        missing = [r for r in range(self.world_size) if r not in peers]
        top = max(p["seq"] for p in peers.values())
        behind = sorted(r for r, p in peers.items() if p["seq"] < top)
        if not behind and not missing:
            return head + f"; no rank is behind: every rank is in '{self.name}' (the backend or the network hangs)"
        named = [f"rank {r} (in '{peers[r]['phase']}' of step {peers[r]['step']})" for r in behind]
        named += [f"rank {r} (never reported)" for r in missing]
        return head + "; stalled: " + ", ".join(named)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._publish()
            # Start-up (data preparation, engine set-up, loading) is left to the process group's timeout.
            if self.seq == 0 or time.monotonic() - self.started <= self.timeout_s:
                continue
            # Let the peers publish their latest state before judging.
            time.sleep(self.poll_s * 2)
            if self._stop.is_set():
                return
            peers = self._peers()
            if peers and self.seq < max(p["seq"] for p in peers.values()):
                # This rank is the one behind: a rank that waits for it names it (and ends the job) first;
                # only if none has within another timeout does this rank report itself.
                if self._stop.wait(self.timeout_s):
                    return
                peers = self._peers()
            line = f"megatrain: error (rank {self.rank}): {self.verdict(peers)}"
            print(line, file=sys.stderr, flush=True)
            if self.on_timeout is not None:
                try:
                    self.on_timeout()
                except Exception:
                    pass
            os._exit(EXIT_STALLED)


class LossSpikeDetector:
    """z-score of a loss against the last `window` accepted ones; `window` 0 disables it."""

    def __init__(self, window: int, zscore: float):
        self.window, self.zscore = window, zscore
        self.history: deque = deque(maxlen=max(window, 1))

    def stats(self) -> Optional[tuple[float, float]]:
        """(mean, std) of the window when it scores losses, else None (disabled, filling, or flat)."""
        if self.window <= 0 or len(self.history) < max(2, self.window // 2):
            return None
        n = len(self.history)
        mean = sum(self.history) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / (n - 1))
        if std <= 1e-12 * max(1.0, abs(mean)):
            return None
        return mean, std

    def score(self, loss: float) -> Optional[float]:
        """The z-score of `loss` when it is a spike (z = (loss - mean) / std > zscore), else None (also while
        the window fills)."""
        stats = self.stats()
        if stats is None or not math.isfinite(loss):
            return None
        z = (loss - stats[0]) / stats[1]
        return z if z > self.zscore else None

    def accept(self, loss: float) -> None:
        if self.window > 0 and math.isfinite(loss):
            self.history.append(loss)

    def state_dict(self) -> list:
        return list(self.history)

    def load_state_dict(self, state: list) -> None:
        self.history.clear()
        self.history.extend(float(x) for x in state)
