"""The one base class of every error a user can cause (bad config, bad file, bad name).

Each module raises its own subclass with one sentence naming the value and the fix; the CLI
catches this base in one place and prints that sentence instead of a traceback.
"""

from __future__ import annotations


class DalleDataError(ValueError):
    """A user or data error; the message says what was wrong and what to do."""


class TrainError(DalleDataError):
    """An input that cannot be trained on; the message names it and says what to do."""


class CheckpointError(DalleDataError):
    """A checkpoint (or VQGAN file) that dalle-data cannot load, rebuild or save, and why."""


class DalleDataWarning(UserWarning):
    """Something the user should know that is not an error; the CLI prints it as one line."""
