"""Resharding checkpoints between tensor-parallel, data-parallel and pipeline layouts.

A checkpoint written at one layout (PP x TP x DP, ZeRO 1 or 2) resumes at another through DeepSpeed's
universal checkpoint format: `convert_to_universal` runs DeepSpeed's converter
(deepspeed.checkpoint.ds_to_universal), which gathers each parameter's fp32 master weight and Adam
moments from the ZeRO shards of every DP rank and merges the TP slices with the patterns
`parallelize` records on the model from the tensor-parallel plan (megatrain.parallel.plan:
row-parallel weights along dim 1, replicated norms from one rank, the rest along dim 0). The
result lives in `step_N/universal/`, next to the original files, which it never modifies. A run at
the new layout then loads it with DeepSpeed's `load_universal`, which slices every tensor for the
new TP rank and re-partitions it over the new DP group.

One case DeepSpeed's merge rule does not cover: with fewer KV heads than TP ranks, each KV head's
slice is held by TP/kv_heads ranks. The converter concatenates all copies; `convert_to_universal`
keeps one of each, and `universal_for_layout` writes a view for a target layout that replicates KV
heads again, where DeepSpeed's loader expects it (the other parameter folders are symlinked).
Which parameters are split by KV head comes from the same plan (`is_kv_split`).

Pipeline stages (parallel.pipeline): DeepSpeed's converter reads a pipelined checkpoint's per-stage files
and names each parameter as the PipelineModule does (`3.block.attn.q_proj.weight`,
`tied_modules.embed.weight`; megatrain.parallel.pipeline). `convert_to_universal` stores every
parameter's folder under the Transformer's name (`blocks.2.attn.q_proj.weight`), whatever the source's
pipeline size, and adds the pipeline's name of each as a relative symlink to it: DeepSpeed's loader
looks a parameter up by the name the run's engine gives it, so one universal folder loads at any
pipeline size (with a tied head, its pipeline name and `embed.weight` are the same folder).

`megatrain reshard CHECKPOINT` runs the conversion ahead of time (it is otherwise done on resume).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil

import torch

from megatrain.engine.checkpoint import read_meta
from megatrain.errors import CheckpointError
from megatrain.parallel.groups import kv_replicas
from megatrain.parallel.pipeline import pipeline_name, transformer_name
from megatrain.parallel.plan import TP_PLAN, is_kv_split

__all__ = ["UNIVERSAL_DIR", "find_universal", "convert_to_universal", "universal_for_layout"]

UNIVERSAL_DIR = "universal"
_DONE = "megatrain-universal.json"


def _tensor_files(param_dir: str) -> list[str]:
    return [os.path.join(param_dir, f) for f in sorted(os.listdir(param_dir)) if f.endswith(".pt") and f != "step.pt"]


def _map_kv_tensors(zero_dir: str, fn) -> None:
    """Apply fn(tensor, dim) -> tensor to every saved state (fp32, exp_avg, exp_avg_sq) of K/V params;
    dim is the one the plan splits that parameter along (0 for dense K/V, 1 for a low-rank b factor)."""
    from deepspeed.checkpoint.constants import PARAM

    for name in sorted(os.listdir(zero_dir)):
        if os.path.islink(os.path.join(zero_dir, name)) or not is_kv_split(name):
            continue  # a pipeline name (an alias of a Transformer name) or not split by KV head
        dim = TP_PLAN.role_of_parameter(name).split[name.rpartition(".")[2]]
        for path in _tensor_files(os.path.join(zero_dir, name)):
            state = torch.load(path, weights_only=True)  # tensors, ints and flags only: nothing to unpickle
            state[PARAM] = fn(state[PARAM], dim).contiguous()
            torch.save(state, path)


def find_universal(checkpoint: str):
    """`checkpoint/universal` when a complete conversion is there, else None."""
    out = os.path.join(checkpoint, UNIVERSAL_DIR)
    return out if os.path.isfile(os.path.join(out, _DONE)) else None


def convert_to_universal(checkpoint: str, out: str = None) -> str:
    """Convert megatrain checkpoint directory `checkpoint` (ZeRO 1/2) to DeepSpeed's universal form.

    Writes `out` (default `checkpoint/universal`) through a temporary folder and a rename, so an
    interrupted conversion leaves nothing half-written; the checkpoint's own files are only read.
    Idempotent. Returns the universal folder. Raises CheckpointError (one line).
    """
    out = out or os.path.join(checkpoint, UNIVERSAL_DIR)
    if os.path.isfile(os.path.join(out, _DONE)):
        return out
    meta = read_meta(checkpoint)
    if meta.get("weights_only"):
        raise CheckpointError(
            f"checkpoint '{checkpoint}' holds weights only (megatrain import): it has no ZeRO state "
            f"to convert and starts a run at any parallel.tensor and process count as it is"
        )
    layout, model = meta["layout"], meta["model"]
    if layout["zero_stage"] not in (1, 2):
        raise CheckpointError(
            f"checkpoint '{checkpoint}' was written with parallel.zero_stage={layout['zero_stage']}; "
            f"changing parallel.tensor or the number of data-parallel ranks needs ZeRO stage 1 or 2 "
            f"(DeepSpeed universal checkpoints)"
        )
    tmp = out + ".tmp"
    _run_ds_to_universal(checkpoint, tmp)
    zero = os.path.join(tmp, "zero")
    if layout.get("pipeline", 1) > 1:
        _rename_to_transformer(zero, model["layers"])
    replicas = kv_replicas(model["kv_heads"], layout["tensor"])
    if replicas > 1:
        # Every KV head was saved by `replicas` TP ranks; keep one copy of each.
        def dedupe(t: torch.Tensor, dim: int) -> torch.Tensor:
            return torch.cat(t.chunk(layout["tensor"], dim=dim)[::replicas], dim=dim)

        _map_kv_tensors(zero, dedupe)
    _link_pipeline_names(zero, model["layers"], model.get("tie_embeddings", False))
    # DeepSpeed's loader reads the client state (step, data position) from the model-state files.
    for name in os.listdir(checkpoint):
        if re.fullmatch(r"mp_rank_\d+_model_states\.pt", name):
            shutil.copyfile(os.path.join(checkpoint, name), os.path.join(tmp, name))
    with open(os.path.join(tmp, _DONE), "w", encoding="utf-8") as fh:
        json.dump({"source_layout": layout, "kv_heads": model["kv_heads"]}, fh)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def _parameter_dirs(zero_dir: str) -> list[str]:
    """The per-parameter folders of a universal `zero/` folder (not optimizer_state.pt, not aliases)."""
    return [
        name
        for name in sorted(os.listdir(zero_dir))
        if os.path.isdir(os.path.join(zero_dir, name)) and not os.path.islink(os.path.join(zero_dir, name))
    ]


def _rename_to_transformer(zero_dir: str, layers: int) -> None:
    """Rename the per-parameter folders DeepSpeed's converter named after a PipelineModule's parameters to
    the Transformer's names."""
    for name in _parameter_dirs(zero_dir):
        try:
            target = transformer_name(name, layers)
        except ValueError:
            raise CheckpointError(
                f"universal checkpoint: '{name}' is not a parameter of the pipelined Transformer"
            ) from None
        os.replace(os.path.join(zero_dir, name), os.path.join(zero_dir, target))


