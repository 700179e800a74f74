"""Tensor-parallel layers against their single-process math, in 2 gloo processes (tp_checks.py):
vocab-parallel cross-entropy against torch's cross_entropy (both kernel backends), column/row-parallel
linears and the vocab-parallel embedding with and without sequence parallelism, the sequence-parallel
norm, and the whole parallelized model (split and replicated KV heads, tied head): loss, logits and
every gradient slice; interleaved head attention in exact and local TP modes; the low-rank kinds
(CoLA, SLTrain, LoRA) at TP=2; the bytes the TP collectives send against `tp_comm_volume`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, child_env, free_port

pytestmark = pytest.mark.slow


def test_tensor_parallel_layers_match_single_process():
    env = child_env()
    env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(free_port()),
            os.path.join("tests", "parallel", "tp_checks.py"),
            "cross_entropy",
            "linear_embedding",
            "sequence_parallel_norm",
            "model",
            "iha",
            "comm_volume",
            "lowrank",
            "relora",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    assert (
        "ok: cross_entropy linear_embedding sequence_parallel_norm model iha comm_volume lowrank relora" in proc.stdout
    )
