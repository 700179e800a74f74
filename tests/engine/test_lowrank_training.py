"""Each low-rank kind trains the tiny model through the CLI under 2-process ZeRO-2 with a falling
loss, and a run resumed from its mid-run checkpoint continues bit for bit; then load/export.

One straight run per kind saves at step 30 of 60; a second run resumes from that checkpoint in a
new run directory and must log exactly the straight run's losses for steps 31..60. ReLoRA runs with
a warm start and restarts at steps 6 (adapters on), 18, 30, 42, 54, so the resume starts on a merge.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.conftest import read_metrics, run_cli

pytestmark = pytest.mark.slow

STEPS, SAVE_AT = 60, 30
JOB = [
    "model.preset=tiny",
    "data.source=embedded",
    "data.seq_len=32",
    "data.vocab_size=512",
    f"train.steps={STEPS}",
    "train.micro_batch=4",
    "train.global_batch=8",
    "train.lr=3e-3",
    "train.warmup_steps=5",
    "train.seed=7",
    "log.every=1",
    "log.eval_every=0",
    "log.progress=false",
    "checkpoint.keep=0",
    f"checkpoint.every={SAVE_AT}",
    "parallel.zero_stage=2",
]
KINDS = {
    "cola": ["model.linear=cola"],
    "sltrain": ["model.linear=sltrain", "model.lowrank.density=0.05"],
    "relora": [
        "model.linear=relora",
        "train.relora.every=12",
        "train.relora.restart_warmup=3",
        "train.relora.warm_start_steps=6",
    ],
    "lora": ["model.linear=lora"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lowrank-runs")
    done: dict[str, tuple[str, str]] = {}

    def get(kind: str) -> tuple[str, str]:
        if kind not in done:
            straight, resumed = str(root / kind), str(root / f"{kind}-resumed")
            common = ["pretrain", "--nproc-per-node", "2", *JOB, *KINDS[kind]]
            run_cli([*common, f"run.dir={straight}"])
            run_cli(
                [
                    *common,
                    f"run.dir={resumed}",
                    "--resume-from",
                    os.path.join(straight, "checkpoints", f"step_{SAVE_AT}"),
                ]
            )
            done[kind] = (straight, resumed)
        return done[kind]

    return get


@pytest.mark.parametrize("kind", list(KINDS))
def test_trains_and_resumes_exactly_under_zero2(runs, kind):
    straight, resumed = runs(kind)
    first = read_metrics(straight)
    assert [r["step"] for r in first] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in first]
    start, end = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert end < start - 0.5, (kind, start, end)
    second = read_metrics(resumed)
    assert [r["step"] for r in second] == list(range(SAVE_AT + 1, STEPS + 1))
    assert [r["loss"] for r in second] == losses[SAVE_AT:]  # bit for bit
    assert [r["lr"] for r in second] == [r["lr"] for r in first][SAVE_AT:]


def test_relora_restarts_rewarm_the_learning_rate(runs):
    straight, _ = runs("relora")
    lr = {r["step"]: r["lr"] for r in read_metrics(straight)}  # logged at step s = optimizer step s - 1
    for restart in (6, 18, 30, 42, 54):
        assert lr[restart + 1] < 0.5 * lr[restart], restart  # drops at the restart, then re-warms
        assert lr[restart + 3] > lr[restart + 1]


def _load(path):
    import megatrain

    model, tokenizer, cfg = megatrain.load(path)
    ids = torch.tensor([tokenizer.encode("It is a truth universally acknowledged")])
    with torch.no_grad():
        return model(ids), cfg


def test_sltrain_support_is_identical_after_resume(runs):
    from safetensors.torch import load_file

    straight, resumed = runs("sltrain")
    saved = load_file(os.path.join(straight, "checkpoints", f"step_{SAVE_AT}", "model.safetensors"))
    final = load_file(os.path.join(straight, "checkpoints", f"step_{STEPS}", "model.safetensors"))
    final_resumed = load_file(os.path.join(resumed, "checkpoints", f"step_{STEPS}", "model.safetensors"))
    supports = [k for k in saved if k.endswith("sparse_index")]
    assert len(supports) == 14
    for k in supports:
        assert torch.equal(saved[k], final[k]) and torch.equal(saved[k], final_resumed[k]), k
    for k in final:
        assert torch.equal(final[k], final_resumed[k]), k  # the resumed run ends on the same weights


@pytest.mark.parametrize("kind", ["sltrain", "relora"])
def test_load_and_dense_export(runs, tmp_path, kind):
    straight, _ = runs(kind)
    logits, cfg = _load(straight)
    assert cfg.linear == kind
    from megatrain.engine.export import export_hf_llama

    out = export_hf_llama(straight, str(tmp_path / "hf"))
    exported, exported_cfg = _load(out)
    assert exported_cfg.linear == "dense"
    torch.testing.assert_close(exported, logits, rtol=1e-4, atol=1e-4)


def test_cola_loads_and_refuses_export(runs, tmp_path):
    straight, _ = runs("cola")
    logits, cfg = _load(straight)
    assert cfg.linear == "cola" and torch.isfinite(logits).all()
    from megatrain.engine.export import export_hf_llama
    from megatrain.errors import CheckpointError

    with pytest.raises(CheckpointError, match="model.linear=cola") as err:
        export_hf_llama(straight, str(tmp_path / "hf"))
    assert "\n" not in str(err.value)
