"""`config_field`: a dataclass field carrying the help text (and allowed values) of one config key.

Every config dataclass (the run's sections in megatrain/config.py, the model's in
megatrain/models/config.py) declares its keys with it, so `megatrain config --reference` can print
each key's default and meaning, and the loader can refuse values outside `choices`.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any, Iterable, Optional


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
