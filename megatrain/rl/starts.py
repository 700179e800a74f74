"""Where an RL job starts: the pretraining run it may train first, and the start checkpoints it reads.

Everything here runs before any process group (the job's preflight) or on rank 0 alone, and fails with
one line (MegatrainError) before anything is written.
"""

from __future__ import annotations

import copy
import dataclasses
import os

from megatrain.config import Config, load_config
from megatrain.distributed import barrier
from megatrain.engine import checkpoint as ckpt
from megatrain.engine.hf_import import import_hf_llama
from megatrain.errors import CheckpointError, ConfigError
from megatrain.files import sha256_file


@dataclasses.dataclass
class Start:
    """A checkpoint an excursion starts from."""

    path: str  # checkpoint directory
    step: int  # its pretraining step
    name: str  # sub-run folder: from_step_N


def pretrain_config(cfg: Config) -> Config:
    p = cfg.rl.pretrain
    overrides = list(p.overrides) + [f"run.dir={os.path.join(cfg.run.dir, 'pretrain')}"]
    try:
        pre = load_config(p.config, overrides)
    except ConfigError as exc:
        raise ConfigError(f"rl.pretrain.config '{p.config}': {exc}") from None
    if p.task_fraction > 0:
        mix = os.path.join(cfg.run.dir, "pretrain", "arithmetic.jsonl")
        sources = pre.data.source if isinstance(pre.data.source, list) else [pre.data.source]
        pre.data.source = [*sources, mix]
        if pre.data.val_source is None and "embedded" in sources:
            pre.data.val_source = "embedded"
    return pre


def mix_count(pre: Config, fraction: float, levels) -> int:
    """Problems to mix in so they make about `fraction` of the pretraining characters."""
    from megatrain.data.sources import resolve_sources

    files = [f for f in resolve_sources(pre.data.source[:-1], "data.source")]
    chars = 0
    for f in files:
        size = os.path.getsize(f)
        chars += size * (3 if f.endswith(".gz") else 1)  # gzip'd prose: about 3x smaller
    from megatrain.rl.tasks import arithmetic_problem

    sample = arithmetic_problem(0, 2, 0, list(levels))
    per_problem = len(sample.prompt) + len(sample.solution) + 2
    return max(1, int(fraction / (1 - fraction) * chars / per_problem))


def pretrain_done(pre: Config) -> bool:
    root = ckpt.checkpoint_root(pre.run.dir)
    tag = ckpt.read_latest(root)
    return tag is not None and ckpt.read_meta(os.path.join(root, tag))["step"] >= pre.train.steps


def _checkpoint_of(path: str, key: str) -> str:
    """A checkpoint directory from a run directory (its latest) or a checkpoint directory."""
    path = ckpt.resolve_checkpoint_dir(os.path.normpath(path))
    if not os.path.isfile(os.path.join(path, ckpt.META_FILE)):
        raise CheckpointError(f"{key}: '{path}' is not a megatrain run or checkpoint directory (no {ckpt.META_FILE})")
    return path


def resolve_starts(rl_cfg, init: str) -> list[Start]:
    """The start checkpoints: rl.init itself, or rl.checkpoints of its run (`all` or a list)."""
    first = _checkpoint_of(init, "rl.init")
    chosen = rl_cfg.checkpoints
    if chosen is None:
        paths = [first]
    else:
        root = os.path.dirname(first)
        available = sorted(
            (int(n[5:]), n)
            for n in os.listdir(root)
            if n.startswith("step_") and n[5:].isdigit() and os.path.isfile(os.path.join(root, n, ckpt.META_FILE))
        )
        if chosen == "all":
            paths = [os.path.join(root, n) for _, n in available]
        else:
            paths = []
            names = {n for _, n in available}
            for item in chosen:
                name = f"step_{item}" if isinstance(item, int) or str(item).isdigit() else str(item)
                if name not in names:
                    raise CheckpointError(
                        f"rl.checkpoints: '{name}' is not a complete checkpoint of '{root}' "
                        f"(available: {', '.join(n for _, n in available) or 'none'})"
                    )
                paths.append(os.path.join(root, name))
    starts = []
    first_meta = ckpt.read_meta(first)
    for path in paths:
        meta = ckpt.read_meta(path)
        if meta["model"] != first_meta["model"] or _tokenizer_sha(path) != _tokenizer_sha(first):
            raise CheckpointError(f"rl.checkpoints: '{path}' holds a different model or tokenizer than '{first}'")
        starts.append(Start(path=path, step=int(meta["step"]), name=f"from_step_{meta['step']}"))
    return starts


def _tokenizer_sha(path: str) -> str:
    return sha256_file(os.path.join(path, "tokenizer.model"))


def check_start(cfg: Config, start: Start) -> None:
    """A start checkpoint must fit the run: data.tokenizer (when given) and model.* (when set) agree."""
    if cfg.data.tokenizer != "auto":
        ckpt.check_tokenizer(
            cfg.data.tokenizer, os.path.join(start.path, "tokenizer.model"), f"checkpoint '{start.path}'"
        )
    saved = ckpt.read_meta(start.path)["model"]
    defaults = dataclasses.asdict(type(cfg.model)())
    for key, value in dataclasses.asdict(cfg.model).items():
        if key in ckpt.MODEL_KEYS and value != defaults.get(key) and value != saved.get(key):
            raise CheckpointError(
                f"checkpoint '{start.path}' was written with model.{key}={saved.get(key)!r} but "
                f"this run sets model.{key}={value!r}"
            )


def check_hf_init(cfg: Config, folder: str) -> None:
    """rl.init naming a Hugging Face Llama folder: what megatrain import will refuse, refused now (no tensor read)."""
    from megatrain.engine.load import source_model

    if cfg.rl.checkpoints is not None:
        raise ConfigError(
            f"rl.checkpoints needs rl.init to be a megatrain run (a series of checkpoints); "
            f"'{folder}' is a Hugging Face folder"
        )
    _, tokenizer = source_model(folder)
    if tokenizer is None:
        raise CheckpointError(
            f"rl.init: '{folder}' has no sentencepiece tokenizer.model (megatrain reads "
            f"sentencepiece tokenizers only; megatrain import --tokenizer can add one)"
        )


def import_hf_init(cfg: Config, folder: str, env) -> str:
    """rl.init naming a Hugging Face folder: rank 0 imports it into RUN/init once (megatrain import), so the
    excursions start from an ordinary run directory. Returns that directory. Collective."""
    imported = cfg.run.path("init")
    if env.is_main and not os.path.isdir(imported):
        import_hf_llama(folder, imported)
    barrier()
    return imported


def with_mix_placeholder(pre: Config) -> Config:
    """The pretraining config for its preflight, without the mix file that does not exist yet."""
    if cfg_has_mix(pre):
        probe = copy.deepcopy(pre)
        probe.data.source = pre.data.source[:-1]
        return probe
    return pre


def cfg_has_mix(pre: Config) -> bool:
    return isinstance(pre.data.source, list) and str(pre.data.source[-1]).endswith("arithmetic.jsonl")
