"""Errors shown to users: each message names the file (when there is one) and the problem."""

from __future__ import annotations

from pathlib import Path


class Cp3dError(Exception):
    """A problem the user can act on. ``str(err)`` is a complete one-line message."""

    def __init__(self, problem: str, path: str | Path | None = None):
        self.problem = problem
        self.path = Path(path) if path is not None else None
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)


class InputError(Cp3dError):
    """The image (or its axes, dtype, values) cannot be segmented as given."""


class TooLargeError(InputError):
    """The volume would not fit in memory in one piece; blockwise segmentation can take it."""


class ModelError(Cp3dError):
    """A model file is missing, corrupt or does not match the network."""


class OutputError(Cp3dError):
    """Results cannot be written where asked."""


class TrainingError(Cp3dError):
    """Training data or settings are unusable."""


class Cancelled(Cp3dError):
    """The user cancelled a long action; nothing half-written was left behind."""

    def __init__(self, problem: str = "cancelled by the user", path: str | Path | None = None):
        super().__init__(problem, path)
