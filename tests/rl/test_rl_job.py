"""The RL job end to end on the session's tiny pretrained run: GRPO raises an easy reward, resume
mid-RL is exact, 2-process ZeRO-2 equals one process (GRPO and parallel averaging), outputs, and
bad inputs as one line with exit code 2 and nothing written."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.conftest import read_metrics, run_cli

# 4 prompts x 8 samples of 8 tokens per iteration; the reward is the share of the letter 'e'.
RL_JOB = ["rl.reward=tests.rl.toy_rewards.letter_e", "rl.group_size=8", "rl.prompts_per_step=4",
          "rl.max_new_tokens=8", "rl.micro_batch=16", "rl.eval.k=[1,2]", "rl.eval.samples=2", "rl.eval.problems=2",
          "log.progress=false", "log.eval_batches=1", "train.lr=2e-2", "train.warmup_steps=0",
          "train.schedule=constant", "optim.weight_decay=0.0", "parallel.zero_stage=2", "rl.kl_coef=0.01"]
PARITY_JOB = RL_JOB + ["rl.pipeline=[grpo,parallel_avg]", "rl.steps=3", "rl.mini_batch=16", "checkpoint.every=1"]


def _rl(run_dir, *extra, check=True, nproc=None):
    args = ["rl", *RL_JOB, f"run.dir={run_dir}", *extra]
    if nproc:
        args += ["--nproc-per-node", str(nproc)]
    return run_cli(args, check=check)


def _metrics(run_dir, start, pipeline):
    return read_metrics(os.path.join(run_dir, start, pipeline))


@pytest.mark.slow
def test_grpo_raises_an_easy_reward(tiny_run, tmp_path):
    run = tmp_path / "learn"
    _rl(run, f"rl.init={tiny_run}", "rl.steps=10", "checkpoint.every=0")
    rewards = [r["reward_mean"] for r in _metrics(run, "from_step_8", "grpo")]
    assert len(rewards) == 10
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.05, rewards


@pytest.mark.slow
def test_resume_is_exact_and_two_processes_equal_one(tiny_run, tmp_path):
    """The same 3 iterations of GRPO and of parallel averaging (ZeRO-2, KL on, 2 optimizer steps per
    rollout): straight, stopped after 1 and resumed, and in 2 processes."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    _rl(straight, f"rl.init={tiny_run}", *PARITY_JOB[len(RL_JOB):])
    # outputs: eval rows for the start (pipeline none) and each pipeline x k, the table, the plot
    rows = [json.loads(line) for line in open(straight / "eval.jsonl")]
    assert {(r["pipeline"], r["k"]) for r in rows} == {(p, k) for p in ("none", "grpo", "parallel_avg") for k in (1, 2)}
    assert all(r["pretrain_step"] == 8 and 0 <= r["pass_at_k"] <= 1 and r["val_ppl"] > 1 for r in rows)
    assert (straight / "eval.md").read_text().count("\n| 8 |") == 3 and (straight / "eval.png").stat().st_size > 0
    assert any(name.startswith("events") for name in os.listdir(straight / "tb"))
    ckpt = straight / "from_step_8" / "parallel_avg" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_3"

    _rl(stopped, f"rl.init={tiny_run}", *PARITY_JOB[len(RL_JOB):], "--stop-after", "1")
    assert not (stopped / "eval.jsonl").exists()
    _rl(stopped, f"rl.init={tiny_run}", *PARITY_JOB[len(RL_JOB):], "--resume")
    for pipeline in ("grpo", "parallel_avg"):
        a, b = _metrics(straight, "from_step_8", pipeline), _metrics(stopped, "from_step_8", pipeline)
        assert [r["step"] for r in b] == [1, 2, 3]
        for ra, rb in zip(a, b):
            for key in ("reward_mean", "loss", "entropy", "kl", "grad_norm"):
                assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-9), (pipeline, key, ra["step"])
    from safetensors.torch import load_file

    w1 = load_file(str(ckpt / "step_3" / "model.safetensors"))
    w2 = load_file(str(stopped / "from_step_8" / "parallel_avg" / "checkpoints" / "step_3" / "model.safetensors"))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)

    two = tmp_path / "two"
    _rl(two, f"rl.init={tiny_run}", *PARITY_JOB[len(RL_JOB):], nproc=2)
    for pipeline in ("grpo", "parallel_avg"):
        a, b = _metrics(straight, "from_step_8", pipeline), _metrics(two, "from_step_8", pipeline)
        assert len(a) == len(b) == 3
        for ra, rb in zip(a, b):
            for key in ("reward_mean", "loss", "entropy", "kl", "grad_norm"):
                assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), (pipeline, key, ra["step"])
    w2 = load_file(str(two / "from_step_8" / "parallel_avg" / "checkpoints" / "step_3" / "model.safetensors"))
    # Adam turns last-bit differences of near-zero gradients into lr-sized steps on a few entries:
    # compare the weights as a whole (the metrics above match to 1e-4).
    diff = sum((w1[k] - w2[k]).double().norm() ** 2 for k in w1) ** 0.5
    assert diff / sum(w1[k].double().norm() ** 2 for k in w1) ** 0.5 < 1e-3


def _bad(tmp_path, *extra, match):
    run = tmp_path / "bad"
    marker = None
    if run.exists():
        marker = sorted(os.listdir(run))
    proc = run_cli(["rl", f"run.dir={run}", "log.progress=false", *extra], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("megatrain: error")]
    assert len(lines) == 1 and match in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert (sorted(os.listdir(run)) if run.exists() else None) == marker  # nothing written or changed


def test_bad_inputs(tiny_run, tmp_path):
    init = f"rl.init={tiny_run}"
    _bad(tmp_path, init, "rl.group_size=1", match="rl.group_size must be >= 2")
    _bad(tmp_path, init, "rl.eval.samples=4", "rl.eval.k=[1,8]", match="rl.eval.k=8 is larger than rl.eval.samples=4")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _bad(tmp_path, init, f"rl.task.source={empty}", match="holds no records")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1?", "answer": 2}\n{"question": "x"}\n')
    _bad(tmp_path, init, f"rl.task.source={bad}", match="line 2 has no 'answer' field")
    _bad(tmp_path, init, "model.dim=128", match="was written with model.dim=64")
    other_tok = tmp_path / "other.model"
    other_tok.write_bytes(b"not the run's tokenizer")
    _bad(tmp_path, init, f"data.tokenizer={other_tok}", match="another tokenizer")
    _bad(tmp_path, f"rl.init={tmp_path}", match="is not a megatrain run or checkpoint")
    _bad(tmp_path, init, "rl.checkpoints=[step_5]", match="'step_5' is not a complete checkpoint")
    _bad(tmp_path, init, "rl.pipeline=ppo", match="rl.pipeline='ppo' is not allowed")
    _bad(tmp_path, init, "rl.reward=no_such_module_xyz.fn", match="cannot import")
    # A reward returning a non-number stops the run with one line naming it; an existing run is refused.
    proc = run_cli(["rl", *RL_JOB, init, f"run.dir={tmp_path / 'bad'}", "rl.reward=tests.rl.toy_rewards.broken",
                    "rl.steps=1"], check=False)
    assert proc.returncode == 2 and "rl.reward tests.rl.toy_rewards.broken returned None" in proc.stderr
    _bad(tmp_path, init, match="already holds an RL run")
