"""RL pipelines as registered strategies (megatrain.rl.pipelines): the built-in ones are registered, a
user's own pipeline is loaded by dotted path from outside the package and runs through `megatrain rl`."""

from __future__ import annotations

import json
import re

import pytest

from megatrain.errors import ConfigError
from megatrain.rl.pipelines import Pipeline, get_pipeline, register_pipeline, registered_pipelines
from tests.conftest import read_metrics, run_cli
from tests.rl.test_rl_job import RL_JOB

TOY = "toy_pipelines.AnchoredGRPO"


def test_registry_holds_the_built_in_pipelines_and_refuses_a_second_owner_of_a_name():
    assert registered_pipelines()[:5] == ["grpo", "sft", "sft_rl", "parallel_avg", "loss_mix"]
    sft = get_pipeline("sft")
    assert sft.name == "sft" and not sft.rollouts and sft.sft_iterations(type("RL", (), {"steps": 3})) == 3
    with pytest.raises(ConfigError, match="'grpo' is registered twice"):
        register_pipeline("grpo")(type("MyGRPO", (Pipeline,), {}))
    for bad, match in (
        ("ppo", "rl.pipeline='ppo' is not allowed"),
        ("../x", "rl.pipeline='../x' is not allowed"),
        ("no_such_module_xyz.P", "cannot import module 'no_such_module_xyz'"),
        ("megatrain.rl.pipelines.register_pipeline", "is not a Pipeline subclass"),
    ):
        with pytest.raises(ConfigError, match=re.escape(match)):
            get_pipeline(bad)


def test_a_pipeline_from_outside_the_package_runs_through_megatrain_rl(tiny_run, tmp_path):
    """toy_pipelines.AnchoredGRPO (tests/plugins/): one SFT iteration, then one RL iteration whose updates go
    through its own `update` and `loss`; its sub-run, metrics and evaluation rows carry its name."""
    run = tmp_path / "toy"
    run_cli(
        [
            "rl",
            *RL_JOB,
            f"rl.init={tiny_run}",
            f"run.dir={run}",
            f"rl.pipeline={TOY}",
            "rl.steps=1",
            "rl.group_size=2",
            "rl.prompts_per_step=2",
            "rl.micro_batch=4",
            "rl.eval.problems=1",
            "log.tensorboard=false",
            "checkpoint.every=0",
        ]
    )
    sft, rl_iteration = read_metrics(run / "from_step_8" / TOY)
    assert sft["step"] == 1 and sft["loss"] == sft["sft_loss"] > 0 and "reward_mean" not in sft
    assert rl_iteration["step"] == 2 and rl_iteration["anchored_updates"] == 1.0
    assert 0 <= rl_iteration["reward_mean"] <= 1 and rl_iteration["kl"] >= 0
    rows = [json.loads(line) for line in open(run / "eval.jsonl")]
    assert {(r["pipeline"], r["k"]) for r in rows} == {(p, k) for p in ("none", TOY) for k in (1, 2)}


def test_loss_mix_pairs_each_rl_micro_batch_with_its_place_in_the_sft_batch():
    """A rollout of two loss_mix updates: the second update's micro-batches (rollout micro-batches 2 and 3) get
    the SFT micro-batches 0 and 1 of their update's SFT batch, exactly as if they were the rollout's first."""
    import torch

    from megatrain.config import Config
    from megatrain.models.config import ModelConfig
    from megatrain.models.transformer import Transformer
    from megatrain.rl.rollout import Rollout
    from megatrain.rl.tasks import Problem
    from tests.rl.test_loss_mix import VOCAB, _excursion, _grads

    torch.manual_seed(0)
    model = Transformer(ModelConfig(preset="tiny", vocab_size=VOCAB, max_seq_len=64, init_std=0.1)).train()
    rl = Config().rl
    rl.mix_weight, rl.kl_coef = 0.3, 0.0
    problems = [Problem(question=f"{a}+{a + 1}", answer=str(2 * a + 1), solution=f"#### {2 * a + 1}") for a in range(8)]
    ex = _excursion(model, None, rl, problems, micro=2, gas=2)
    prompts = [ex.tokenizer.encode(p.prompt) for p in problems]
    completions = [[5 + i, 9, 11][: 1 + i % 3] for i in range(8)]
    ids_masks = [ex.sequences(prompts[s : s + 2], completions[s : s + 2]) for s in range(0, 8, 2)]
    old_logp = [torch.zeros(ids.shape[0], ids.shape[1] - 1) for ids, _ in ids_masks]
    advantages = torch.linspace(-1, 1, 8, dtype=torch.float64)
    roll = Rollout(
        ids_masks=ids_masks, old_logp=old_logp, advantages=advantages, keep=torch.ones(8, dtype=torch.float64)
    )
    first = Rollout(ids_masks=ids_masks[2:], old_logp=old_logp[2:], advantages=advantages[4:], keep=roll.keep[4:])
    model.zero_grad()
    ex.rl_step(roll, [2, 3], update=1, stats=torch.zeros(5, dtype=torch.float64))
    second_update = _grads(model)
    model.zero_grad()
    ex.rl_step(first, [0, 1], update=1, stats=torch.zeros(5, dtype=torch.float64))
    assert torch.equal(second_update, _grads(model))
