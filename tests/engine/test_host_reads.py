"""Host reads in the training step (issue 29, a lean step): on a GPU each value read out of a device tensor waits
for every kernel queued before it. A bf16 ZeRO-2 step of the trainer reads one value before its update (the
gradient norm, in the lean optimizer step, which decides whether to apply it), and the step's loss and flags
only after it, from a copy made without blocking."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, TINY_JOB, child_env

SCRIPT = """
import atexit, json, sys
from megatrain.bench.measure import HostReads
from megatrain.engine import trainer
from megatrain.kernels import reference

# What a GPU run does: the loss leaves its targets unread (reading them is only free for CPU tensors).
reference._targets_readable = lambda target: False
steps, real_step = [], trainer.Trainer.train_step

def train_step(self):
    with HostReads(self.env.device, trace=True) as counter:
        record = real_step(self)
    steps.append(counter.order)
    return record

trainer.Trainer.train_step = train_step
atexit.register(lambda: json.dump(steps, open(sys.argv[1], "w")))  # entry leaves with os._exit after these
from megatrain.cli import entry
entry(sys.argv[2:])
"""


@pytest.mark.slow
def test_the_trainer_reads_the_device_once_before_the_update(tmp_path):
    out = tmp_path / "reads.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            SCRIPT,
            str(out),
            "pretrain",
            *TINY_JOB,
            "train.steps=3",
            "log.every=100",  # no step but the last is logged: its metrics are read, nothing else
            "log.eval_every=0",
            "log.tensorboard=false",
            "checkpoint.every=0",
            "train.dtype=bf16",
            "parallel.zero_stage=2",
            f"run.dir={tmp_path / 'run'}",
        ],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    steps = json.loads(out.read_text())
    assert len(steps) == 3
    for order in steps[1:]:  # after the first step's one-off work
        # Reads of host-side tensors are no syncs on a GPU: the sampler's order and torch's CPU step counters.
        device = [s for s in order if not s.startswith(("torch/", os.path.join("megatrain", "data", "")))]
        assert [s.split(":")[0] for s in device] == [
            "megatrain/optim/deepspeed_adapter.py",  # the gradient norm: apply the update or not
            "megatrain/engine/trainer.py",  # after the step: the loss, the non-finite count, the stop flag
        ], order
