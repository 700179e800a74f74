"""`config_field`: a dataclass field carrying the help text (and allowed values) of one config key.

Every config dataclass (the run's sections in megatrain/config.py, the model's in
megatrain/models/config.py) declares its keys with it, so `megatrain config --reference` can print
each key's default and meaning, and the loader can refuse values outside `choices`.

`parse_number` is how the loader reads the value of every numeric key (int or float, alone or in a
list): NaN and infinity are refused like any other out-of-range value, whatever key they are given to.

`declare_section_module` names a module that adds a section of its own to the run's config (the RL
job's `rl.*` in megatrain/rl/config.py, qTTT's `ttt.*` in megatrain/ttt/config.py): the package root
declares those, and megatrain.config imports every declared module before it builds a Config, so
each process knows every section without the central config importing up into the jobs.
"""

from __future__ import annotations

import math
from dataclasses import field
from typing import Any, Iterable, Optional

from megatrain.errors import ConfigError


def config_field(default: Any, help: str, choices: Optional[Iterable] = None, **kwargs):
    """A dataclass field with `help` (and `choices`) in its metadata.

    A dict passed as `choices` stays live: its keys are read at every check, so a registry (the
    projection kinds of models/layers.py) extends the allowed values as kinds are registered.
    A list or dict default is copied for every instance.
    """
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = choices.keys() if isinstance(choices, dict) else list(choices)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kwargs)
    return field(default=default, metadata=meta, **kwargs)


def parse_number(key: str, value: Any, integer: bool):
    """`value` (a YAML number or a string such as "1e-3") as an int (`integer`) or a float.

    Raises ConfigError naming `key` for anything else: booleans, non-numbers, and NaN or +-infinity
    (`.nan`, `nan`, `inf`, or `1e999`, which overflows to infinity), which no key allows.
    """
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{key} must be {kind}, got {value!r}")
    try:
        out = int(value) if integer else float(value)
    except (ValueError, OverflowError):
        raise ConfigError(f"{key} must be {kind}, got {value!r}") from None
    if integer and isinstance(value, float):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if not integer and not math.isfinite(out):
        raise ConfigError(f"{key} must be a finite number (NaN and infinity are not allowed), got {value!r}")
    return out


_SECTION_MODULES: list[str] = []


def declare_section_module(module: str) -> None:
    """Declare `module` (a dotted name) as one that registers a config section when imported.

    The module calls `megatrain.config.register_section(name, schema)` at import time; megatrain.config
    imports the declared modules, in the order declared, before it first needs the list of sections.
    Sections appear in that order in a saved config and in `megatrain config --reference`.
    """
    if module not in _SECTION_MODULES:
        _SECTION_MODULES.append(module)


def section_modules() -> tuple[str, ...]:
    """The declared section modules, in the order declared."""
    return tuple(_SECTION_MODULES)
