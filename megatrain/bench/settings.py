"""The settings a benchmark compares: short `key=value` lists over one base config.

A setting is written `mb=4,zero=2,ac=1` (comma-separated; several settings are separate arguments or
separated by `;`). Short keys name the knobs people compare; any full config key (`train.dtype=bf16`)
works too. `kernels` is not a config key: it sets MEGATRAIN_KERNELS for that setting's run.
`procs` is the number of processes (default: parallel.tensor x parallel.pipeline x parallel.context, i.e.
DP=1; `pp=2` alone runs two pipeline stages on two processes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megatrain.errors import ConfigError

# short key -> config key
ALIASES: dict[str, str] = {
    "mb": "train.micro_batch",
    "micro_batch": "train.micro_batch",
    "zero": "parallel.zero_stage",
    "zero_stage": "parallel.zero_stage",
    "tp": "parallel.tensor",
    "pp": "parallel.pipeline",
    "pipeline": "parallel.pipeline",
    "cp": "parallel.context",
    "context": "parallel.context",
    "sp": "parallel.sequence",
    "ac": "train.activation_checkpointing",
    "activation_checkpointing": "train.activation_checkpointing",
    "compile": "train.compile",
    "dtype": "train.dtype",
}
KERNEL_CHOICES = ("auto", "torch", "triton")
_TRUE = {
    "1": "true",
    "true": "true",
    "yes": "true",
    "on": "true",
    "0": "false",
    "false": "false",
    "no": "false",
    "off": "false",
}


@dataclass
class Setting:
    """One column of the comparison: config overrides plus how to run it."""

    label: str
    overrides: list[str] = field(default_factory=list)
    kernels: Optional[str] = None  # MEGATRAIN_KERNELS for this setting (None: leave the environment alone)
    procs: Optional[int] = None  # processes (None: one data-parallel rank of the model-parallel layout)

    def process_count(self, tensor: int, pipeline: int = 1, context: int = 1) -> int:
        """The processes this setting runs on: `procs`, else tensor x pipeline x context (DP = 1)."""
        model_parallel = tensor * pipeline * context
        procs = self.procs if self.procs is not None else model_parallel
        if procs % model_parallel:
            what = " x ".join(
                f"{key}={value}"
                for key, value in (
                    ("parallel.tensor", tensor),
                    ("parallel.pipeline", pipeline),
                    ("parallel.context", context),
                )
                if value > 1 or key == "parallel.tensor"
            )
            raise ConfigError(f"setting '{self.label}': procs={procs} is not a multiple of {what}")
        return procs

    def to_dict(self) -> dict:
        return {"label": self.label, "overrides": list(self.overrides), "kernels": self.kernels, "procs": self.procs}


def parse_setting(text: str) -> Setting:
    """'mb=4,zero=2' -> Setting. Raises ConfigError naming the bad item and the allowed keys."""
    text = text.strip()
    if text in ("", "base"):
        return Setting(label="base")
    overrides, kernels, procs = [], None, None
    for item in text.split(","):
        item = item.strip()
        if "=" not in item:
            raise ConfigError(f"--settings '{text}': '{item}' is not key=value")
        key, value = (part.strip() for part in item.split("=", 1))
        if key == "kernels":
            if value not in KERNEL_CHOICES:
                raise ConfigError(f"--settings '{text}': kernels={value} (allowed: {', '.join(KERNEL_CHOICES)})")
            kernels = value
            continue
        if key == "procs":
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"--settings '{text}': procs={value} (allowed: a positive integer)")
            procs = int(value)
            continue
        if key in ALIASES:
            full = ALIASES[key]
            if full in ("train.activation_checkpointing", "train.compile", "parallel.sequence"):
                value = _TRUE.get(value.lower(), value)
        elif "." in key:
            full = key
        else:
            raise ConfigError(
                f"--settings '{text}': unknown key '{key}' (allowed: {', '.join(ALIASES)}, kernels, "
                f"procs, or a full config key such as train.dtype)"
            )
        overrides.append(f"{full}={value}")
    return Setting(label=text, overrides=overrides, kernels=kernels, procs=procs)


def parse_settings(items: Optional[list[str]]) -> list[Setting]:
    """Each item one setting, or several separated by ';'. No items: one setting, the base config."""
    texts = [part for item in (items or []) for part in item.split(";") if part.strip()]
    settings = [parse_setting(t) for t in texts] or [Setting(label="base")]
    labels = [s.label for s in settings]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ConfigError(f"--settings lists {', '.join(duplicates)} more than once")
    return settings
