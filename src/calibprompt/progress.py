"""One progress-bar style for long loops: description, bar, done/total, items per second, ETA."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

__all__ = ["UnitDisplay", "rate_progress", "unit_progress"]


def rate_progress(enabled: bool = True, unit: str = "img", rate_label: str | None = None) -> Progress:
    """A transient rich progress bar; tasks carry a ``rate`` field shown as ``<rate> <unit>/s``
    (or, with ``rate_label``, as ``<rate_label> <rate>``: e.g. the last epoch's loss)."""
    shown = f"{rate_label} {{task.fields[rate]}}" if rate_label else f"{{task.fields[rate]}} {unit}/s"
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn(shown), TimeRemainingColumn(), disable=not enabled, transient=True)


class UnitDisplay:
    """Counts of independent units: done and failed (incremented), running (set)."""

    def __init__(self, bar: Progress, task: int) -> None:
        self.bar, self.task = bar, task
        self.done = self.failed = self.running = 0

    def update(self, done: int = 0, failed: int = 0, running: int | None = None) -> None:
        self.done += done
        self.failed += failed
        if running is not None:
            self.running = running
        self.bar.update(self.task, advance=done + failed, running=self.running, failed=self.failed)


@contextmanager
def unit_progress(enabled: bool, description: str, total: int) -> Iterator[UnitDisplay]:
    """One bar for a set of independent units (runs, images): done/total, running, failed, ETA."""
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[running]} running, {task.fields[failed]} failed"),
                   TimeRemainingColumn(), disable=not enabled, transient=True)
    with bar:
        yield UnitDisplay(bar, bar.add_task(description, total=total, running=0, failed=0))
