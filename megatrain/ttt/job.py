"""The qTTT job: `megatrain ttt --config launch/configs/ttt-tiny-cpu.yaml [a.b=c ...]`.

preflight (config, run dir, the model to load) -> without ttt.init, pretrain a model on the
retrieval task through the pretraining recipe into RUN/pretrain -> load it -> accuracy per
(context length, depth) with and without qTTT and the thinking baseline -> RUN/ttt.jsonl (one
record per cell), RUN/ttt.md (table) and RUN/ttt.png (heat maps depth x length).

With parallel.context = C (`megatrain ttt --nproc-per-node C ... parallel.context=C`) the job runs in one
context group of C processes: its pretraining (without ttt.init) is context-parallel, each context prefill is
split over them (every rank ends with the whole cache), the adaptation and the answers run whole on every
rank, so all compute the same records; rank 0 logs and writes the outputs.
"""

from __future__ import annotations

import copy
import json
import os
import time
from typing import Optional

import numpy as np

from megatrain.errors import CheckpointError, ConfigError

__all__ = ["run_ttt", "preflight", "write_outputs", "markdown_table", "heatmap"]


def preflight(cfg, world_size: int = 1) -> Optional[str]:
    """Every check that needs no training: ttt.*, the run directory, ttt.init, the layout of `world_size`
    processes. Returns the path to load (None: pretrain first)."""
    from megatrain.config import validate
    from megatrain.ttt.config import check_against_model, validate_ttt

    validate_ttt(cfg)
    if os.path.exists(cfg.run.dir) and not os.path.isdir(cfg.run.dir):
        raise ConfigError(f"run.dir '{cfg.run.dir}' exists and is not a directory")
    init = cfg.ttt.init
    if init is None:
        validate(cfg)
        model_cfg = cfg.model.resolved()
        check_against_model(cfg, model_cfg)
    elif not os.path.isdir(init):
        raise CheckpointError(f"ttt.init: '{init}' is not a run, checkpoint or export directory")
    check_layout(cfg, world_size, init)
    return init


def check_layout(cfg, world_size: int, init: Optional[str]) -> None:
    """ConfigError (one line) unless the job runs in one process, or in one context group: parallel.context = C
    processes that split each context prefill (megatrain.parallel.context_parallel.context_prefill) and run the
    adaptation and the answers whole, each of them (no data or tensor parallelism)."""
    from megatrain.engine.load import source_model
    from megatrain.parallel.checks import check_context_split

    context = cfg.parallel.context
    if context == 1 and world_size == 1:
        return
    if cfg.parallel.tensor != 1:
        raise ConfigError(
            f"parallel.tensor={cfg.parallel.tensor}: the ttt job runs in one process or one context group "
            f"(parallel.context); it needs parallel.tensor=1"
        )
    if world_size != context:
        raise ConfigError(
            f"the ttt job runs in one context group: {world_size} processes (--nproc-per-node) with "
            f"parallel.context={context}; start parallel.context processes"
        )
    if init is None:  # the job pretrains its model first, context-parallel as well
        check_context_split(cfg.model.resolved(), context, seq_len=cfg.data.seq_len)
        return
    check_context_split(source_model(init)[0].resolved(), context)


def _embedded_tokenizer(data_cfg):
    from megatrain.data.sources import resolve_sources
    from megatrain.data.tokenizer import get_tokenizer

    return get_tokenizer(data_cfg, resolve_sources("embedded"))


