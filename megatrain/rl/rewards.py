"""Verifiable rewards: `reward(prompt, completion, answer) -> float`.

The built-in `math_reward` scores 1.0 for the exact numeric answer after a marker (`#### 42` or
`\\boxed{42}`), the format score (default 0.1) for a well-formed but wrong answer, else 0.
Any function with that signature plugs in through `rl.reward: my_pkg.my_module.my_fn`.
"""

from __future__ import annotations

import functools
import importlib
import math
import numbers
import re
from fractions import Fraction
from typing import Callable, Optional

from megatrain.errors import ConfigError, MegatrainError

DEFAULT_REWARD = "megatrain.rl.rewards.math_reward"

_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_HASH = re.compile(r"####\s*(" + _NUMBER + r")(?![\d.])")
_BOXED = re.compile(r"\\boxed\{\s*(" + _NUMBER + r")\s*\}")

Reward = Callable[[str, str, str], float]


class RewardError(MegatrainError):
    """A reward function raised or returned something that is not a finite number."""


def parse_number(text: str) -> Optional[Fraction]:
    """'1,234' -> 1234, '-3.50' -> -7/2; None when `text` is not a number."""
    text = str(text).strip().replace(",", "")
    if not re.fullmatch(r"[-+]?\d+(?:\.\d+)?", text):
        return None
    return Fraction(text)


def extract_answer(completion: str) -> Optional[str]:
    """The number after the first answer marker (`#### N` or `\\boxed{N}`), or None.

    The earliest marker in the text counts: a model that writes two answers is judged on its first.
    """
    found = [m for m in (_HASH.search(completion), _BOXED.search(completion)) if m is not None]
    if not found:
        return None
    return min(found, key=lambda m: m.start()).group(1)


def math_reward(prompt: str, completion: str, answer: str, format_score: float = 0.1) -> float:
    """1.0 for the exact numeric answer after a marker, `format_score` for a marker followed by a
    wrong number, 0.0 without a well-formed answer. `answer` is the reference number as text."""
    got = extract_answer(completion)
    if got is None:
        return 0.0
    want = parse_number(answer)
    return 1.0 if want is not None and parse_number(got) == want else float(format_score)


def load_reward(path: str, format_score: float = 0.1) -> Reward:
    """The reward named by dotted `path` (`pkg.module.fn`); the built-in gets `format_score` bound."""
    if path == DEFAULT_REWARD:
        return functools.partial(math_reward, format_score=format_score)
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ConfigError(f"rl.reward={path!r} is not a dotted path (expected package.module.function)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"rl.reward={path!r}: cannot import module '{module_name}' ({exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"rl.reward={path!r}: module '{module_name}' has no function '{attr}'")
    return fn


def score(fn: Reward, prompt: str, completion: str, answer: str, name: str = "") -> float:
    """fn(prompt, completion, answer) as a float; RewardError (one line naming the function and the
    sample) when it raises or returns something that is not a finite number."""
    label = name or getattr(fn, "__qualname__", repr(fn))
    sample = f"prompt {prompt[-60:]!r}, completion {completion[:60]!r}"
    try:
        value = fn(prompt, completion, answer)
    except Exception as exc:  # a user's function: any failure ends the run with one line
        raise RewardError(f"rl.reward {label} raised {type(exc).__name__}: {exc} on {sample}") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise RewardError(f"rl.reward {label} returned {value!r} (expected a finite number) on {sample}")
    return float(value)