def _link_pipeline_names(zero_dir: str, layers: int, tied: bool) -> None:
    """Each Transformer-named parameter folder under its pipeline name too, a relative symlink (what a
    pipelined run's engine looks up)."""
    for name in _parameter_dirs(zero_dir):
        alias = os.path.join(zero_dir, pipeline_name(name, layers, tied))
        if not os.path.lexists(alias):
            os.symlink(name, alias)


def _run_ds_to_universal(checkpoint: str, tmp: str) -> None:
    """DeepSpeed's converter from `checkpoint` into a fresh `tmp`, its output captured; a failure removes
    tmp and is one CheckpointError line."""
    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=checkpoint,
        output_folder=tmp,
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,
    )
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):  # its prints and progress bars
            ds_to_universal.main(args)
    except Exception as exc:  # the converter raises assorted types on damaged input
        shutil.rmtree(tmp, ignore_errors=True)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(
            f"checkpoint '{checkpoint}' could not be converted to a universal checkpoint "
            f"({type(exc).__name__}: {first})"
        ) from None


def universal_for_layout(universal: str, tensor: int, kv_heads: int, scratch: str) -> str:
    """The folder DeepSpeed should load for a run at TP size `tensor`.

    That is `universal` itself unless KV heads are replicated at the target layout: then a view in
    `scratch` whose K/V tensors repeat each head for the ranks that share it (DeepSpeed's loader
    slices every tensor into `tensor` equal parts), with every other entry symlinked.
    """
    replicas = kv_replicas(kv_heads, tensor)
    if replicas == 1:
        return universal
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(os.path.join(scratch, "zero"))
    for name in os.listdir(universal):
        if name != "zero":
            os.symlink(os.path.abspath(os.path.join(universal, name)), os.path.join(scratch, name))
    zero_src = os.path.join(universal, "zero")
    for name in os.listdir(zero_src):
        src = os.path.join(zero_src, name)
        if os.path.islink(src):  # a pipeline name: the same relative link to its folder in the view
            os.symlink(os.readlink(src), os.path.join(scratch, "zero", name))
        elif is_kv_split(name):
            shutil.copytree(src, os.path.join(scratch, "zero", name))
        else:
            os.symlink(os.path.abspath(src), os.path.join(scratch, "zero", name))

    def expand(t: torch.Tensor, dim: int) -> torch.Tensor:
        heads = t.chunk(kv_heads, dim=dim)
        return torch.cat([h for h in heads for _ in range(replicas)], dim=dim)

    _map_kv_tensors(os.path.join(scratch, "zero"), expand)
    return scratch
