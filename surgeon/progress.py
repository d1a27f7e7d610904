"""Progress bars for the long work (reading a checkpoint, hashing, quantizing, writing), on stderr.

A bar shows only on a terminal, and only once the work has taken longer than `DELAY` seconds, so
short work stays quiet; it is transient (erased when done). `SURGEON_PROGRESS=1` forces bars at
once, even off a terminal (tests, logs); `SURGEON_PROGRESS=0` never shows one. The CLI's `--json`
switches them off (`settings(enabled=False)`), whatever the variable says: its output is for
programs. When off, `track` hands back the iterable itself and `working` does nothing, so the
work costs what it cost without bars.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")

DELAY = 0.5  # seconds of work before a bar is worth showing
ENABLED = True  # False: no bars at all (the CLI's --json)
_console: Console | None = None  # the CLI's stderr console: a bar then nests under its status line


def _mode() -> str:
    """"off", "forced" (show at once, even off a terminal) or "auto" (a terminal, after DELAY)."""
    if not ENABLED:
        return "off"
    forced = os.environ.get("SURGEON_PROGRESS", "").strip()
    if forced in ("0", "1"):
        return "forced" if forced == "1" else "off"
    stream = sys.stderr
    return "auto" if stream is not None and stream.isatty() else "off"


@contextmanager
def settings(*, enabled: bool = True, console: Console | None = None) -> Iterator[None]:
    """For one command: whether bars may show, and the console to draw them on."""
    global ENABLED, _console
    before = ENABLED, _console
    ENABLED, _console = enabled, console
    try:
        yield
    finally:
        ENABLED, _console = before


def _target_console() -> Console:
    if _console is not None and _console.is_terminal:
        return _console
    return Console(stderr=True, force_terminal=True)  # forced off a terminal: draw it all the same


class _Bar:
    """One bar, drawn only when DELAY passes before the work ends (or at once when forced). A timer
    thread draws it, so one long step (a big tensor, one write) is covered too."""

    def __init__(self, description: str, total: int | None, forced: bool) -> None:
        self.description, self.total, self.forced = description, total, forced
        self.done = 0
        self.lock = threading.Lock()
        self.progress: Progress | None = None
        self.timer: threading.Timer | None = None
        self.closed = False

    def __enter__(self) -> _Bar:
        if self.forced:
            self._show()
        else:
            self.timer = threading.Timer(DELAY, self._show)
            self.timer.daemon = True
            self.timer.start()
        return self

    def _show(self) -> None:
        with self.lock:
            if self.closed or self.progress is not None:
                return
            columns = [TextColumn("{task.description}"), BarColumn()]
            columns += [MofNCompleteColumn()] if self.total is not None else []
            self.progress = Progress(*columns, TimeElapsedColumn(), console=_target_console(), transient=True)
            self.progress.start()
            self.task = self.progress.add_task(self.description, total=self.total, completed=self.done)

    def advance(self, steps: int = 1) -> None:
        with self.lock:
            self.done += steps
            if self.progress is not None:
                self.progress.update(self.task, completed=self.done)

    def __exit__(self, *exc: object) -> None:
        if self.timer is not None:
            self.timer.cancel()
        with self.lock:
            self.closed = True
            if self.progress is not None:
                self.progress.stop()


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterable[T]:
    """`items` as they come, with a bar of `total` steps while they take long enough to matter."""
    mode = _mode()
    if mode == "off":
        return items
    return _tracked(items, description, total, mode == "forced")


def _tracked(items: Iterable[T], description: str, total: int | None, forced: bool) -> Iterator[T]:
    with _Bar(description, total, forced) as bar:
        for item in items:
            yield item
            bar.advance()


@contextmanager
def working(description: str) -> Iterator[None]:
    """A bar without steps around one long call (writing a file, a library's load)."""
    mode = _mode()
    if mode == "off":
        yield
        return
    with _Bar(description, None, mode == "forced"):
        yield
