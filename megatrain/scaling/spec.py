"""Sweep files and the plan they expand to: one normal pretraining run config per point (docs/scaling.md).

A sweep YAML names a base run config and what varies over it:

    base: launch/configs/tiny-cpu.yaml    # a run config path (relative to the working directory or to
                                          # the sweep file's folder), or a run config mapping inline
    overrides: {train.warmup_steps: 10}   # dotted keys applied to every run
    dir: runs/my-sweep                    # the sweep directory (runs/, configs/, report/)
    mode: isoflop                         # or grid
    budgets: [1e12, 3e12]                 # isoflop: compute budgets C in FLOPs
    sizes: [1e5, 3e5, {dim: 64, layers: 2}, small-cpu]   # isoflop: target non-embedding parameters,
                                          # explicit width/depth, or a preset name
    axes: {model.linear: [dense, cola]}   # any config key -> values; grid mode also takes the special
                                          # axes `size` (as sizes) and `tokens` (token budget D)
    # A linked axis (axes.variant, or any axis whose values are mappings): named sets of keys that vary
    # together, e.g. a method that is a layer kind plus its rank, or an optimizer:
    # variant: [{name: dense}, {name: cola, model.linear: cola, model.lowrank.rank: 16}]

A study (megatrain.scaling.study, docs/scaling.md) adds `tune` (a key whose best value is chosen per
point, e.g. the learning rate), `seeds` (repeats at the best value) and `study` (its report); `quick`
holds top-level keys that replace the file's own under `--quick` (a minutes-long variant).

In isoflop mode each (budget C, size N) point trains D = C / (6 N) tokens; in grid mode every
combination of the axes is one run. Axes other than size and tokens (e.g. model.linear, optim.name)
multiply both modes and label the runs' method, fitted separately. N is the non-embedding parameter
count: the model without its input embedding and output head (vocab x dim matrices), as Kaplan et al.
count it, computed from the model itself so every model.linear / model.attention kind is exact.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from megatrain.config import Config, _read_structured, load_config
from megatrain.errors import ConfigError

__all__ = [
    "SweepSpec",
    "SweepRun",
    "load_sweep",
    "parse_sweep",
    "plan_runs",
    "check_overrides_kept",
    "model_counts",
    "size_for_params",
    "isoflop_points",
    "SPECIAL_AXES",
    "linked_keys",
    "apply_quick",
    "parse_study",
    "METRIC_GOALS",
]

SPECIAL_AXES = ("size", "tokens")
MODES = ("grid", "isoflop")
_SPEC_KEYS = (
    "base",
    "overrides",
    "dir",
    "mode",
    "axes",
    "budgets",
    "sizes",
    "size_rule",
    "warmup_fraction",
    "min_steps",
    "nproc_per_node",
    "fit",
    "tune",
    "seeds",
    "study",
    "quick",
)
VARIANT_AXIS = "variant"  # axes.variant: [{name: LABEL, key: value, ...}, ...]
TUNE_VALUES = "tune_values"  # in a linked axis' value: that value's own grid of tune.key (a study)
_SIZE_RULE_KEYS = ("aspect", "head_dim")
_FIT_KEYS = ("bootstrap", "max_starts")
_SIZE_KEYS = ("dim", "layers", "heads", "kv_heads", "ffn_dim")


@dataclass
class SweepSpec:
    """A parsed sweep file. `base` is the base run config as a mapping (a path is read)."""

    path: Optional[str]
    base: dict
    dir: str
    mode: str = "grid"
    overrides: dict = field(default_factory=dict)
    axes: dict = field(default_factory=dict)  # config key (or size/tokens) -> list of values
    budgets: list = field(default_factory=list)
    sizes: list = field(default_factory=list)
    aspect: float = 32.0  # width/depth rule: dim / layers
    head_dim: int = 32  # width/depth rule: dim = heads x head_dim
    warmup_fraction: Optional[float] = None  # train.warmup_steps = this x the run's steps
    min_steps: int = 1  # isoflop points with fewer steps are dropped
    nproc_per_node: int = 1
    bootstrap: int = 100
    max_starts: Optional[int] = None
    study: dict = field(default_factory=dict)  # tune / seeds / study sections (megatrain.scaling.study)

    def to_dict(self) -> dict:
        """The spec as a self-contained sweep file (the base inlined), written into the sweep directory."""
        out = {
            "base": self.base,
            "overrides": self.overrides,
            "dir": self.dir,
            "mode": self.mode,
            "axes": self.axes,
            "size_rule": {"aspect": self.aspect, "head_dim": self.head_dim},
            "min_steps": self.min_steps,
            "nproc_per_node": self.nproc_per_node,
            "fit": {"bootstrap": self.bootstrap, "max_starts": self.max_starts},
        }
        if self.mode == "isoflop":
            out.update(budgets=self.budgets, sizes=self.sizes)
        if self.warmup_fraction is not None:
            out["warmup_fraction"] = self.warmup_fraction
        out.update(copy.deepcopy(self.study))
        return out


@dataclass
class SweepRun:
    """One point of the sweep: a normal pretraining run in `<sweep dir>/runs/<name>`."""

    name: str
    config: dict  # the full run config mapping (base + overrides + this point), run.dir set
    axes: dict  # axis -> the value of this point (size as its label)
    method: str  # the non-size, non-token axes' values ("base" when there are none)
    size: str  # label of the model size (preset, dNlM, or "base")
    steps: int
    tokens: int  # D: steps x global batch x seq_len
    params_non_embedding: int
    budget: Optional[float] = None  # isoflop: the compute budget C the point belongs to

    @property
    def flops_6nd(self) -> float:
        return 6.0 * self.params_non_embedding * self.tokens


# ----------------------------------------------------------------------------------------------
# parsing


def load_sweep(path: str, overrides: Optional[list[str]] = None, quick: bool = False) -> SweepSpec:
    """Read and check a sweep file; `overrides` (a.b=c) apply to every run's config. quick: apply the file's
    `quick` section (its top-level keys replace the file's own; `overrides` and `axes` are merged key by key)."""
    data = _read_structured(path, "sweep")
    if quick:
        data = apply_quick(data, path)
    spec = parse_sweep(data, path)
    if overrides:
        from megatrain.config import parse_overrides

        spec.overrides = {**spec.overrides, **_flatten(parse_overrides(overrides))}
    return spec


def apply_quick(data: dict, path: Optional[str] = None) -> dict:
    """The sweep mapping with its `quick` section applied (ConfigError when it has none)."""
    where = f"sweep file '{path}'" if path else "sweep"
    quick = data.get("quick")
    if not isinstance(quick, dict) or not quick:
        raise ConfigError(f"{where}: --quick needs a 'quick' section (top-level keys of the quick variant)")
    if "quick" in quick or "base" in quick:
        raise ConfigError(
            f"{where}: quick.{'quick' if 'quick' in quick else 'base'} is not allowed (the quick "
            f"variant changes keys of the same base)"
        )
    out = {k: copy.deepcopy(v) for k, v in data.items() if k != "quick"}
    for key, value in quick.items():
        if (
            key in ("overrides", "axes", "tune", "seeds", "study")
            and isinstance(value, dict)
            and isinstance(out.get(key), dict)
        ):
            merged = dict(_flatten(out[key])) if key == "overrides" else dict(out[key])
            merged.update(_flatten(value) if key == "overrides" else value)
            out[key] = merged
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_sweep(data: dict, path: Optional[str] = None) -> SweepSpec:
    """A sweep mapping -> SweepSpec. Raises ConfigError (one line naming the key) on anything unknown or bad."""
    where = f"sweep file '{path}'" if path else "sweep"
    unknown = [k for k in data if k not in _SPEC_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}' (allowed: {', '.join(_SPEC_KEYS)})")
    if "base" not in data:
        raise ConfigError(f"{where}: 'base' is missing (a run config path, or a run config mapping)")
    base = data["base"]
    if isinstance(base, str):
        base = _read_structured(_find_base(base, path), "base config")
    elif base is None:
        base = {}
    elif not isinstance(base, dict):
        raise ConfigError(f"{where}: 'base' must be a run config path or mapping, got {type(base).__name__}")
    stem = os.path.splitext(os.path.basename(path))[0] if path else "sweep"
    spec = SweepSpec(path=path, base=copy.deepcopy(base), dir=str(data.get("dir") or os.path.join("runs", stem)))
    spec.mode = data.get("mode", "grid")
    if spec.mode not in MODES:
        raise ConfigError(f"{where}: mode={spec.mode!r} is not allowed (allowed: {', '.join(MODES)})")
    spec.overrides = _flatten(_mapping(data.get("overrides"), f"{where}: overrides"))
    axes = _mapping(data.get("axes"), f"{where}: axes")
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: axes.{key} must be a non-empty list of values")
        if key in ("run.dir", "train.steps") or key.startswith("run."):
            raise ConfigError(
                f"{where}: axes.{key} cannot vary (the sweep sets it per run; use the 'tokens' axis "
                f"for the token budget)"
            )
        if key == VARIANT_AXIS or (key not in SPECIAL_AXES and any(isinstance(v, dict) for v in values)):  # linked
            axes[key] = [_check_variant(v, f"{where}: axes.{key}") for v in values]
    spec.axes = axes
    spec.study = parse_study(data, where, spec.axes)
    rule = _mapping(data.get("size_rule"), f"{where}: size_rule")
    for key in rule:
        if key not in _SIZE_RULE_KEYS:
            raise ConfigError(f"{where}: unknown key 'size_rule.{key}' (allowed: {', '.join(_SIZE_RULE_KEYS)})")
    spec.aspect = _number(rule.get("aspect", spec.aspect), f"{where}: size_rule.aspect", positive=True)
    spec.head_dim = int(_number(rule.get("head_dim", spec.head_dim), f"{where}: size_rule.head_dim", positive=True))
    if spec.head_dim % 2:
        raise ConfigError(f"{where}: size_rule.head_dim={spec.head_dim} must be even (RoPE)")
    if data.get("warmup_fraction") is not None:
        spec.warmup_fraction = _number(data["warmup_fraction"], f"{where}: warmup_fraction")
        if not 0.0 <= spec.warmup_fraction < 1.0:
            raise ConfigError(f"{where}: warmup_fraction must be in [0, 1), got {spec.warmup_fraction}")
    spec.min_steps = int(_number(data.get("min_steps", 1), f"{where}: min_steps", positive=True))
    spec.nproc_per_node = int(_number(data.get("nproc_per_node", 1), f"{where}: nproc_per_node", positive=True))
    fit = _mapping(data.get("fit"), f"{where}: fit")
    for key in fit:
        if key not in _FIT_KEYS:
            raise ConfigError(f"{where}: unknown key 'fit.{key}' (allowed: {', '.join(_FIT_KEYS)})")
    spec.bootstrap = int(_number(fit.get("bootstrap", spec.bootstrap), f"{where}: fit.bootstrap"))
    if fit.get("max_starts") is not None:
        spec.max_starts = int(_number(fit["max_starts"], f"{where}: fit.max_starts", positive=True))
    if spec.mode == "isoflop":
        for key in SPECIAL_AXES:
            if key in axes:
                raise ConfigError(f"{where}: axes.{key} is for mode grid; isoflop takes 'budgets' and 'sizes'")
        budgets = data.get("budgets")
        if not isinstance(budgets, list) or not budgets:
            raise ConfigError(f"{where}: mode isoflop needs 'budgets', a list of compute budgets in FLOPs")
        spec.budgets = [_number(c, f"{where}: budgets", positive=True) for c in budgets]
        sizes = data.get("sizes")
        if not isinstance(sizes, list) or not sizes:
            raise ConfigError(
                f"{where}: mode isoflop needs 'sizes', a list of target parameter counts, "
                f"{{dim, layers}} mappings or preset names"
            )
        spec.sizes = [_check_size(s, f"{where}: sizes") for s in sizes]
    else:
        for key in ("budgets", "sizes"):
            if key in data:
                raise ConfigError(f"{where}: '{key}' is for mode isoflop; in mode grid use axes.size / axes.tokens")
        if "size" in axes:
            axes["size"] = [_check_size(s, f"{where}: axes.size") for s in axes["size"]]
        if "tokens" in axes:
            axes["tokens"] = [_number(t, f"{where}: axes.tokens", positive=True) for t in axes["tokens"]]
    return spec


def _check_variant(entry, what: str) -> dict:
    """One value of axes.variant: {name: LABEL, dotted.key: value, ...} (nested mappings are flattened)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"].strip():
        raise ConfigError(f"{what}: each variant is a mapping with a 'name' and the keys it sets, got {entry!r}")
    keys = _flatten({k: v for k, v in entry.items() if k not in ("name", TUNE_VALUES)})
    bad = next((k for k in keys if k in ("run.dir", "train.steps") or k.startswith("run.")), None)
    if bad:
        raise ConfigError(f"{what}: variant {entry['name']!r} sets {bad}, which the sweep sets per run")
    out = {"name": entry["name"], **keys}
    if TUNE_VALUES in entry:
        values = entry[TUNE_VALUES]
        if not isinstance(values, list) or not values:
            raise ConfigError(
                f"{what}: variant {entry['name']!r}: {TUNE_VALUES} must be a non-empty list (this "
                f"variant's own values of tune.key)"
            )
        out[TUNE_VALUES] = list(values)
    return out


def linked_keys(spec) -> list:
    """The config keys the sweep's linked axes set (collected per run, so reports can plot against them)."""
    keys = []
    for values in spec.axes.values():
        for value in values:
            if isinstance(value, dict) and "name" in value:
                keys += [k for k in value if k not in ("name", TUNE_VALUES) and k not in keys]
    return keys


def variant_label(value) -> Any:
    """The label of an axis value: a variant's name, any other value itself."""
    return value["name"] if isinstance(value, dict) and "name" in value else value


def _expand_point(combo: dict) -> dict:
    """Axis values -> the dotted keys they set (a variant sets each of its keys)."""
    out = {}
    for key, value in combo.items():
        if isinstance(value, dict) and "name" in value:  # a linked axis' value (axes.variant, named mappings)
            out.update({k: v for k, v in value.items() if k not in ("name", TUNE_VALUES)})
        else:
            out[key] = value
    return out


def _find_base(base: str, sweep_path: Optional[str]) -> str:
    if os.path.isfile(base) or sweep_path is None or os.path.isabs(base):
        return base
    beside = os.path.join(os.path.dirname(sweep_path), base)
    return beside if os.path.isfile(beside) else base


def _mapping(value, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{what} must be a mapping, got {type(value).__name__}")
    return dict(value)


def _number(value, what: str, positive: bool = False) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(out) or (positive and out <= 0):
        raise ConfigError(f"{what} must be a {'positive ' if positive else ''}finite number, got {value!r}")
    return out


def _check_size(entry, what: str):
    """A size entry: a preset name, a target non-embedding parameter count, or a {dim, layers, ...} mapping."""
    from megatrain.models.config import PRESETS

    if isinstance(entry, str):
        try:
            return _number(entry, what, positive=True)  # "1e5" written as a string
        except ConfigError:
            if entry not in PRESETS:
                raise ConfigError(
                    f"{what}: '{entry}' is neither a preset ({', '.join(PRESETS)}) nor a number"
                ) from None
            return entry
    if isinstance(entry, dict):
        unknown = [k for k in entry if k not in _SIZE_KEYS]
        if unknown or "dim" not in entry or "layers" not in entry:
            raise ConfigError(
                f"{what}: a size mapping needs dim and layers (optional heads, kv_heads, ffn_dim), got {entry}"
            )
        return {k: int(_number(v, f"{what}.{k}", positive=True)) for k, v in entry.items()}
    return _number(entry, what, positive=True)


def _flatten(nested: dict, prefix: str = "") -> dict:
    """{'train': {'lr': 1}} or {'train.lr': 1} -> {'train.lr': 1}."""
    out = {}
    for key, value in nested.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and full != "deepspeed" and not full.startswith("deepspeed."):
            out.update(_flatten(value, full + "."))
        else:
            out[full] = value
    return out


def _set_dotted(config: dict, key: str, value: Any) -> None:
    node = config
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


# ----------------------------------------------------------------------------------------------
# sizes


def model_counts(model_cfg, seq_len: int) -> dict:
    """Parameter and FLOP counts of the model `model_cfg` describes (built on the meta device: no memory).

    Returns params (all), params_non_embedding (without the input embedding and the output head),
    flops_per_token (training FLOPs per token at `seq_len`: the trainer's MFU accounting,
    `Transformer.flops_per_token`).
    """
    from megatrain.models.transformer import Transformer

    model = Transformer(model_cfg, seed=0, device="meta")
    head = 0 if model.head.weight is model.embed.weight else model.head.weight.numel()
    return {
        "params": model.num_params(non_embedding=False),
        "params_non_embedding": model.num_params(non_embedding=True) - head,
        "flops_per_token": model.flops_per_token(seq_len),
    }


def _size_overrides(dim: int, layers: int, heads: int, kv_heads: int, ffn_dim: int) -> dict:
    return {
        "model.dim": dim,
        "model.layers": layers,
        "model.heads": heads,
        "model.kv_heads": kv_heads,
        "model.ffn_dim": ffn_dim,
    }


def _derived_ffn(dim: int, multiple_of: int) -> int:
    """The model's own SwiGLU rule (ModelConfig.resolved): 8/3 dim rounded up to multiple_of."""
    hidden = int(8 * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def size_for_params(target: float, base_model, seq_len: int, aspect: float, head_dim: int) -> dict:
    """Width and depth for about `target` non-embedding parameters: the width/depth rule.

    Depth from the aspect ratio (N ~ 12 layers dim^2 with dim = aspect x layers gives layers =
    (N / (12 aspect^2))^(1/3), at least 1), then the number of heads (dim = heads x head_dim, MHA,
    SwiGLU 8/3 dim rounded to model.multiple_of) whose exact count is closest to the target in log.
    Returns the model.* overrides.
    """
    layers = max(1, round((target / (12.0 * aspect * aspect)) ** (1.0 / 3.0)))
    best, best_err = None, math.inf
    heads = 1
    while True:
        dim = heads * head_dim
        sizes = _size_overrides(dim, layers, heads, heads, _derived_ffn(dim, base_model.multiple_of))
        n = model_counts(_with_model(base_model, sizes), seq_len)["params_non_embedding"]
        err = abs(math.log(n / target))
        if err < best_err:
            best, best_err = sizes, err
        if n > target:
            return best
        heads += 1


def _with_model(base_model, model_overrides: dict):
    """A copy of the ModelConfig `base_model` with `model.*` dotted overrides applied (vocab kept)."""
    fields = {k.split(".", 1)[1]: v for k, v in model_overrides.items()}
    return dataclasses.replace(base_model, **fields)


def _size_label(entry, overrides: dict) -> str:
    if isinstance(entry, str):
        return entry
    return f"d{overrides['model.dim']}l{overrides['model.layers']}"


# ----------------------------------------------------------------------------------------------
# the plan


def isoflop_points(budgets: list, params: list, tokens_per_step: int, min_steps: int = 1) -> list[tuple]:
    """(budget C, size index, steps, tokens) of every IsoFLOP point: D = C / (6 N) rounded to whole steps of
    `tokens_per_step` tokens; points with fewer than `min_steps` steps are dropped."""
    out = []
    for C in budgets:
        for i, n in enumerate(params):
            steps = max(1, round(C / (6.0 * n) / tokens_per_step))
            if steps >= min_steps:
                out.append((C, i, steps, steps * tokens_per_step))
    return out


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}".replace("+", "")
    return str(value)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def _compose(spec: SweepSpec, point: dict) -> dict:
    config = copy.deepcopy(spec.base)
    for key, value in {**spec.overrides, **point}.items():
        _set_dotted(config, key, value)
    return config


def _load(config: dict, where: str) -> Config:
    """Validate a run config mapping through the one loader (load_config); ConfigError names the run."""
    with tempfile.TemporaryDirectory(prefix="megatrain-sweep-") as tmp:
        path = os.path.join(tmp, "config.yaml")
        with open(path, "w", encoding="utf-8") as fh:
            yaml.safe_dump(config, fh, sort_keys=False)
        try:
            return load_config(path)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None


def plan_runs(spec: SweepSpec) -> list[SweepRun]:
    """Expand the sweep into its runs (validated run configs; nothing is written)."""
    _load(_compose(spec, {}), "base config")  # a bad base is named as such, before any axis
    other_axes = {k: v for k, v in spec.axes.items() if k not in SPECIAL_AXES}
    combos = [dict(zip(other_axes, values)) for values in itertools.product(*other_axes.values())] or [{}]
    runs: list[SweepRun] = []
    for combo in combos:
        method = ", ".join(f"{k}={_fmt(variant_label(v))}" for k, v in combo.items()) or "base"
        method_cfg = _load(_compose(spec, _expand_point(combo)), f"axes {method}")
        model = method_cfg.model.resolved()
        seq_len = method_cfg.data.seq_len
        if model.vocab_size is None:
            model.vocab_size = method_cfg.data.vocab_size  # counts here never include vocab-sized matrices
        tokens_per_step = _tokens_per_step(method_cfg, spec.nproc_per_node)
        if spec.mode == "isoflop":
            sizes = [_size_point(s, model, seq_len, spec) for s in spec.sizes]
            for C, i, steps, tokens in isoflop_points(
                spec.budgets, [n for _, _, n in sizes], tokens_per_step, spec.min_steps
            ):
                label, size_overrides, n = sizes[i]
                runs.append(
                    _run(spec, combo, method, label, size_overrides, n, steps, tokens, C, [f"C{_fmt(C)}", label])
                )
        else:
            size_entries = spec.axes.get("size", [None])
            token_entries = spec.axes.get("tokens", [None])
            for size_entry, token_budget in itertools.product(size_entries, token_entries):
                if size_entry is None:
                    label, size_overrides = "base", {}
                    n = model_counts(model, seq_len)["params_non_embedding"]
                else:
                    label, size_overrides, n = _size_point(size_entry, model, seq_len, spec)
                steps = (
                    max(1, round(token_budget / tokens_per_step))
                    if token_budget is not None
                    else method_cfg.train.steps
                )
                parts = ([label] if size_entry is not None else []) + (
                    [f"T{_fmt(float(token_budget))}"] if token_budget is not None else []
                )
                runs.append(
                    _run(spec, combo, method, label, size_overrides, n, steps, steps * tokens_per_step, None, parts)
                )
    names = [r.name for r in runs]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise ConfigError(
            f"sweep: two points are both named '{duplicate}' (repeated axis values or sizes "
            f"that round to the same model)"
        )
    if not runs:
        raise ConfigError(f"sweep: no runs (every isoflop point has fewer than min_steps={spec.min_steps} steps)")
    return runs


def check_overrides_kept(runs: list[SweepRun], overrides: Optional[list[str]]) -> None:
    """The command line's overrides (`megatrain sweep FILE a.b=c`) must reach every run as given. A key the
    sweep sets per run itself (an axis, the size rule's model keys, the steps of a budget or a token
    axis, warmup_fraction's warm-up, run.dir) would replace the override silently: ConfigError instead."""
    if not overrides:
        return
    from megatrain.config import parse_overrides

    missing = object()
    for key, value in _flatten(parse_overrides(overrides)).items():
        for run in runs:
            got = _flatten(run.config).get(key, missing)
            if got != value:
                shown = "nothing" if got is missing else repr(got)
                raise ConfigError(
                    f"sweep: the override {key}={value!r} would not reach run {run.name}, where the "
                    f"sweep sets {shown} (an axis, a size, the steps of a budget, warmup_fraction or "
                    f"run.dir); change the sweep file (or --dir) instead"
                )


def _tokens_per_step(cfg: Config, nproc: int) -> int:
    resolved = copy.deepcopy(cfg).resolve(nproc)
    return resolved.train.global_batch * resolved.data.seq_len


def _size_point(entry, model, seq_len: int, spec: SweepSpec) -> tuple[str, dict, int]:
    """(label, model.* overrides, non-embedding params) of a size entry."""
    from megatrain.models.config import PRESETS

    if isinstance(entry, str):
        preset = PRESETS[entry]
        overrides = {"model.preset": entry, **{f"model.{k}": preset[k] for k in _SIZE_KEYS if k in preset}}
    elif isinstance(entry, dict):
        dim = entry["dim"]
        heads = entry.get("heads", max(1, dim // spec.head_dim))
        overrides = _size_overrides(
            dim,
            entry["layers"],
            heads,
            entry.get("kv_heads", heads),
            entry.get("ffn_dim", _derived_ffn(dim, model.multiple_of)),
        )
    else:
        overrides = size_for_params(entry, model, seq_len, spec.aspect, spec.head_dim)
    try:
        n = model_counts(_with_model(model, overrides), seq_len)["params_non_embedding"]
    except ConfigError as exc:
        raise ConfigError(f"sweep: size {entry}: {exc}") from None
    return _size_label(entry, overrides), overrides, n


def _run(
    spec: SweepSpec,
    combo: dict,
    method: str,
    label: str,
    size_overrides: dict,
    n: int,
    steps: int,
    tokens: int,
    budget: Optional[float],
    name_parts: list,
) -> SweepRun:
    point = {**_expand_point(combo), **size_overrides, "train.steps": steps}
    if spec.warmup_fraction is not None:
        point["train.warmup_steps"] = int(spec.warmup_fraction * steps)
    name_parts = name_parts + [f"{k.rsplit('.', 1)[-1]}-{_fmt(variant_label(v))}" for k, v in combo.items()]
    name = _slug("_".join(name_parts) or "run")
    point["run.dir"] = os.path.join(spec.dir, "runs", name)
    config = _compose(spec, point)
    _load(config, f"run {name}")
    axes = {k: variant_label(v) for k, v in combo.items()}
    if spec.mode == "grid":
        if "size" in spec.axes:
            axes["size"] = label
        if "tokens" in spec.axes:
            axes["tokens"] = tokens
    return SweepRun(
        name=name,
        config=config,
        axes=axes,
        method=method,
        size=label,
        steps=steps,
        tokens=tokens,
        params_non_embedding=n,
        budget=budget,
    )


# ----------------------------------------------------------------------------------------------
# study sections (tune, seeds, study; run by megatrain.scaling.study)

# Columns a study may tune on or report (the collected table's numeric results; megatrain.scaling.collect).
METRIC_GOALS = {
    "best_val_loss": "min",
    "final_val_loss": "min",
    "final_val_ppl": "min",
    "best_val_ppl": "min",
    "final_loss": "min",
    "final_val_exact_match": "max",
    "final_val_answer_acc": "max",
    "best_val_exact_match": "max",
    "train_s": "min",
    "wall_s": "min",
    "params": None,
    "params_non_embedding": None,
    "optimizer_bytes": None,
    "model_state_bytes": None,
    "tokens": None,
    "flops": None,
}
_TUNE_KEYS = ("key", "values", "metric", "goal")
_SEED_KEYS = ("key", "values")
_STUDY_KEYS = ("title", "metrics", "baseline", "plots", "notes")
_PLOT_KEYS = ("x", "y", "group", "panel", "logx", "logy", "title", "where")
_BASELINE_KEYS = ("axis", "value", "metric")


def _unknown(section: dict, allowed: tuple, what: str) -> None:
    bad = [k for k in section if k not in allowed]
    if bad:
        raise ConfigError(f"{what}: unknown key '{bad[0]}' (allowed: {', '.join(allowed)})")


def _metric(name, what: str) -> str:
    if name not in METRIC_GOALS:
        raise ConfigError(f"{what}={name!r} is not a result column (allowed: {', '.join(METRIC_GOALS)})")
    return name


def parse_study(data: dict, where: str, axes: dict) -> dict:
    """The tune / seeds / study sections of a sweep mapping, checked ({} for a plain sweep)."""
    out = {}
    tune = _mapping(data.get("tune"), f"{where}: tune")
    seeds = _mapping(data.get("seeds"), f"{where}: seeds")
    study = _mapping(data.get("study"), f"{where}: study")
    if tune:
        _unknown(tune, _TUNE_KEYS, f"{where}: tune")
        key, values = tune.get("key"), tune.get("values")
        if not isinstance(key, str) or not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: tune needs 'key' (a config key) and 'values' (a non-empty list)")
        metric = _metric(tune.get("metric", "best_val_loss"), f"{where}: tune.metric")
        goal = tune.get("goal", METRIC_GOALS[metric] or "min")
        if goal not in ("min", "max"):
            raise ConfigError(f"{where}: tune.goal={goal!r} is not allowed (allowed: min, max)")
        out["tune"] = {"key": key, "values": list(values), "metric": metric, "goal": goal}
    if seeds:
        _unknown(seeds, _SEED_KEYS, f"{where}: seeds")
        key, values = seeds.get("key", "train.seed"), seeds.get("values")
        if not isinstance(key, str) or not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: seeds needs 'values' (a non-empty list; key defaults to train.seed)")
        if len(set(map(str, values))) != len(values):
            raise ConfigError(f"{where}: seeds.values repeats a value: {values}")
        out["seeds"] = {"key": key, "values": list(values)}
    for section in ("tune", "seeds"):
        if section in out:
            key = out[section]["key"]
            if key in axes:
                raise ConfigError(
                    f"{where}: {section}.key={key} is also an axis; a key is either tuned, seeded or an axis"
                )
            if key in ("run.dir", "train.steps") or key.startswith("run."):
                raise ConfigError(f"{where}: {section}.key={key} cannot vary (the sweep sets it per run)")
    if "tune" in out and "seeds" in out and out["tune"]["key"] == out["seeds"]["key"]:
        raise ConfigError(f"{where}: tune.key and seeds.key are both {out['tune']['key']}")
    if study:
        _unknown(study, _STUDY_KEYS, f"{where}: study")
        metrics = study.get("metrics", ["best_val_loss"])
        if not isinstance(metrics, list) or not metrics:
            raise ConfigError(f"{where}: study.metrics must be a non-empty list of result columns")
        checked = {
            "title": str(study.get("title") or "Study"),
            "notes": str(study.get("notes") or ""),
            "metrics": [_metric(m, f"{where}: study.metrics") for m in metrics],
            "plots": [],
        }
        baseline = _mapping(study.get("baseline"), f"{where}: study.baseline")
        if baseline:
            _unknown(baseline, _BASELINE_KEYS, f"{where}: study.baseline")
            if baseline.get("axis") not in axes:
                raise ConfigError(
                    f"{where}: study.baseline.axis={baseline.get('axis')!r} is not an axis of the "
                    f"sweep (axes: {', '.join(axes) or 'none'})"
                )
            checked["baseline"] = {
                "axis": baseline["axis"],
                "value": baseline.get("value"),
                "metric": _metric(baseline.get("metric", checked["metrics"][0]), f"{where}: study.baseline.metric"),
            }
        plots = study.get("plots") or []
        if not isinstance(plots, list):
            raise ConfigError(f"{where}: study.plots must be a list of {{x, y, group, panel}} mappings")
        for i, plot in enumerate(plots):
            plot = _mapping(plot, f"{where}: study.plots[{i}]")
            _unknown(plot, _PLOT_KEYS, f"{where}: study.plots[{i}]")
            if "x" not in plot or "y" not in plot:
                raise ConfigError(f"{where}: study.plots[{i}] needs x (an axis or config key) and y (a result column)")
            _metric(plot["y"] if plot["y"] != "gap" else "final_val_ppl", f"{where}: study.plots[{i}].y")
            if plot["y"] == "gap" and "baseline" not in checked:
                raise ConfigError(f"{where}: study.plots[{i}].y=gap needs study.baseline")
            checked["plots"].append(plot)
        out["study"] = checked
    if out and "seeds" not in out:
        out["seeds"] = {"key": "train.seed", "values": [None]}  # one seed: the base config's
    return out
