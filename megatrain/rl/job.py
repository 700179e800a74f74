"""The RL recipe: `megatrain rl` and `launch/rl.py` run `rl(cfg, resume)` in every process.

    RUN/                         run.dir of the RL job
      config.yaml                the resolved config
      pretrain/                  the pretraining run (only when rl.init is null; megatrain's pretrain recipe)
      from_step_N/base_eval.json the start checkpoint's own pass@k / perplexity (pipeline "none")
      from_step_N/PIPELINE/      one sub-run per start checkpoint x pipeline: config.yaml, metrics.jsonl,
                                 tb/, checkpoints/step_I/ (+ latest), eval.json once finished
      eval.jsonl                 one object per checkpoint x pipeline x k
      eval.md, eval.png, tb/     the table, the plot (pass@k vs pretraining step), the same in tensorboard

Composition: the stages of the job are here; where it starts (pretraining first, the start checkpoints)
is megatrain.rl.starts; each sub-run is an `Excursion` (megatrain.rl.excursion) running a registered
pipeline (megatrain.rl.pipelines) with the engine's checkpointer and logger; rollouts are
megatrain.rl.rollout; pass@k and perplexity megatrain.rl.evaluation (the engine's Validator).
"""

from __future__ import annotations

import json
import os
from typing import Optional

from megatrain.config import Config, save_config
from megatrain.distributed import barrier
from megatrain.engine.hf_import import is_hf_folder
from megatrain.engine.load import load_for_inference
from megatrain.engine.resilience import StopRequest
from megatrain.errors import CheckpointError, ConfigError
from megatrain.files import write_atomic
from megatrain.rl.config import pipelines, validate_rl
from megatrain.rl.evaluation import evaluate
from megatrain.rl.excursion import Excursion, stop_agreed
from megatrain.rl.rewards import load_reward
from megatrain.rl.starts import (
    Start,
    check_hf_init,
    check_start,
    cfg_has_mix,
    import_hf_init,
    mix_count,
    pretrain_config,
    pretrain_done,
    resolve_starts,
    with_mix_placeholder,
)
from megatrain.rl.tasks import task_splits, write_pretraining_mix

__all__ = ["rl", "preflight", "Excursion", "Start", "resolve_starts", "evaluate"]

RESULT_FILE = "eval.json"
_check_start = check_start  # the name tests/engine/test_hf.py imports


def preflight(cfg: Config, resume, world_size: int) -> Optional[Config]:
    """Validate, check the pipelines, the start points and the run directory; returns the pretraining config
    to run first (or None). Raises MegatrainError (one line) before anything is written."""
    validate_rl(cfg, world_size)  # the pipelines' own checks included
    run_dir = cfg.run.dir
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ConfigError(f"run.dir '{run_dir}' exists and is not a directory")
    if os.path.isdir(run_dir) and os.listdir(run_dir) and not resume:
        raise CheckpointError(
            f"run.dir '{run_dir}' already holds an RL run; pass --resume to continue it or choose another run.dir"
        )
    task_splits(cfg.rl.task)  # a missing, empty or malformed task file
    load_reward(cfg.rl.reward, cfg.rl.format_score)
    init = cfg.rl.init
    if init is None:
        pre = pretrain_config(cfg)
        from megatrain.engine.trainer import preflight as pretrain_preflight

        if not (os.path.isdir(pre.run.dir) and pretrain_done(pre)):
            pretrain_preflight(with_mix_placeholder(pre), True, world_size)
        return pre
    if is_hf_folder(init):
        check_hf_init(cfg, init)
    else:
        for start in resolve_starts(cfg.rl, init):
            check_start(cfg, start)
    return None


def _write_json(path: str, data) -> None:
    write_atomic(path, json.dumps(data, indent=1))


def _read_json(path: str):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def rl(cfg: Config, resume=False, stop_after: Optional[int] = None) -> list[dict]:
    """Run (or resume) the RL job in this process; returns the rows of RUN/eval.jsonl.

    `stop_after` (tests, preemptible jobs): stop every excursion after that many iterations, with a
    checkpoint, without writing results. SIGTERM / SIGUSR1 to any rank does the same at the next
    iteration (or before the next excursion; the pretraining stage stops as `megatrain pretrain` does),
    and the job returns [] so the command exits 0; `--resume` continues.
    """
    from megatrain.engine.deepspeed import init_distributed
    from megatrain.env import world_size

    world = world_size()
    pre = preflight(cfg, resume, world)
    env = init_distributed(cfg)
    stop = StopRequest()
    try:
        stop.install()  # SIGTERM / SIGUSR1: stop at the next iteration (or before the next excursion)
    except ValueError:
        stop = None  # not the main thread (an embedding application): it handles signals itself
    try:
        return _rl_stages(cfg, env, pre, stop, stop_after)
    finally:
        if stop is not None:
            stop.restore()


