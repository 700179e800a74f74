"""`megatrain bench`: every setting of one config timed against its baselines, then one report.

Settings that need one process run in this process, one after another; a setting with several
processes (TP, or procs=N) runs under torchrun (`python -m megatrain.bench.worker`) and hands its
record back as JSON. Every setting is checked (config, batch arithmetic, data sources) before the
first one is timed, so a typo costs one line, not a half-finished benchmark. A setting that fails
while running is recorded with its error and the others still run.
"""

from __future__ import annotations

import gc
import json
import os
import re
import platform
import shutil
import subprocess
import sys
import tempfile
from typing import Optional

import torch

from megatrain.bench.baseline import transformers_version
from megatrain.bench.measure import kernels_env, measure_setting
from megatrain.bench.report import render_markdown, source_commit, write_results
from megatrain.bench.settings import Setting
from megatrain.config import load_config
from megatrain.errors import ConfigError, MegatrainError

# Keys the benchmark owns: its scratch run directory and no progress bar or event files.
_FIXED = ["log.progress=false", "log.tensorboard=false"]


def setting_config(
    config_path: Optional[str],
    overrides: list[str],
    setting: Setting,
    run_dir: str,
    deepspeed_json: Optional[str] = None,
):
    """The setting's Config: the base YAML, the user's overrides, the setting's, then the scratch run dir."""
    return load_config(config_path, [*overrides, *setting.overrides, f"run.dir={run_dir}", *_FIXED], deepspeed_json)


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def versions() -> dict:
    from importlib import metadata

    import deepspeed

    try:
        megatrain_version = metadata.version("megatrain")
    except metadata.PackageNotFoundError:  # a checkout on sys.path, not installed
        megatrain_version = None
    return {
        "megatrain": megatrain_version,
        "commit": source_commit(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers_version(),
        "python": platform.python_version(),
    }


def _model_description(cfg) -> str:
    m = cfg.model.resolved()
    return (
        f"{cfg.model.preset or 'custom'} model: dim {m.dim}, {m.layers} layers, {m.heads} heads ({m.kv_heads} KV), "
        f"FFN {m.ffn_dim}, {m.linear} / {m.attention}"
    )


def _tp_comm(cfg, record: dict) -> Optional[dict]:
    if cfg.parallel.tensor == 1:
        return None
    from megatrain.parallel.parallelize import tp_comm_volume

    model_cfg = cfg.model.resolved()
    model_cfg.vocab_size = record["vocab_size"]
    return tp_comm_volume(
        model_cfg,
        record["tokens_per_step"],
        cfg.parallel.tensor,
        sequence_parallel=cfg.parallel.sequence,
        bytes_per_element=2 if record["dtype"] == "bf16" else 4,
    )


def _child_env(setting: Setting, procs: int) -> dict:
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // procs))
    if setting.kernels is not None:
        env["MEGATRAIN_KERNELS"] = setting.kernels
    return env


def _run_in_processes(spec: dict, setting: Setting, procs: int, scratch: str) -> dict:
    """One setting under torchrun; returns its record, or {"error": ...} when the run failed."""
    from megatrain.engine.deepspeed import _free_port

    spec_path = os.path.join(scratch, "spec.json")
    out_path = os.path.join(scratch, "record.json")
    with open(spec_path, "w") as fh:
        json.dump(spec, fh)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(procs),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        "-m",
        "megatrain.bench.worker",
        spec_path,
        out_path,
    ]
    proc = subprocess.run(cmd, env=_child_env(setting, procs), capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.exists(out_path):
        lines = proc.stderr.splitlines()
        errors = [line for line in lines if line.startswith("megatrain: error")]
        # else a rank's exception line ("[rank1]: RuntimeError: ..."), else the last one (torchrun's summary)
        raised = [line for line in lines if re.match(r"(\[rank\d+\]:\s*)?[A-Za-z_][\w.]*(Error|Exception)\b", line)]
        errors = errors or [line for line in raised if line.startswith("[rank")][:1] or raised[-1:]
        tail = errors[0] if errors else (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"the {procs}-process run exited {proc.returncode}: {tail}"}
    with open(out_path) as fh:
        return json.load(fh)


def run_bench(
    config_path: Optional[str],
    overrides: list[str],
    settings: list[Setting],
    *,
    out_dir: str,
    stem: Optional[str] = None,
    warmup: int = 3,
    steps: int = 20,
    block: int = 5,
    breakdown_steps: int = 2,
    profile_steps: int = 0,
    baseline: bool = True,
    plain: bool = True,
    plot: bool = False,
    deepspeed_json: Optional[str] = None,
    command: Optional[str] = None,
    echo: bool = True,
    clock: str = "wall",
    threads: Optional[int] = None,
) -> dict:
    """Time every setting; write STEM.json / STEM.md (/ STEM.png) under out_dir; returns the result dict
    (with `paths`). Raises ConfigError (one line) for a bad option, config or setting before timing."""
    from megatrain.data import check_sources
    from megatrain.engine.deepspeed import check_deepspeed_for, init_distributed
    from megatrain.engine.trainer import resolve_config

    for name, value, least in (
        ("--steps", steps, 1),
        ("--warmup", warmup, 1),
        ("--block", block, 1),
        ("--breakdown-steps", breakdown_steps, 0),
        ("--profile", profile_steps, 0),
    ):
        if value < least:
            raise ConfigError(f"{name} must be >= {least}, got {value}")
    if clock not in ("wall", "cpu"):
        raise ConfigError(f"--clock {clock} (allowed: wall, cpu)")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    scratch_root = tempfile.mkdtemp(prefix="megatrain-bench-")
    try:
        planned = []
        for i, setting in enumerate(settings):
            run_dir = os.path.join(scratch_root, f"setting-{i}")
            with kernels_env(setting.kernels):
                cfg = setting_config(config_path, overrides, setting, run_dir, deepspeed_json)
                procs = setting.process_count(cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.context)
                try:
                    resolve_config(cfg, procs)
                except ConfigError as exc:
                    raise ConfigError(f"setting '{setting.label}': {exc}") from None
                check_sources(cfg)
                check_deepspeed_for(cfg)
            planned.append((setting, cfg, procs, run_dir))
        base_cfg = planned[0][1]
        config_name = os.path.basename(config_path) if config_path else "defaults"
        device_kind = "gpu" if torch.cuda.is_available() else "cpu"
        stem = stem or f"bench-{os.path.splitext(config_name)[0]}-{device_kind}"
        result = {
            "config": config_path,
            "config_name": config_name,
            "overrides": list(overrides),
            "device": device_name(),
            "versions": versions(),
            "command": command or "megatrain bench",
            "model": {"description": _model_description(base_cfg)},
            "base_config": base_cfg.to_dict(),
            "settings": [],
        }
        options = dict(
            warmup=warmup,
            steps=steps,
            block=block,
            breakdown_steps=breakdown_steps,
            profile_steps=profile_steps,
            baseline=baseline,
            plain=plain,
            clock=clock,
            threads=threads,
        )
        env = None
        for i, (setting, cfg, procs, run_dir) in enumerate(planned):
            if echo:
                print(
                    f"bench: setting {i + 1}/{len(planned)} '{setting.label}' ({procs} process"
                    f"{'es' if procs > 1 else ''})",
                    flush=True,
                )
            if procs == 1:
                try:
                    with kernels_env(setting.kernels):
                        if env is None:
                            env = init_distributed(cfg)
                        resolve_config(cfg, 1)
                        record = measure_setting(cfg, env, **options)
                except MegatrainError as exc:
                    record = {"error": str(exc)}
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            else:
                spec = {
                    "config": config_path,
                    "overrides": list(overrides),
                    "setting": setting.to_dict(),
                    "run_dir": run_dir,
                    "deepspeed": deepspeed_json,
                    "options": options,
                }
                scratch = os.path.join(scratch_root, f"spec-{i}")
                os.makedirs(scratch)
                record = _run_in_processes(spec, setting, procs, scratch)
            record.update(label=setting.label, setting=setting.to_dict(), procs=procs)
            if "error" not in record:
                record["tp_comm"] = _tp_comm(cfg, record)
                result["model"].setdefault("params", record["params"])
                result["model"].setdefault("flops_per_token", record["flops_per_token"])
            result["settings"].append(record)
            result["settings_planned"] = len(planned)
            if "params" in result["model"] and i + 1 < len(planned):
                # What is measured so far, on disk: a long benchmark stopped midway still leaves its table.
                write_results(result, out_dir, stem)
        if "params" not in result["model"]:
            raise MegatrainError(
                "every setting failed: " + "; ".join(f"{s['label']}: {s['error']}" for s in result["settings"])
            )
        result["paths"] = write_results(result, out_dir, stem, plot=plot)
        if echo:
            print(render_markdown(result), end="")
            print("wrote " + ", ".join(result["paths"].values()))
        return result
    finally:
        shutil.rmtree(scratch_root, ignore_errors=True)