def pretrain_for_ttt(cfg, log=print, groups=None) -> str:
    """Pretrain this config's model on retrieval documents (training novels as haystack) into
    RUN/pretrain; reuse it when a finished run is already there, continue it from its latest checkpoint
    when one stopped on a signal. Returns the run directory.

    `groups` (a context-parallel job, parallel.context = C processes): every rank calls this; rank 0 trains
    the tokenizer and writes the documents, then the C ranks pretrain together, context-parallel."""
    from megatrain.engine.checkpoint import resolve_checkpoint_dir
    from megatrain.engine.trainer import pretrain

    first = groups is None or groups.rank == 0
    sync = _barrier if groups is not None else lambda: None
    run = os.path.join(cfg.run.dir, "pretrain")
    sync()  # every rank decides on what is there before rank 0 writes anything
    if os.path.isdir(run):
        if os.path.basename(resolve_checkpoint_dir(run)) == f"step_{cfg.train.steps}":
            log(f"reusing the pretrained model in {run}")
            return run
    data = copy.deepcopy(cfg.data)
    data.source = "embedded"
    docs = cfg.run.path("pretrain-data", f"{cfg.ttt.task.kind}.jsonl")
    if first:
        tokenizer = _embedded_tokenizer(data)  # trained once, cached
        _write_documents(cfg, tokenizer, docs)
    sync()
    if not first:
        tokenizer = _embedded_tokenizer(data)
    pre = copy.deepcopy(cfg)
    pre.run.dir = run
    pre.data.source, pre.data.val_source, pre.data.tokenizer = docs, None, tokenizer.path
    log(f"pretraining on {cfg.ttt.pretrain_documents} {cfg.ttt.task.kind} documents into {run}")
    # resume=True continues a pretraining a stop signal cut short (a fresh start when there is none)
    pretrain(pre, resume=True, resume_hint="run the same megatrain ttt command again to continue")
    sync()  # rank 0 has committed the last checkpoint
    return run


