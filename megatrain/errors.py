"""Errors that mean "the user's input is wrong": reported as one line, exit code 2.

Everything else (a bug, a crashed collective) is allowed to raise with its traceback.
"""


class MegatrainError(Exception):
    """Base of all user-facing errors; the message is the single line shown to the user."""


class ConfigError(MegatrainError):
    """A config key is unknown, has the wrong type, or an impossible value/combination."""


class DataError(MegatrainError):
    """A data or tokenizer file is missing, empty, unreadable or not UTF-8."""


class CheckpointError(MegatrainError):
    """A checkpoint is missing, corrupt, or does not match the run's config."""
