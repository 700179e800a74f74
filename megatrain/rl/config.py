"""The `rl.*` config section: its schema and its checks.

The schema (`RLConfig` and its subsections) is registered with the central loader as the section `rl`
(`megatrain.config.register_section`), so YAML files, `rl.a=b` overrides, the saved config and
`megatrain config --reference` treat it like every other section; the loader checks each key's type.
`validate_rl(cfg, world_size)` runs in the RL job's preflight, before any process group starts:
every bad value is one line naming the key and what is allowed (ConfigError).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from megatrain.config import register_section
from megatrain.errors import ConfigError
from megatrain.fields import config_field as _f
from megatrain.rl.grpo import KL_ESTIMATORS, LOSS_AGG_MODES, SCALE_MODES

__all__ = ["RLConfig", "RLTaskConfig", "RLEvalConfig", "RLPretrainConfig", "pipelines", "validate_rl"]


@dataclass
class RLTaskConfig:
    """`rl.task.*`: problems with exact answers (megatrain/rl/tasks.py)."""

    source: str = _f(
        "embedded",
        "embedded (generated arithmetic word problems with step-by-step solutions) or a .jsonl file of problems.",
    )
    question_field: str = _f("question", "jsonl field holding the question.")
    answer_field: str = _f("answer", "jsonl field holding the exact answer.")
    solution_field: str = _f(
        "solution", "jsonl field holding a worked solution for SFT (optional per record; default target '#### ANSWER')."
    )
    levels: list[int] = _f([1, 2], "embedded: difficulty levels (operations per problem), cycled over the problems.")
    train_size: int = _f(4096, "embedded: training problems.")
    held_out: int = _f(64, "Held-out problems for pass@k (a jsonl file's last records).")
    seed: int = _f(0, "embedded: generator seed.")


@dataclass
class RLEvalConfig:
    """`rl.eval.*`: pass@k on the held-out problems and validation perplexity on the pretraining corpus."""

    k: list[int] = _f([1, 8, 32], "pass@k values reported (unbiased estimator; each <= rl.eval.samples).")
    samples: int = _f(32, "Samples n per held-out problem.")
    problems: Optional[int] = _f(None, "Held-out problems evaluated (default: all of rl.task.held_out).")
    temperature: float = _f(1.0, "Sampling temperature of the evaluation.")
    every: int = _f(0, "Also evaluate every N RL iterations (0: only at the start and the end).")


@dataclass
class RLPretrainConfig:
    """`rl.pretrain.*`: the run pretrained first (into RUN/pretrain) when rl.init is null."""

    config: Optional[str] = _f(
        None, "Pretraining YAML (e.g. launch/configs/tiny-cpu.yaml); needed when rl.init is null."
    )
    overrides: list[str] = _f([], "a.b=c overrides applied to it (run.dir is set to RUN/pretrain).")
    task_fraction: float = _f(
        0.0,
        "Fraction of the pretraining text (by characters, approximately) made of solved "
        "arithmetic problems mixed into the corpus, in [0, 1).",
    )


@dataclass
class RLConfig:
    """`rl.*`: the RL job (`megatrain rl`); the update side reuses train.lr/schedule, optim.*, parallel.*,
    checkpoint.*, log.*. docs: megatrain/rl/job.py."""

    init: Optional[str] = _f(
        None,
        "Start point: a megatrain run or checkpoint directory, or a Hugging Face Llama "
        "folder (imported into RUN/init; docs/huggingface.md); null: pretrain one first, see "
        "rl.pretrain.",
    )
    checkpoints: Optional[str | list[str | int]] = _f(
        None,
        "Run the excursion from each of these checkpoints of the init run ([step_500, ...] or all), each into "
        "RUN/from_step_N/; null: from rl.init itself.",
    )
    pipeline: str | list[str] = _f(
        "grpo",
        "grpo, sft, sft_rl, parallel_avg or loss_mix, a Pipeline class of your own as package.module.Class "
        "(docs/rl.md), or a list of them (each its own sub-run RUN/from_step_N/PIPELINE).",
    )
    mix_weight: float = _f(0.5, "loss_mix: loss = w L_RL + (1 - w) L_SFT.")
    reward: str = _f("megatrain.rl.rewards.math_reward", "reward(prompt, completion, answer) -> float, by dotted path.")
    format_score: float = _f(0.1, "Built-in reward for a well-formed but wrong answer.")
    task: RLTaskConfig = field(default_factory=RLTaskConfig)
    group_size: int = _f(16, "Samples per prompt (GRPO group), >= 2.")
    prompts_per_step: int = _f(8, "Prompts per RL iteration (global; a multiple of the data-parallel size).")
    max_new_tokens: int = _f(64, "Longest completion.")
    temperature: float = _f(1.0, "Rollout sampling temperature (> 0).")
    top_p: float = _f(1.0, "Rollout nucleus sampling.")
    scale_rewards: str = _f(
        "group",
        "Advantage scaling: (r - group mean) / std of the group, of the batch, or none.",
        choices=["group", "batch", "none"],
    )
    clip_low: float = _f(0.2, "PPO ratio clip below: 1 - clip_low.")
    clip_high: float = _f(0.2, "PPO ratio clip above: 1 + clip_high (DAPO clip-higher: 0.28).")
    dual_clip: Optional[float] = _f(
        None, "Dual clip c > 1 bounding the loss of negative-advantage tokens (verl: 3); null off."
    )
    loss_agg: str = _f(
        "token-mean", "Loss aggregation.", choices=["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
    )
    kl_coef: float = _f(0.001, "KL penalty coefficient to the frozen start model (0: no reference model).")
    kl_estimator: str = _f("k3", "KL estimator.", choices=["k1", "k2", "k3"])
    kl_in: str = _f(
        "loss", "Where the KL penalty goes: the loss, or subtracted from the reward.", choices=["loss", "reward"]
    )
    ppo_epochs: int = _f(1, "Passes over each rollout batch.")
    mini_batch: Optional[int] = _f(
        None,
        "Sequences per optimizer step (global; a multiple of group_size); default: "
        "the whole rollout batch. SFT steps use the same size.",
    )
    micro_batch: int = _f(16, "Sequences per forward/backward per process.")
    dynamic_filter: bool = _f(False, "Drop groups whose rewards are all equal (zero advantage) from the loss.")
    mask_truncated: bool = _f(
        False,
        "Give zero loss weight to completions cut at rl.max_new_tokens without EOS or "
        "a stop (TRL's mask_truncated_completions, DAPO's overlong filtering; off by "
        "default as in TRL). They still count in the group advantages; the share is logged "
        "as `truncated`.",
    )
    steps: int = _f(50, "RL iterations (rollout + update); for sft, SFT steps.")
    sft_steps: int = _f(20, "sft_rl: SFT steps before the RL iterations.")
    seed: int = _f(0, "Seed of prompt order and sampling.")
    eval: RLEvalConfig = field(default_factory=RLEvalConfig)
    pretrain: RLPretrainConfig = field(default_factory=RLPretrainConfig)


register_section("rl", RLConfig)


def pipelines(rl) -> list[str]:
    """rl.pipeline as a list of names."""
    names = rl.pipeline if isinstance(rl.pipeline, (list, tuple)) else [rl.pipeline]
    return [str(n) for n in names]


def validate_rl(cfg, world_size: int = 1) -> None:
    """The rl.* section against itself and the machine; each pipeline of rl.pipeline (a registered name or
    a user's Pipeline class by dotted path, megatrain/rl/pipelines.py) checks what it needs."""
    from megatrain.parallel.checks import check_pretraining_only_layouts
    from megatrain.rl.pipelines import check_pipelines, registered_pipelines

    check_pretraining_only_layouts(cfg, "rl")
    rl = cfg.rl
    names = pipelines(rl)
    if not names:
        raise ConfigError(
            f"rl.pipeline is empty (allowed: {', '.join(registered_pipelines())}, a Pipeline class "
            f"as package.module.Class, or a list of them)"
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"rl.pipeline lists a pipeline twice: {names}")
    check_pipelines(cfg, world_size, names)
    _validate_sampling(rl)
    _validate_batches(rl, max(1, world_size // cfg.parallel.tensor))
    _validate_task(rl.task)
    _validate_eval(rl)
    _validate_start(rl)


def _validate_sampling(rl) -> None:
    """Group size, step counts, the sampling, clipping and loss settings."""
    if rl.group_size < 2:
        raise ConfigError(f"rl.group_size must be >= 2 (GRPO compares samples within a group), got {rl.group_size}")
    for key in ("prompts_per_step", "max_new_tokens", "ppo_epochs", "micro_batch", "steps"):
        if getattr(rl, key) < 1:
            raise ConfigError(f"rl.{key} must be >= 1, got {getattr(rl, key)}")
    if rl.sft_steps < 0:
        raise ConfigError(f"rl.sft_steps must be >= 0, got {rl.sft_steps}")
    if not rl.temperature > 0:
        raise ConfigError(f"rl.temperature must be > 0 (rollouts sample), got {rl.temperature}")
    if not 0.0 < rl.top_p <= 1.0:
        raise ConfigError(f"rl.top_p must be in (0, 1], got {rl.top_p}")
    if not 0.0 <= rl.clip_low < 1.0:
        raise ConfigError(f"rl.clip_low must be in [0, 1), got {rl.clip_low}")
    if not rl.clip_high >= 0.0:
        raise ConfigError(f"rl.clip_high must be >= 0, got {rl.clip_high}")
    if rl.dual_clip is not None and not rl.dual_clip > 1.0:
        raise ConfigError(f"rl.dual_clip must be > 1 (verl's default is 3) or null, got {rl.dual_clip}")
    if rl.scale_rewards not in SCALE_MODES:
        raise ConfigError(f"rl.scale_rewards={rl.scale_rewards!r} is not allowed (allowed: {', '.join(SCALE_MODES)})")
    if rl.loss_agg not in LOSS_AGG_MODES:
        raise ConfigError(f"rl.loss_agg={rl.loss_agg!r} is not allowed (allowed: {', '.join(LOSS_AGG_MODES)})")
    if rl.kl_estimator not in KL_ESTIMATORS:
        raise ConfigError(f"rl.kl_estimator={rl.kl_estimator!r} is not allowed (allowed: {', '.join(KL_ESTIMATORS)})")
    if not rl.kl_coef >= 0:
        raise ConfigError(f"rl.kl_coef must be >= 0, got {rl.kl_coef}")
    if not 0.0 <= rl.mix_weight <= 1.0:
        raise ConfigError(f"rl.mix_weight must be in [0, 1], got {rl.mix_weight}")
    if not math.isfinite(rl.format_score):
        raise ConfigError(f"rl.format_score must be a finite number, got {rl.format_score}")


def _validate_batches(rl, dp: int) -> None:
    """The rollout, mini-batch and micro-batch arithmetic over `dp` data-parallel ranks."""
    if rl.prompts_per_step % dp:
        raise ConfigError(
            f"rl.prompts_per_step={rl.prompts_per_step} must be a multiple of the data-parallel size {dp}"
        )
    rollout = rl.prompts_per_step * rl.group_size
    mini = rl.mini_batch if rl.mini_batch is not None else rollout
    if mini < 1 or rollout % mini or mini % rl.group_size or (mini // rl.group_size) % dp:
        raise ConfigError(
            f"rl.mini_batch={rl.mini_batch} must divide the rollout batch rl.prompts_per_step x "
            f"rl.group_size = {rollout} in whole groups of {rl.group_size}, and those groups must split "
            f"over the data-parallel size {dp}"
        )
    local = mini // dp
    if local % min(rl.micro_batch, local):
        raise ConfigError(
            f"rl.micro_batch={rl.micro_batch} must divide the sequences per process per optimizer "
            f"step ({local} = rl.mini_batch / data-parallel size)"
        )


def _validate_task(t) -> None:
    if t.source != "embedded" and not str(t.source).endswith(".jsonl"):
        raise ConfigError(f"rl.task.source={t.source!r} must be 'embedded' or a .jsonl file")
    levels = t.levels if isinstance(t.levels, list) else None
    if not levels or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in levels):
        raise ConfigError(f"rl.task.levels must be a non-empty list of integers >= 1, got {t.levels!r}")
    if t.train_size < 1 or t.held_out < 1:
        raise ConfigError("rl.task.train_size and rl.task.held_out must be >= 1")


def _validate_eval(rl) -> None:
    e = rl.eval
    ks = e.k if isinstance(e.k, list) else None
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ConfigError(f"rl.eval.k must be a non-empty list of integers >= 1, got {e.k!r}")
    if e.samples < 1:
        raise ConfigError(f"rl.eval.samples must be >= 1, got {e.samples}")
    if max(ks) > e.samples:
        raise ConfigError(
            f"rl.eval.k={max(ks)} is larger than rl.eval.samples={e.samples} (pass@k needs k <= n samples)"
        )
    if e.problems is not None and not 1 <= e.problems <= rl.task.held_out:
        raise ConfigError(f"rl.eval.problems must be in [1, rl.task.held_out={rl.task.held_out}], got {e.problems}")
    if not e.temperature > 0:
        raise ConfigError(f"rl.eval.temperature must be > 0, got {e.temperature}")
    if e.every < 0:
        raise ConfigError(f"rl.eval.every must be >= 0, got {e.every}")


def _validate_start(rl) -> None:
    ck = rl.checkpoints
    if ck is not None and ck != "all":
        if (
            not isinstance(ck, list)
            or not ck
            or not all(isinstance(c, (str, int)) and not isinstance(c, bool) for c in ck)
        ):
            raise ConfigError(f"rl.checkpoints must be null, 'all', or a list like [step_500, step_1000], got {ck!r}")
    p = rl.pretrain
    if rl.init is None:
        if p.config is None:
            raise ConfigError(
                "rl.init is null and rl.pretrain.config is not set: give a run or checkpoint to start "
                "from (rl.init) or a pretraining YAML to train one first (rl.pretrain.config)"
            )
    if not isinstance(p.overrides, list) or not all(isinstance(o, str) and "=" in o for o in p.overrides):
        raise ConfigError(f"rl.pretrain.overrides must be a list of a.b=c strings, got {p.overrides!r}")
    if not 0.0 <= p.task_fraction < 1.0:
        raise ConfigError(f"rl.pretrain.task_fraction must be in [0, 1), got {p.task_fraction}")
