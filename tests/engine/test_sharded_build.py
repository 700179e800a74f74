"""Sharded construction through the engine (`megatrain.engine.build.build_model`): under ZeRO-3 the
model is partitioned at construction and still gathers to the one-process weights bit for bit (in bf16:
the one-process fp32 weights rounded to bf16)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO, child_env, free_port

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "model",
    [
        ["model.linear=sltrain", "train.dtype=fp32"],
        ["model.attention=iha", "model.tie_embeddings=true", "train.dtype=bf16"],
        ["model.kv_heads=2", "train.dtype=fp32", "--initial-state"],
    ],
)
def test_zero3_partitioned_build_equals_one_process_weights(model):
    """2 gloo processes; SLTrain so that a non-partitioned buffer (the sparse support) is checked too, IHA
    (its mixing tensors) with a tied head in bf16 (the fp32 keyed values rounded into bf16 partitions),
    and a GQA model built from given weights (an imported run or train.init_from) instead of its keyed
    init."""
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
            "tests/engine/zero3_build_check.py",
            "model.preset=tiny",
            "model.vocab_size=512",
            *model,
            "parallel.zero_stage=3",
            "train.micro_batch=4",
            "train.global_batch=8",
        ],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("parameters held, all equal") == 2, proc.stdout[-3000:]
