"""Rich progress bars with ETA for long work; silenced by ``--quiet`` (``set_quiet(True)``) or OPTISCOPE_QUIET=1."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
_QUIET = os.environ.get("OPTISCOPE_QUIET", "") not in ("", "0")


def set_quiet(quiet: bool) -> None:
    """Turn progress bars off (``True``) or back on (``False``) for this process (the CLI's ``--quiet``)."""
    global _QUIET
    _QUIET = bool(quiet)


def quiet_requested() -> bool:
    """Whether ``--quiet`` was asked for: :func:`set_quiet` or ``OPTISCOPE_QUIET=1`` (read now, so that a worker's
    environment counts); one-line notes such as the probe budget are silenced by this, not by a missing terminal."""
    return _QUIET or os.environ.get("OPTISCOPE_QUIET", "") not in ("", "0")


def is_quiet() -> bool:
    """Whether progress bars are off: :func:`quiet_requested`, or stderr is not a terminal (unless
    ``OPTISCOPE_PROGRESS=1`` forces them)."""
    return quiet_requested() or not sys.stderr.isatty() and os.environ.get("OPTISCOPE_PROGRESS", "") in ("", "0")


class _NullTask:
    def advance(self, n: float = 1) -> None:
        pass

    def update(self, **kwargs) -> None:
        pass


class _Task:
    def __init__(self, progress, task_id):
        self._p, self._id = progress, task_id

    def advance(self, n: float = 1) -> None:
        self._p.advance(self._id, n)

    def update(self, **kwargs) -> None:
        self._p.update(self._id, **kwargs)


@contextmanager
def progress_task(description: str, total: float | None) -> Iterator[_Task | _NullTask]:
    """``with progress_task("training adam", total=T) as task: ... task.advance()`` (bar with ETA on stderr)."""
    if is_quiet():
        yield _NullTask()
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("eta"), TimeRemainingColumn(), console=Console(stderr=True), transient=True,
    ) as p:
        yield _Task(p, p.add_task(description, total=total))


def track(iterable: Iterable[T], description: str, total: float | None = None) -> Iterator[T]:
    """Iterate with a progress bar (no-op when quiet)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with progress_task(description, total) as task:
        for x in iterable:
            yield x
            task.advance()
