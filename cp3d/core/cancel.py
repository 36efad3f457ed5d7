"""Progress reporting and cooperative cancellation shared by every long core function."""

from __future__ import annotations

import threading
from typing import Callable, Optional

from .errors import Cancelled

# progress(stage, fraction): stage is a short human label ("prediction YX", "dynamics"),
# fraction in [0, 1] is how far that stage has got.
ProgressFn = Callable[[str, float], None]


class CancelToken:
    """Set from any thread (the GUI's Cancel button); checked by the worker between steps."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        """Raise :class:`Cancelled` if cancel() was called."""
        if self._event.is_set():
            raise Cancelled()


def check_cancel(token: Optional[CancelToken]) -> None:
    if token is not None:
        token.check()


def report(progress: Optional[ProgressFn], stage: str, fraction: float) -> None:
    if progress is not None:
        progress(stage, min(max(float(fraction), 0.0), 1.0))
