"""Config loading, overrides and every config error (one line, naming the key)."""

import copy
import json
import os

import pytest

from megatrain.config import Config, config_reference, load_config, parse_overrides, validate
from megatrain.engine.deepspeed import build_ds_config
from megatrain.errors import ConfigError


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_defaults_yaml_and_overrides_layer(tmp_path):
    path = write(tmp_path, "train:\n  lr: 1.0e-3\n  steps: 50\nmodel:\n  preset: tiny\n")
    cfg = load_config(path, ["train.steps=70", "model.dim=128", "data.source=[a.txt, b.txt]", "train.lr=2e-3"])
    assert cfg.train.steps == 70
    assert cfg.train.lr == 2e-3  # YAML reads "2e-3" as a string; float fields accept it
    assert cfg.model.dim == 128 and cfg.model.resolved().layers == 2
    assert cfg.data.source == ["a.txt", "b.txt"]
    assert cfg.optim.name == "adamw"


def test_shipped_configs_load():
    for name in ("tiny-cpu", "125m", "1.3b", "7b"):
        cfg = load_config(f"launch/configs/{name}.yaml")
        assert cfg.model.resolved().dim > 0


@pytest.mark.parametrize(
    "name, world, layout",
    [
        ("7b-tp8", 32, (8, 1, 1, 4)),  # TP 8 per node x 4 nodes
        ("7b-pp2-tp8", 16, (8, 2, 1, 1)),  # 2 nodes: PP=2 across them, TP=8 inside each
        ("long-context-c8", 8, (1, 1, 8, 1)),  # one node: a 32k sequence over 8 ranks
    ],
)
def test_multi_node_configs_resolve_at_their_world_size(name, world, layout):
    """The large layouts pass every check a launch makes at their world size (the batch arithmetic, heads and
    layers split by TP / C / PP), and the plan holds them well inside an 80 GB GPU in bf16."""
    from megatrain.engine.memory_plan import plan_memory

    cfg = load_config(f"launch/configs/{name}.yaml", ["train.dtype=bf16"]).resolve(world)
    p = cfg.parallel
    assert (p.tensor, p.pipeline, p.context, world // (p.tensor * p.pipeline * p.context)) == layout
    assert plan_memory(cfg, world).total_bytes < 40 * 2**30


@pytest.mark.parametrize(
    "override, fragment",
    [
        (["train.stepz=3"], "unknown config key 'train.stepz'"),
        (["trian.steps=3"], "unknown config key 'trian'"),
        (["train.steps=abc"], "train.steps must be an integer"),
        (["train.steps=1.5"], "train.steps must be an integer"),
        (["train.lr=fast"], "train.lr must be a number"),
        (["model.tie_embeddings=maybe"], "model.tie_embeddings must be true or false"),
        (["parallel.zero_stage=4"], "parallel.zero_stage=4 is not allowed (allowed: 0, 1, 2, 3)"),
        (["model.preset=huge"], "model.preset='huge' is not allowed"),
        (["model.heads=5"], "model.heads=5 does not divide model.dim=64"),
        (["model.kv_heads=3"], "model.kv_heads=3 does not divide model.heads=4"),
        (["data.seq_len=1"], "data.seq_len must be >= 2"),
        (["train.warmup_steps=-1"], "train.warmup_steps must be >= 0"),
        (["train.stop_after=0"], "train.stop_after must be in [1"),
        (["train.steps"], "is not of the form section.key=value"),
        (["model.linear=sparse"], "model.linear='sparse' is not allowed"),
        (["optim.name=lion"], "optim.name='lion' is not allowed"),
    ],
)
def test_bad_values_raise_one_line(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, override)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="train must be a mapping"):
        load_config(write(tmp_path, "train: 3\n"))


