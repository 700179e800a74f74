"""`megatrain plan`: the memory plan of a layout (megatrain.engine.memory_plan), and with --build the
measurements of a real sharded build on every rank of the layout."""

from __future__ import annotations

from typing import Optional

from megatrain.engine.memory_plan import check_fits, format_plan, measure_build, plan_model_config, plan_stages
from megatrain.env import world_size

__all__ = ["plan_report", "build_report"]


def plan_report(cfg, world_size: int) -> str:
    """`megatrain plan` without --build: the config resolved for `world_size` processes (every check a
    launch makes before a process group starts), then the plan, and the fit warning if any."""
    from megatrain.engine.trainer import resolve_config

    resolve_config(cfg, world_size)
    text = format_plan(plan_stages(cfg, world_size))
    warning = check_fits(cfg, world_size)
    return text if warning is None else f"{text}\n{warning}"


def build_report(cfg) -> Optional[str]:
    """`megatrain plan --build` in each process of the layout: build this rank's model through the
    engine, measure it, and gather the measurements; rank 0 returns the plan with them (others None)."""
    import torch.distributed as dist

    from megatrain.engine.deepspeed import init_distributed
    from megatrain.engine.trainer import resolve_config
    from megatrain.parallel.groups import build_groups

    world = world_size()
    resolve_config(cfg, world)
    model_cfg = plan_model_config(cfg)
    plan = plan_stages(cfg, world, model_cfg)
    env = init_distributed(cfg)
    if cfg.parallel.pipeline > 1:  # DeepSpeed's pipe x data x model topology
        from megatrain.parallel.pipeline import build_pipeline_groups

        groups = build_pipeline_groups(cfg.parallel.tensor, cfg.parallel.pipeline)
    else:
        groups = build_groups(cfg.parallel.tensor, context=cfg.parallel.context)
    measured = measure_build(cfg, model_cfg, groups)
    gathered = [None] * env.world_size
    if env.world_size > 1:
        dist.all_gather_object(gathered, measured)
    else:
        gathered = [measured]
    return format_plan(plan, gathered) if env.is_main else None