def _write_documents(cfg, tokenizer, docs: str) -> None:
    """ttt.pretrain_documents retrieval documents of ttt.task.kind as jsonl at `docs` (atomically)."""
    from megatrain.data.longcontext import retrieval_document

    os.makedirs(os.path.dirname(docs), exist_ok=True)
    rng = np.random.default_rng([cfg.train.seed, 7])
    low = max(16, cfg.data.seq_len // 4)
    high = max(low + 1, cfg.data.seq_len - 48)
    with open(docs + ".tmp", "w", encoding="utf-8") as fh:
        for _ in range(cfg.ttt.pretrain_documents):
            text = retrieval_document(
                cfg.ttt.task.kind, tokenizer, rng, int(rng.integers(low, high)), keys=cfg.ttt.task.keys
            )
            fh.write(json.dumps({"text": text}) + "\n")
    os.replace(docs + ".tmp", docs)


def markdown_table(records: list[dict], methods) -> str:
    """Accuracy per cell and the FLOPs of each method per example."""
    head = (
        ["length", "depth"]
        + [f"{m} acc" for m in methods]
        + ["qTTT GFLOP", "think tokens", "think GFLOP", "plain GFLOP"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        depth = "-" if r["depth"] is None else f"{r['depth']:.2f}"
        cells = [str(r["length"]), depth] + [f"{r[f'{m}_acc']:.3f}" for m in methods]
        cells += [
            f"{r['flops_qttt'] / 1e9:.3f}",
            str(r["think_tokens"]),
            f"{r['flops_think'] / 1e9:.3f}",
            f"{r['flops_prefill'] / 1e9:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def heatmap(records: list[dict], methods, path: str, title: str = "") -> None:
    """One panel per method: accuracy, depth (rows) x context length (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in records})
    depths = sorted({r["depth"] for r in records if r["depth"] is not None}) or [None]
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods) + 1, 0.5 * len(depths) + 2.2), squeeze=False)
    for ax, method in zip(axes[0], methods):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for r in records:
            grid[depths.index(r["depth"]), lengths.index(r["length"])] = r[f"{method}_acc"]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if not np.isnan(grid[i, j]):
                    ax.text(
                        j,
                        i,
                        f"{grid[i, j]:.2f}",
                        ha="center",
                        va="center",
                        color="white" if grid[i, j] < 0.6 else "black",
                        fontsize=8,
                    )
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), ["-" if d is None else f"{d:.2f}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(method)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_outputs(run_dir: str, records: list[dict], methods, title: str = "") -> None:
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "ttt.jsonl"), "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    with open(os.path.join(run_dir, "ttt.md"), "w", encoding="utf-8") as fh:
        if title:
            fh.write(f"{title}\n\n")
        fh.write(markdown_table(records, methods))
    heatmap(records, methods, os.path.join(run_dir, "ttt.png"), title)


def run_ttt(cfg, log=print) -> list[dict]:
    """Run the qTTT job of `cfg` in this process; returns the per-cell records."""
    from megatrain.config import save_config
    from megatrain.engine.checkpoint import resolve_checkpoint_dir
    from megatrain.engine.load import load_for_inference
    from megatrain.engine.resilience import StopRequest
    from megatrain.env import world_size
    from megatrain.ttt.config import check_against_model
    from megatrain.ttt.evaluate import METHODS, evaluate_cells

    world = world_size()
    init = preflight(cfg, world)
    start = time.perf_counter()
    groups, device = None, "cpu"
    if world > 1:  # one context group (check_layout): every rank runs the job, rank 0 writes and talks
        groups, device, main = _context_group(cfg)
        log = log if main else _quiet
    if init is None:
        init = pretrain_for_ttt(cfg, log, groups)
        done = resolve_checkpoint_dir(init)
        if os.path.basename(done) != f"step_{cfg.train.steps}":  # the trainer stopped on SIGTERM / SIGUSR1
            log(
                f"megatrain: stopped the qTTT job's pretraining at {os.path.basename(done)}; run the same command "
                f"again to continue it"
            )
            return []
    model, tokenizer, model_cfg = load_for_inference(init, device=device)
    check_against_model(cfg, model_cfg)
    writer = groups is None or groups.rank == 0
    if groups is not None:
        from megatrain.parallel.context_parallel import apply_context_parallel

        apply_context_parallel(model, groups)  # what it splits here: each context prefill
    if writer:
        os.makedirs(cfg.run.dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.run.dir, "config.yaml"))
    methods = [m for m in METHODS if m != "think" or cfg.ttt.think]
    t = cfg.ttt
    title = (
        f"qTTT on {t.task.kind}: steps {t.steps} x span {t.span}, lr {t.lr:g}, target {t.target}, "
        f"{t.optimizer}; thinking baseline {2 * t.steps * t.span} tokens; model {init}"
    )
    log(title)
    stop = StopRequest()
    try:
        stop.install()  # SIGTERM / SIGUSR1: stop before the next cell
    except ValueError:
        pass  # not the main thread (an embedding application): it handles signals itself
    try:
        records = evaluate_cells(
            model, tokenizer, cfg, log=log, methods=methods, should_stop=_stop_check(stop, groups, device)
        )
    finally:
        stop.restore()
    if stop.signum:
        cells = len(t.task.context_lengths) * (1 if t.task.kind == "jsonl" else len(t.task.depths))
        log(
            f"megatrain: stopped the qTTT evaluation on {stop.name} after {len(records)} of {cells} cells; nothing "
            f"of it is written (the model it evaluates is kept); run the same command again to evaluate"
        )
        return []
    if writer:
        write_outputs(cfg.run.dir, records, methods, title)
    log(f"wrote {os.path.join(cfg.run.dir, 'ttt.jsonl')}, ttt.md and ttt.png ({time.perf_counter() - start:.0f}s)")
    return records


def _quiet(*args, **kwargs) -> None:
    """The log of the ranks other than 0."""


def _context_group(cfg):
    """Start the process group of a context-parallel job (check_layout: world = parallel.context, tensor 1).
    Returns (groups, device, whether this is rank 0)."""
    from megatrain.engine.deepspeed import init_distributed
    from megatrain.parallel.groups import build_groups

    env = init_distributed(cfg)
    return build_groups(1, context=cfg.parallel.context), env.device, env.is_main


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def _stop_check(stop, groups, device):
    """Asked before each cell: a stop signal on any rank stops every rank of a context group before the same
    cell (one all-reduce), so none waits in a collective the others left."""
    if groups is None:
        return lambda: stop.signum != 0
    from megatrain.generate import _any_rank

    return lambda: _any_rank(stop.signum != 0, device)