@pytest.mark.parametrize(
    "world, kw, expect",
    [
        (2, dict(micro_batch=4, global_batch=16), 2),
        (1, dict(micro_batch=4, global_batch=16), 4),
        (4, dict(micro_batch=2, grad_accum=3), 3),
    ],
)
def test_batch_arithmetic(world, kw, expect):
    cfg = Config()
    for k, v in kw.items():
        setattr(cfg.train, k, v)
    cfg.resolve(world)
    assert cfg.train.grad_accum == expect
    assert cfg.train.global_batch == cfg.train.micro_batch * cfg.train.grad_accum * world


def test_impossible_batch_arithmetic():
    cfg = Config()
    cfg.train.micro_batch, cfg.train.global_batch = 4, 18
    with pytest.raises(ConfigError, match=r"train.global_batch=18 is not a multiple of train.micro_batch x DP = 4 x 2"):
        cfg.resolve(2)
    cfg = Config()
    cfg.train.micro_batch, cfg.train.grad_accum, cfg.train.global_batch = 4, 2, 16
    with pytest.raises(ConfigError, match=r"train.global_batch=16 != train.micro_batch x train.grad_accum x DP"):
        cfg.resolve(1)


def test_batch_checked_against_launcher_world_size(monkeypatch):
    """Under a launcher (WORLD_SIZE set) the preflight resolves the batch for that world size, before any
    process group starts; loading the config does not look at the environment."""
    from megatrain.engine.trainer import preflight

    monkeypatch.setenv("WORLD_SIZE", "3")
    cfg = load_config(None, ["train.micro_batch=2", "train.global_batch=8"])
    assert cfg.train.grad_accum is None
    with pytest.raises(ConfigError, match="not a multiple"):
        preflight(cfg, None, int(os.environ["WORLD_SIZE"]))


class _NoEnvironment(dict):
    """Stands in for os.environ: any read fails the test."""

    def _fail(self, *args, **kwargs):
        raise AssertionError(f"validation read the environment: {args}")

    __getitem__ = get = __contains__ = __iter__ = keys = items = _fail


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.micro_batch=2", "train.global_batch=8"],
        ["model.linear=relora", "train.steps=300"],
        ["model.attention=iha", "model.iha.schedule=flop_matched", "model.iha.window=8"],
        ["optim.name=galore", "optim.rank=8", "parallel.zero_stage=0", "train.dtype=auto"],
        ["parallel.tensor=2", "model.kv_heads=1", "data.source=task:multikey", "data.seq_len=64"],
    ],
)
def test_validation_reads_no_environment_and_changes_nothing(monkeypatch, overrides):
    import megatrain.data.tasks  # noqa: F401  (imported first: importing reads the environment, validating must not)

    cfg = load_config(None, overrides)
    before = copy.deepcopy(cfg)
    monkeypatch.setattr(os, "environ", _NoEnvironment())
    validate(cfg)
    monkeypatch.undo()
    assert cfg == before
    assert cfg.train.grad_accum is None and cfg.train.relora.every is None


def test_resolve_fills_defaults_and_checks_the_machine():
    cfg = load_config(None, ["model.linear=relora", "train.steps=300", "train.micro_batch=2"]).resolve(4)
    assert (cfg.train.grad_accum, cfg.train.global_batch) == (1, 8)
    assert (cfg.train.relora.every, cfg.train.relora.restart_warmup) == (30, 1)
    galore = ["optim.name=galore", "optim.rank=8", "parallel.zero_stage=0"]
    load_config(None, galore).resolve(1, cuda=False)  # train.dtype=auto: fp32 on CPU
    with pytest.raises(ConfigError, match="optim.name=galore with parallel.zero_stage=0 and bf16 is not supported"):
        load_config(None, galore).resolve(1, cuda=True)  # auto: bf16 on GPUs
    with pytest.raises(ConfigError, match="optim.name=galore with parallel.zero_stage=0 and bf16 is not supported"):
        load_config(None, [*galore, "train.dtype=bf16"])  # explicit bf16: refused whatever the machine