def _rl_stages(
    cfg: Config, env, pre: Optional[Config], stop: Optional[StopRequest], stop_after: Optional[int]
) -> list[dict]:
    """rl()'s stages in order: pretraining (rl.init null), each start's base evaluation, each excursion,
    the results. Returns [] when it stopped early (stop_after, or a stop signal)."""
    from megatrain.parallel.groups import build_groups

    if env.is_main:
        os.makedirs(cfg.run.dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.run.dir, "config.yaml"))
    init = _pretrain(cfg, env, pre) if pre is not None else cfg.rl.init
    if init is None:
        return []  # the pretraining stopped on a signal; the trainer said where
    if pre is None and is_hf_folder(init):
        init = import_hf_init(cfg, init, env)
    starts = resolve_starts(cfg.rl, init)
    for start in starts:
        check_start(cfg, start)
    groups = build_groups(cfg.parallel.tensor)
    problems = task_splits(cfg.rl.task)
    rows: list[dict] = []
    for start in starts:
        rows += _base_rows(cfg, env, start, problems, groups)
        for pipeline in pipelines(cfg.rl):
            found = _excursion(cfg, env, start, pipeline, problems, groups, stop, stop_after)
            if found is None:
                return []
            rows += [
                {"checkpoint": os.path.basename(start.path), "pretrain_step": start.step, "pipeline": pipeline, **r}
                for r in found
            ]
            barrier()
    if env.is_main:
        from megatrain.rl.study import write_results

        write_results(cfg.run.dir, rows, tensorboard=cfg.log.tensorboard)
    barrier()
    return rows


def _pretrain(cfg: Config, env, pre: Config) -> Optional[str]:
    """rl.init null: pretrain (or finish pretraining) into RUN/pretrain; returns that run directory, or None
    when a stop signal ended the pretraining early. Collective."""
    if not (os.path.isdir(pre.run.dir) and pretrain_done(pre)):
        from megatrain.engine.trainer import pretrain

        if cfg_has_mix(pre) and env.local_rank == 0 and not os.path.isfile(pre.data.source[-1]):
            write_pretraining_mix(
                pre.data.source[-1],
                cfg.rl.task.seed,
                mix_count(pre, cfg.rl.pretrain.task_fraction, cfg.rl.task.levels),
                list(cfg.rl.task.levels),
            )
        barrier()
        pretrain(pre, resume=True)  # its own stop handling: a signal checkpoints and returns
        barrier()
        if not pretrain_done(pre):
            return None
    return pre.run.dir


def _base_rows(cfg: Config, env, start: Start, problems, groups) -> list[dict]:
    """The start checkpoint's own evaluation (pipeline "none"), computed once into base_eval.json."""
    folder = cfg.run.path(start.name)
    base_file = os.path.join(folder, "base_eval.json")
    if os.path.isfile(base_file):
        base = _read_json(base_file)
    else:
        model, tokenizer, _ = load_for_inference(start.path, device=env.device)
        base = evaluate(model, tokenizer, problems[1], cfg, groups, env)
        del model
        if env.is_main:
            os.makedirs(folder, exist_ok=True)
            _write_json(base_file, base)
    return [
        {"checkpoint": os.path.basename(start.path), "pretrain_step": start.step, "pipeline": "none", **r} for r in base
    ]


def _excursion(
    cfg: Config,
    env,
    start: Start,
    pipeline: str,
    problems,
    groups,
    stop: Optional[StopRequest],
    stop_after: Optional[int],
) -> Optional[list[dict]]:
    """One sub-run's evaluation rows: from its eval.json when it finished before, else run (or resume) it
    and evaluate the result. None when it stopped early (stop_after, or a stop signal)."""
    sub = cfg.run.path(start.name, pipeline)
    result = os.path.join(sub, RESULT_FILE)
    if os.path.isfile(result):
        return _read_json(result)
    if stop_agreed(stop, env):
        if env.is_main:
            print(
                f"stopped before {pipeline} from {start.name} ({stop.name or 'a stop signal'}); the "
                f"finished parts are kept; continue with --resume",
                flush=True,
            )
        return None
    job = Excursion(cfg, env, start, pipeline, sub, problems, groups)
    job.run(stop_after, stop)
    if job.it < job.iterations:
        return None
    found = evaluate(job.engine.module, job.tokenizer, problems[1], cfg, groups, env)
    if env.is_main:
        _write_json(result, found)
    return found