def test_unknown_kernel_backend_is_one_config_error(monkeypatch):
    from megatrain.engine.trainer import resolve_config

    monkeypatch.setenv("MEGATRAIN_KERNELS", "cuda")
    with pytest.raises(ConfigError, match="MEGATRAIN_KERNELS='cuda' is not allowed \\(allowed: auto, torch, triton\\)"):
        resolve_config(load_config(None, []), 1)


def test_deepspeed_section_and_json(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(
        json.dumps(
            {
                "zero_optimization": {"stage": 3, "overlap_comm": True},
                "train_micro_batch_size_per_gpu": 2,
                "gradient_accumulation_steps": "auto",
            }
        )
    )
    cfg = load_config(None, ["train.global_batch=8"], deepspeed_json=str(ds))
    assert cfg.parallel.zero_stage == 3 and cfg.train.micro_batch == 2
    cfg.resolve(2)
    out = build_ds_config(cfg)
    assert out["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert out["gradient_accumulation_steps"] == 2 and out["train_batch_size"] == 8
    assert out["zero_allow_untested_optimizer"] is True

    cfg = load_config(None, ["deepspeed.optimizer.type=Adam"])
    cfg.resolve(1)
    with pytest.raises(ConfigError, match="deepspeed.optimizer is not used"):
        build_ds_config(cfg)
    cfg = load_config(None, ["deepspeed.zero_optimization.stage=1", "parallel.zero_stage=2"])
    cfg.resolve(1)
    with pytest.raises(ConfigError, match="disagrees with parallel.zero_stage=2"):
        build_ds_config(cfg)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(None, None, deepspeed_json=str(bad))


def test_parse_overrides_nested():
    assert parse_overrides(["a.b.c=1", "a.d=x", "e=true"]) == {"a": {"b": {"c": 1}, "d": "x"}, "e": True}


def test_reference_lists_every_contract_key():
    ref = config_reference()
    for key in (
        "run.dir",
        "model.preset",
        "model.dim",
        "model.layers",
        "model.heads",
        "model.kv_heads",
        "model.vocab_size",
        "model.linear",
        "model.attention",
        "data.source",
        "data.seq_len",
        "data.tokenizer",
        "train.steps",
        "train.micro_batch",
        "train.grad_accum",
        "train.global_batch",
        "train.seed",
        "train.lr",
        "train.stop_after",
        "optim.name",
        "parallel.tensor",
        "parallel.sequence",
        "parallel.zero_stage",
        "checkpoint.every",
        "checkpoint.keep",
    ):
        assert f"| `{key}` |" in ref, key


@pytest.mark.parametrize(
    "override, message",
    [
        ("rl.eval.k=[1, x]", "rl.eval.k[1] must be an integer, got 'x'"),
        ("rl.eval.k=8", "rl.eval.k must be a list of integers, got 8"),
        ("rl.pipeline=[grpo, 3]", "rl.pipeline[1] must be a string, got 3"),
        ("rl.pipeline=5", "rl.pipeline must be a string or a list of strings, got 5"),
        ("rl.checkpoints=[step_5, 1.5]", "rl.checkpoints[1] must be a string or an integer, got 1.5"),
        ("rl.checkpoints=7", "rl.checkpoints must be a string or a list of strings or integers, or null, got 7"),
        ("rl.task.levels=[1, true]", "rl.task.levels[1] must be an integer, got True"),
        ("rl.pretrain.overrides=[train.steps=2, 3]", "rl.pretrain.overrides[1] must be a string, got 3"),
        ("ttt.task.context_lengths=[256, long]", "ttt.task.context_lengths[1] must be an integer, got 'long'"),
        ("ttt.task.depths=[0.5, deep]", "ttt.task.depths[1] must be a number, got 'deep'"),
        ("data.source=123", "data.source must be a string or a list of strings, got 123"),
        ("data.val_source=[a.txt, {x: 1}]", "data.val_source[1] must be a string, got {'x': 1}"),
    ],
)
def test_list_keys_check_every_element(override, message):
    """A typed list key (`rl.eval.k: list[int]`, `rl.pipeline: str | list[str]`, ...): a bad element or a
    value of the wrong shape is one line naming the key (the element's index) and what it may hold."""
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == message


def test_list_keys_accept_their_forms():
    cfg = load_config(
        None,
        [
            "rl.pipeline=[grpo, sft]",
            "rl.checkpoints=[step_5, 500]",
            "ttt.task.depths=[0, 1]",
            "rl.eval.k=[1, '2']",
            "data.val_source=null",
        ],
    )
    assert cfg.rl.pipeline == ["grpo", "sft"] and cfg.rl.checkpoints == ["step_5", 500]
    assert cfg.ttt.task.depths == [0.0, 1.0] and all(isinstance(d, float) for d in cfg.ttt.task.depths)
    assert cfg.rl.eval.k == [1, 2] and cfg.data.val_source is None
    cfg = load_config(None, ["rl.pipeline=sft", "rl.checkpoints=all", "data.source=corpus.txt"])
    assert (cfg.rl.pipeline, cfg.rl.checkpoints, cfg.data.source) == ("sft", "all", "corpus.txt")


def test_no_config_key_is_loosely_typed():
    """Every key names what it holds (no `Any`, no bare `list`), so the loader checks every element."""
    import dataclasses
    import typing

    def loose(schema, prefix):
        hints = typing.get_type_hints(schema)
        for f in dataclasses.fields(schema):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                yield from loose(tp, f"{prefix}.{f.name}")
                continue
            parts = [tp, *typing.get_args(tp)]
            parts += [a for p in parts for a in typing.get_args(p)]
            if any(p is typing.Any or p is list or p is dict for p in parts):
                yield f"{prefix}.{f.name}"

    bad = [
        key
        for name, section in Config().sections()
        if dataclasses.is_dataclass(section)
        for key in loose(type(section), name)
    ]
    assert bad == []


def _section_keys(schema, prefix):
    """Every key of the config dataclass `schema` under `prefix`, nested sections flattened."""
    import dataclasses

    for f in dataclasses.fields(schema):
        default = getattr(schema(), f.name)
        if dataclasses.is_dataclass(default):
            yield from _section_keys(type(default), f"{prefix}.{f.name}")
        else:
            yield f"{prefix}.{f.name}"


def test_the_jobs_own_their_sections_and_the_loader_knows_them():
    """rl.* and ttt.* are defined (schema and checks) in megatrain/rl/config.py and megatrain/ttt/config.py,
    registered with the loader: the reference lists every key in the file's order, overrides and YAML reach
    them, and they are saved like the built-in sections."""
    from megatrain.config import registered_sections
    from megatrain.rl.config import RLConfig
    from megatrain.ttt.config import TTTConfig

    assert registered_sections() == {"rl": RLConfig, "ttt": TTTConfig}
    assert [name for name, _ in Config().sections()] == [
        "run",
        "model",
        "data",
        "train",
        "optim",
        "parallel",
        "checkpoint",
        "log",
        "rl",
        "ttt",
        "deepspeed",
    ]
    assert list(Config().to_dict()) == [name for name, _ in Config().sections()]
    ref = config_reference().splitlines()
    keys = [line.split("`")[1] for line in ref[2:]]
    jobs = [*_section_keys(RLConfig, "rl"), *_section_keys(TTTConfig, "ttt")]
    assert len(jobs) > 50 and "rl.eval.k" in jobs and "ttt.task.depths" in jobs
    start = keys.index("rl.init")
    assert keys[start : start + len(jobs)] == jobs and keys[start - 1].startswith("log.") and keys[-1] == "deepspeed"
    cfg = load_config(None, ["rl.eval.samples=4", "ttt.task.kind=needle"])
    assert isinstance(cfg.rl, RLConfig) and (cfg.rl.eval.samples, cfg.ttt.task.kind) == (4, "needle")
    assert cfg.to_dict()["rl"]["eval"]["samples"] == 4 and cfg != Config()


def test_a_section_registered_from_outside(monkeypatch, tmp_path):
    """A user's job registers its own section the same way; the built-in names are refused."""
    import dataclasses

    from megatrain import config as config_module
    from megatrain.config import register_section
    from megatrain.fields import config_field

    @dataclasses.dataclass
    class ToyConfig:
        sizes: list[int] = config_field([1, 2], "Toy sizes.")

    monkeypatch.setattr(config_module, "_SECTIONS", dict(config_module._SECTIONS))
    register_section("toy", ToyConfig)
    register_section("toy", ToyConfig)  # the same schema again (a re-imported module) is harmless
    path = write(tmp_path, "toy:\n  sizes: [3, 4]\n")
    assert load_config(path).toy.sizes == [3, 4] and Config().toy.sizes == [1, 2]
    assert "| `toy.sizes` | `[1, 2]` | Toy sizes. |" in config_reference()
    assert [name for name, _ in Config().sections()][-2:] == ["toy", "deepspeed"]
    with pytest.raises(ConfigError, match=r"^toy.sizes\[0\] must be an integer, got 'x'$"):
        load_config(None, ["toy.sizes=[x]"])
    with pytest.raises(ValueError, match="built in"):
        register_section("train", ToyConfig)
    with pytest.raises(ValueError, match="registered twice"):
        register_section("toy", dataclasses.make_dataclass("Other", []))


def test_galore_fira_on_lowrank_factors():
    """GaLore/Fira project CoLA and SLTrain factors (rank up to the layers' rank); ReLoRA/LoRA refused."""
    from megatrain.config import load_config

    load_config(None, ["model.linear=cola", "model.lowrank.rank=16", "optim.name=galore", "optim.rank=8"])
    load_config(None, ["model.linear=sltrain", "model.lowrank.rank=16", "optim.name=fira", "optim.rank=16"])
    with pytest.raises(ConfigError, match=r"optim.rank=32 exceeds model.lowrank.rank=16"):
        load_config(None, ["model.linear=cola", "model.lowrank.rank=16", "optim.name=galore", "optim.rank=32"])
    for kind in ("relora", "lora"):
        with pytest.raises(ConfigError, match=f"optim.name=galore with model.linear={kind} is not supported"):
            load_config(None, [f"model.linear={kind}", "optim.name=galore", "optim.rank=8"])


def _numeric_keys(obj=None, prefix=""):
    """(key, is_list) of every int/float config key (Optional too) and every list-of-numbers key."""
    import dataclasses
    import typing

    from megatrain.config import Config

    if obj is None:  # the built-in sections and the registered ones (rl, ttt)
        for name, section in Config().sections():
            if dataclasses.is_dataclass(section):
                yield from _numeric_keys(section, name + ".")
        return
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, key, tp = getattr(obj, f.name), f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(value):
            yield from _numeric_keys(value, key + ".")
            continue
        if typing.get_origin(tp) is list:
            if set(typing.get_args(tp)) & {int, float}:
                yield key, True
            continue
        args = set(typing.get_args(tp)) or {tp}
        if args & {int, float} and not isinstance(value, bool):
            yield key, False


def test_every_numeric_key_refuses_nan_and_infinity():
    keys = list(_numeric_keys())
    assert len(keys) > 60 and ("train.lr", False) in keys and ("ttt.task.depths", True) in keys
    for key, is_list in keys:
        for raw in (".nan", "nan", ".inf", "-.inf", "inf", "-Infinity"):
            value = f"[{raw}]" if is_list else raw
            with pytest.raises(ConfigError) as err:
                load_config(None, [f"{key}={value}"])
            message = str(err.value)
            assert message.startswith(key) and "\n" not in message, (key, raw, message)
    # YAML's own float forms reach the same check through a config file too.
    from megatrain.fields import parse_number

    for value in (float("nan"), float("inf"), -float("inf"), "1e999"):
        with pytest.raises(ConfigError, match="finite"):
            parse_number("x", value, integer=False)
    assert parse_number("x", "1e-3", integer=False) == 1e-3 and parse_number("x", "12", integer=True) == 12
